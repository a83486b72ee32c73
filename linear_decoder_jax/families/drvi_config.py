"""DRVI's static configuration: ``DRVIConfig``, stdlib only (``config.ModelSpec`` reads it
without importing jax; the model's functions are in ``families.drvi``)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from linear_decoder_jax.errors import ConfigError

SplitMethod = Literal["split", "split_map", "split_diag", "power"]
SplitAggregation = Literal["logsumexp", "sum", "sum_plus", "max"]
ReuseWeights = Literal["everywhere", "last", "intermediate", "nowhere", "not_first"]
Where = Literal["encoder", "decoder", "none", "both"]
CovariateModeling = Literal["one_hot", "emb"]
GeneLikelihood = Literal["pnb", "nb", "poisson"]
Dispersion = Literal["gene", "gene-batch"]
VarActivation = Literal["exp", "pow2", "2sig"]
Activation = Literal["elu", "relu"]

_MEAN_ACTIVATION = re.compile(
    r"identity|relu|gelu|leaky_relu(_[0-9.eE+-]+)?|elu(_[0-9.eE+-]+)?|celu(_[0-9.eE+-]+)?"
)


def _check_choice(name: str, value: Any, literal: Any) -> None:
    allowed = get_args(literal)
    if value not in allowed:
        msg = f"Expected {name} to be one of {allowed}, got {value!r} instead."
        raise ConfigError(msg)


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        msg = f"Expected {name} to be a positive integer, got {value!r} instead."
        raise ConfigError(msg)


def in_part(where: str, part: Literal["encoder", "decoder"]) -> bool:
    """drvi-py's "encoder" / "decoder" / "none" / "both" switches (``DRVIModule.__init__``)."""
    return where in (part, "both")


