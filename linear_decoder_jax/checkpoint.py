"""Our on-disk format: an orbax-checkpoint of the parameters plus a versioned ``config.json``.

Layout of a converted model directory::

    MODEL/
      config.json   {"format_version": 2, "family": "linear_scvi" | "drvi", "model": {...},
                     "data": {...}, "source": {...}}  (version 1, without "family": LinearSCVI)
      params/       orbax checkpoint of the parameter tree (flat keys nested by "/")
      training.json history (scvi-tools' history_ keys, one value per epoch) and settings, and
      training_indices.npz  train / validation / test cell indices (trained models only)

This is the only module that writes or reads that format. Restores go against
``abstract_params(config)``, and every leaf's shape is checked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from linear_decoder_jax._atomic import atomic_path
from linear_decoder_jax.config import LDVAEConfig, ModelSpec
from linear_decoder_jax.errors import CheckpointFormatError, ConfigError
from linear_decoder_jax.params import abstract_params, from_flat, to_flat

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TRAINING_FILE = "training.json"
INDICES_FILE = "training_indices.npz"


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, last = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{path}/"))
        else:
            flat[path] = value
    return flat


def _family_params(spec: ModelSpec) -> tuple[Any, Any]:
    """``abstract_params`` and ``from_flat`` of the spec's family."""
    if isinstance(spec.model, LDVAEConfig):
        return abstract_params, from_flat
    from linear_decoder_jax.families import drvi

    return drvi.abstract_params, drvi.from_flat


def save(
    path: str | os.PathLike,
    params: Any,
    spec: ModelSpec,
    *,
    overwrite: bool = False,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``params`` and ``spec`` to the directory ``path`` atomically; return its path.

    ``training`` (a trained model's record: ``history``, ``settings`` and ``indices``, a dict of
    index arrays) goes to ``training.json`` and ``training_indices.npz``."""
    import orbax.checkpoint as ocp

    flat = {k: np.asarray(v) for k, v in to_flat(params).items()}
    with atomic_path(path, overwrite=overwrite, directory=True) as tmp:
        with ocp.StandardCheckpointer(**_this_process_only()) as ckptr:
            ckptr.save(tmp / PARAMS_DIR, _nest(flat))
            ckptr.wait_until_finished()
        (tmp / CONFIG_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
        if training is not None:
            record = {k: v for k, v in training.items() if k != "indices"}
            (tmp / TRAINING_FILE).write_text(json.dumps(record) + "\n")
            indices = {k: np.asarray(v, np.int64) for k, v in training["indices"].items()}
            np.savez(str(tmp / INDICES_FILE), **indices)  # type: ignore[arg-type]
    return Path(path).absolute()


def _this_process_only() -> dict[str, Any]:
    """Orbax options that let one process of a distributed run (process 0, after ``ldj train
    --distributed``) save alone: by default orbax waits for every process at its barriers."""
    import jax

    if not jax.distributed.is_initialized():
        return {}
    import orbax.checkpoint as ocp

    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return {"multiprocessing_options": options}


def read_training(path: str | os.PathLike) -> dict[str, Any] | None:
    """The training record of a model directory written by ``ldj.train`` (None otherwise)."""
    path = Path(path)
    if not (path / TRAINING_FILE).is_file():
        return None
    try:
        record = json.loads((path / TRAINING_FILE).read_text(encoding="utf-8"))
        with np.load(path / INDICES_FILE, allow_pickle=False) as npz:
            record["indices"] = {k: np.asarray(npz[k]) for k in npz.files}
    except (OSError, ValueError, KeyError) as err:
        msg = f"{path}: cannot read the training record ({type(err).__name__}: {err})."
        raise CheckpointFormatError(msg) from err
    return record


def read_spec(path: str | os.PathLike) -> ModelSpec:
    """Read ``config.json`` of a converted model directory."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        msg = f"{path} is not a linear-decoder-jax model directory: {CONFIG_FILE} is missing."
        raise CheckpointFormatError(msg)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise TypeError(f"expected a JSON object, got {type(config).__name__}")
        spec = ModelSpec.from_dict(config)
    # ValueError covers invalid JSON and text that is not UTF-8
    except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as err:
        msg = f"{config_file} is not a valid model configuration: {err}"
        raise CheckpointFormatError(msg) from err
    model, data = spec.model, spec.data
    counts: list[tuple[str, Any, Any]] = [("genes", len(data.var_names), model.n_input)]
    if not isinstance(model, LDVAEConfig):  # DRVI: the batch, then each categorical covariate
        per_cov = [max(len(data.batch_categories), 1)]
        per_cov += [len(c) for c in data.categorical_covariate_categories]
        if len(data.categorical_covariate_keys) != len(data.categorical_covariate_categories):
            per_cov.append(-1)
        counts.append(("categories per covariate", per_cov, list(model.n_cats_per_cov)))
    elif model.n_batch > 1:
        counts.append(("batch categories", len(data.batch_categories), model.n_batch))
    if isinstance(model, LDVAEConfig) and model.dispersion == "gene-label":
        counts.append(("label categories", len(data.label_categories), model.n_labels))
    for what, listed, expected in counts:
        if listed != expected:
            msg = f"{config_file} lists {listed} {what} but the model has {expected}."
            raise CheckpointFormatError(msg)
    return spec


def load(path: str | os.PathLike) -> tuple[Any, ModelSpec]:
    """Read a directory written by :func:`save`; shapes are checked against the config."""
    import jax
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    spec = read_spec(path)
    abstract, from_flat_ = _family_params(spec)
    template = to_flat(abstract(spec.model))
    target = _nest({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in template.items()})
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path / PARAMS_DIR, target)
    except Exception as err:  # orbax raises many types for a damaged checkpoint
        msg = f"Could not restore the parameters in {path / PARAMS_DIR}: {err}"
        raise CheckpointFormatError(msg) from err
    return from_flat_(_flatten(restored), spec.model), spec


def fingerprint(params: Any, spec: ModelSpec) -> str:
    """sha256 over the architecture, the data registry and every parameter (as float32).

    Identifies a model across shards and processes: the same weights converted to two places, or
    loaded in float32 and float64, give the same fingerprint (the provenance in ``spec.source``,
    such as the checkpoint's path, is left out).
    """
    import hashlib

    described = {"model": spec.model.to_dict(), "data": spec.data.to_dict()}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for key, value in sorted(to_flat(params).items()):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(value, dtype=np.float32).tobytes())
    return digest.hexdigest()
