"""Read DRVI checkpoints (drvi-py 0.2.x and the scvi-tools 1.5 layout) into numpy and a plain config.

Two layouts of ``model.pt`` (a ``torch.save`` dict with ``model_state_dict``, ``var_names`` and
``attr_dict``, read with the allowlist unpickler of ``_torch_zip``):

* ``"drvi-py"``: written by drvi-py's ``DRVI.save`` (0.2.x). Read from drvi-py 0.2.8
  (``scvi_tools_based/module/_drvi.py``, ``scvi_tools_based/nn/_base_components.py``,
  ``nn_modules/``).
* ``"scvi-tools-1.5"``: the ``scvi.external.DRVI`` layout as ``drvi.utils.port_to_scvi_tools``
  writes it (renamed keys, per-split weights transposed, the dispersion offset 1 folded into
  ``px_r``, an unused zero library encoder). It is read as the exact inverse of that port; no
  scvi-tools 1.5 run checked it (1.5 needs Python >= 3.12). Options the 1.5 module has and the
  port never writes (zinb, gene-label dispersion, a batch embedding, an encoded library, batch
  norm) are refused by name.

``DRVICheckpoint.params`` maps our flat keys (``linear_decoder_jax.families.drvi.DRVIParams``:
``encoder/0/dense/kernel``, ``split_transform/kernel``, ``decoder/0/embeddings/1``,
``px_mean/dense/kernel``, ``px_r``, ...) to float32 arrays; kernels are ``(in, out)`` and
per-split kernels ``(n_split, in, out)``. ``px_r`` is log theta (drvi-py's ``r`` plus 1).
``DRVICheckpoint.config`` holds the ``DRVIConfig`` fields plus ``var_names``, ``batch_key``,
``batch_categories``, ``categorical_covariate_keys``, ``categorical_covariate_categories``,
``layer`` and ``source``.

Every state-dict key is mapped by :func:`_rules` (one explicit table per configuration) and its
shape checked; keys left over are an error. Options that change the computation and cannot be
mirrored raise :class:`UnsupportedModelError` naming the option.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from ._errors import CheckpointPathError, MalformedCheckpointError, UnsupportedModelError
from ._torch_zip import load_torch_zip

__all__ = ["DRVICheckpoint", "detect_family", "read_drvi_checkpoint"]

Layout = Literal["drvi-py", "scvi-tools-1.5"]

#: DRVIModule.__init__ options (drvi-py 0.2.8) and what we do with each. "mirror": read into the
#: config; "training": changes training only (dropout, masking, gradient scaling), ignored in eval
#: mode; anything else is refused when it differs from the default given here.
_DRVI_OPTIONS: dict[str, Any] = {
    "n_latent": "mirror",
    "n_split_latent": "mirror",
    "split_aggregation": "mirror",
    "split_method": "mirror",
    "decoder_reuse_weights": "mirror",  # read from the weights' shapes
    "encoder_dims": "mirror",  # read from the weights' shapes
    "decoder_dims": "mirror",
    "categorical_embedding_dims": "mirror",  # read from the embedding tables
    "covariate_modeling_strategy": "mirror",
    "deeply_inject_covariates": "mirror",
    "use_batch_norm": "mirror",
    "affine_batch_norm": "mirror",
    "use_layer_norm": "mirror",
    "gene_likelihood": "mirror",
    "dispersion": "mirror",
    "var_activation": "mirror",
    "mean_activation": "mirror",
    "n_labels": "training",  # labels only feed training metrics
    "fill_in_the_blanks_ratio": "training",
    "reconstruction_strategy": "training",
    "input_dropout_rate": "training",
    "encoder_dropout_rate": "training",
    "decoder_dropout_rate": "training",
    "last_layer_gradient_scale": "training",
    "encode_covariates": False,
    "prior": "normal",
    "encoder_layer_factory": None,
    "decoder_layer_factory": None,
    "extra_encoder_kwargs": None,
    "extra_decoder_kwargs": None,
}
_LIKELIHOOD_RENAMES = {"pnb_softmax": "pnb", "poisson_orig": "poisson", "nb_orig": "nb"}  # < 0.2.2
_STRATEGIES = ("one_hot", "emb")
_AGGREGATIONS = ("logsumexp", "sum", "sum_plus", "max")
_WHERE = ("encoder", "decoder", "none", "both")
#: The 1.5 names the port writes, back to drvi-py's (``_DrviPy027ToScviTools150``).
_SCVI15_METHOD = {"split_map": "split_map", "split_mask": "split_diag"}
_SCVI15_AGGREGATION = {"logsumexp": "logsumexp", "mean": "sum"}
_SCVI15_ACTIVATION = {"identity": "identity", "ReLU": "relu", "GELU": "gelu", "ELU": "elu",
                      "CELU": "celu", "LeakyReLU": "leaky_relu"}  # fmt: skip
_SCVI15_OPTIONS = {
    "n_latent", "n_split_latent", "split_method", "split_aggregation", "gene_likelihood",
    "n_hidden", "n_layers", "dispersion", "decoder_reuse_weights", "mean_activation",
    "activation_fn", "use_batch_norm", "use_layer_norm", "deeply_inject_covariates",
    "use_observed_lib_size", "batch_representation", "n_split_output",
}  # fmt: skip
#: State-dict entries that carry nothing for inference.
_IGNORED_PREFIXES = ("latent_stats.", "mi_metric.", "prior.", "decoder.last_layer_gradient_scaler")
_IGNORED_KEYS = frozenset({"pyro_param_store"})


@dataclass(frozen=True, repr=False)
class DRVICheckpoint:
    """Parameters (flat keys of ``DRVIParams``, float32) and configuration of a DRVI model."""

    params: dict[str, np.ndarray]
    config: dict[str, Any]

    def __repr__(self) -> str:
        c = self.config
        return (
            f"DRVICheckpoint(n_input={c['n_input']}, n_latent={c['n_latent']}, "
            f"n_split={c['n_split']}, layout={c['source']['layout']!r}, n_params={len(self.params)})"
        )


class _Rule(NamedTuple):
    torch_key: str
    key: str
    shape: tuple[int, ...]  # expected torch shape
    transform: str = "none"  # "none", "T" (2-D transpose), "T3" (swap the last two axes)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _model_file(src: str | os.PathLike[str], prefix: str | None) -> Path:
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"No such file or directory: {os.fspath(src)!r}")
    if not path.is_dir():
        if prefix is not None:
            msg = f"{path} is a file and prefix= (CLI: --prefix) applies only to a folder, so pass the folder, or the file without a prefix."
            raise CheckpointPathError(msg)
        return path
    if prefix is None:
        found = sorted(p.name for p in path.glob("*model.pt") if p.is_file())
        if len(found) > 1:
            msg = f"{path} holds several models ({', '.join(found)}); pick one with prefix= (CLI: --prefix)."
            raise CheckpointPathError(msg)
        prefix = found[0].removesuffix("model.pt") if found else ""
    file = path / f"{prefix}model.pt"
    if not file.is_file():
        raise MalformedCheckpointError(f"{path}: expected {prefix}model.pt in this folder")
    return file


def _load(file: Path) -> dict:
    saved = load_torch_zip(file)
    expected = ("attr_dict", "model_state_dict", "var_names")
    if not isinstance(saved, dict) or not all(k in saved for k in expected):
        got = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
        msg = f"{file}: expected a dict with keys {list(expected)}, got {got}"
        raise MalformedCheckpointError(msg)
    for name in ("attr_dict", "model_state_dict"):
        if not isinstance(saved[name], dict):
            raise MalformedCheckpointError(f"{file}: expected {name!r} to be a dict")
    return saved


def _model_name(saved: dict) -> str | None:
    registry = saved["attr_dict"].get("registry_")
    name = registry.get("model_name") if isinstance(registry, dict) else None
    return name if isinstance(name, str) else None


def detect_family(
    src: str | os.PathLike[str], *, prefix: str | None = None
) -> Literal["linear_scvi", "drvi"]:
    """Which family a saved model (``model.pt`` or its folder) belongs to: ``"linear_scvi"`` or
    ``"drvi"``, from the registry's model name, else from the state dict's layers.

    Raises
    ------
    UnsupportedModelError
        Another scvi-tools model (SCVI, SCANVI, ...).
    """
    try:
        file = _model_file(src, prefix)
    except MalformedCheckpointError:
        folder = Path(src)  # scvi-tools < 0.15 saved LinearSCVI as model_params.pt + attr.pkl
        if folder.is_dir() and any(folder.glob(f"{prefix or '*'}model_params.pt")):
            return "linear_scvi"
        raise
    saved = _load(file)
    name = _model_name(saved)
    state = saved["model_state_dict"]
    if name == "DRVI" or any(k.startswith("decoder.params_nets.") for k in state):
        return "drvi"
    if name == "LinearSCVI" or any(k.startswith("decoder.factor_regressor.") for k in state):
        return "linear_scvi"
    msg = f"{file}: this is a {name or 'unknown'} model; only LinearSCVI and DRVI can be converted"
    raise UnsupportedModelError(msg)


def read_drvi_checkpoint(
    src: str | os.PathLike[str], *, prefix: str | None = None
) -> DRVICheckpoint:
    """Read a saved DRVI model (drvi-py 0.2.x or the scvi-tools 1.5 layout) without torch.

    Parameters
    ----------
    src
        The folder written by ``DRVI.save`` / ``port_to_scvi_tools``, or its ``model.pt``.
    prefix
        File-name prefix given to ``save``; only for a folder.

    Returns
    -------
    DRVICheckpoint
        ``params`` (flat keys, float32) and ``config`` (plain values).

    Raises
    ------
    FileNotFoundError, UnsafeCheckpointError, MalformedCheckpointError, UnsupportedModelError
        As :func:`converters.read_scvi_checkpoint`.
    """
    file = _model_file(src, prefix)
    saved = _load(file)
    name = _model_name(saved)
    if name not in (None, "DRVI"):
        raise UnsupportedModelError(f"{file}: this is a {name} model, not DRVI")
    state = saved["model_state_dict"]
    if any(k.startswith("decoder.params_nets.") for k in state):
        layout: Layout = "drvi-py"
    elif any(k.startswith("decoder.px_scale_decoder.") for k in state):
        layout = "scvi-tools-1.5"
    else:
        raise MalformedCheckpointError(f"{file}: not a DRVI state dict (no decoder head found)")
    var_names = saved["var_names"]
    if (
        not isinstance(var_names, np.ndarray)
        or var_names.ndim != 1
        or not all(isinstance(v, str) for v in var_names.tolist())
    ):
        raise MalformedCheckpointError(f"{file}: expected 'var_names' as a 1-D array of str")
    attr = saved["attr_dict"]
    registry = _registry(attr, file)
    options = _init_kwargs(attr, file)
    if layout == "drvi-py":
        config = _drvi_py_config(options, state, registry, file)
    else:
        config = _scvi15_config(options, state, registry, file)
    config["n_input"] = len(var_names)
    rules = _rules(config, layout)
    params = _apply(rules, state, config, layout, file)
    source = {
        "layout": layout,
        "model_name": "DRVI",
        "drvi_version": registry["drvi_version"],
        "scvi_version": registry["scvi_version"],
        "path": str(file),
    }
    full = dict(config)
    full.update(
        var_names=[str(v) for v in var_names.tolist()],
        batch_key=registry["batch_key"],
        batch_categories=registry["batch_categories"],
        categorical_covariate_keys=registry["cov_keys"],
        categorical_covariate_categories=registry["cov_categories"],
        layer=registry["layer"],
        source=source,
    )
    return DRVICheckpoint(params=params, config=full)


# --------------------------------------------------------------------------------------------
# Registry and init parameters
# --------------------------------------------------------------------------------------------


def _dict(value: Any, where: str, file: Path) -> dict:
    if not isinstance(value, dict):
        raise MalformedCheckpointError(
            f"{file}: expected {where} to be a dict, got {type(value).__name__}"
        )
    return value


def _strs(value: Any, where: str, file: Path) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (np.ndarray, list, tuple)):
        raise MalformedCheckpointError(f"{file}: expected {where} as a list, got {value!r}")
    return [str(v) for v in np.asarray(value, dtype=object).ravel()]


def _registry(attr: dict, file: Path) -> dict[str, Any]:
    registry = _dict(attr.get("registry_"), "attr_dict['registry_']", file)
    setup = _dict(registry.get("setup_args", {}), "registry_['setup_args']", file)
    fields = _dict(registry.get("field_registries", {}), "registry_['field_registries']", file)
    if "batch" not in fields:
        msg = f"{file}: no batch field in the registry (drvi-py < 0.1.11); load and save it with drvi-py 0.2 first"
        raise UnsupportedModelError(msg)
    batch_state = _dict(
        _dict(fields["batch"], "batch field", file).get("state_registry", {}), "batch state", file
    )
    batch_key = setup.get("batch_key")
    cats = _dict(fields.get("extra_categorical_covs", {}), "categorical covariates field", file)
    cat_state = _dict(cats.get("state_registry", {}), "categorical covariates state", file)
    cov_keys = _strs(cat_state.get("field_keys"), "categorical covariate keys", file)
    mappings = _dict(cat_state.get("mappings", {}), "categorical covariate mappings", file)
    cont = _dict(fields.get("extra_continuous_covs", {}), "continuous covariates field", file)
    n_cont = _dict(cont.get("summary_stats", {}), "continuous covariates stats", file).get(
        "n_extra_continuous_covs", 0
    )
    if n_cont:
        keys = setup.get("continuous_covariate_keys")
        msg = f"{file}: DRVI with continuous covariates ({keys}) is not supported (continuous_covariate_keys cannot be mirrored)"
        raise UnsupportedModelError(msg)
    layer = setup.get("layer")
    version = registry.get("drvi_version")
    return {
        "batch_key": batch_key if isinstance(batch_key, str) else None,
        "batch_categories": _strs(batch_state.get("categorical_mapping"), "batch categories", file),
        "cov_keys": cov_keys,
        "cov_categories": [_strs(mappings.get(k), f"categories of {k!r}", file) for k in cov_keys],
        "layer": layer if isinstance(layer, str) else None,
        "drvi_version": str(version) if version is not None else None,
        "scvi_version": str(registry["scvi_version"]) if registry.get("scvi_version") else None,
    }


def _init_kwargs(attr: dict, file: Path) -> dict[str, Any]:
    init = _dict(attr.get("init_params_"), "attr_dict['init_params_']", file)
    merged = dict(_dict(init.get("non_kwargs", {}), "init_params_['non_kwargs']", file))
    for name, group in _dict(init.get("kwargs", {}), "init_params_['kwargs']", file).items():
        merged.update(_dict(group, f"init_params_ keyword group {name!r}", file))
    for deprecated in ("categorical_covariates", "batch_key"):  # DRVI drops them with a warning
        merged.pop(deprecated, None)
    return merged


def _refuse(file: Path, option: str, value: Any, why: str) -> None:
    raise UnsupportedModelError(f"{file}: DRVI with {option}={value!r} is not supported ({why})")


def _choice(options: dict, name: str, default: Any, allowed: tuple, file: Path) -> Any:
    value = options.get(name, default)
    if value not in allowed:
        _refuse(file, name, value, f"expected one of {', '.join(map(repr, allowed))}")
    return value


def _shape(state: dict, key: str, file: Path) -> tuple[int, ...]:
    value = state.get(key)
    if not isinstance(value, np.ndarray):
        raise MalformedCheckpointError(f"{file}: missing state-dict tensor {key!r}")
    return value.shape


def _layer_count(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.fc_layers\.Layer (\d+)\.")
    found = sorted({int(m[1]) for k in state if (m := pattern.match(k))})
    if found != list(range(len(found))):
        raise MalformedCheckpointError(f"{prefix}: layers numbered {found}, expected 0, 1, ...")
    return len(found)


def _drvi_py_config(options: dict, state: dict, registry: dict, file: Path) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_DRVI_OPTIONS))
    if unknown:
        _refuse(file, unknown[0], options[unknown[0]], "an option this converter does not know")
    for name, rule in _DRVI_OPTIONS.items():
        if rule not in ("mirror", "training") and name in options and options[name] != rule:
            if not (name.startswith("extra_") and options[name] == {}):
                _refuse(file, name, options[name], "cannot be mirrored")
    likelihood = options.get("gene_likelihood", "pnb")
    likelihood = _LIKELIHOOD_RENAMES.get(likelihood, likelihood)
    if likelihood not in ("pnb", "nb", "poisson"):
        _refuse(file, "gene_likelihood", likelihood, "expected 'pnb', 'nb' or 'poisson'")
    dispersion = _choice(options, "dispersion", "gene", ("gene", "gene-batch"), file)
    strategy = _choice(options, "covariate_modeling_strategy", "one_hot", _STRATEGIES, file)
    aggregation = _choice(options, "split_aggregation", "logsumexp", _AGGREGATIONS, file)
    method = options.get("split_method", "split_map")
    match = re.fullmatch(r"(split|split_map|split_diag|power)(?:@(\d+))?", str(method))
    if match is None or (match[2] and match[1] not in ("split_map", "power")):
        _refuse(
            file, "split_method", method, "expected split, split_map[@Z], split_diag or power[@Z]"
        )
    assert match is not None
    var_activation = _choice(options, "var_activation", "exp", ("exp", "pow2", "2sig"), file)
    mean_activation = options.get("mean_activation", "identity")
    if not isinstance(mean_activation, str):
        _refuse(file, "mean_activation", mean_activation, "a callable cannot be mirrored")
    n_latent = _shape(state, "z_encoder.mean_encoder.fc_layers.Layer 0.0.weight", file)[0]
    n_split = options.get("n_split_latent", -1)
    n_split = n_latent if n_split in (None, -1) else n_split
    if not isinstance(n_split, int) or n_split < 1:
        raise MalformedCheckpointError(
            f"{file}: expected n_split_latent to be -1 or positive, got {n_split!r}"
        )
    n_enc = _layer_count(state, "z_encoder.encoder")
    n_dec = _layer_count(state, "decoder.px_shared_decoder")
    n_cats = [max(len(registry["batch_categories"]), 1)] + [
        len(c) for c in registry["cov_categories"]
    ]
    emb_dims: list[int] = []
    if strategy == "emb":
        head = (
            "decoder.px_shared_decoder.fc_layers.Layer 0.0"
            if n_dec
            else "decoder.params_nets.mean.fc_layers.Layer 0.0"
        )
        emb_dims = [
            _shape(state, f"{head}.emb_list.{c}.weight", file)[-1] for c in range(len(n_cats))
        ]
    split_dim = int(match[2]) if match[2] else None
    enc_dims = [
        _shape(state, f"z_encoder.encoder.fc_layers.Layer {i}.{0}.weight", file)[0]
        for i in range(n_enc)
    ]
    lin = 1 if strategy == "emb" else 0
    dec_dims = []
    for i in range(n_dec):
        j = lin if (i == 0 or options.get("deeply_inject_covariates", False)) else 0
        w = _shape(state, f"decoder.px_shared_decoder.fc_layers.Layer {i}.{j}.weight", file)
        dec_dims.append(w[-1] if len(w) == 3 else w[0])
    head_j = lin if (options.get("deeply_inject_covariates", False) or not n_dec) else 0
    head_3d = (
        len(_shape(state, f"decoder.params_nets.mean.fc_layers.Layer 0.{head_j}.weight", file)) == 3
    )
    hidden_3d = [
        len(
            _shape(
                state,
                f"decoder.px_shared_decoder.fc_layers.Layer {i}.{lin if (i == 0 or options.get('deeply_inject_covariates', False)) else 0}.weight",
                file,
            )
        )
        == 3
        for i in range(n_dec)
    ]
    return {
        "n_latent": n_latent,
        "n_split": n_split,
        "split_method": match[1],
        "split_dim": split_dim,
        "split_aggregation": aggregation,
        "decoder_reuse_weights": _reuse(hidden_3d, head_3d, file),
        "encoder_dims": enc_dims,
        "decoder_dims": dec_dims,
        "n_cats_per_cov": n_cats,
        "covariate_modeling": strategy,
        "covariate_dims": emb_dims,
        "deeply_inject_covariates": bool(options.get("deeply_inject_covariates", False)),
        "use_batch_norm": _choice(options, "use_batch_norm", "none", _WHERE, file),
        "affine_batch_norm": _choice(options, "affine_batch_norm", "both", _WHERE, file),
        "use_layer_norm": _choice(options, "use_layer_norm", "both", _WHERE, file),
        "gene_likelihood": likelihood,
        "dispersion": dispersion,
        "var_activation": var_activation,
        "mean_activation": mean_activation,
        "activation": "elu",
    }


def _reuse(hidden_3d: list[bool], head_3d: bool, file: Path) -> str:
    """drvi-py's ``decoder_reuse_weights`` from which layers have per-split (3-D) weights."""
    if not any(hidden_3d):
        return "intermediate" if head_3d else "everywhere"
    if all(hidden_3d):
        if len(hidden_3d) == 1 and not head_3d:
            return "last"  # "not_first" with one hidden layer is the same network
        return "nowhere" if head_3d else "last"
    if hidden_3d[0] and not any(hidden_3d[1:]) and not head_3d:
        return "not_first"
    raise MalformedCheckpointError(
        f"{file}: per-split decoder weights in layers {hidden_3d} + head {head_3d} match no decoder_reuse_weights"
    )


