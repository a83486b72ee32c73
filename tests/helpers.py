"""Random LDVAE models and data for tests that need no scvi-tools; the port and environment of
the tests that start several processes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import anndata
import jax
import numpy as np
import pandas as pd

import linear_decoder_jax as ldj
from linear_decoder_jax.config import DataRegistry, LDVAEConfig, ModelSpec
from linear_decoder_jax.params import abstract_params


def random_model(seed: int = 0, dtype: str = "float32", **overrides) -> ldj.LinearSCVI:
    """A LinearSCVI with random weights (plausible scales) for any configuration."""
    cfg = {"n_input": 30, "n_latent": 5, "n_hidden": 12, "n_batch": 2, "n_labels": 2, **overrides}
    config = LDVAEConfig(**cfg)
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = jax.tree_util.keystr(path)
        if name.endswith(".var"):
            return rng.uniform(0.5, 2.0, spec.shape).astype(np.float32)
        scale = 0.3 if "kernel" in name else 0.1
        return (rng.normal(size=spec.shape) * scale).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(leaf, abstract_params(config))
    data = DataRegistry(
        var_names=tuple(f"g{i}" for i in range(config.n_input)),
        batch_key="batch" if config.n_batch > 1 else None,
        batch_categories=tuple(f"b{i}" for i in range(config.n_batch)),
        labels_key="label" if config.n_labels > 1 else None,
        label_categories=tuple(f"l{i}" for i in range(config.n_labels)),
    )
    return ldj.LinearSCVI(params, ModelSpec(config, data, {}), dtype=dtype)


def random_adata(model: ldj.LinearSCVI, n_obs: int = 37, seed: int = 1, zero_cells: int = 0):
    rng = np.random.default_rng(seed)
    g = model.config.n_input
    x = rng.negative_binomial(2, 0.2, size=(n_obs, g)).astype(np.float32)
    x[:zero_cells] = 0
    d = model.spec.data
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n_obs)])
    obs["batch"] = pd.Categorical(rng.choice(list(d.batch_categories), n_obs))
    obs["label"] = pd.Categorical(rng.choice(list(d.label_categories), n_obs))
    obs["group"] = pd.Categorical(rng.choice(["A", "B", "C"], n_obs))
    return anndata.AnnData(X=x, obs=obs, var=pd.DataFrame(index=list(d.var_names)))


def plan_for(model: ldj.LinearSCVI, n_obs: int, baseline, **overrides):
    """A ``pipeline.Plan`` over all latents and cells on one device (for tests that drive scorers)."""
    from linear_decoder_jax import pipeline, sizing

    fields = {
        "latents": tuple(range(model.n_latent)),
        "baseline_name": "values",
        "baseline": tuple(float(b) for b in baseline),
        "mode": "drop",
        "library": "model",
        "n_samples": 0,
        "seed": 0,
        "batch_size": sizing.choose_batch_size(
            n_obs, model.config.n_input, model.n_latent, itemsize=4, vectorize=False
        ),
        "dtype": model.dtype,
        "devices": tuple(jax.local_devices()[:1]),
        "rows": (0, n_obs),
        "vectorize": False,
        **overrides,
    }
    return pipeline.Plan(**fields)


def accelerator_precision() -> None:
    """Float32 matrix products at full precision wherever the tests may run on a GPU or TPU
    (``JAX_PLATFORMS`` other than ``cpu``): JAX's default there is TF32 or bf16 passes, and the
    tests' float32 tolerances are set for float32 rounding. On CPU it changes nothing (its
    products are full float32 either way). Called once by conftest, before any test traces."""
    import os

    if os.environ.get("JAX_PLATFORMS", "") != "cpu":
        jax.config.update("jax_default_matmul_precision", "highest")


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (a jax.distributed coordinator's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int, *, compilation_cache: bool = True) -> dict[str, str]:
    """The environment of a child process: this checkout importable, CPU only with ``devices``
    devices, and (``compilation_cache=False``) no on-disk compilation cache."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if not compilation_cache:
        env["LDJ_COMPILATION_CACHE"] = "0"
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # importing jax here set it; a user's shell has none
    return env


def seed_scvi(seed: int = 0) -> None:
    """``scvi.settings.seed = seed`` (torch, numpy, random and scvi's train/validation split)
    without its side effect on ``XLA_FLAGS``: the setter appends a GPU-only flag on every call,
    which child processes inherit and which changes JAX's compilation-cache keys."""
    import scvi

    flags = os.environ.get("XLA_FLAGS")
    scvi.settings.seed = seed
    if flags is None:
        os.environ.pop("XLA_FLAGS", None)
    else:
        os.environ["XLA_FLAGS"] = flags
