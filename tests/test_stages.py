"""Per-stage timers of a run (``linear_decoder_jax.stages``) and the GPU precision helper."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import accelerator_precision, random_adata, random_model

import linear_decoder_jax as ldj
from linear_decoder_jax import stages


def test_a_recorded_run_times_every_stage_and_gives_the_same_result(tmp_path) -> None:
    model = random_model(seed=1, n_latent=3)
    adata = random_adata(model, n_obs=100, seed=2)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    plain = ldj.ablate(model, str(path), output=tmp_path / "a.h5ad", batch_size=16)
    with stages.record() as times:
        timed = ldj.ablate(model, str(path), output=tmp_path / "b.h5ad", batch_size=16)
    np.testing.assert_array_equal(timed.delta_nll, plain.delta_nll)
    n_minibatches = -(-100 // 16)
    assert times.counts["read"] == times.counts["copy"] == n_minibatches
    assert times.counts["compute"] == times.counts["fetch"] == n_minibatches
    assert times.counts["write"] >= 1
    assert all(v >= 0 for v in times.as_dict().values())
    assert sum(times.as_dict().values()) > 0
    # outside a recording nothing is counted
    ldj.ablate(model, adata, batch_size=16)
    assert times.counts["read"] == n_minibatches
    with stages.record(), pytest.raises(RuntimeError, match="already recording"):
        with stages.record():
            pass


def test_accelerator_precision_sets_full_float32_products_off_cpu(monkeypatch) -> None:
    before = jax.config.jax_default_matmul_precision
    try:
        monkeypatch.setenv("JAX_PLATFORMS", "cpu")
        jax.config.update("jax_default_matmul_precision", None)
        accelerator_precision()
        assert jax.config.jax_default_matmul_precision is None
        monkeypatch.setenv("JAX_PLATFORMS", "")  # the default backend: a GPU where there is one
        accelerator_precision()
        assert jax.config.jax_default_matmul_precision == "highest"
    finally:
        jax.config.update("jax_default_matmul_precision", before)
