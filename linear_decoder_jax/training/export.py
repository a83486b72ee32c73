"""Export a model to a scvi-tools 1.4 ``LinearSCVI`` directory, without torch.

``DIR/model.pt`` is written as ``BaseModelClass.save`` writes it: a torch zip archive holding
``{"model_state_dict": OrderedDict, "var_names": ndarray, "attr_dict": {...}}``. The state dict
is the converter's key table (``converters.scvi_ldvae._RULES``) run backwards, kernels transposed
back to torch's (out, in); ``attr_dict`` holds ``init_params_`` and the ``registry_`` that
``scvi.model.LinearSCVI.load(DIR, adata=...)`` sets the AnnData up with (``setup_args`` and the
X, batch and labels field registries), plus ``history_`` and the split of a model trained here.
"""

from __future__ import annotations

import os
import uuid
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from linear_decoder_jax._atomic import atomic_path
from linear_decoder_jax.params import to_flat

SCVI_VERSION = "1.4.2"  # the release whose layout is written


def state_dict(model: Any, *, num_batches_tracked: int = 0) -> OrderedDict[str, Any]:
    """The scvi-tools ``LDVAE`` state dict of ``model`` (numpy arrays under torch's keys)."""
    from converters.scvi_ldvae import _expand_rules

    flat = {k: np.asarray(v, np.float32) for k, v in to_flat(model.host_params).items()}
    out: OrderedDict[str, Any] = OrderedDict()
    for rule in _expand_rules(model.config.n_layers):
        if rule.key not in flat:
            continue
        value = flat[rule.key]
        out[rule.torch_key] = np.ascontiguousarray(value.T if rule.transpose else value)
        if rule.torch_key.endswith(".1.running_var"):
            stem = rule.torch_key.removesuffix("running_var")
            out[stem + "num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
    return out


def _mapping(key: str | None, categories: tuple[str, ...], default: str) -> dict[str, Any]:
    if key is None:
        state = {"categorical_mapping": np.array([0]), "original_key": default}
    else:
        state = {"categorical_mapping": np.array(categories, dtype=object), "original_key": key}
    return {"data_registry": {"attr_key": default, "attr_name": "obs"}, "state_registry": state}


def registry(model: Any, n_obs: int) -> dict[str, Any]:
    """``registry_`` as ``LinearSCVI.setup_anndata`` records it in scvi-tools 1.4."""
    data, config = model.spec.data, model.config
    var_names = np.array(data.var_names, dtype=object)
    fields: defaultdict[str, Any] = defaultdict(dict)
    fields["X"] = {
        "data_registry": {"attr_key": data.layer, "attr_name": "layers" if data.layer else "X"},
        "state_registry": {"column_names": var_names, "n_obs": n_obs, "n_vars": len(var_names)},
        "summary_stats": {"n_cells": n_obs, "n_vars": len(var_names)},
    }
    fields["batch"] = _mapping(data.batch_key, data.batch_categories, "_scvi_batch")
    fields["batch"]["summary_stats"] = {"n_batch": config.n_batch}
    fields["labels"] = _mapping(data.labels_key, data.label_categories, "_scvi_labels")
    fields["labels"]["summary_stats"] = {"n_labels": config.n_labels}
    return {
        "scvi_version": SCVI_VERSION,
        "model_name": "LinearSCVI",
        "setup_args": {
            "batch_key": data.batch_key,
            "labels_key": data.labels_key,
            "layer": data.layer,
        },  # fmt: skip
        "field_registries": fields,
        "setup_method_name": "setup_anndata",
        "_scvi_uuid": str(uuid.uuid4()),
    }


def attr_dict(model: Any) -> dict[str, Any]:
    """``attr_dict`` of ``model.pt``: init parameters, registry and training attributes."""
    config = model.config
    training = model.training or {}
    settings = training.get("settings", {})
    model_kwargs: dict[str, Any] = {}
    if not config.decoder_batch_norm:
        model_kwargs["use_batch_norm"] = False
    if config.decoder_bias:
        model_kwargs["bias"] = True
    if not config.log_variational:
        model_kwargs["log_variational"] = False
    if config.dispersion == "gene-label":
        model_kwargs["n_labels"] = config.n_labels
    non_kwargs = {
        "n_hidden": config.n_hidden,
        "n_latent": config.n_latent,
        "n_layers": config.n_layers,
        "dropout_rate": float(settings.get("dropout_rate", 0.1)),
        "dispersion": config.dispersion,
        "gene_likelihood": config.gene_likelihood,
        "use_observed_lib_size": config.use_observed_lib_size,
        "latent_distribution": config.latent_distribution,
    }
    indices = {k: np.asarray(v, np.int64) for k, v in training.get("indices", {}).items()}
    n_obs = int(sum(len(v) for v in indices.values()))
    out: dict[str, Any] = {
        "init_params_": {"kwargs": {"model_kwargs": model_kwargs}, "non_kwargs": non_kwargs},
        "registry_": registry(model, n_obs),
        "is_trained_": True,
        "get_normalized_function_name_": "get_normalized_expression",
        "run_id_": "",
        "run_name_": "",
    }
    if model.training is not None:
        out["history_"] = model.history_
        for name in ("train", "validation", "test"):
            out[f"{name}_indices_"] = indices.get(name, np.zeros(0, np.int64))
    return out


def export_scvi(model: Any, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` as a scvi-tools ``LinearSCVI`` directory ``path`` (``model.pt``)."""
    from converters._torch_zip_writer import Tensor, write_torch_zip

    state: OrderedDict[str, Any] = OrderedDict((k, Tensor(v)) for k, v in state_dict(model).items())
    state["pyro_param_store"] = {"params": {}, "constraints": {}}
    saved = {
        "model_state_dict": state,
        "var_names": np.array(model.spec.data.var_names, dtype=object),
        "attr_dict": attr_dict(model),
    }
    with atomic_path(path, overwrite=overwrite, directory=True) as tmp:
        write_torch_zip(saved, Path(tmp) / "model.pt", root="model")
    return Path(path).absolute()
