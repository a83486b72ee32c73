"""Attribution cost against the plain sweep (``linear_decoder_jax.attribution``).

Per run, steady state (compiled; the least of ``--repeat`` runs, the machine is shared):

* ``plain_s``: ``ldj.ablate`` (delta_nll, delta_l1, mean_lfc);
* ``genes_s`` / ``genes_grouped_s``: the same run with ``gene_scores=True``, without and with a
  ``groupby`` of ``--groups`` categories; target <= 1.3x ``plain_s``. The three are measured in
  interleaved rounds, so their ratios compare runs under the same load;
* ``exact_s``: ``shapley="exact"`` (2^K coalition decodes per cell, against K for the sweep: the
  expected ratio is 2^K / K); ``permutation_s``: ``shapley="permutation"`` with
  ``--permutations`` M (M (K - 1) + 2 decodes per cell). Shapley runs are measured on
  ``--shapley-cells`` cells and scaled linearly to N (cost is linear in cells), said so in the
  output;
* ``drvi`` (``--drvi``): a DRVI (default architecture, random weights, ``--latents`` latents, one
  per split, 3 batches) on ``--shapley-cells`` cells: exact and permutation Shapley values over
  its sweep by the per-split path (split terms at z and at the baseline decoded once per
  minibatch, each coalition re-aggregates them) and by decoding every coalition, and the largest
  difference between the two.

Model: random weights of LDVAE's shapes (``tests/helpers.random_model``; speed does not depend
on training), NB, 3 batches; counts ~10 % non-zero.

Usage::

    python benchmarks/bench_attribution.py                      # 20k x 2000 x 10
    python benchmarks/bench_attribution.py --cells 5000 --out results/attribution.json
    python benchmarks/bench_attribution.py --cells 2000 --shapley-cells 200 --drvi
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import platform
import time
from pathlib import Path

import numpy as np
from bench_traverse import (  # a sibling: benchmarks/ is sys.path[0] as a script
    generic_path,
    random_params,
)

HERE = Path(__file__).parent


def _helpers():
    spec = importlib.util.spec_from_file_location("helpers", HERE.parent / "tests" / "helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_data(model, n_obs: int, n_groups: int, seed: int = 0):
    import anndata
    import pandas as pd

    rng = np.random.default_rng(seed)
    g = model.config.n_input
    rate = rng.gamma(0.3, 1.0, size=(1, g)) * rng.lognormal(0, 0.3, size=(n_obs, 1)) * 0.45
    counts = rng.poisson(rate).astype(np.float32)
    counts[:, 0] += 1
    d = model.spec.data
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n_obs)])
    obs["batch"] = pd.Categorical(rng.choice(list(d.batch_categories), n_obs))
    obs["cell_type"] = pd.Categorical(rng.choice([f"t{i}" for i in range(n_groups)], n_obs))
    return anndata.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=list(d.var_names)))


def steady(fn, repeat: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved(runs: dict, repeat: int) -> dict[str, float]:
    """Steady seconds of each run, the least of ``repeat`` rounds that take every run in turn:
    a ratio then compares runs that saw the same machine load."""
    for fn in runs.values():
        fn()  # compile
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeat):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def drvi_shapley(a) -> dict:
    """DRVI (default architecture, random weights, one latent per split, 3 batches), on
    ``--shapley-cells`` cells: exact and permutation Shapley values over the sweep, by the
    per-split path (each coalition re-aggregates split terms decoded once per minibatch) and by
    decoding every coalition; the two results compared."""
    import linear_decoder_jax as ldj
    from linear_decoder_jax import attribution
    from linear_decoder_jax.config import DataRegistry, ModelSpec
    from linear_decoder_jax.families import drvi as F

    config = F.DRVIConfig(n_input=a.genes, n_latent=a.latents, n_split=a.latents,
                          n_cats_per_cov=(3,))  # fmt: skip
    data = DataRegistry(var_names=tuple(f"g{i}" for i in range(a.genes)), batch_key="batch",
                        batch_categories=("b0", "b1", "b2"), labels_key=None,
                        label_categories=("0",))  # fmt: skip
    params = random_params(F.abstract_params(config), np.random.default_rng(0))
    model = ldj.DRVI(params, ModelSpec(config, data, {}))
    small = make_data(model, a.shapley_cells, a.groups)
    out: dict = {"cells": a.shapley_cells, "latents": a.latents}
    out["plain_s"] = steady(lambda: ldj.ablate(model, small), a.repeat)
    results = {}
    for method, extra in (("exact", {}), ("permutation", {"n_permutations": a.permutations})):
        for path in ("split", "generic"):
            with generic_path(attribution, path == "generic"):
                run = functools.partial(ldj.ablate, model, small, shapley=method, **extra)
                out[f"{method}_{path}_s"] = steady(run, 1) - out["plain_s"]
                results[path] = run().arrays["shapley_nll"]
        ref = np.abs(results["generic"]).max()
        out[f"{method}_max_rel_diff"] = float(
            np.abs(results["split"] - results["generic"]).max() / ref
        )
        out[f"{method}_generic_over_split"] = out[f"{method}_generic_s"] / out[f"{method}_split_s"]
    return out


def main() -> None:
    import linear_decoder_jax as ldj

    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, default=20_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--latents", type=int, default=10)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--shapley-cells", type=int, default=1000)
    p.add_argument("--permutations", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--drvi", action="store_true", help="also DRVI's Shapley values, both paths")
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    model = _helpers().random_model(
        n_input=a.genes, n_latent=a.latents, n_hidden=128, n_batch=3, n_labels=1
    )
    adata = make_data(model, a.cells, a.groups)
    small = adata[: a.shapley_cells].copy()
    scale = a.cells / a.shapley_cells
    k = a.latents
    row: dict = {
        "cells": a.cells,
        "genes": a.genes,
        "latents": k,
        "groups": a.groups,
        "machine": f"{platform.machine()}, {platform.processor() or ''}".strip(", "),
    }
    runs = {
        "plain_s": lambda: ldj.ablate(model, adata),
        "genes_s": lambda: ldj.ablate(model, adata, gene_scores=True),
        "genes_grouped_s": lambda: ldj.ablate(model, adata, gene_scores=True, groupby="cell_type"),
    }
    row.update(interleaved(runs, a.repeat))
    row["genes_ratio"] = row["genes_s"] / row["plain_s"]
    row["genes_grouped_ratio"] = row["genes_grouped_s"] / row["plain_s"]

    plain_small = steady(lambda: ldj.ablate(model, small), a.repeat)
    exact_small = steady(lambda: ldj.ablate(model, small, shapley="exact"), 1) - plain_small
    perm_small = (
        steady(
            lambda: ldj.ablate(model, small, shapley="permutation", n_permutations=a.permutations),
            1,
        )
        - plain_small
    )
    row["shapley_measured_on_cells"] = a.shapley_cells
    row["exact_s"] = exact_small * scale
    row["exact_ratio"] = exact_small / plain_small
    row["exact_expected_ratio"] = 2**k / k
    row["permutation_M"] = a.permutations
    row["permutation_s"] = perm_small * scale
    row["permutation_ratio"] = perm_small / plain_small
    row["permutation_expected_ratio"] = (a.permutations * (k - 1) + 2) / k
    if a.drvi:
        row["drvi"] = drvi_shapley(a)
    print(json.dumps(row, indent=1))
    if a.out:
        a.out.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
