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

FORMAT_VERSION = 2  # 2: config.json names its "family"; version-1 directories are LinearSCVI
FAMILIES = ("linear_scvi", "drvi")


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
    # DRVI's categorical covariates after the batch (drvi-py's categorical_covariate_keys)
    categorical_covariate_keys: tuple[str, ...] = ()
    categorical_covariate_categories: tuple[tuple[str, ...], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        d["categorical_covariate_categories"] = [
            list(c) for c in self.categorical_covariate_categories
        ]
        for name in ("categorical_covariate_keys", "categorical_covariate_categories"):
            if not d[
                name
            ]:  # absent for LinearSCVI: its recorded dicts and fingerprints stay as they were
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataRegistry:
        return cls(
            var_names=tuple(str(v) for v in d["var_names"]),
            batch_key=d.get("batch_key"),
            batch_categories=tuple(str(v) for v in d.get("batch_categories", ())),
            labels_key=d.get("labels_key"),
            label_categories=tuple(str(v) for v in d.get("label_categories", ())),
            layer=d.get("layer"),
            categorical_covariate_keys=tuple(
                str(v) for v in d.get("categorical_covariate_keys", ())
            ),
            categorical_covariate_categories=tuple(
                tuple(str(v) for v in c) for c in d.get("categorical_covariate_categories", ())
            ),
        )


def _model_config(family: str, d: dict[str, Any]) -> Any:
    if family == "drvi":  # imported here: this module stays stdlib-only for LinearSCVI
        from linear_decoder_jax.families.drvi_config import DRVIConfig

        return DRVIConfig.from_dict(d)
    return LDVAEConfig.from_dict(d)


@dataclass(frozen=True)
class ModelSpec:
    """Everything ``config.json`` holds: family, architecture, data registry and provenance.

    ``model`` is an ``LDVAEConfig`` (family "linear_scvi") or a
    ``linear_decoder_jax.families.drvi.DRVIConfig`` (family "drvi").
    """

    model: Any  # LDVAEConfig | DRVIConfig
    data: DataRegistry
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return "linear_scvi" if isinstance(self.model, LDVAEConfig) else "drvi"

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
        if version not in (1, FORMAT_VERSION):
            msg = (
                f"Expected config format_version 1 or {FORMAT_VERSION}, got {version!r} instead; "
                "re-run `ldj convert` with this version of linear-decoder-jax."
            )
            raise ConfigError(msg)
        family = "linear_scvi" if version == 1 else d.get("family")
        if family not in FAMILIES:
            msg = f"Expected config family to be one of {FAMILIES}, got {family!r} instead."
            raise ConfigError(msg)
        return cls(
            model=_model_config(family, d["model"]),
            data=DataRegistry.from_dict(d["data"]),
            source=dict(d.get("source", {})),
        )

    @classmethod
    def from_converter(cls, cfg: dict[str, Any], *, family: str = "linear_scvi") -> ModelSpec:
        """Build from the plain config dict returned by ``converters.read_scvi_checkpoint``
        (``family="linear_scvi"``) or ``converters.drvi.read_drvi_checkpoint`` (``"drvi"``)."""
        if family == "drvi":
            from linear_decoder_jax.families.drvi_config import DRVIConfig

            model_cls: Any = DRVIConfig
        else:
            model_cls = LDVAEConfig
        model_keys = {f.name for f in dataclasses.fields(model_cls)}
        data_keys = {f.name for f in dataclasses.fields(DataRegistry)}
        model = model_cls.from_dict({k: v for k, v in cfg.items() if k in model_keys})
        data = DataRegistry.from_dict({k: v for k, v in cfg.items() if k in data_keys})
        return cls(model=model, data=data, source=dict(cfg.get("source", {})))
