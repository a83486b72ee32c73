"""linear-decoder-jax: an exact, torch-free JAX mirror of scvi-tools' LinearSCVI (LDVAE).

>>> import linear_decoder_jax as ldj                       # doctest: +SKIP
>>> ldj.convert("scvi_model/", "model_ldj/")                # doctest: +SKIP
>>> model = ldj.load("model_ldj/")                          # doctest: +SKIP
>>> result = ldj.ablate(model, adata)                       # doctest: +SKIP
"""

from linear_decoder_jax._version import __version__
from linear_decoder_jax.api import AffineDecoders, LinearSCVI, ablate, convert, load
from linear_decoder_jax.config import DataRegistry, LDVAEConfig, ModelSpec
from linear_decoder_jax.errors import (
    CheckpointFormatError,
    ConfigError,
    IncompatibleDataError,
    LDJError,
    OutputExistsError,
)
from linear_decoder_jax.model import AffineDecoder, Decoded, Posterior
from linear_decoder_jax.results import AblationResult

__all__ = [
    "AblationResult",
    "AffineDecoder",
    "AffineDecoders",
    "CheckpointFormatError",
    "ConfigError",
    "DataRegistry",
    "Decoded",
    "IncompatibleDataError",
    "LDJError",
    "LDVAEConfig",
    "LinearSCVI",
    "ModelSpec",
    "OutputExistsError",
    "Posterior",
    "__version__",
    "ablate",
    "convert",
    "load",
]
