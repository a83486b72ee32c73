"""Exception classes of the runtime package.

The converter's own errors live in ``converters`` (``ConverterError`` and subclasses); the CLI maps
both families to one-line messages.
"""

from __future__ import annotations


class LDJError(Exception):
    """Base class of every error raised on purpose by linear_decoder_jax."""


class IncompatibleDataError(LDJError, ValueError):
    """The AnnData does not fit the model (genes, categories, counts, layer)."""


class CheckpointFormatError(LDJError):
    """A linear-decoder-jax checkpoint directory is missing, malformed or of another version."""


class OutputExistsError(LDJError, FileExistsError):
    """A destination exists and ``overwrite`` was not given."""


class ConfigError(LDJError, ValueError):
    """A model configuration or an option value is not supported."""


class GeneSetError(LDJError, ValueError):
    """A gene-set file or collection is malformed, or no set fits the model's genes."""
