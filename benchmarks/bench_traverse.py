"""The latent traversal (``ldj.ablate(traverse=True)``): what it adds to a run, per family and path.

In one process, on the same in-memory data (N cells x G genes, synthetic counts), each timed as
the least of ``--repeats`` calls after one warm-up call (compiles excluded):

* LinearSCVI (random weights, K latents): the plain sweep; the sweep plus a traversal of every
  latent over ``--steps`` values by the rank-one path (``family.AffineFamily``); the same through
  the generic path (the family's whole decode per grid value; the same maths, so the results are
  compared);
* DRVI (default architecture, random weights from ``abstract_params``' shapes, K latents): the
  plain sweep, the sweep plus the traversal by the per-split path (``traversal._split_parts``:
  the moved latent's split decoded once per covariate combination) and by the generic path (every
  split decoded again per grid value; results compared).

Usage::

    python benchmarks/bench_traverse.py                       # 5k x 2000 x 10, 11 steps
    python benchmarks/bench_traverse.py --n-obs 1000 --n-vars 500
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
from bench_drvi import make_adata  # a sibling: benchmarks/ is sys.path[0] when run as a script

HERE = Path(__file__).parent


@dataclasses.dataclass(frozen=True)
class WholeDecode:
    """A LinearSCVI family without its affine heads: the scorers take their generic paths."""

    inner: Any
    name: ClassVar[str] = "linear_scvi_generic"

    n_latent = property(lambda self: self.inner.n_latent)
    n_vars = property(lambda self: self.inner.n_vars)
    simplex = property(lambda self: self.inner.simplex)
    additive = property(lambda self: self.inner.additive)

    def latent_names(self):
        return self.inner.latent_names()

    def unit_latents(self):
        return self.inner.unit_latents()

    def split_names(self):
        return self.inner.split_names()

    def encode(self, *args, **kwargs):
        return self.inner.encode(*args, **kwargs)

    def decoder_input(self, z):
        return self.inner.decoder_input(z)

    def decode(self, *args, **kwargs):
        return self.inner.decode(*args, **kwargs)

    def log_prob(self, x, rates):
        return self.inner.log_prob(x, rates)

    def loadings(self, params):
        return None


def random_params(abstract: Any, rng: np.random.Generator) -> Any:
    """Random weights of a parameter tree's shapes (BatchNorm variances in [0.5, 2]); speed does
    not depend on training."""

    def leaf(path, spec):
        if jax.tree_util.keystr(path).endswith(".var"):
            return rng.uniform(0.5, 2.0, spec.shape).astype(np.float32)
        return (rng.normal(size=spec.shape) * 0.1).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


@contextlib.contextmanager
def generic_path(module: Any, on: bool = True):
    """Inside: ``module``'s scorers take their generic path for DRVI (``one_latent_per_split``
    reads False), with the compiled programs dropped on both sides so that neither path reuses
    the other's."""
    if not on:
        yield
        return
    keep = module.one_latent_per_split
    module.one_latent_per_split = lambda family: False
    jax.clear_caches()
    try:
        yield
    finally:
        module.one_latent_per_split = keep
        jax.clear_caches()


def least(fn, repeats: int) -> tuple[Any, float]:
    fn()  # compile
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-obs", type=int, default=5_000)
    p.add_argument("--n-vars", type=int, default=2_000)
    p.add_argument("--n-latent", type=int, default=10)
    p.add_argument("--steps", type=int, default=11)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / "traverse.json")
    args = p.parse_args(argv)

    import linear_decoder_jax as ldj
    from linear_decoder_jax import traversal
    from linear_decoder_jax.config import DataRegistry, LDVAEConfig, ModelSpec
    from linear_decoder_jax.families import drvi as F
    from linear_decoder_jax.params import abstract_params

    n, g, k = args.n_obs, args.n_vars, args.n_latent
    adata = make_adata(n, g)  # the models have no batch key: its batch column is not read
    rng = np.random.default_rng(0)

    config = LDVAEConfig(n_input=g, n_latent=k, n_hidden=128)
    data = DataRegistry(var_names=tuple(adata.var_names), batch_key=None, batch_categories=("0",),
                        labels_key=None, label_categories=("0",))  # fmt: skip
    linear = ldj.LinearSCVI(
        random_params(abstract_params(config), rng), ModelSpec(config, data, {})
    )
    generic = ldj.LinearSCVI(linear.host_params, linear.spec, family=WholeDecode(linear.family))

    rows, outs = [], {}
    kw = dict(traverse=True, traverse_steps=args.steps)
    cases = {
        "linear_scvi_sweep": (linear, {}),
        "linear_scvi_sweep_traverse_rank_one": (linear, kw),
        "linear_scvi_sweep_traverse_generic": (generic, kw),
    }
    dconfig = F.DRVIConfig(n_input=g, n_latent=k, n_split=k)
    drvi_params = random_params(F.abstract_params(dconfig), rng)
    drvi = ldj.DRVI(drvi_params, ModelSpec(dconfig, data, {}))
    cases |= {
        "drvi_sweep": (drvi, {}),
        "drvi_sweep_traverse": (drvi, kw),
        "drvi_sweep_traverse_generic": (drvi, kw),
    }
    for name, (model, extra) in cases.items():
        with generic_path(traversal, name.endswith("traverse_generic")):
            out, seconds = least(lambda m=model, e=extra: ldj.ablate(m, adata, **e), args.repeats)
        outs[name] = out
        row = {"case": name, "seconds": round(seconds, 3), "load_avg": os.getloadavg()[0]}
        print(json.dumps(row), flush=True)
        rows.append(row)

    def max_rel_err(fast_case: str, generic_case: str) -> float:
        fast, slow = outs[fast_case], outs[generic_case]
        return float(
            np.abs(fast.arrays["traverse_lfc"] - slow.arrays["traverse_lfc"]).max()
            / np.abs(slow.arrays["traverse_lfc"]).max()
        )

    seconds = {r["case"]: r["seconds"] for r in rows}
    meta = {
        "n_obs": n,
        "n_vars": g,
        "n_latent": k,
        "steps": args.steps,
        "traverse_over_sweep_linear_scvi": round(
            seconds["linear_scvi_sweep_traverse_rank_one"] / seconds["linear_scvi_sweep"], 2
        ),
        "generic_over_rank_one": round(
            seconds["linear_scvi_sweep_traverse_generic"]
            / seconds["linear_scvi_sweep_traverse_rank_one"],
            2,
        ),
        "traverse_over_sweep_drvi": round(
            seconds["drvi_sweep_traverse"] / seconds["drvi_sweep"], 2
        ),
        "drvi_generic_over_split": round(
            seconds["drvi_sweep_traverse_generic"] / seconds["drvi_sweep_traverse"], 2
        ),
        "rank_one_vs_generic_max_rel_err": max_rel_err(
            "linear_scvi_sweep_traverse_rank_one", "linear_scvi_sweep_traverse_generic"
        ),
        "split_vs_generic_max_rel_err": max_rel_err(
            "drvi_sweep_traverse", "drvi_sweep_traverse_generic"
        ),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    print(json.dumps(meta), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
