"""Streamed and distributed training on one machine: ``ldj train`` in memory, streamed from an
h5ad file and a zarr store, and ``--distributed`` with 1 and 2 local processes.

What it measures (N cells x G genes, CSR counts, batch size 128, 3 batches, NB, n_latent 10,
default options), as wall clock of whole ``ldj train`` commands (start-up, compilation, the data
check and the save included):

* ``*_s[E]``: one command with ``--max-epochs E`` for E = 1 and 3; every run in one sweep,
  interleaved, so that all see the same load (the load average is recorded at the start and end);
* ``*_epoch_s``: ``(t(3) - t(1)) / 2``, the time of an epoch once the run has started.

On a 2-core machine two processes share the cores and meet at every minibatch's collectives
(gloo over 127.0.0.1), so this shows what streaming and the multi-process step cost, not a
speed-up; on a cluster each process brings its own cores or devices and reads its own share.

Usage::

    python benchmarks/bench_train_distributed.py               # 5,000 x 1,000
    python benchmarks/bench_train_distributed.py --n-obs 20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import bench_distributed  # a sibling: its process launcher (benchmarks/ is sys.path[0])

HERE = Path(__file__).parent
ROOT = HERE.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-obs", type=int, default=5_000)
    parser.add_argument("--n-vars", type=int, default=1_000)
    parser.add_argument("--out", default=str(HERE / "results" / "train_distributed.json"))
    args = parser.parse_args()
    import scipy.sparse as sp

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        import bench_ablation  # a sibling: benchmarks/ is sys.path[0] when run as a script

        adata = bench_ablation.make_data(args.n_obs, args.n_vars)
        adata.X = sp.csr_matrix(adata.X)
        adata.write_h5ad(tmp_path / "cells.h5ad")
        adata.write_zarr(tmp_path / "cells.zarr")
        h5ad, zarr = str(tmp_path / "cells.h5ad"), str(tmp_path / "cells.zarr")

        def train(data: str, epochs: int, *extra: str) -> list[str]:
            out = str(tmp_path / f"model-{time.perf_counter_ns()}")
            cmd = [sys.executable, "-m", "linear_decoder_jax", "train", data, "-o", out]
            return cmd + ["--batch-key", "batch", "--max-epochs", str(epochs), "--quiet", *extra]

        def distributed(n: int, epochs: int) -> list[list[str]]:
            flags = [
                "--stream",
                "--distributed",
                "--coordinator",
                f"127.0.0.1:{bench_distributed._port()}",
            ]
            flags += ["--num-processes", str(n)]
            return [train(h5ad, epochs, *flags, "--process-id", str(i)) for i in range(n)]

        runs = {
            "in_memory": lambda e: [train(h5ad, e)],
            "stream_h5ad": lambda e: [train(h5ad, e, "--stream")],
            "stream_zarr": lambda e: [train(zarr, e, "--stream")],
            "distributed_1": lambda e: distributed(1, e),
            "distributed_2": lambda e: distributed(2, e),
        }
        load_start = os.getloadavg()
        times: dict[str, dict[int, float]] = {name: {} for name in runs}
        for epochs in (1, 3):
            for name, commands in runs.items():
                times[name][epochs] = bench_distributed._run(commands(epochs))
                print(name, epochs, round(times[name][epochs], 2), flush=True)
        load_end = os.getloadavg()
    record = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "n_obs": args.n_obs,
        "n_vars": args.n_vars,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in load_end],
    }
    for name, t in times.items():
        record[f"{name}_s"] = {str(e): round(v, 2) for e, v in t.items()}
        record[f"{name}_epoch_s"] = round((t[3] - t[1]) / 2, 2)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
