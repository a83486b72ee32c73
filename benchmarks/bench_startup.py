"""Startup: how long a user waits before ``ldj`` answers, in fresh processes.

Measures, each the least of ``--repeat`` runs of a new Python process (wall clock):

* ``import jax`` and ``import anndata`` alone (the floor any command that needs them pays);
* ``ldj --help``;
* a typo in a data path (``ldj ablate MODEL missing.h5ad -o out.h5ad``): how long until the error;
* a warm-cache ``ldj ablate`` of the bundled demo (a few hundred cells, one to a few minibatches,
  so this is the time to the first minibatch's scores plus writing the result). The first,
  cold run fills the compilation cache and is reported separately.

Run: ``python benchmarks/bench_startup.py [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "linear_decoder_jax" / "data" / "demo"


def wall(cmd: list[str], *, env: dict[str, str], expect_rc: int | None = 0) -> float:
    """Seconds one run of ``cmd`` takes; checks its exit status."""
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if expect_rc is not None and done.returncode != expect_rc:
        raise SystemExit(f"{cmd} exited {done.returncode}: {done.stderr.strip()}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    py = sys.executable
    ldj = [py, "-m", "linear_decoder_jax"]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(Path(tmp) / "cache")}
        out = str(Path(tmp) / "out.h5ad")
        ablate = [*ldj, "ablate", str(DEMO / "model.pt"), str(DEMO / "counts.h5ad"), "-o", out]
        ablate += ["--overwrite"]
        cases = {
            "python -c 'import jax'": ([py, "-c", "import jax"], 0),
            "python -c 'import anndata'": ([py, "-c", "import anndata"], 0),
            "ldj --help": ([*ldj, "--help"], 0),
            "ldj ablate (typo in data path)": (
                [*ldj, "ablate", str(DEMO / "model.pt"), "missing.h5ad", "-o", out],
                1,
            ),
        }
        cold = wall(ablate, env=env)
        rows = [("ldj ablate demo, cold compilation cache", cold)]
        for name, (cmd, rc) in cases.items():
            rows.append((name, min(wall(cmd, env=env, expect_rc=rc) for _ in range(args.repeat))))
        warm = min(wall(ablate, env=env) for _ in range(args.repeat))
        rows.append(("ldj ablate demo, warm cache (to first minibatch and write)", warm))
    width = max(len(name) for name, _ in rows)
    print(f"{'case':<{width}}  seconds (least of {args.repeat})")
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:6.2f}")


if __name__ == "__main__":
    main()