def _scvi15_config(options: dict, state: dict, registry: dict, file: Path) -> dict[str, Any]:
    unknown = sorted(set(options) - _SCVI15_OPTIONS)
    if unknown:
        _refuse(
            file,
            unknown[0],
            options[unknown[0]],
            "a scvi-tools 1.5 option the port never writes, not checked against running code",
        )
    likelihood = _choice(options, "gene_likelihood", "pnb", ("pnb", "nb", "poisson"), file)
    dispersion = _choice(options, "dispersion", "gene", ("gene", "gene-batch"), file)
    method = _SCVI15_METHOD.get(options.get("split_method", "split_map"))
    if method is None:
        _refuse(
            file,
            "split_method",
            options.get("split_method"),
            "expected 'split_map' or 'split_mask'",
        )
    aggregation = _SCVI15_AGGREGATION.get(options.get("split_aggregation", "logsumexp"))
    if aggregation is None:
        _refuse(
            file,
            "split_aggregation",
            options.get("split_aggregation"),
            "expected 'logsumexp' or 'mean'",
        )
    for name, allowed in (
        ("use_observed_lib_size", (True,)),
        ("batch_representation", ("one-hot",)),
        ("use_batch_norm", ("none",)),
        ("activation_fn", ("elu", "relu")),
    ):
        if name in options and options[name] not in allowed:
            _refuse(
                file,
                name,
                options[name],
                "not written by port_to_scvi_tools, so not checked against running code",
            )
    use_layer_norm = _choice(options, "use_layer_norm", "both", _WHERE, file)
    mean = options.get("mean_activation")
    mean_activation = "identity"
    if mean is not None:
        base, _, arg = str(mean).partition("_")
        if base not in _SCVI15_ACTIVATION:
            _refuse(file, "mean_activation", mean, "expected a torch activation the port writes")
        mean_activation = _SCVI15_ACTIVATION[base] + (f"_{arg}" if arg else "")
    wrapped = "z_encoder.mean_encoder.0.weight" in state
    n_latent = _shape(
        state,
        "z_encoder.mean_encoder.0.weight" if wrapped else "z_encoder.mean_encoder.weight",
        file,
    )[0]
    split = state.get("decoder.split_transform.weight")
    n_split = split.shape[0] if isinstance(split, np.ndarray) else n_latent
    n_enc = _layer_count(state, "z_encoder.encoder")
    n_dec = _layer_count(state, "decoder.px_decoder")
    enc_dims = [
        _shape(state, f"z_encoder.encoder.fc_layers.Layer {i}.0.weight", file)[0]
        for i in range(n_enc)
    ]
    dec_w = [
        _shape(state, f"decoder.px_decoder.fc_layers.Layer {i}.0.weight", file)
        for i in range(n_dec)
    ]
    dec_dims = [w[-2] if len(w) == 3 else w[0] for w in dec_w]
    head_3d = len(_shape(state, "decoder.px_scale_decoder.weight", file)) == 3
    split_dim = None
    if isinstance(split, np.ndarray) and split.ndim == 3 and split.shape[1] != n_latent:
        split_dim = int(split.shape[1])
    n_cats = [max(len(registry["batch_categories"]), 1)] + [
        len(c) for c in registry["cov_categories"]
    ]
    return {
        "n_latent": n_latent,
        "n_split": n_split,
        "split_method": method,
        "split_dim": split_dim,
        "split_aggregation": aggregation,
        "decoder_reuse_weights": _reuse([len(w) == 3 for w in dec_w], head_3d, file),
        "encoder_dims": enc_dims,
        "decoder_dims": dec_dims,
        "n_cats_per_cov": n_cats,
        "covariate_modeling": "one_hot",
        "covariate_dims": [],
        "deeply_inject_covariates": bool(options.get("deeply_inject_covariates", False)),
        "use_batch_norm": "none",
        "affine_batch_norm": "both",
        "use_layer_norm": use_layer_norm,
        "gene_likelihood": likelihood,
        "dispersion": dispersion,
        "var_activation": "exp",
        "mean_activation": mean_activation,
        "activation": options.get("activation_fn", "elu"),
    }


