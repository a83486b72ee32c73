"""Scale: peak memory of a streamed ``ldj ablate`` vs the number of cells, and throughput vs the
number of devices.

* Peak RSS: ``ldj ablate MODEL DATA.h5ad -o OUT.h5ad`` (streams DATA in row chunks and writes OUT
  as it goes) on CSR h5ad files of N in {50k, 200k} cells x 2,000 genes (~10 % non-zeros), each
  in a fresh process; the target is a peak that does not grow with N (<= 30 % apart, < 2.5 GB).
* Devices: the same sweep on 1, 2 and 4 devices (CPU devices forced with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` here; GPUs/TPU cores where present),
  cells per second, and the largest difference from the 1-device result.

The model is random (speed and memory do not depend on training). Usage::

    python benchmarks/bench_scale.py [--sizes 50000 200000] [--devices 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
ROOT = HERE.parent
N_VARS, N_LATENT = 2_000, 10

CHILD = """
import resource, sys, time
from linear_decoder_jax.cli import main
t = time.perf_counter()
code = main(sys.argv[1:])
print("RESULT", time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      file=sys.stderr)
sys.exit(code)
"""


def make_model(folder: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import random_model

    model = random_model(n_input=N_VARS, n_latent=N_LATENT, n_hidden=128, n_batch=2, n_labels=1)
    model.save(folder)


def make_h5ad(path: Path, n_obs: int, seed: int = 0) -> None:
    """Write a CSR h5ad in row blocks (never the whole matrix in memory)."""
    import anndata
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import write_elem

    rng = np.random.default_rng(seed)
    rate = rng.gamma(0.3, 1.0, size=N_VARS) * 0.45
    block = 10_000
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        obs = pd.DataFrame(
            {"batch": pd.Categorical(rng.choice(["b0", "b1"], n_obs))},
            index=[f"c{i}" for i in range(n_obs)],
        )
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=[f"g{i}" for i in range(N_VARS)]))
        first = sp.csr_matrix(rng.poisson(rate, size=(block, N_VARS)).astype(np.float32))
        write_elem(f, "X", first)  # anndata makes the CSR arrays resizable
        x = anndata.io.sparse_dataset(f["X"])
        for start in range(block, n_obs, block):
            rows = min(block, n_obs - start)
            x.append(sp.csr_matrix(rng.poisson(rate, size=(rows, N_VARS)).astype(np.float32)))
        for key in ("layers", "obsm", "varm", "obsp", "varp", "uns"):
            write_elem(f, key, {})


def run_cli(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("RESULT"))
    _, seconds, rss = line.split()
    return float(seconds), float(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device-cells", type=int, default=50_000)
    parser.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    args = parser.parse_args()
    rows: dict[str, list] = {"memory": [], "devices": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model")
        print(f"{'N':>8} {'seconds':>8} {'cells/s':>9} {'peak RSS MB':>12}")
        for n in args.sizes:
            data = tmp / f"cells{n}.h5ad"
            make_h5ad(data, n)
            seconds, rss = run_cli(
                ["ablate", str(tmp / "model"), str(data), "-o", str(tmp / f"out{n}.h5ad")]
            )
            rows["memory"].append({"n_obs": n, "seconds": seconds, "peak_rss_mb": rss})
            print(f"{n:>8} {seconds:>8.1f} {n / seconds:>9.0f} {rss:>12.0f}", flush=True)
        peaks = [r["peak_rss_mb"] for r in rows["memory"]]
        spread = max(peaks) / min(peaks) - 1
        print(
            f"peak RSS spread across N: {spread:.0%} (target <= 30 %, all < 2500 MB: {max(peaks) < 2500})"
        )
        data = tmp / f"cells{args.device_cells}.h5ad"
        if not data.exists():
            make_h5ad(data, args.device_cells)
        print(f"{'devices':>8} {'seconds':>8} {'cells/s':>9} {'max |diff|':>11}")
        base = None
        for d in args.devices:
            out = tmp / f"dev{d}.h5ad"
            env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={d}"}
            seconds, _ = run_cli(["ablate", str(tmp / "model"), str(data), "-o", str(out)], env)
            import anndata

            delta = anndata.read_h5ad(out).obsm["delta_nll"]
            base = delta if base is None else base
            diff = float(np.abs(delta - base).max())
            rows["devices"].append(
                {
                    "devices": d,
                    "seconds": seconds,
                    "cells_per_s": args.device_cells / seconds,
                    "max_abs_diff_vs_1": diff,
                }
            )
            print(
                f"{d:>8} {seconds:>8.1f} {args.device_cells / seconds:>9.0f} {diff:>11.2e}",
                flush=True,
            )
    meta = {
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "n_vars": N_VARS,
        "n_latent": N_LATENT,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, **rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
