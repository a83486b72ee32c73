"""Reading a streamed h5ad: the h5py fast path (``sources.H5Source``) against anndata's element API
(``sources.StoreSource(path, fast=False)``), on the same file, side by side.

A CSR h5ad of N cells x G genes (synthetic counts, ~10 % non-zeros, a categorical batch column) is
written once; then, each the least of ``--repeats``:

1. ``open``: open the file, read var names, obs names and the batch column (what
   ``anndata_io.prepare`` reads besides the counts), in a fresh interpreter (wall clock from the
   parent, interpreter start included, so the import of anndata counts where a path needs it);
2. ``rows_<R>``: read every row of X in blocks of R rows (``counts("X")[lo:hi]``, what
   ``anndata_io.minibatches`` does; R = 4,096 is the block a run reads at 2,000 genes, 128 a
   small minibatch), in this process, after a warm-up pass (page cache warm);
3. ``import_anndata``: ``python -c "import anndata"`` against ``python -c "import h5py"``.

Usage::

    python benchmarks/bench_reading.py [--cells 20000] [--genes 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _write(path: Path, n_cells: int, n_genes: int) -> None:
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    x = sp.random(n_cells, n_genes, density=0.1, format="csr", random_state=rng, dtype=np.float32)
    x.data = np.ceil(x.data * 10).astype(np.float32)
    obs = pd.DataFrame(
        {"batch": pd.Categorical(rng.choice(["a", "b", "c"], n_cells))},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    anndata.AnnData(X=x, obs=obs, var=var).write_h5ad(path)


_OPEN = """
import sys, time
t0 = time.perf_counter()
from linear_decoder_jax import sources
with sources.StoreSource(sys.argv[1], fast=sys.argv[2] == "fast") as s:
    names = s.var_names, s.obs_names, s.obs_column("batch"), s.counts("X").shape
"""


def _least(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _subprocess(args: list[str]) -> None:
    subprocess.run([sys.executable, *args], check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from linear_decoder_jax import sources

    out: dict = {
        "cells": args.cells,
        "genes": args.genes,
        "repeats": args.repeats,
        "machine": platform.platform(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cells.h5ad"
        _write(path, args.cells, args.genes)
        for name, fast in (("h5py", True), ("element_api", False)):
            timings = {
                "open": _least(
                    lambda fast=fast: _subprocess(
                        ["-c", _OPEN, str(path), "fast" if fast else "element"]
                    ),
                    args.repeats,
                )
            }
            with sources.StoreSource(path, fast=fast) as source:
                matrix = source.counts("X")
                for rows in (4096, 128):

                    def read(matrix=matrix, rows=rows) -> None:
                        for lo in range(0, args.cells, rows):
                            matrix[lo : lo + rows]

                    read()  # warm-up
                    timings[f"rows_{rows}"] = _least(read, args.repeats)
            out[name] = timings
        out["import_anndata"] = _least(lambda: _subprocess(["-c", "import anndata"]), args.repeats)
        out["import_h5py"] = _least(lambda: _subprocess(["-c", "import h5py"]), args.repeats)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
