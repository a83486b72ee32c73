"""``ldj merge``: join the parts written by ``ldj ablate --shard i/n`` into one result.

Each part records its shard, its row range, the total number of input cells, the settings and a
fingerprint of the model (``uns["ablation"]``). A merge refuses parts from different models or
settings, duplicated or missing shards, and row ranges that do not tile the input; it writes the
whole result in obs order, streaming the large arrays.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from linear_decoder_jax import schema
from linear_decoder_jax._atomic import atomic_path, check_destination
from linear_decoder_jax.errors import IncompatibleDataError
from linear_decoder_jax.options import ExecutionOptions
from linear_decoder_jax.results import AblationResult, H5adStream, derive

# Settings that may differ between parts: how each part was run (the execution options, and
# where it ran), not what it computed. A part of another family or unit differs in what.
_PER_PART = {f.name for f in dataclasses.fields(ExecutionOptions)} | {
    "rows",
    "n_devices",
    "versions",
    "source_model",
}


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in settings.items():
        if key not in _PER_PART:
            out[key] = np.asarray(value).tolist() if isinstance(value, np.ndarray) else value
    return out


def _check(parts: list[tuple[str, AblationResult]], *, whole_ok: bool = False) -> None:
    first_path, first = parts[0]
    reference = _comparable(first.settings)
    for path, part in parts[1:]:
        other = _comparable(part.settings)
        diff = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
        if diff:
            msg = f"{path} was not made with the same model and settings as {first_path} (differs in {diff})."
            raise IncompatibleDataError(msg)
    n_shards = {int(p.settings["shard"][1]) for _, p in parts}
    if len(n_shards) != 1:
        raise IncompatibleDataError(f"Parts come from different shard counts: {sorted(n_shards)}.")
    (n,) = n_shards
    if n == 1 and not (whole_ok and len(parts) == 1):
        msg = (
            f"{', '.join(path for path, _ in parts)} are whole runs, not shard parts of one run "
            "(`ldj ablate --shard I/N` writes those), so there is nothing to merge."
        )
        raise IncompatibleDataError(msg)
    seen = sorted(int(p.settings["shard"][0]) for _, p in parts)
    if seen != list(range(n)):
        missing = sorted(set(range(n)) - set(seen))
        dups = sorted({i for i in seen if seen.count(i) > 1})
        msg = f"Expected shards 0..{n - 1} once each; missing {missing}, duplicated {dups}."
        raise IncompatibleDataError(msg)
    stop = 0
    for path, part in parts:
        lo, hi = (int(v) for v in part.settings["rows"])
        if lo != stop or hi - lo != len(part.delta_nll):
            raise IncompatibleDataError(f"{path}: rows {lo}..{hi} do not continue at row {stop}.")
        stop = hi
    if stop != int(first.settings["n_obs_total"]):
        msg = f"Parts cover {stop} of {int(first.settings['n_obs_total'])} input cells."
        raise IncompatibleDataError(msg)


def _group_mean(results: list[AblationResult], name: str) -> np.ndarray:
    """Per-group means of the parts (groups x ...), weighted by each part's group cell counts
    (``gene_n_cells``); NaN where no part has a cell of the group."""
    counts = [np.asarray(r.arrays["gene_n_cells"], np.float64) for r in results]
    total = sum(counts)
    ndim = np.ndim(results[0].arrays[name])
    along = (slice(None),) + (None,) * (ndim - 1)  # counts broadcast over the other axes
    acc = sum(
        np.nan_to_num(np.asarray(r.arrays[name], np.float64)) * c[along]
        for r, c in zip(results, counts, strict=True)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = acc / np.where(total > 0, total, np.nan)[along]
    return mean.astype(np.asarray(results[0].arrays[name]).dtype)


def merge_parts(
    paths: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    settings: dict[str, Any] | None = None,
    whole_ok: bool = False,
    global_totals: bool = False,
) -> AblationResult:
    """Merge shard results into ``output`` (atomic; refuses to overwrite unless asked);
    ``settings`` are recorded in the merged ``uns["ablation"]`` on top of the parts' own;
    ``whole_ok`` accepts one whole run as its own single part (a one-process distributed run);
    ``global_totals``: every part holds the totals over all cells (a distributed run's global
    mesh), taken from the first part as they are."""
    import pandas as pd

    check_destination(output, overwrite=overwrite)
    parts = [(str(p), AblationResult.read(p)) for p in paths]
    parts.sort(key=lambda item: int(item[1].settings["shard"][0]))
    _check(parts, whole_ok=whole_ok)
    results = [p for _, p in parts]
    first = results[0]
    counts = [len(r.obs) for r in results]
    n = sum(counts)
    present = [f for f in schema.FIELDS if first.arrays.get(f.name) is not None]
    shapes = {
        f.name: ((n, *first.arrays[f.name].shape[1:]), first.arrays[f.name].dtype)
        for f in present
        if f.per_cell
    }
    with atomic_path(output, overwrite=overwrite, directory=False) as tmp:
        stream = H5adStream(tmp, shapes)
        try:
            start = 0
            for part, count in zip(results, counts, strict=True):
                for key in shapes:
                    stream.arrays[key][start : start + count] = part.arrays[key]
                start += count
            arrays = stream.read_back()
            for f in present:
                if global_totals and not f.per_cell:
                    arrays[f.name] = np.asarray(first.arrays[f.name])
                elif f.reduce == "mean":  # means over each part's cells, weighted by cell counts
                    total = sum(r.arrays[f.name] * c for r, c in zip(results, counts, strict=True))
                    arrays[f.name] = np.asarray(total / n)
                elif f.reduce == "sum":
                    arrays[f.name] = np.asarray(sum(r.arrays[f.name] for r in results))
                elif f.reduce == "group_mean":
                    arrays[f.name] = _group_mean(results, f.name)
            extra = dict(settings or {})
            settings = dict(first.settings)
            settings.update(
                shard=np.asarray([0, 1]),
                rows=np.asarray([0, n]),
                merged_parts=len(results),
                n_devices=max(int(r.settings["n_devices"]) for r in results),
            )
            settings.update(extra)
            obs = pd.concat([r.obs for r in results])
            groups, explained = derive(arrays, obs, settings)
            merged = AblationResult(
                arrays=arrays,
                loadings=first.loadings,
                obs=obs,
                var_names=first.var_names,
                settings=settings,
                embeddings={
                    k: np.concatenate([r.embeddings[k] for r in results]) for k in first.embeddings
                },
                groups=groups,
                explained_table=explained,
            )
            stream.finish(merged)
        finally:
            stream.close()
    return AblationResult.read(Path(output))
