"""linear-decoder-jax: an exact, torch-free JAX mirror of scvi-tools' LinearSCVI (LDVAE).

>>> import linear_decoder_jax as ldj                       # doctest: +SKIP
>>> ldj.convert("scvi_model/", "model_ldj/")                # doctest: +SKIP
>>> model = ldj.load("model_ldj/")                          # doctest: +SKIP
>>> result = ldj.ablate(model, adata, groupby="cell_type")  # doctest: +SKIP

Names are imported on first use (PEP 562), so ``ldj --help`` starts without importing jax, and
``ldj.pl`` (plotting) imports matplotlib only when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from linear_decoder_jax._version import __version__

_EXPORTS = {
    "AblationResult": "results",
    "AffineDecoder": "model",
    "AffineDecoders": "api",
    "CheckpointFormatError": "errors",
    "ConfigError": "errors",
    "DRVI": "api",
    "DataRegistry": "config",
    "Decoded": "model",
    "DistributedError": "errors",
    "GeneSetError": "errors",
    "IncompatibleDataError": "errors",
    "LDJError": "errors",
    "LDVAEConfig": "config",
    "LinearSCVI": "api",
    "ModelSpec": "config",
    "OutputExistsError": "errors",
    "Posterior": "model",
    "ablate": "api",
    "compare": "matching",
    "convert": "api",
    "enable_compilation_cache": "_cache",
    "enrichment": "genesets",
    "read_gmt": "genesets",
    "load": "api",
    "train": "training.trainer",
}

_SUBMODULES = ("module", "pl")

__all__ = ["__version__", *sorted(_EXPORTS), *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"linear_decoder_jax.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'linear_decoder_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"linear_decoder_jax.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from linear_decoder_jax import module, pl
    from linear_decoder_jax._cache import enable_compilation_cache
    from linear_decoder_jax.api import DRVI, AffineDecoders, LinearSCVI, ablate, convert, load
    from linear_decoder_jax.config import DataRegistry, LDVAEConfig, ModelSpec
    from linear_decoder_jax.errors import (
        CheckpointFormatError,
        ConfigError,
        DistributedError,
        GeneSetError,
        IncompatibleDataError,
        LDJError,
        OutputExistsError,
    )
    from linear_decoder_jax.genesets import enrichment, read_gmt
    from linear_decoder_jax.matching import compare
    from linear_decoder_jax.model import AffineDecoder, Decoded, Posterior
    from linear_decoder_jax.results import AblationResult
    from linear_decoder_jax.training.trainer import train
