"""Refit ablation cost: the unique-contribution sweep next to the plain sweep, same data and run.

What it measures, per grid point (N cells x G genes x K latents, likelihood), all through
``ldj.ablate`` on the same in-memory AnnData:

* ``plain_e2e_s`` / ``plain_steady_s``: ``ldj.ablate(model, adata)``, first call (JIT compile
  included) and a second call.
* ``refit_e2e_s`` / ``refit_steady_s``: ``ldj.ablate(model, adata, refit=True)`` (plain sweep +
  refit, default L-BFGS settings: 100 steps, tol 1e-3), first and second call;
  ``refit_only_steady_s`` = refit_steady - plain_steady, ``refit_over_plain`` its ratio to
  plain_steady.
* ``converged_fraction``: fraction of (cell, latent) fits that met the gradient tolerance;
  ``unique_median`` / ``plain_median``: median over cells and latents of both scores.

Data: ``make_data`` of ``bench_ablation.py`` (synthetic NB counts, ~10 % non-zeros, 3 batches);
the model is a scvi-tools LinearSCVI trained for 1 epoch (speed does not depend on how well it is
trained).

Usage::

    python benchmarks/bench_refit.py                       # 20k x 2000 x 10, NB
    python benchmarks/bench_refit.py --likelihood nb zinb  # both
    python benchmarks/bench_refit.py --n-obs 2000          # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_point(n: int, g: int, k: int, likelihood: str) -> dict:
    import bench_ablation as bench  # a sibling: benchmarks/ is sys.path[0] when run as a script
    import jax

    import linear_decoder_jax as ldj

    adata = bench.make_data(n, g)
    with tempfile.TemporaryDirectory() as tmp:
        bench.train_scvi(adata, k, likelihood, Path(tmp) / "scvi")
        ldj.convert(Path(tmp) / "scvi", Path(tmp) / "ldj")
        model = ldj.load(Path(tmp) / "ldj")
    jax.clear_caches()
    _, plain_e2e = timed(lambda: ldj.ablate(model, adata))
    plain, plain_steady = timed(lambda: ldj.ablate(model, adata))
    _, refit_e2e = timed(lambda: ldj.ablate(model, adata, refit=True))
    res, refit_steady = timed(lambda: ldj.ablate(model, adata, refit=True))
    refit_only = max(refit_steady - plain_steady, 0.0)
    return {
        "n_obs": n,
        "n_vars": g,
        "n_latent": k,
        "likelihood": likelihood,
        "plain_e2e_s": plain_e2e,
        "plain_steady_s": plain_steady,
        "refit_e2e_s": refit_e2e,
        "refit_steady_s": refit_steady,
        "refit_only_steady_s": refit_only,
        "refit_over_plain": refit_only / plain_steady,
        "refit_ms_per_cell": 1e3 * refit_only / n,
        "converged_fraction": float(np.mean(res.refit_converged)),
        "max_grad_norm": float(np.max(res.refit_grad_norm)),
        "unique_median": float(np.median(res.unique_delta_nll)),
        "plain_median": float(np.median(plain.delta_nll)),
        "min_unique": float(np.min(res.unique_delta_nll)),
        "settings": {k: res.settings[k] for k in ("refit_optimizer", "refit_steps", "refit_tol")},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-obs", type=int, default=20_000)
    parser.add_argument("--n-vars", type=int, default=2_000)
    parser.add_argument("--n-latent", type=int, default=10)
    parser.add_argument("--likelihood", nargs="+", default=["nb"], choices=("nb", "zinb"))
    parser.add_argument("--out", default=str(HERE / "results" / "refit.json"))
    args = parser.parse_args()
    import jax

    rows = []
    header = (
        f"{'N':>7} {'G':>5} {'K':>3} {'lik':>5} {'plain':>8} {'refit':>8} {'ratio':>7} "
        f"{'e2e':>8} {'ms/cell':>8} {'conv':>6} {'uniq med':>9} {'plain med':>9}"
    )
    print(header)
    for lik in args.likelihood:
        r = run_point(args.n_obs, args.n_vars, args.n_latent, lik)
        rows.append(r)
        print(
            f"{r['n_obs']:>7} {r['n_vars']:>5} {r['n_latent']:>3} {r['likelihood']:>5} "
            f"{r['plain_steady_s']:>7.2f}s {r['refit_only_steady_s']:>7.1f}s "
            f"{r['refit_over_plain']:>6.0f}x {r['refit_e2e_s']:>7.1f}s "
            f"{r['refit_ms_per_cell']:>8.2f} {r['converged_fraction']:>6.1%} "
            f"{r['unique_median']:>9.3f} {r['plain_median']:>9.3f}",
            flush=True,
        )
    meta = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "date": time.strftime("%Y-%m-%d"),
        "load_average_at_end": os.getloadavg(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
