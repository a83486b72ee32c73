"""Minibatch size from the memory the device reports (``linear_decoder_jax.sizing``), tested on
CPU with a reported figure injected: sizes follow the figure, results do not."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_adata, random_model

import linear_decoder_jax as ldj
from linear_decoder_jax import assemble, sizing


class Device:
    """A device that reports ``free`` bytes (None: reports nothing, as the CPU does)."""

    platform = "gpu"

    def __init__(self, free: int | None, in_use: int = 0):
        self.free, self.in_use = free, in_use

    def memory_stats(self) -> dict[str, int] | None:
        if self.free is None:
            return None
        return {"bytes_limit": self.free + self.in_use, "bytes_in_use": self.in_use}


def test_the_reported_free_memory_sets_the_budget() -> None:
    gib = 2**30
    assert sizing.available_bytes([Device(3 * gib, in_use=gib)]) == 3 * gib
    assert sizing.available_bytes([Device(4 * gib), Device(gib)]) == gib  # the fullest device
    assert sizing.available_bytes([Device(None)]) is None
    # no figure: the documented fallback on accelerators, the cache budget on CPU
    assert sizing.budget([Device(None)], vectorize=True) == sizing.FALLBACK_ACCELERATOR_BYTES
    assert sizing.budget([Device(64 * gib)], vectorize=False) == sizing.CPU_BYTES
    assert sizing.budget([Device(8 * gib)], vectorize=True) == 8 * gib * sizing.ACCELERATOR_FRACTION
    assert sizing.budget([Device(8 * gib)], vectorize=True, n_scores=2) == gib


@pytest.mark.parametrize("n_obs", [20_000, 1_000_000])
def test_batch_size_grows_with_memory_and_fits_it(n_obs: int) -> None:
    n_vars, k, itemsize = 2000, 10, 4
    per_cell = n_vars * itemsize * sizing.SWEEP_TEMPORARIES * k
    sizes = []
    for free in (2**28, 2**30, 2**33, 2**36):
        devices = [Device(free)]
        size = sizing.choose_batch_size(
            n_obs, n_vars, k, itemsize=itemsize, vectorize=True, devices=devices
        )
        budget = sizing.budget(devices, vectorize=True)
        assert size % 8 == 0 and sizing.MIN_CELLS <= size <= sizing.MAX_CELLS
        assert size * per_cell <= budget or size == sizing.MIN_CELLS
        n_batches = -(-n_obs // size)
        assert n_batches * size - n_obs < 8 * n_batches  # evenly filled: little padding
        sizes.append(size)
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    # the CPU keeps its cache-sized minibatches whatever the device reports
    cpu = sizing.choose_batch_size(n_obs, n_vars, k, itemsize=itemsize, vectorize=False)
    assert cpu == 256
    chunks = [sizing.shapley_chunk(1024, n_vars, 4, devices=[Device(f)]) for f in (2**28, 2**36)]
    assert chunks[0] < chunks[1]


def test_small_and_large_reported_memory_give_equal_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The vmapped (accelerator) path on CPU with 512 KiB and 64 GiB reported: other minibatch
    sizes and Shapley chunks, the same scores (float64: to its rounding)."""
    model = random_model(seed=3, dtype="float64", n_latent=4)
    adata = random_adata(model, n_obs=100, seed=4)
    monkeypatch.setattr(assemble, "vectorize_default", lambda devices: True)
    results = {}
    for free in (2**19, 64 * 2**30):
        stats = {"bytes_limit": free, "bytes_in_use": 0}
        monkeypatch.setattr(sizing, "_memory_stats", lambda device, stats=stats: stats)
        results[free] = ldj.ablate(model, adata, shapley="exact", gene_scores=True, groupby="group")
    small, large = results.values()
    assert small.settings["batch_size"] == sizing.MIN_CELLS
    assert large.settings["batch_size"] >= adata.n_obs
    for key in ("delta_nll", "gain_nll", "shapley_nll", "gene_delta_nll", "mean_lfc"):
        a, b = np.asarray(small.arrays[key]), np.asarray(large.arrays[key])
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9, err_msg=key)
