"""Exceptions raised by the checkpoint converters.

Every failure of :func:`converters.read_scvi_checkpoint` is a :class:`ConverterError`, except
:class:`FileNotFoundError` for a path that does not exist.
"""

from __future__ import annotations

__all__ = [
    "CheckpointPathError",
    "ConverterError",
    "MalformedCheckpointError",
    "UnsafeCheckpointError",
    "UnsupportedModelError",
]


class ConverterError(Exception):
    """Base class of every error raised while reading a foreign checkpoint."""


class UnsafeCheckpointError(ConverterError):
    """The file asks to run code: a pickle global off the allowlist, or a forbidden opcode.

    The message names the global as ``module.name`` (for example ``posix.system``). Nothing named
    by the file has been imported or called when this is raised.
    """


class MalformedCheckpointError(ConverterError):
    """The file is not a well-formed checkpoint.

    Raised for empty, truncated or non-zip files, a missing ``data.pkl`` or storage record, size
    caps exceeded, missing files of a saved-model directory, missing or unexpected state-dict keys,
    shapes that disagree, and weights holding NaN or infinity.
    """


class UnsupportedModelError(ConverterError):
    """The checkpoint is well formed but is not a LinearSCVI model we can mirror exactly.

    Examples: an SCVI or SCANVI model, ``dispersion="gene-cell"``, ``gene_likelihood="normal"``,
    ``batch_representation="embedding"`` or encoded covariates.
    """


class CheckpointPathError(ConverterError, ValueError):
    """The path and prefix do not name one model: a prefix given with a file, or a folder holding
    several models and no prefix to choose one. The message lists what was found."""