@dataclass(frozen=True)
class DRVIConfig:
    """Architecture and likelihood of one DRVI model (drvi-py's ``DRVIModule`` options).

    Option names and values are drvi-py's, except ``n_split`` (``n_split_latent`` with -1
    resolved), ``split_method`` without its ``@Z`` suffix (that is ``split_dim``), and
    ``covariate_modeling`` (``covariate_modeling_strategy``; the ``*_linear`` and ``emb_shared``
    strategies are refused by the converter). ``n_cats_per_cov`` starts with the batch (1 without
    a batch key), as drvi-py's ``DRVI.__init__`` builds it.
    """

    n_input: int
    n_latent: int = 32
    n_split: int = 32
    split_method: SplitMethod = "split_map"
    split_dim: int | None = None
    split_aggregation: SplitAggregation = "logsumexp"
    decoder_reuse_weights: ReuseWeights = "everywhere"
    encoder_dims: tuple[int, ...] = (128, 128)
    decoder_dims: tuple[int, ...] = (128, 128)
    n_cats_per_cov: tuple[int, ...] = (1,)
    covariate_modeling: CovariateModeling = "one_hot"
    covariate_dims: tuple[int, ...] = ()
    deeply_inject_covariates: bool = False
    use_batch_norm: Where = "none"
    affine_batch_norm: Where = "both"
    use_layer_norm: Where = "both"
    gene_likelihood: GeneLikelihood = "pnb"
    dispersion: Dispersion = "gene"
    var_activation: VarActivation = "exp"
    mean_activation: str = "identity"
    activation: Activation = "elu"

    def __post_init__(self) -> None:
        for name in ("n_input", "n_latent", "n_split"):
            _positive(name, getattr(self, name))
        for name, literal in (
            ("split_method", SplitMethod),
            ("split_aggregation", SplitAggregation),
            ("decoder_reuse_weights", ReuseWeights),
            ("covariate_modeling", CovariateModeling),
            ("use_batch_norm", Where),
            ("affine_batch_norm", Where),
            ("use_layer_norm", Where),
            ("gene_likelihood", GeneLikelihood),
            ("dispersion", Dispersion),
            ("var_activation", VarActivation),
            ("activation", Activation),
        ):
            _check_choice(name, getattr(self, name), literal)
        for name in ("encoder_dims", "decoder_dims", "n_cats_per_cov", "covariate_dims"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                msg = f"Expected {name} to be a tuple of positive integers, got {value!r} instead."
                raise ConfigError(msg)
            for v in value:
                _positive(f"each of {name}", v)
        if not self.n_cats_per_cov:
            msg = "Expected n_cats_per_cov to start with the batch (1 without a batch key), got ()."
            raise ConfigError(msg)
        if self.split_dim is not None:
            _positive("split_dim", self.split_dim)
            if self.split_method not in ("split_map", "power"):
                msg = f"split_dim (the @Z of split_map@Z / power@Z) does not apply to split_method={self.split_method!r}."
                raise ConfigError(msg)
        if self.n_split > 1:
            if self.split_method in ("split", "split_map") and self.n_latent % self.n_split:
                msg = f"split_method={self.split_method!r} needs n_latent ({self.n_latent}) divisible by n_split ({self.n_split})."
                raise ConfigError(msg)
            if self.split_method == "split_diag" and self.n_split != self.n_latent:
                msg = f"split_method='split_diag' needs n_split == n_latent, got {self.n_split} and {self.n_latent}."
                raise ConfigError(msg)
        elif self.decoder_reuse_weights not in ("everywhere", "last"):
            msg = f"decoder_reuse_weights={self.decoder_reuse_weights!r} needs several splits (drvi-py asserts n_split > 1)."
            raise ConfigError(msg)
        if not self.decoder_dims and self.decoder_reuse_weights != "nowhere":
            msg = "A decoder without hidden layers needs decoder_reuse_weights='nowhere' (as drvi-py asserts)."
            raise ConfigError(msg)
        if self.covariate_modeling == "emb" and len(self.covariate_dims) != len(
            self.n_cats_per_cov
        ):
            msg = f"Expected one embedding dimension per covariate ({len(self.n_cats_per_cov)}), got covariate_dims={self.covariate_dims!r}."
            raise ConfigError(msg)
        if not isinstance(self.mean_activation, str) or not _MEAN_ACTIVATION.fullmatch(
            self.mean_activation
        ):
            msg = (
                "Expected mean_activation to be 'identity', 'relu', 'gelu', 'leaky_relu[_slope]', "
                f"'elu[_alpha]' or 'celu[_alpha]', got {self.mean_activation!r} instead."
            )
            raise ConfigError(msg)
        if self.deeply_inject_covariates not in (True, False):
            msg = f"Expected deeply_inject_covariates to be a bool, got {self.deeply_inject_covariates!r}."
            raise ConfigError(msg)

    # ---- derived sizes -----------------------------------------------------------------------

    @property
    def split_size(self) -> int:
        """Latents per split (``split``, ``split_map``); 1 for ``split_diag``."""
        return 1 if self.split_method == "split_diag" else self.n_latent // self.n_split

    @property
    def effective_dim(self) -> int:
        """Width of one split's decoder input (``DecoderDRVI._initialize_splitting``)."""
        if self.n_split == 1:
            return self.n_latent
        if self.split_method == "split":
            return self.n_latent // self.n_split
        if self.split_method in ("split_map", "power") and self.split_dim is not None:
            return self.split_dim
        return self.n_latent

    @property
    def cov_widths(self) -> tuple[int, ...]:
        """Columns each covariate adds to an injected layer's input (one-hot drops n_cat == 1)."""
        if self.covariate_modeling == "emb":
            return self.covariate_dims
        return tuple(n if n > 1 else 0 for n in self.n_cats_per_cov)

    def hidden_stacked(self, i: int) -> bool:
        """Whether decoder hidden layer ``i`` has per-split weights (``reuse_weights``)."""
        if self.n_split == 1 or self.decoder_reuse_weights in ("everywhere", "intermediate"):
            return False
        if self.decoder_reuse_weights == "not_first":
            return i == 0
        return True  # last, nowhere

    @property
    def head_stacked(self) -> bool:
        """Whether the last (per-gene) layer has per-split weights."""
        return self.n_split > 1 and self.decoder_reuse_weights in ("intermediate", "nowhere")

    def hidden_injected(self, i: int) -> bool:
        return i == 0 or self.deeply_inject_covariates

    @property
    def head_injected(self) -> bool:
        """drvi-py passes the covariates to the last layer with deep injection, or when the
        decoder has no hidden layer (``DecoderDRVI.__init__``)."""
        return self.deeply_inject_covariates or not self.decoder_dims

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("encoder_dims", "decoder_dims", "n_cats_per_cov", "covariate_dims"):
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DRVIConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            msg = (
                f"Unknown DRVI configuration keys {unknown}; expected a subset of {sorted(names)}."
            )
            raise ConfigError(msg)
        d = dict(d)
        for name in ("encoder_dims", "decoder_dims", "n_cats_per_cov", "covariate_dims"):
            if name in d:
                if not isinstance(d[name], (list, tuple)):
                    msg = f"Expected {name} to be a list of integers, got {d[name]!r} instead."
                    raise ConfigError(msg)
                d[name] = tuple(d[name])
        return cls(**d)


def config_from_converter(cfg: dict[str, Any]) -> DRVIConfig:
    """The ``DRVIConfig`` of a ``converters.drvi.read_drvi_checkpoint`` config (its other keys,
    the data registry and provenance, are left out)."""
    names = {f.name for f in dataclasses.fields(DRVIConfig)}
    return DRVIConfig.from_dict({k: v for k, v in cfg.items() if k in names})


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
