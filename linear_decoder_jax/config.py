"""Static model configuration and data registry, saved as ``config.json`` beside the weights.

``LDVAEConfig`` holds only Python scalars and ``Literal`` strings: it is hashable, so jitted
functions take it as a static argument and changing parameters never retraces.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from linear_decoder_jax.errors import ConfigError

GeneLikelihood = Literal["nb", "zinb", "poisson"]
Dispersion = Literal["gene", "gene-batch", "gene-label"]
LatentDistribution = Literal["normal", "ln"]

# 2: config.json names the model family ("family"); version-1 directories are LinearSCVI models
FORMAT_VERSION = 2
FORMAT_VERSIONS = (1, 2)


def _check_choice(name: str, value: Any, literal: Any) -> None:
    allowed = get_args(literal)
    if value not in allowed:
        msg = f"Expected {name} to be one of {allowed}, got {value!r} instead."
        raise ConfigError(msg)


@dataclass(frozen=True)
class LDVAEConfig:
    """Architecture and likelihood of one LinearSCVI model (scvi-tools' LDVAE).

    Dimensions follow AnnData/scvi-tools names: ``n_input`` genes, ``n_latent`` latents,
    ``n_batch`` batches (1 when the model has no batch key), ``n_labels`` labels.
    """

    n_input: int
    n_latent: int
    n_hidden: int = 128
    n_layers: int = 1
    n_batch: int = 1
    n_labels: int = 1
    gene_likelihood: GeneLikelihood = "nb"
    dispersion: Dispersion = "gene"
    latent_distribution: LatentDistribution = "normal"
    use_observed_lib_size: bool = False
    log_variational: bool = True
    decoder_batch_norm: bool = True
    decoder_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("n_input", "n_latent", "n_hidden", "n_layers", "n_batch", "n_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"Expected {name} to be a positive integer, got {value!r} instead."
                raise ConfigError(msg)
        _check_choice("gene_likelihood", self.gene_likelihood, GeneLikelihood)
        _check_choice("dispersion", self.dispersion, Dispersion)
        _check_choice("latent_distribution", self.latent_distribution, LatentDistribution)

    @property
    def n_batch_onehot(self) -> int:
        """Batch one-hot columns of the decoder input (scvi-tools drops them for one batch)."""
        return self.n_batch if self.n_batch > 1 else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LDVAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            msg = (
                f"Unknown model configuration keys {unknown}; expected a subset of {sorted(names)}."
            )
            raise ConfigError(msg)
        return cls(**d)


@dataclass(frozen=True)
class DataRegistry:
    """What the model was set up with: gene order, categories and the counts layer."""

    var_names: tuple[str, ...]
    batch_key: str | None = None
    batch_categories: tuple[str, ...] = ()
    labels_key: str | None = None
    label_categories: tuple[str, ...] = ()
    layer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataRegistry:
        return cls(
            var_names=tuple(str(v) for v in d["var_names"]),
            batch_key=d.get("batch_key"),
            batch_categories=tuple(str(v) for v in d.get("batch_categories", ())),
            labels_key=d.get("labels_key"),
            label_categories=tuple(str(v) for v in d.get("label_categories", ())),
            layer=d.get("layer"),
        )


@dataclass(frozen=True)
class ModelSpec:
    """Everything ``config.json`` holds: architecture, data registry and provenance."""

    model: LDVAEConfig
    data: DataRegistry
    source: dict[str, Any] = field(default_factory=dict)
    family: str = "linear_scvi"  # ``Family.name`` of the model

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "model": self.model.to_dict(),
            "data": self.data.to_dict(),
            "source": dict(self.source),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        version = d.get("format_version")
        if version not in FORMAT_VERSIONS:
            msg = (
                f"Expected config format_version one of {FORMAT_VERSIONS}, got {version!r} "
                "instead; re-run `ldj convert` with this version of linear-decoder-jax."
            )
            raise ConfigError(msg)
        family = d.get("family", "linear_scvi") if version >= 2 else "linear_scvi"
        if family != "linear_scvi":
            msg = f"Expected model family 'linear_scvi', got {family!r} instead."
            raise ConfigError(msg)
        return cls(
            model=LDVAEConfig.from_dict(d["model"]),
            data=DataRegistry.from_dict(d["data"]),
            source=dict(d.get("source", {})),
        )

    @classmethod
    def from_converter(cls, cfg: dict[str, Any]) -> ModelSpec:
        """Build from the plain config dict returned by ``converters.read_scvi_checkpoint``."""
        model_keys = {f.name for f in dataclasses.fields(LDVAEConfig)}
        data_keys = {f.name for f in dataclasses.fields(DataRegistry)}
        model = LDVAEConfig.from_dict({k: v for k, v in cfg.items() if k in model_keys})
        data = DataRegistry.from_dict({k: v for k, v in cfg.items() if k in data_keys})
        return cls(model=model, data=data, source=dict(cfg.get("source", {})))
