"""Cells per minibatch, from the memory the device reports as available to JAX.

On an accelerator the sweep decodes every ablated latent of a minibatch at once (``vmap``), and
Shapley values many coalitions at once, so the minibatch is as large as the device's free memory
allows: :func:`available_bytes` reads ``device.memory_stats()`` (``bytes_limit - bytes_in_use``).
With JAX's default preallocation on GPUs (``XLA_PYTHON_CLIENT_PREALLOCATE``, 75 % of the card
reserved at start-up) ``bytes_limit`` is that pool, which is what JAX allocates from; with
preallocation off it is what the allocator may still take. A fraction of it
(:data:`ACCELERATOR_FRACTION`) is given to a minibatch's temporaries, leaving room for the
minibatches in flight (read ahead, being written) and XLA's own scratch; the budget is shared by
the scores computed on each minibatch.

Where a backend reports no memory (``memory_stats()`` is None, as on CPU and some plugins) an
accelerator gets :data:`FALLBACK_ACCELERATOR_BYTES`; the CPU keeps its cache-sized budget
(:data:`CPU_BYTES`): it runs the latents one after another on (minibatch, genes) blocks that
should stay in cache, so more memory would make it slower, not faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Measured at 20k x 2000 x 10 NB, 2 cores: 256 cells per minibatch fastest, 128 and 512 10-20%
# slower, 1024 1.6x (the latents run one after another on cache-resident blocks).
CPU_BYTES = 12 * 2**20
FALLBACK_ACCELERATOR_BYTES = 1024 * 2**20  # an accelerator that reports no memory
ACCELERATOR_FRACTION = 0.25  # of the reported free memory, for one minibatch's temporaries
SWEEP_TEMPORARIES = 6  # live (cells, genes) arrays per ablated latent in the sweep body
SHAPLEY_TEMPORARIES = 8  # live (cells, genes) arrays per coalition in the Shapley body
MIN_CELLS, MAX_CELLS = 8, 2**15


def _memory_stats(device: Any) -> dict[str, int] | None:
    """``device.memory_stats()`` (one place, so that tests can inject a reported figure)."""
    try:
        return device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None


def available_bytes(devices: Sequence[Any]) -> int | None:
    """Free memory available to JAX on the fullest of ``devices`` (``bytes_limit -
    bytes_in_use``), or None when a device reports none (CPU)."""
    free = []
    for device in devices:
        stats = _memory_stats(device)
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(max(0, int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))))
    return min(free) if free else None


def budget(devices: Sequence[Any] | None, *, vectorize: bool, n_scores: int = 1) -> int:
    """Bytes of temporaries one score may use on one minibatch (see the module docstring)."""
    if not vectorize:
        return CPU_BYTES
    free = None if devices is None else available_bytes(devices)
    total = FALLBACK_ACCELERATOR_BYTES if free is None else int(ACCELERATOR_FRACTION * free)
    return max(1, total // max(1, n_scores))


def choose_batch_size(
    n_obs: int,
    n_vars: int,
    n_ablated: int,
    *,
    itemsize: int,
    vectorize: bool,
    devices: Sequence[Any] | None = None,
    n_scores: int = 1,
) -> int:
    """Largest power-of-two minibatch whose sweep temporaries fit the budget of ``devices``
    (:func:`budget`), between 8 and :data:`MAX_CELLS` cells and no larger than the data.

    ``n_ablated``: latents decoded at once when ``vectorize`` (all of them); ``n_scores``: scores
    computed on each minibatch (sweep, Shapley, ...), which share the budget. A minibatch spread
    over several devices puts 1/len(devices) of its cells on each.
    """
    per_cell = n_vars * itemsize * SWEEP_TEMPORARIES
    if vectorize:  # vmapped latents: all of them at once
        per_cell *= max(1, n_ablated)
    cells = budget(devices, vectorize=vectorize, n_scores=n_scores) // per_cell
    if vectorize and devices:
        cells *= len(devices)
    size = 2 ** int(np.floor(np.log2(max(1, cells))))
    size = int(np.clip(size, MIN_CELLS, MAX_CELLS))
    if vectorize:  # large minibatches: as many, evenly filled (the last is not mostly padding)
        n_batches = -(-n_obs // size)
        size = -(-n_obs // (8 * n_batches)) * 8
    return int(min(size, max(MIN_CELLS, -(-n_obs // 8) * 8)))


def shapley_chunk(
    batch_size: int, n_vars: int, itemsize: int, *, devices: Sequence[Any] | None = None
) -> int:
    """Coalitions Shapley decodes at once on an accelerator: as many as the budget of
    ``devices`` holds for a minibatch of ``batch_size`` cells (at least one)."""
    per = batch_size * n_vars * itemsize * SHAPLEY_TEMPORARIES
    if devices:
        per = max(1, per // len(devices))
    return max(1, budget(devices, vectorize=True) // per)
