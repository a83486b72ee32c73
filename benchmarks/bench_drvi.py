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

``ldj ablate`` against the loop a user writes (``ablate`` in the JSON): (a) our whole CLI
process (a subprocess: import, reading the .h5ad and the drvi-py model folder, compilation,
writing the result; ``ours_cli_s``) against (b) a loop over latents with drvi-py's own torch module
(``torch_loop_s``): encode once to the posterior mean, then per minibatch K+1 decodes (the full
z, then each latent at the baseline 0) and the per-cell NLL of each, as the scvi-tools loop does;
both give the per-cell delta NLL per latent (``max_rel_diff``: max |ours - torch| / max |torch|;
``max_abs_diff_over_max_nll``: the same difference over the largest NLL, float32's scale).
``--loop-cells`` runs the torch loop on the first cells only and scales its time to all cells
(per-cell cost is constant); ``profile`` splits our in-process run into its stages.

Functions: ``get_reconstruction_effect_of_each_split``, ``get_effect_of_splits_within_distribution``
(all three aggregations, directional), ``set_latent_dimension_stats`` (reconstruction effect +
column stats) and ``get_effect_of_splits_out_of_distribution`` (3 covariate combinations, 20
steps; milliseconds, so the least of 20 calls on each side; ``floor``: the last-layer product
that both sides compute, timed alone in torch and in JAX, a bound on any exact float32 speed-up),
and ``traverse_latent`` + ``calculate_differential_vars`` (drvi-py's ``utils.tl``; 20 steps,
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
import subprocess
import sys
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


def torch_loop(m, adata, n_cells: int, batch_size: int = 512) -> np.ndarray:
    """Per-cell delta NLL (n_cells, K) with drvi-py's module: encode once (posterior mean), then
    K+1 decodes per minibatch, each latent set to 0 in turn."""
    import torch

    mod = m.module
    mod.eval()
    out = []
    loader = m._make_data_loader(adata=adata, indices=np.arange(n_cells), batch_size=batch_size)
    with torch.no_grad():
        for tensors in loader:
            inf = mod.inference(**mod._get_inference_input(tensors))
            z = inf["qzm"]

            def nll(zk, tensors=tensors, inf=inf):
                gen = mod.generative(**mod._get_generative_input(tensors, {**inf, "z": zk}))
                return -gen["px"].log_prob(tensors["X"]).sum(-1)

            full = nll(z)
            deltas = []
            for k in range(z.shape[1]):
                zk = z.clone()
                zk[:, k] = 0.0
                deltas.append(nll(zk) - full)
            out.append(torch.stack(deltas, 1).numpy())
    return np.concatenate(out)


def ablate_profile(folder: Path, data: Path) -> dict[str, float]:
    """Our stages in this process, each timed on its own: reading (model, data), the sweep's
    first call (compile + run) and a second call (run only), writing the result."""
    import anndata as ad

    import linear_decoder_jax as ldj

    t0 = time.perf_counter()
    model = ldj.load(folder)
    adata = ad.read_h5ad(data)
    t1 = time.perf_counter()
    ldj.ablate(model, adata)
    t2 = time.perf_counter()
    result = ldj.ablate(model, adata)
    t3 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result.write(Path(tmp) / "r.h5ad")
    t4 = time.perf_counter()
    return {
        "read_s": round(t1 - t0, 2),
        "first_ablate_s": round(t2 - t1, 2),
        "steady_ablate_s": round(t3 - t2, 2),
        "compile_s_approx": round((t2 - t1) - (t3 - t2), 2),
        "write_s": round(t4 - t3, 2),
    }


def compare_ablate(m, adata, tmp: Path, loop_cells: int) -> dict:
    """(a) the ``ldj ablate`` process against (b) the torch loop; see the module docstring."""
    import anndata as ad
    from scipy import sparse

    from linear_decoder_jax.results import read_result

    data = tmp / "cells.h5ad"
    ad.AnnData(sparse.csr_matrix(adata.X), obs=adata.obs[["batch"]], var=adata.var).write_h5ad(data)
    out = tmp / "ablation.h5ad"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "linear_decoder_jax", "ablate", str(tmp / "m"), str(data), "-o", str(out)]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    cli_s = time.perf_counter() - t0
    result = read_result(out)
    ours, nll = np.asarray(result.delta_nll), np.asarray(result.nll)
    t0 = time.perf_counter()
    ref = torch_loop(m, adata, loop_cells)
    loop_s = time.perf_counter() - t0
    loop_all_s = loop_s * adata.n_obs / loop_cells
    return {
        "function": "ablate (delta NLL per cell and latent)",
        "ours_cli_s": round(cli_s, 2),
        "torch_loop_s": round(loop_all_s, 2),
        "torch_loop_cells": loop_cells,
        "torch_loop_measured_s": round(loop_s, 2),
        "speedup_e2e": round(loop_all_s / cli_s, 2),
        "max_rel_diff": rel(ours[:loop_cells], ref),
        # both in float32: the changes are differences of NLLs of up to this size
        "max_abs_diff_over_max_nll": float(
            np.abs(ours[:loop_cells] - ref).max() / np.abs(nll[:loop_cells]).max()
        ),
        # in a process of its own, as the CLI: torch's thread pool in this process slows
        # jax's down several-fold (measured 463 s here against 80 s for the CLI, 2026-12-06)
        "profile": json.loads(
            subprocess.run(
                [sys.executable, __file__, "--profile", str(tmp / "m"), str(data)],
                check=True,
                env=env,
                capture_output=True,
                text=True,
            ).stdout.splitlines()[-1]
        ),
        "load_avg": [round(v, 2) for v in os.getloadavg()],
    }


def reconstruction_profile(family, params, x: np.ndarray, batch_size: int = 1024) -> dict:
    """Where ``get_reconstruction_effect_of_each_split``'s time goes: the same minibatches
    through the encoder only, the encoder and the split decoder, and the whole score (steady)."""
    import jax
    import jax.numpy as jnp

    from linear_decoder_jax import drvi_scores as S
    from linear_decoder_jax.families.drvi import posterior, split_values

    c = family.config
    batch_size = min(batch_size, x.shape[0])
    codes = jnp.zeros((batch_size, len(c.n_cats_per_cov)), jnp.int32)
    stages = {
        "encode_s": jax.jit(lambda xb: posterior(params, xb, config=c)[0].sum()),
        "encode_decode_s": jax.jit(
            lambda xb: split_values(params, posterior(params, xb, config=c)[0], codes, config=c).sum()
        ),
        "whole_score_s": jax.jit(
            lambda xb: S._within_batch(
                family, params, xb, codes, jnp.ones(batch_size, bool), add_to_counts=1.0,
                directional=False, skip_threshold=1.0, aggregate=False,
            )["share"].sum()
        ),
    }  # fmt: skip
    n = x.shape[0] // batch_size * batch_size
    out = {}
    for name, fn in stages.items():
        jax.block_until_ready(fn(jnp.asarray(x[:batch_size])))
        t0 = time.perf_counter()
        for start in range(0, n, batch_size):
            jax.block_until_ready(fn(jnp.asarray(x[start : start + batch_size])))
        out[name] = round((time.perf_counter() - t0) * x.shape[0] / n, 2)
    return out


def ood_floor(family, params, n_comb: int, least) -> dict:
    """The one product both sides must compute for the out-of-distribution effects: per covariate
    combination, 20 steps x K splits of hidden states through the shared last layer
    (n_hidden x n_genes), timed alone in torch (MKL) and in JAX (least of 20 calls each)."""
    import jax
    import jax.numpy as jnp
    import torch

    kernel = np.asarray(params.px_mean.dense.kernel)
    rows = 20 * family.config.n_split
    h = np.random.default_rng(0).normal(size=(n_comb, rows, kernel.shape[0])).astype(np.float32)
    th, tk = torch.from_numpy(h), torch.from_numpy(kernel)
    jh, jk = jnp.asarray(h), jnp.asarray(kernel)
    product = jax.jit(lambda a, b: jnp.einsum("cri,io->cro", a, b))
    with torch.no_grad():
        _, torch_s = least(lambda: [th[c] @ tk for c in range(n_comb)], 20)
    _, jax_s = least(lambda: product(jh, jk).block_until_ready(), 20)
    return {
        "shape": [n_comb, rows, *kernel.shape],
        "torch_product_s": round(torch_s, 4),
        "jax_product_s": round(jax_s, 4),
    }


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
    p.add_argument("--only", default=None, help="comma-separated function names (no ablate)")
    p.add_argument("--loop-cells", type=int, default=None, help="cells of the torch loop (all)")
    p.add_argument("--skip-scores", action="store_true", help="only the ablate comparison")
    p.add_argument(
        "--profile", nargs=2, type=Path, metavar=("MODEL", "DATA"), help=argparse.SUPPRESS
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "drvi.json")
    args = p.parse_args(argv)
    if args.profile:
        print(json.dumps(ablate_profile(*args.profile)))
        return 0

    import anndata as ad
    import jax
    import torch
    from drvi.model import DRVI as TorchDRVI

    from converters.drvi import read_drvi_checkpoint
    from linear_decoder_jax import drvi_scores as S
    from linear_decoder_jax.families import drvi as F

    adata = make_adata(args.n_obs, args.n_vars)
    tmp_dir = tempfile.TemporaryDirectory()
    tmp = Path(tmp_dir.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        TorchDRVI.setup_anndata(adata, batch_key="batch", is_count_data=True)
        torch.manual_seed(0)
        m = TorchDRVI(adata, n_latent=args.n_latent)
        t0 = time.perf_counter()
        if args.epochs:
            m.train(max_epochs=args.epochs, accelerator="cpu", enable_progress_bar=False,
                    logger=False, enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
        train_s = time.perf_counter() - t0
        m.save(tmp / "m", overwrite=True)
        ckpt = read_drvi_checkpoint(tmp / "m")
    ablate_row = None
    if not args.only:
        ablate_row = compare_ablate(m, adata, tmp, args.loop_cells or args.n_obs)
        print(json.dumps(ablate_row), flush=True)
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
    rows = [] if ablate_row is None else [ablate_row]
    if args.only:
        cases = {k: v for k, v in cases.items() if k in args.only.split(",")}
    for name, (ref_fn, ours_fn) in cases.items():
        if args.skip_scores:
            break
        fast = name == "get_effect_of_splits_out_of_distribution"  # ms: least of 20 calls each
        ref_out, ref_s = least(ref_fn, max(args.repeats, 20 if fast else 1))
        t0 = time.perf_counter()
        ours_out = ours_fn()
        e2e = time.perf_counter() - t0
        ours_out, steady = least(ours_fn, max(args.steady, 20 if fast else 1))
        if isinstance(ref_out, dict):
            err = max(rel(ours_out[k], ref_out[k]) for k in ref_out)
        else:
            err = rel(ours_out, ref_out)
        row = {
            "function": name,
            **(
                {"profile": reconstruction_profile(family, params, x)}
                if name == "get_reconstruction_effect_of_each_split"
                else {}
            ),
            **({"floor": ood_floor(family, params, len(combos), least)} if fast else {}),
            "drvi_py_s": round(ref_s, 4 if fast else 3),
            "ours_e2e_s": round(e2e, 3),
            "ours_steady_s": round(steady, 4 if fast else 3),
            "speedup_steady": round(ref_s / steady, 2),
            "speedup_e2e": round(ref_s / e2e, 2),
            "max_rel_err": err,
            "load_avg": [round(v, 2) for v in os.getloadavg()],
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
        "load_avg_end": [round(v, 2) for v in os.getloadavg()],
        "note": "OOD combinations: drvi-py permutes all 3 with np.random (seed 0); ours take a permutation of the same 3 (order only changes the float sum).",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    tmp_dir.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
