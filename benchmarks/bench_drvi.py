"""DRVI's own interpretability scores: ``linear_decoder_jax.drvi_scores`` next to drvi-py's.

What it measures, on one default DRVI model (n_latent 32, one split per latent, split_map,
encoder/decoder 128 x 128, layer norm, logsumexp, pnb, 3 batches) and the same in-memory data
(N cells x G genes, synthetic Poisson counts of a low-rank rate, ~10 % non-zeros), in one process,
each function timed the way a user calls it:

* ``drvi_py_s``: drvi-py 0.2.8's method (torch CPU, its own minibatch loop, batch size 128), one
  call (``--repeats`` takes the least of several);
* ``ours_e2e_s``: our function's first call (JIT compile included); ``ours_steady_s``: the least of
  the following calls;
* ``speedup_steady`` / ``speedup_e2e``: drvi_py_s over ours;
* ``max_rel_err``: max |ours - drvi-py| / max |drvi-py| over the function's outputs.

Functions: ``get_reconstruction_effect_of_each_split``, ``get_effect_of_splits_within_distribution``
(all three aggregations, directional), ``set_latent_dimension_stats`` (reconstruction effect +
column stats) and ``get_effect_of_splits_out_of_distribution`` (3 covariate combinations, 20
steps), and ``traverse_latent`` + ``calculate_differential_vars`` (drvi-py's ``utils.tl``; 20 steps,
``--traverse-samples`` noise samples, the same numpy draws on both sides). The model is
initialised and trained for ``--epochs`` (default 1; speed does not depend on how well it is
trained). ``--only`` runs some of the functions (comma-separated names).

Usage::

    python benchmarks/bench_drvi.py                                  # 20k x 2000 x 32
    python benchmarks/bench_drvi.py --n-obs 2000 --n-vars 500        # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def make_adata(n: int, g: int, seed: int = 0):
    import anndata as ad

    rng = np.random.default_rng(seed)
    usage = rng.gamma(0.5, 1.0, size=(n, 8)).astype(np.float32)
    programmes = rng.gamma(0.3, 1.0, size=(8, g)).astype(np.float32)
    rate = usage @ programmes * 0.06
    x = rng.poisson(rate).astype(np.float32)
    adata = ad.AnnData(x)
    adata.var_names = [f"g{i}" for i in range(g)]
    adata.obs["batch"] = rng.choice(["b0", "b1", "b2"], n)
    return adata


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def least(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-obs", type=int, default=20_000)
    p.add_argument("--n-vars", type=int, default=2_000)
    p.add_argument("--n-latent", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="drvi-py calls (least is kept)")
    p.add_argument("--steady", type=int, default=2, help="our calls after the first")
    p.add_argument("--traverse-samples", type=int, default=20)
    p.add_argument("--only", default=None, help="comma-separated function names")
    p.add_argument("--out", type=Path, default=HERE / "results" / "drvi.json")
    args = p.parse_args(argv)

    import anndata as ad
    import jax
    import torch
    from drvi.model import DRVI as TorchDRVI

    from converters.drvi import read_drvi_checkpoint
    from linear_decoder_jax import drvi_scores as S
    from linear_decoder_jax.families import drvi as F

    adata = make_adata(args.n_obs, args.n_vars)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        TorchDRVI.setup_anndata(adata, batch_key="batch", is_count_data=True)
        torch.manual_seed(0)
        m = TorchDRVI(adata, n_latent=args.n_latent)
        t0 = time.perf_counter()
        if args.epochs:
            m.train(max_epochs=args.epochs, accelerator="cpu", enable_progress_bar=False,
                    logger=False, enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
        train_s = time.perf_counter() - t0
        m.save(Path(tmp) / "m", overwrite=True)
        ckpt = read_drvi_checkpoint(Path(tmp) / "m")
    config = F.config_from_converter(ckpt.config)
    family, params = F.DRVI(config), F.from_flat(ckpt.params, config)
    params = jax.device_put(params)
    x = np.asarray(adata.X, np.float32)
    codes = np.asarray(m.adata_manager.get_from_registry("batch")).astype(np.int64)
    latent = m.get_latent_representation(adata)

    def embed():
        return ad.AnnData(latent.copy())

    e_ref = embed()
    m.set_latent_dimension_stats(e_ref)
    combos = S.all_covariate_combinations(family)

    def ours_stats():
        e = embed()
        S.set_latent_dimension_stats(
            e, S.get_reconstruction_effect_of_each_split(family, params, x, codes)
        )
        return e.var["reconstruction_effect"].to_numpy()

    def ref_stats():
        e = embed()
        m.set_latent_dimension_stats(e)
        return e.var["reconstruction_effect"].to_numpy()

    def ref_ood():
        np.random.seed(0)
        return m.get_effect_of_splits_out_of_distribution(e_ref)

    def ref_traverse():
        from drvi.utils import tl

        np.random.seed(0)
        out = tl.traverse_latent(m, e_ref, n_samples=args.traverse_samples)
        tl.calculate_differential_vars(out)
        return {k: out.uns[k] for k in out.uns if k.endswith("stepwise")} | {"X": out.X}

    def ours_traverse():
        np.random.seed(0)
        out = S.traverse_latent(
            family, params, e_ref, adata.var_names, n_samples=args.traverse_samples
        )
        S.calculate_differential_vars(out)
        return {k: out.uns[k] for k in out.uns if k.endswith("stepwise")} | {"X": out.X}

    cases = {
        "get_reconstruction_effect_of_each_split": (
            lambda: m.get_reconstruction_effect_of_each_split(adata),
            lambda: S.get_reconstruction_effect_of_each_split(family, params, x, codes),
        ),
        "get_effect_of_splits_within_distribution": (
            lambda: m.get_effect_of_splits_within_distribution(adata),
            lambda: S.get_effect_of_splits_within_distribution(family, params, x, codes),
        ),
        "set_latent_dimension_stats": (ref_stats, ours_stats),
        "get_effect_of_splits_out_of_distribution": (
            ref_ood,
            lambda: S.get_effect_of_splits_out_of_distribution(
                family, params, e_ref.var["min"].values, e_ref.var["max"].values,
                combinations=np.random.default_rng(0).permutation(combos),
            ),
        ),
        "traverse_latent+calculate_differential_vars": (ref_traverse, ours_traverse),
    }  # fmt: skip
    if args.only:
        cases = {k: v for k, v in cases.items() if k in args.only.split(",")}
    rows = []
    for name, (ref_fn, ours_fn) in cases.items():
        ref_out, ref_s = least(ref_fn, args.repeats)
        t0 = time.perf_counter()
        ours_out = ours_fn()
        e2e = time.perf_counter() - t0
        ours_out, steady = least(ours_fn, args.steady)
        if isinstance(ref_out, dict):
            err = max(rel(ours_out[k], ref_out[k]) for k in ref_out)
        else:
            err = rel(ours_out, ref_out)
        row = {
            "function": name,
            "drvi_py_s": round(ref_s, 3),
            "ours_e2e_s": round(e2e, 3),
            "ours_steady_s": round(steady, 3),
            "speedup_steady": round(ref_s / steady, 2),
            "speedup_e2e": round(ref_s / e2e, 2),
            "max_rel_err": err,
            "load_avg": os.getloadavg()[0],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = {
        "n_obs": args.n_obs,
        "n_vars": args.n_vars,
        "n_latent": args.n_latent,
        "epochs": args.epochs,
        "train_one_run_s": round(train_s, 2),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "note": "OOD combinations: drvi-py permutes all 3 with np.random (seed 0); ours take a permutation of the same 3 (order only changes the float sum).",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
