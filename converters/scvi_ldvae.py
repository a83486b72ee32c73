"""Read scvi-tools LinearSCVI checkpoints into numpy parameters and a plain config.

The key mapping lives in :data:`_RULES`; the layouts handled are described in
:func:`read_scvi_checkpoint`. Everything scvi-tools-specific was read from scvi-tools 1.4.2:
``model/base/_save_load.py`` (files and ``init_params_``), ``data/_compat.py`` (pre-0.15 setup
dictionaries), ``module/_vae.py`` (``LDVAE``) and ``nn/_base_components.py``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ._errors import CheckpointPathError, MalformedCheckpointError, UnsupportedModelError
from ._torch_zip import MAX_PICKLE_BYTES, load_pickle, load_torch_zip

__all__ = ["ScviCheckpoint", "read_scvi_checkpoint"]

_MODEL_NAME = "LinearSCVI"
_LIKELIHOODS = ("nb", "zinb", "poisson")
_DISPERSIONS = ("gene", "gene-batch", "gene-label")
_LATENT_DISTRIBUTIONS = ("normal", "ln")


@dataclass(frozen=True, repr=False)
class ScviCheckpoint:
    """Parameters and configuration of a LinearSCVI model, as numpy arrays and plain values.

    Attributes
    ----------
    params
        Flat mapping from our parameter path (``"decoder/factor/dense/kernel"``) to a C-contiguous
        ``float32`` array. Dense kernels are stored ``(in, out)``, the transpose of torch.
    config
        JSON-serialisable model configuration; see :mod:`converters` for its keys.
    """

    params: dict[str, np.ndarray]
    config: dict[str, Any]

    def __repr__(self) -> str:
        c = self.config
        return (
            f"ScviCheckpoint(n_input={c['n_input']}, n_latent={c['n_latent']}, "
            f"n_batch={c['n_batch']}, gene_likelihood={c['gene_likelihood']!r}, "
            f"n_params={len(self.params)}, path={c['source']['path']!r})"
        )


# --------------------------------------------------------------------------------------------
# The state-dict mapping
# --------------------------------------------------------------------------------------------


class _Rule(NamedTuple):
    """One state-dict entry: torch key, our key, our shape (dimension names), transform."""

    torch_key: str
    key: str
    shape: tuple[str, ...]
    transpose: bool = False  # torch Linear stores (out, in); our kernels are (in, out)
    group: str = "required"  # the optional groups "bias", "bn", "library": all keys or none


_ENC = "{enc}.encoder.fc_layers.Layer {i}."  # Linear (.0) then BatchNorm1d (.1)
_DEC = "decoder.{dec}.fc_layers.Layer 0."

#: Every state-dict entry of an LDVAE module. Templates: ``{enc}`` is ``z_encoder`` (layers
#: ``{i}`` = 0 .. n_layers - 1, ``n_out`` = n_latent) or ``l_encoder`` (layer 0, ``n_out`` = 1);
#: ``{dec}`` -> ``{out}`` is ``factor_regressor`` -> ``factor`` or ``px_dropout_decoder`` ->
#: ``dropout``. ``n_in`` is n_input for layer 0 and n_hidden after it; ``n_dispersion`` is
#: absent, n_batch or n_labels for dispersion "gene", "gene-batch" or "gene-label".
_RULES: tuple[_Rule, ...] = (
    _Rule(_ENC + "0.weight", "{enc}/layers/{i}/dense/kernel", ("n_in", "n_hidden"), True),
    _Rule(_ENC + "0.bias", "{enc}/layers/{i}/dense/bias", ("n_hidden",)),
    _Rule(_ENC + "1.weight", "{enc}/layers/{i}/bn/scale", ("n_hidden",)),
    _Rule(_ENC + "1.bias", "{enc}/layers/{i}/bn/bias", ("n_hidden",)),
    _Rule(_ENC + "1.running_mean", "{enc}/layers/{i}/bn/mean", ("n_hidden",)),
    _Rule(_ENC + "1.running_var", "{enc}/layers/{i}/bn/var", ("n_hidden",)),
    _Rule("{enc}.mean_encoder.weight", "{enc}/mean/kernel", ("n_hidden", "n_out"), True),
    _Rule("{enc}.mean_encoder.bias", "{enc}/mean/bias", ("n_out",)),
    _Rule("{enc}.var_encoder.weight", "{enc}/var/kernel", ("n_hidden", "n_out"), True),
    _Rule("{enc}.var_encoder.bias", "{enc}/var/bias", ("n_out",)),
    _Rule(_DEC + "0.weight", "decoder/{out}/dense/kernel", ("n_factor_in", "n_input"), True),
    _Rule(_DEC + "0.bias", "decoder/{out}/dense/bias", ("n_input",), group="bias"),
    _Rule(_DEC + "1.weight", "decoder/{out}/bn/scale", ("n_input",), group="bn"),
    _Rule(_DEC + "1.bias", "decoder/{out}/bn/bias", ("n_input",), group="bn"),
    _Rule(_DEC + "1.running_mean", "decoder/{out}/bn/mean", ("n_input",), group="bn"),
    _Rule(_DEC + "1.running_var", "decoder/{out}/bn/var", ("n_input",), group="bn"),
    _Rule("px_r", "px_r", ("n_input", "n_dispersion")),
    _Rule("library_log_means", "library_log_means", ("1", "n_batch"), group="library"),
    _Rule("library_log_vars", "library_log_vars", ("1", "n_batch"), group="library"),
)

#: State-dict entries that carry nothing we need: BatchNorm step counters and pyro's store.
_IGNORED_SUFFIX = ".num_batches_tracked"
_IGNORED_KEYS = frozenset({"pyro_param_store"})

_ENCODER_LAYER_WEIGHT = re.compile(r"z_encoder\.encoder\.fc_layers\.Layer (\d+)\.0\.weight")


def _instances(rule: _Rule, n_layers: int) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """Template values and dimension renames for each concrete key a rule stands for."""
    if "{enc}" in rule.torch_key:
        return [
            ({"enc": enc, "i": i}, {"n_out": n_out, "n_in": "n_hidden" if i else "n_input"})
            for enc, n_out, layers in (("z_encoder", "n_latent", n_layers), ("l_encoder", "1", 1))
            for i in range(layers if "{i}" in rule.torch_key else 1)
        ]
    if "{dec}" in rule.torch_key:
        return [({"dec": "factor_regressor", "out": "factor"}, {}),
                ({"dec": "px_dropout_decoder", "out": "dropout"}, {})]  # fmt: skip
    return [({}, {})]


def _expand_rules(n_layers: int) -> list[_Rule]:
    """:data:`_RULES` with templates filled in for a model with ``n_layers`` encoder layers."""
    return [
        rule._replace(
            torch_key=rule.torch_key.format(**names),
            key=rule.key.format(**names),
            shape=tuple(renames.get(d, d) for d in rule.shape),
        )
        for rule in _RULES
        for names, renames in _instances(rule, n_layers)
    ]


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def read_scvi_checkpoint(
    src: str | os.PathLike[str], *, prefix: str | None = None
) -> ScviCheckpoint:
    """Read a saved scvi-tools LinearSCVI model without torch and without running pickle code.

    Parameters
    ----------
    src
        A directory written by ``LinearSCVI.save`` (``{prefix}model.pt``, scvi-tools >= 0.15, or
        the legacy ``{prefix}model_params.pt`` + ``{prefix}attr.pkl`` + ``{prefix}var_names.csv``),
        or the path of a ``model.pt`` file.
    prefix
        File-name prefix given to ``LinearSCVI.save``; only for a directory. Without it, a
        directory holding exactly one ``*model.pt`` (or ``*model_params.pt``) is read.

    Returns
    -------
    ScviCheckpoint
        ``params`` (float32 arrays, kernels ``(in, out)``) and ``config`` (plain values).

    Raises
    ------
    FileNotFoundError
        ``src`` does not exist.
    UnsafeCheckpointError
        A pickle asks to import or call something off the allowlist.
    MalformedCheckpointError
        Corrupt, truncated or incomplete files; inconsistent shapes; non-finite weights.
    UnsupportedModelError
        Not a LinearSCVI model, or options we cannot mirror exactly.

    Examples
    --------
    >>> ckpt = read_scvi_checkpoint("my_model/")  # doctest: +SKIP
    >>> ckpt.params["decoder/factor/dense/kernel"].shape  # doctest: +SKIP
    (10, 2000)
    """
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"No such file or directory: {os.fspath(src)!r}")
    if not path.is_dir():
        if prefix is not None:
            msg = (
                f"{path} is a file and prefix= (CLI: --prefix) applies only to a folder, so pass "
                "the folder, or the file without a prefix."
            )
            raise CheckpointPathError(msg)
        return _read_model_pt(path)
    name = _find_prefix(path) if prefix is None else prefix
    if (path / f"{name}model.pt").is_file():
        return _read_model_pt(path / f"{name}model.pt")
    if (path / f"{name}model_params.pt").is_file():
        return _read_legacy(path, name)
    msg = (
        f"{path}: expected {name}model.pt (scvi-tools >= 0.15) or {name}model_params.pt (older) "
        "in this folder and found neither; if the model was saved with a prefix, pass it with "
        "prefix= (CLI: --prefix)."
    )
    raise MalformedCheckpointError(msg)


def _find_prefix(folder: Path) -> str:
    """The save prefix of the one model in ``folder`` ("" when there is none to find)."""
    for suffix in ("model.pt", "model_params.pt"):
        found = sorted(p.name for p in folder.glob(f"*{suffix}") if p.is_file())
        if len(found) == 1:
            return found[0].removesuffix(suffix)
        if len(found) > 1:
            example = found[0].removesuffix(suffix)
            msg = (
                f"{folder} holds several models ({', '.join(found)}); pick one with "
                f"prefix={example!r} (CLI: --prefix {example}) or another of their prefixes."
            )
            raise CheckpointPathError(msg)
    return ""


def _read_model_pt(path: Path) -> ScviCheckpoint:
    saved = load_torch_zip(path)
    expected = ("attr_dict", "model_state_dict", "var_names")
    if not isinstance(saved, dict) or not all(k in saved for k in expected):
        got = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
        msg = f"{path}: expected a dict with keys {list(expected)} (scvi-tools >= 0.15), got {got}"
        if isinstance(saved, dict) and any(isinstance(v, np.ndarray) for v in saved.values()):
            msg += "; a bare state dict is a legacy model_params.pt: pass its directory instead"
        raise MalformedCheckpointError(msg)
    var_names = saved["var_names"]
    if (
        not isinstance(var_names, np.ndarray)
        or var_names.ndim != 1
        or not all(isinstance(v, str) for v in var_names.tolist())
    ):
        msg = f"{path}: expected 'var_names' as a 1-D array of gene names (str), got {var_names!r}"
        raise MalformedCheckpointError(msg)
    return _convert(
        saved["model_state_dict"],
        var_names.tolist(),
        saved["attr_dict"],
        layout="modern",
        path=path,
    )


def _read_legacy(directory: Path, prefix: str) -> ScviCheckpoint:
    files = {
        name: directory / f"{prefix}{name}"
        for name in ("model_params.pt", "attr.pkl", "var_names.csv")
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        msg = f"{directory}: legacy (scvi-tools < 0.15) layout is missing {', '.join(missing)}"
        raise MalformedCheckpointError(msg)
    return _convert(
        load_torch_zip(files["model_params.pt"]),
        _read_var_names(files["var_names.csv"]),
        load_pickle(files["attr.pkl"]),
        layout="legacy",
        path=files["model_params.pt"],
    )


def _read_var_names(path: Path) -> list[str]:
    """Gene names of a legacy ``var_names.csv``, one per line.

    scvi-tools writes them with ``np.savetxt`` and reads them back with ``np.genfromtxt``, which
    strips surrounding whitespace.
    """
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        msg = f"{path}: {size} bytes is more than the cap of {MAX_PICKLE_BYTES} for gene names"
        raise MalformedCheckpointError(msg)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MalformedCheckpointError(f"{path}: gene names are not UTF-8 text ({err})") from err
    return [line.strip() for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# Attributes: registry and init parameters
# --------------------------------------------------------------------------------------------


class _Registry(NamedTuple):
    model_name: str | None
    scvi_version: str | None
    batch_key: str | None
    batch_categories: list[str]
    labels_key: str | None
    label_categories: list[str]
    layer: str | None


def _as_dict(value: Any, where: str, path: Path) -> dict:
    if not isinstance(value, dict):
        msg = f"{path}: expected {where} to be a dict, got {type(value).__name__} instead"
        raise MalformedCheckpointError(msg)
    return value


def _optional_str(value: Any, where: str, path: Path) -> str | None:
    if value is not None and not isinstance(value, str):
        msg = f"{path}: expected {where} to be a str or None, got {value!r} instead"
        raise MalformedCheckpointError(msg)
    return value


def _categories(mapping: Any, where: str, path: Path) -> list[str]:
    if mapping is None:
        return []
    if not isinstance(mapping, (np.ndarray, list, tuple)):
        msg = f"{path}: expected {where} as an array of categories, got {mapping!r} instead"
        raise MalformedCheckpointError(msg)
    return [str(c) for c in np.asarray(mapping, dtype=object).ravel()]


def _user_key(original_key: Any) -> Any:
    """scvi-tools names the column it creates when no key was given ``_scvi_<field>``."""
    if isinstance(original_key, str) and original_key.startswith("_scvi_"):
        return None
    return original_key


def _registry(attr: dict, path: Path) -> _Registry:
    if "registry_" in attr:
        return _modern_registry(_as_dict(attr["registry_"], "attr_dict['registry_']", path), path)
    if "scvi_setup_dict_" in attr:
        setup = _as_dict(attr["scvi_setup_dict_"], "attr_dict['scvi_setup_dict_']", path)
        return _legacy_registry(setup, path)
    msg = f"{path}: expected 'registry_' or 'scvi_setup_dict_' in the saved attributes, got "
    raise MalformedCheckpointError(f"{msg}{sorted(map(str, attr))}")


def _modern_registry(registry: dict, path: Path) -> _Registry:
    setup_args = _as_dict(registry.get("setup_args", {}), "registry_['setup_args']", path)
    fields = _as_dict(registry.get("field_registries", {}), "registry_['field_registries']", path)
    found: dict[str, Any] = {}
    for field in ("batch", "labels"):
        where = f"registry_['field_registries'][{field!r}]['state_registry']"
        state = _as_dict(
            _as_dict(fields.get(field, {}), where, path).get("state_registry", {}), where, path
        )
        key = setup_args.get(f"{field}_key", _user_key(state.get("original_key")))
        found[f"{field}_key"] = _optional_str(key, f"the {field} key", path)
        found[field] = _categories(
            state.get("categorical_mapping"), f"{where}['categorical_mapping']", path
        )
    return _Registry(
        model_name=_optional_str(registry.get("model_name"), "registry_['model_name']", path),
        scvi_version=_scvi_version(registry.get("scvi_version"), path),
        batch_key=found["batch_key"],
        batch_categories=found["batch"],
        labels_key=found["labels_key"],
        label_categories=found["labels"],
        layer=_optional_str(setup_args.get("layer"), "registry_['setup_args']['layer']", path),
    )


def _legacy_registry(setup: dict, path: Path) -> _Registry:
    """A pre-0.15 ``scvi_setup_dict_``, read as ``scvi/data/_compat.py`` converts it."""
    where = "scvi_setup_dict_"
    data_registry = _as_dict(setup.get("data_registry", {}), f"{where}['data_registry']", path)
    mappings = _as_dict(
        setup.get("categorical_mappings", {}), f"{where}['categorical_mappings']", path
    )
    found: dict[str, Any] = {"batch_key": None, "batch": [], "labels_key": None, "labels": []}
    for legacy_key, field in (("batch_indices", "batch"), ("labels", "labels")):
        entry = _as_dict(
            data_registry.get(legacy_key, {}), f"{where}['data_registry'][{legacy_key!r}]", path
        )
        if "attr_key" not in entry:
            continue
        mapping = _as_dict(
            mappings.get(entry["attr_key"]),
            f"{where}['categorical_mappings'][{entry['attr_key']!r}]",
            path,
        )
        key = _user_key(mapping.get("original_key"))
        found[f"{field}_key"] = _optional_str(key, f"the {field} key", path)
        found[field] = _categories(mapping.get("mapping"), f"the {field} mapping", path)
    x_entry = _as_dict(data_registry.get("X", {}), f"{where}['data_registry']['X']", path)
    layer = x_entry.get("attr_key") if x_entry.get("attr_name") == "layers" else None
    return _Registry(
        model_name=None,
        scvi_version=_scvi_version(setup.get("scvi_version"), path),
        batch_key=found["batch_key"],
        batch_categories=found["batch"],
        labels_key=found["labels_key"],
        label_categories=found["labels"],
        layer=_optional_str(layer, f"{where}['data_registry']['X']['attr_key']", path),
    )


def _scvi_version(value: Any, path: Path) -> str | None:
    return None if value is None else str(_optional_str(value, "scvi_version", path))


def _init_kwargs(attr: dict, path: Path) -> dict[str, Any]:
    """Named and keyword init arguments merged, as ``_initialize_model`` in scvi-tools does.

    ``init_params_`` is ``{"non_kwargs": {...}, "kwargs": {"model_kwargs": {...}}}`` (>= 0.14) or
    flat, ``{"n_latent": ..., "model_kwargs": {...}}``, where dict values hold keyword arguments.
    Keyword arguments override named ones.
    """
    if "init_params_" not in attr:
        msg = f"{path}: no 'init_params_' among the saved attributes {sorted(map(str, attr))}"
        raise MalformedCheckpointError(msg)
    init = _as_dict(attr["init_params_"], "attr_dict['init_params_']", path)
    if "non_kwargs" in init:
        named = _as_dict(init["non_kwargs"], "init_params_['non_kwargs']", path)
        groups = _as_dict(init.get("kwargs", {}), "init_params_['kwargs']", path)
    else:
        named = {k: v for k, v in init.items() if not isinstance(v, dict)}
        groups = {k: v for k, v in init.items() if isinstance(v, dict)}
    merged = dict(named)
    for name, group in groups.items():
        merged.update(_as_dict(group, f"init_params_ keyword group {name!r}", path))
    return merged


def _option(kwargs: dict, name: str, default: str, allowed: tuple[str, ...], path: Path) -> str:
    value = kwargs.get(name, default)
    if value not in allowed:
        msg = (
            f"{path}: {name}={value!r} cannot be mirrored; expected one of "
            f"{', '.join(map(repr, allowed))}, got {value!r} instead"
        )
        raise UnsupportedModelError(msg)
    return value


def _flag(kwargs: dict, name: str, default: bool, path: Path) -> bool:
    value = kwargs.get(name, default)
    if not isinstance(value, (bool, np.bool_)):
        msg = f"{path}: expected init parameter {name} to be a bool, got {value!r} instead"
        raise MalformedCheckpointError(msg)
    return bool(value)


def _count(kwargs: dict, name: str, path: Path) -> int | None:
    value = kwargs.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
        msg = f"{path}: expected init parameter {name} to be an int, got {value!r} instead"
        raise MalformedCheckpointError(msg)
    return None if value is None else int(value)


def _check_supported(kwargs: dict, path: Path) -> None:
    """Refuse LDVAE options that change the computation in ways we do not mirror."""
    refused = {
        "batch_representation": kwargs.get("batch_representation", "one-hot") != "one-hot",
        "encode_covariates": bool(kwargs.get("encode_covariates", False)),
        "n_continuous_cov": bool(kwargs.get("n_continuous_cov", 0)),
        "n_cats_per_cov": bool(kwargs.get("n_cats_per_cov")),
        "use_size_factor_key": bool(kwargs.get("use_size_factor_key", False)),
    }
    bad = [f"{name}={kwargs[name]!r}" for name, is_bad in refused.items() if is_bad]
    if bad:
        msg = f"{path}: LinearSCVI with {', '.join(bad)} is not supported (covariates or size "
        raise UnsupportedModelError(f"{msg}factors other than one-hot batch cannot be mirrored)")


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _check_model_name(registry: _Registry, state: dict, path: Path) -> None:
    name = registry.model_name
    if name is None:  # pre-0.15 attributes do not name the model: look at the layers
        if any(k.startswith("decoder.factor_regressor.") for k in state):
            return
        looks = "SCVI" if any(k.startswith("decoder.px_decoder.") for k in state) else "unknown"
        msg = f"{path}: not LinearSCVI (looks like {looks}): no decoder.factor_regressor layer"
        raise UnsupportedModelError(msg)
    if name != _MODEL_NAME:
        msg = f"{path}: this is a {name} model, not LinearSCVI; only LinearSCVI can be converted"
        raise UnsupportedModelError(msg)


def _shape_of(state: dict, key: str, ndim: int, path: Path) -> tuple[int, ...]:
    if key not in state:
        raise MalformedCheckpointError(f"{path}: missing state-dict key {key!r}")
    value = state[key]
    if not isinstance(value, np.ndarray) or value.ndim != ndim:
        got = value.shape if isinstance(value, np.ndarray) else type(value).__name__
        msg = f"{path}: expected state-dict key {key!r} to be a {ndim}-D tensor, got {got}"
        raise MalformedCheckpointError(msg)
    return value.shape


def _dims(state: dict, dispersion: str, path: Path) -> tuple[dict[str, int], int]:
    """Dimension sizes and the number of z-encoder layers, read from anchor tensors."""
    layers = sorted(int(m[1]) for k in state if (m := _ENCODER_LAYER_WEIGHT.fullmatch(k)))
    if layers != list(range(len(layers))) or not layers:
        msg = f"{path}: expected z-encoder layers numbered 0, 1, ..., got {layers or 'none'}"
        raise MalformedCheckpointError(msg)
    n_hidden, n_input = _shape_of(state, "z_encoder.encoder.fc_layers.Layer 0.0.weight", 2, path)
    n_latent, _ = _shape_of(state, "z_encoder.mean_encoder.weight", 2, path)
    factor_key = "decoder.factor_regressor.fc_layers.Layer 0.0.weight"
    _, n_factor_in = _shape_of(state, factor_key, 2, path)
    n_onehot = n_factor_in - n_latent
    if n_onehot < 0 or n_onehot == 1:  # FCLayers drops a one-category covariate
        msg = (
            f"{path}: expected {factor_key!r} to have n_latent ({n_latent}) columns, or n_latent "
            f"plus at least 2 batch columns, got {n_factor_in} instead"
        )
        raise MalformedCheckpointError(msg)
    dims = {
        "1": 1,
        "n_input": n_input,
        "n_hidden": n_hidden,
        "n_latent": n_latent,
        "n_factor_in": n_factor_in,
        "n_batch": max(n_onehot, 1),
    }
    if dispersion == "gene-label":
        dims["n_dispersion"] = _shape_of(state, "px_r", 2, path)[1]
    elif dispersion == "gene-batch":
        dims["n_dispersion"] = dims["n_batch"]
    return dims, len(layers)


def _map_state_dict(
    state: dict, dispersion: str, path: Path
) -> tuple[dict[str, np.ndarray], dict[str, int], int, set[str]]:
    """Map every state-dict entry through :data:`_RULES`, checking shapes and values."""
    state = {k: v for k, v in state.items() if k not in _IGNORED_KEYS}
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIX)}
    dims, n_layers = _dims(state, dispersion, path)
    rules = _expand_rules(n_layers)
    groups = {r.group for r in rules if r.torch_key in state} | {"required"}
    leftovers = sorted(set(state) - {r.torch_key for r in rules})
    if leftovers:
        msg = f"{path}: unexpected state-dict keys {leftovers}; this is not a plain LinearSCVI"
        raise UnsupportedModelError(f"{msg} module and cannot be mirrored exactly")
    missing = [r.torch_key for r in rules if r.group in groups and r.torch_key not in state]
    if missing:
        raise MalformedCheckpointError(f"{path}: missing state-dict keys {missing}")
    params = {}
    for rule in rules:
        if rule.group not in groups:
            continue
        value = state[rule.torch_key]
        names = tuple(d for d in rule.shape if d in dims)  # px_r is 1-D for "gene"
        shape = tuple(dims[d] for d in names)
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            msg = f"{path}: expected state-dict key {rule.torch_key!r} to be a float tensor"
            raise MalformedCheckpointError(f"{msg}, got {got} instead")
        array = value.T if rule.transpose else value
        if array.shape != shape:
            expected = dict(zip(names, shape, strict=True))
            msg = (
                f"{path}: expected {rule.torch_key!r} to have shape {shape} (as {rule.key}: "
                f"{expected}), got {array.shape} instead"
            )
            raise MalformedCheckpointError(msg)
        if not np.isfinite(array).all():
            msg = f"{path}: state-dict key {rule.torch_key!r} holds NaN or infinite values"
            raise MalformedCheckpointError(msg)
        params[rule.key] = np.ascontiguousarray(array, dtype=np.float32)
    return params, dims, n_layers, groups


def _cross_check(name: str, claimed: int | None, actual: int, path: Path) -> None:
    if claimed is not None and claimed != actual:
        msg = f"{path}: init_params_ give {name}={claimed!r} but the state dict has {actual}"
        raise MalformedCheckpointError(msg)


def _convert(
    state: Any, var_names: list[str], attr: Any, *, layout: str, path: Path
) -> ScviCheckpoint:
    state = _as_dict(state, "the model state dict", path)
    if not all(isinstance(k, str) for k in state):
        raise MalformedCheckpointError(f"{path}: expected str keys in the model state dict")
    attr = _as_dict(attr, "the saved attributes (attr_dict)", path)
    registry = _registry(attr, path)
    _check_model_name(registry, state, path)
    kwargs = _init_kwargs(attr, path)
    _check_supported(kwargs, path)
    likelihood = _option(kwargs, "gene_likelihood", "nb", _LIKELIHOODS, path)
    dispersion = _option(kwargs, "dispersion", "gene", _DISPERSIONS, path)
    latent = _option(kwargs, "latent_distribution", "normal", _LATENT_DISTRIBUTIONS, path)
    observed_lib = _flag(kwargs, "use_observed_lib_size", False, path)
    log_variational = _flag(kwargs, "log_variational", True, path)

    params, dims, n_layers, groups = _map_state_dict(state, dispersion, path)
    _cross_check("n_hidden", _count(kwargs, "n_hidden", path), dims["n_hidden"], path)
    _cross_check("n_latent", _count(kwargs, "n_latent", path), dims["n_latent"], path)
    _cross_check("n_layers", _count(kwargs, "n_layers", path), n_layers, path)
    if observed_lib and "library" in groups:
        msg = f"{path}: use_observed_lib_size=True but the state dict has library_log_means/vars"
        raise MalformedCheckpointError(f"{msg}, which scvi-tools only creates when it is False")
    n_batch = dims["n_batch"]
    if registry.batch_categories and len(registry.batch_categories) != n_batch:
        msg = f"{path}: the registry lists {len(registry.batch_categories)} batch categories but"
        raise MalformedCheckpointError(f"{msg} the decoder has {n_batch} batch columns")
    if dispersion == "gene-label":
        n_labels = dims["n_dispersion"]
        _cross_check("n_labels", _count(kwargs, "n_labels", path), n_labels, path)
        if n_labels == 0:
            msg = f"{path}: dispersion 'gene-label' with n_labels=0 (px_r has no columns)"
            raise UnsupportedModelError(msg)
    else:
        n_labels = max(_count(kwargs, "n_labels", path) or len(registry.label_categories), 1)
    if len(var_names) != dims["n_input"]:
        msg = f"{path}: expected {dims['n_input']} gene names, got {len(var_names)} instead"
        raise MalformedCheckpointError(msg)

    config = {
        "n_input": dims["n_input"],
        "n_latent": dims["n_latent"],
        "n_hidden": dims["n_hidden"],
        "n_layers": n_layers,
        "n_batch": n_batch,
        "n_labels": n_labels,
        "gene_likelihood": likelihood,
        "dispersion": dispersion,
        "latent_distribution": latent,
        "use_observed_lib_size": observed_lib,
        "log_variational": log_variational,
        "decoder_batch_norm": "bn" in groups,
        "decoder_bias": "bias" in groups,
        "var_names": var_names,
        "batch_key": registry.batch_key,
        "batch_categories": registry.batch_categories,
        "labels_key": registry.labels_key,
        "label_categories": registry.label_categories,
        "layer": registry.layer,
        "source": {
            "scvi_version": registry.scvi_version,
            "model_name": _MODEL_NAME,
            "layout": layout,
            "path": str(path.resolve()),
        },
    }
    return ScviCheckpoint(params=params, config=config)
