"""Distributed runs on one machine: cells/s of ``ldj ablate`` with 1, 2 (and more) processes.

What it measures (same data, same run, warm compilation cache):

* ``single_s``: ``ldj ablate MODEL DATA -o OUT`` as one ordinary process;
* ``distributed_s[n]``: the same command with ``--distributed`` on n local processes joined by
  ``jax.distributed`` on 127.0.0.1 (wall clock until every process has exited, OUT assembled);
* ``overhead``: ``distributed_s[n] / single_s`` and cells/s for each.

On a 2-core machine the processes share the cores, so this shows the cost of the runtime (joining,
settings check, baselines exchange, parts and assembly), not a speed-up; on a cluster each process
brings its own cores or devices. Data: synthetic NB counts (``bench_ablation.make_data``), a model
with random weights (speed does not depend on training).

Usage::

    python benchmarks/bench_distributed.py                      # 20k x 1,000 x 10, 1 and 2 processes
    python benchmarks/bench_distributed.py --n-obs 50000 --processes 1 2 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(folder: Path, n_vars: int, n_latent: int, var_names: list[str]) -> None:
    import jax
    import numpy as np

    import linear_decoder_jax as ldj
    from linear_decoder_jax.config import DataRegistry, LDVAEConfig, ModelSpec
    from linear_decoder_jax.params import abstract_params

    config = LDVAEConfig(n_input=n_vars, n_latent=n_latent, n_batch=3)
    rng = np.random.default_rng(0)

    def leaf(path, spec):
        name = jax.tree_util.keystr(path)
        if name.endswith(".var"):
            return rng.uniform(0.5, 2.0, spec.shape).astype(np.float32)
        return (rng.normal(size=spec.shape) * (0.1 if "kernel" in name else 0.05)).astype(
            np.float32
        )

    params = jax.tree_util.tree_map_with_path(leaf, abstract_params(config))
    data = DataRegistry(
        var_names=tuple(var_names),
        batch_key="batch",
        batch_categories=("a", "b", "c"),
    )
    ldj.LinearSCVI(params, ModelSpec(config, data, {})).save(folder)


def _run(cmd_sets: list[list[str]]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for c in cmd_sets
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(err.decode()[-2000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-obs", type=int, default=20_000)
    parser.add_argument("--n-vars", type=int, default=1_000)
    parser.add_argument("--n-latent", type=int, default=10)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=str(HERE / "results" / "distributed.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        import bench_ablation  # a sibling: benchmarks/ is sys.path[0] when run as a script

        adata = bench_ablation.make_data(args.n_obs, args.n_vars)
        data = tmp_path / "cells.h5ad"
        adata.write_h5ad(data)
        _model(tmp_path / "model", args.n_vars, args.n_latent, list(adata.var_names))
        base = [sys.executable, "-m", "linear_decoder_jax", "ablate", str(tmp_path / "model")]
        base += [str(data), "--baseline", "mean", "--overwrite"]
        _run([[*base, "-o", str(tmp_path / "warm.h5ad")]])  # fills the compilation cache
        single = min(_run([[*base, "-o", str(tmp_path / "one.h5ad")]]) for _ in range(2))
        record = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "n_obs": args.n_obs,
            "n_vars": args.n_vars,
            "n_latent": args.n_latent,
            "single_s": round(single, 2),
            "single_cells_per_s": round(args.n_obs / single),
            "distributed": {},
        }
        for n in args.processes:
            port = _port()
            cmds = [
                [
                    *base,
                    "-o",
                    str(tmp_path / f"dist{n}.h5ad"),
                    "--distributed",
                    "--coordinator",
                    f"127.0.0.1:{port}",
                    "--num-processes",
                    str(n),
                    "--process-id",
                    str(i),
                ]
                for i in range(n)
            ]
            seconds = _run(cmds)
            record["distributed"][str(n)] = {
                "seconds": round(seconds, 2),
                "cells_per_s": round(args.n_obs / seconds),
                "overhead_vs_single": round(seconds / single, 2),
            }
            print(f"{n} process(es): {seconds:.2f} s ({seconds / single:.2f}x one ordinary run)")
    print(json.dumps(record, indent=2))
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
