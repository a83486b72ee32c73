"""Training quality: ``ldj.train`` against scvi-tools' ``LinearSCVI.train``, several seeds each.

Same data, same settings, same epochs. Both sides are evaluated by the same code (scvi-tools'
models are read with our converter): on held-out cells (never trained on by either),

* ``nll``: reconstruction NLL per cell at the posterior mean (``get_reconstruction_error``);
* ``elbo``: the negative ELBO per cell (reconstruction at one posterior draw + KL of z and of
  the library, KL weight 1; the same draws for every model);
* latents: ``ldj.compare`` correlations (matched latents on the held-out cells) between our
  seeds and scvi-tools' seeds (cross-framework) and among scvi-tools' seeds (seed to seed).

Reported: mean, standard error, best and worst seed on each side; the difference of means in %
and in standard errors of the difference.

Usage::

    python benchmarks/bench_train_quality.py                   # 5 seeds, 2000 x 200, 60 epochs
    python benchmarks/bench_train_quality.py --seeds 2 --epochs 10   # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def make_data(n_obs: int, n_vars: int, seed: int = 0):
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import make_adata

    return make_adata(seed, n_obs=n_obs, n_vars=n_vars)


def evaluate(model, adata) -> dict:
    import jax
    import jax.numpy as jnp

    from linear_decoder_jax.training import objective

    nll = float(np.mean(model.get_reconstruction_error(adata)))
    cells = model.prepare(adata)
    x = jnp.asarray(cells.rows(0, cells.n_obs))
    batch, label = jnp.asarray(cells.batch), jnp.asarray(cells.label)
    key = jax.random.key(123)
    kz, kl = jax.random.split(key)
    n = x.shape[0]
    z_noise = jax.random.normal(kz, (n, model.n_latent))
    l_noise = jax.random.normal(kl, (n, 1))
    parts = objective.eval_loss(
        model.params, x, batch, label, z_noise, l_noise, 1.0, config=model.config
    )
    elbo = float(np.mean(parts.reconstruction_loss + parts.kl_z + parts.kl_l))
    return {"nll": nll, "elbo": elbo}


def summary(values: list[float]) -> dict:
    a = np.asarray(values)
    return {
        "mean": float(a.mean()),
        "se": float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan"),
        "min": float(a.min()),  # the best seed for nll and elbo
        "max": float(a.max()),
        "values": a.tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-obs", type=int, default=2000)
    parser.add_argument("--n-vars", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--output", default=str(HERE / "results" / "train_quality.json"))
    args = parser.parse_args()

    import scvi

    import linear_decoder_jax as ldj

    scvi.settings.verbosity = 40
    adata = make_data(args.n_obs + args.n_obs // 5, args.n_vars)
    train, held = adata[: args.n_obs].copy(), adata[args.n_obs :].copy()
    ours, theirs = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(args.seeds):
            ours.append(
                ldj.train(
                    train, batch_key="batch", max_epochs=args.epochs, seed=seed, progress_bar=False
                )  # fmt: skip
            )
            scvi.settings.seed = seed
            a = train.copy()
            scvi.model.LinearSCVI.setup_anndata(a, batch_key="batch")
            m = scvi.model.LinearSCVI(a)
            m.train(max_epochs=args.epochs, accelerator="cpu", enable_progress_bar=False)
            m.save(f"{tmp}/scvi{seed}", overwrite=True)
            theirs.append(ldj.load(f"{tmp}/scvi{seed}"))
            print(f"seed {seed} done at {time.perf_counter() - t0:.0f} s", flush=True)
        ev_ours = [evaluate(m, held) for m in ours]
        ev_theirs = [evaluate(m, held) for m in theirs]

        def corr(a, b) -> float:
            table = ldj.compare(a, b, held)
            return float(table["corr_cells"].abs().mean())

        cross = [corr(a, b) for a, b in itertools.product(ours, theirs)]
        scvi_pairs = [corr(a, b) for a, b in itertools.combinations(theirs, 2)]
    result: dict = {
        "n_obs_train": args.n_obs,
        "n_obs_held_out": held.n_obs,
        "n_vars": args.n_vars,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    for metric in ("nll", "elbo"):
        a = summary([e[metric] for e in ev_ours])
        b = summary([e[metric] for e in ev_theirs])
        diff = a["mean"] - b["mean"]
        se = float(np.hypot(a["se"], b["se"]))
        result[metric] = {
            "ours": a,
            "scvi": b,
            "difference_percent": 100 * diff / b["mean"],
            "difference_in_se": diff / se if se > 0 else float("nan"),
            "within_1_percent_or_2_se": bool(abs(diff) <= 0.01 * b["mean"] or abs(diff) <= 2 * se),
        }
    result["latents"] = {
        "cross_framework_mean_abs_corr": summary(cross),
        "scvi_seed_to_seed_mean_abs_corr": summary(scvi_pairs),
        "cross_at_least_scvi_minus_0.05": bool(np.mean(cross) >= np.mean(scvi_pairs) - 0.05),
    }
    text = json.dumps(result, indent=1)
    print(text)
    Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