# --------------------------------------------------------------------------------------------
# The state-dict table
# --------------------------------------------------------------------------------------------


def _in(where: str, part: str) -> bool:
    return where in (part, "both")


def _rules(c: dict[str, Any], layout: Layout) -> list[_Rule]:
    """Every state-dict entry of the model ``c``: torch key, our key, torch shape, transform."""
    scvi15 = layout == "scvi-tools-1.5"
    g, k, s = c["n_input"], c["n_latent"], c["n_split"]
    n_cats = c["n_cats_per_cov"]
    emb = c["covariate_modeling"] == "emb"
    cov_w = sum(c["covariate_dims"]) if emb else sum(n for n in n_cats if n > 1)
    rules: list[_Rule] = []

    def bn(prefix: str, key: str, width: int, affine: bool) -> None:
        names = (
            ("weight", "bias", "running_mean", "running_var")
            if affine
            else ("running_mean", "running_var")
        )
        ours = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
        rules.extend(_Rule(f"{prefix}.{n}", f"{key}/bn/{ours[n]}", (width,)) for n in names)

    # encoder
    dims = [g, *c["encoder_dims"]]
    enc_bn, enc_affine = _in(c["use_batch_norm"], "encoder"), _in(c["affine_batch_norm"], "encoder")
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        p = f"z_encoder.encoder.fc_layers.Layer {i}"
        rules += [_Rule(f"{p}.0.weight", f"encoder/{i}/dense/kernel", (b, a), "T"),
                  _Rule(f"{p}.0.bias", f"encoder/{i}/dense/bias", (b,))]  # fmt: skip
        if enc_bn:
            bn(f"{p}.1", f"encoder/{i}", b, enc_affine)
    h = dims[-1]
    for head, ours in (("mean", "qz_mean"), ("var", "qz_var")):
        if scvi15:
            wrapped = head == "mean" and c["mean_activation"] != "identity"
            p = f"z_encoder.{head}_encoder" + (".0" if wrapped else "")
        else:
            p = f"z_encoder.{head}_encoder.fc_layers.Layer 0.0"
        rules += [
            _Rule(f"{p}.weight", f"{ours}/kernel", (k, h), "T"),
            _Rule(f"{p}.bias", f"{ours}/bias", (k,)),
        ]
    # split transformation
    d = c["split_dim"] or (k // s if c["split_method"] == "split" else k)
    if s == 1:
        d = k
    if s > 1 and c["split_method"] == "split_map":
        m = k // s
        if scvi15:
            rules.append(
                _Rule("decoder.split_transform.weight", "split_transform/kernel", (s, d, m), "T3")
            )
        else:
            rules.append(
                _Rule("decoder.split_transformation_weight", "split_transform/kernel", (s, m, d))
            )
    elif s > 1 and c["split_method"] == "power":
        rules += [_Rule("decoder.split_transformation.0.weight", "split_transform/kernel", (d * s, k), "T"),
                  _Rule("decoder.split_transformation.0.bias", "split_transform/bias", (d * s,))]  # fmt: skip
    # decoder
    reuse = c["decoder_reuse_weights"]
    deep = c["deeply_inject_covariates"]
    dims = [d, *c["decoder_dims"]]
    dec_bn, dec_affine = _in(c["use_batch_norm"], "decoder"), _in(c["affine_batch_norm"], "decoder")

    def stacked_hidden(i: int) -> bool:
        if s == 1 or reuse in ("everywhere", "intermediate"):
            return False
        return i == 0 if reuse == "not_first" else True

    def linear(p: str, key: str, n_in: int, n_out: int, stacked: bool, injected: bool) -> int:
        """Rules of one injected/plain Linear (and embeddings); returns the Linear's index."""
        j = 0
        if injected and emb:
            rules.extend(
                _Rule(f"{p}.0.emb_list.{ci}.weight", f"{key}/embeddings/{ci}", (n, dim))
                for ci, (n, dim) in enumerate(zip(n_cats, c["covariate_dims"], strict=True))
            )
            j = 1
        if injected:
            n_in += cov_w
        lp = p if scvi15 and p.endswith("px_scale_decoder") else f"{p}.{j}"
        if stacked:
            shape = (s, n_out, n_in) if scvi15 else (s, n_in, n_out)
            rules.extend([_Rule(f"{lp}.weight", f"{key}/dense/kernel", shape, "T3" if scvi15 else "none"),
                      _Rule(f"{lp}.bias", f"{key}/dense/bias", (s, n_out))])  # fmt: skip
        else:
            rules.extend([_Rule(f"{lp}.weight", f"{key}/dense/kernel", (n_out, n_in), "T"),
                      _Rule(f"{lp}.bias", f"{key}/dense/bias", (n_out,))])  # fmt: skip
        return j

    hidden = "decoder.px_decoder" if scvi15 else "decoder.px_shared_decoder"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        p = f"{hidden}.fc_layers.Layer {i}"
        j = linear(p, f"decoder/{i}", a, b, stacked_hidden(i), i == 0 or deep)
        if dec_bn:
            bn(f"{p}.{j + 1}", f"decoder/{i}", b * s if s > 1 else b, dec_affine)
    head_stacked = s > 1 and reuse in ("intermediate", "nowhere")
    head = "decoder.px_scale_decoder" if scvi15 else "decoder.params_nets.mean.fc_layers.Layer 0"
    linear(head, "px_mean", dims[-1], g, head_stacked, deep or len(dims) == 1)
    # dispersion
    if c["gene_likelihood"] == "poisson":
        pass  # no dispersion
    elif c["dispersion"] == "gene":
        rules.append(
            _Rule(
                "px_r" if scvi15 else "decoder.params_nets.r",
                "px_r",
                (g,),
                "none" if scvi15 else "+1",
            )
        )
    elif scvi15:
        rules.append(_Rule("px_r", "px_r", (g, n_cats[0])))
    else:
        rules += [_Rule("decoder.params_nets.r.weight", "px_r", (g, n_cats[0]), "+1"),
                  _Rule("decoder.params_nets.r.bias", "px_r/bias", (g,), "bias")]  # fmt: skip
    if scvi15:  # the zero library encoder the port adds for 1.5's module; unused (observed library)
        n_in = g
        rules += [
            _Rule("l_encoder.encoder.fc_layers.Layer 0.0.weight", "", (h, n_in), "skip"),
            _Rule("l_encoder.encoder.fc_layers.Layer 0.0.bias", "", (h,), "skip"),
            _Rule("l_encoder.mean_encoder.weight", "", (1, h), "skip"),
            _Rule("l_encoder.mean_encoder.bias", "", (1,), "skip"),
            _Rule("l_encoder.var_encoder.weight", "", (1, h), "skip"),
            _Rule("l_encoder.var_encoder.bias", "", (1,), "skip"),
        ]
    return rules


def _apply(
    rules: list[_Rule], state: dict, c: dict, layout: Layout, file: Path
) -> dict[str, np.ndarray]:
    params: dict[str, np.ndarray] = {}
    bias_r = None
    used = set()
    for rule in rules:
        if rule.torch_key not in state:
            if rule.transform == "skip":  # the library encoder is optional
                continue
            raise MalformedCheckpointError(
                f"{file}: missing state-dict key {rule.torch_key!r} ({layout} layout)"
            )
        value = state[rule.torch_key]
        used.add(rule.torch_key)
        if not isinstance(value, np.ndarray) or value.shape != rule.shape:
            got = value.shape if isinstance(value, np.ndarray) else type(value).__name__
            msg = f"{file}: state-dict key {rule.torch_key!r}: expected shape {rule.shape}, got {got} instead"
            raise MalformedCheckpointError(msg)
        if not np.issubdtype(value.dtype, np.floating) or not np.all(np.isfinite(value)):
            raise MalformedCheckpointError(
                f"{file}: state-dict key {rule.torch_key!r} holds non-finite or non-float values"
            )
        value = value.astype(np.float32)
        if rule.transform == "skip":
            continue
        if rule.transform == "bias":
            bias_r = value
            continue
        if rule.transform == "T":
            value = value.T
        elif rule.transform == "T3":
            value = np.swapaxes(value, -1, -2)
        params[rule.key] = np.ascontiguousarray(value)
    for key in state:
        if key in used or key in _IGNORED_KEYS or key.endswith(".num_batches_tracked"):
            continue
        if any(key.startswith(p) for p in _IGNORED_PREFIXES):
            continue
        msg = f"{file}: unexpected state-dict key {key!r} for this DRVI configuration ({layout} layout)"
        raise MalformedCheckpointError(msg)
    # drvi-py: theta = exp(1 + r) with r = params_nets.r ("gene") or Linear(n_batch, G) on the
    # batch one-hot ("gene-batch": W[:, b] + bias); the offset added as drvi-py adds it, in float32
    r = params.get("px_r")
    if r is not None and layout == "drvi-py":
        if bias_r is not None:
            r = r + bias_r[:, None]
        params["px_r"] = np.float32(1.0) + r
    return params
