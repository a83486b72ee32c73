"""Training speed: ``ldj.train`` next to scvi-tools' ``LinearSCVI.train``, same data, same run.

What it measures (N cells x G genes, batch size 128, 3 batches, NB, n_latent 10, default
options: 90/10 split, validation off), on the CPU:

* ``*_whole_s``: one ``train(max_epochs=E)`` call, the first of its kind in the process (our
  compilation, the data checks, the library prior and the split included; for scvi-tools the
  model's construction, ``setup_anndata`` not included for either). The two sides' calls are
  interleaved (whole calls, then the 1- and 3-epoch calls), so that both see the same load;
  the load average at the start and end is recorded.
* ``*_epoch_s``: steady-state time per epoch, ``(t(max_epochs=3) - t(max_epochs=1)) / 2`` from
  two further calls (our compilation is cached by then; scvi-tools has no compilation).
* ``speedup_epoch`` and ``speedup_whole``: scvi-tools' time over ours.

Data: ``make_data`` of ``bench_ablation.py`` (synthetic Poisson counts, ~10 % non-zeros).

Usage::

    python benchmarks/bench_train.py                        # 20k x 2000, 20 epochs
    python benchmarks/bench_train.py --n-obs 2000 --epochs 5  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

HERE = Path(__file__).parent


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def ours_runner(adata):
    import linear_decoder_jax as ldj

    def run(e):
        model = ldj.train(adata, batch_key="batch", max_epochs=e, progress_bar=False)
        return float(model.history_["elbo_train"].iloc[-1, 0])

    return run


def scvi_runner(adata):
    import scvi
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    scvi.settings.verbosity = 40
    a = adata.copy()
    scvi.model.LinearSCVI.setup_anndata(a, batch_key="batch")

    def run(e):
        model = scvi.model.LinearSCVI(a)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.train(max_epochs=e, accelerator="cpu", enable_progress_bar=False)
        return float(model.history_["elbo_train"].iloc[-1, 0])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-obs", type=int, default=20_000)
    parser.add_argument("--n-vars", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--output", default=str(HERE / "results" / "train.json"))
    parser.add_argument("--skip-scvi", action="store_true")
    args = parser.parse_args()
    import bench_ablation  # a sibling: benchmarks/ is sys.path[0] when run as a script

    adata = bench_ablation.make_data(args.n_obs, args.n_vars)
    result = {
        "n_obs": args.n_obs,
        "n_vars": args.n_vars,
        "epochs": args.epochs,
        "batch_size": 128,
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "machine": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    import jax
    import torch

    result |= {"device": str(jax.devices()[0]), "torch_threads": torch.get_num_threads()}
    sides = {"ours": ours_runner(adata)}
    if not args.skip_scvi:
        sides["scvi"] = scvi_runner(adata)
    # interleaved, so that both sides run under the same load: the whole calls first (ours is
    # then the first call in the process: compilation included), then 1 and 3 epochs
    for name, run in sides.items():
        elbo, result[f"{name}_whole_s"] = timed(lambda run=run: run(args.epochs))
        result[f"{name}_elbo_train_last"] = elbo
        print(name, "whole", result[f"{name}_whole_s"], flush=True)
    for name, run in sides.items():
        _, one = timed(lambda run=run: run(1))
        _, three = timed(lambda run=run: run(3))
        result[f"{name}_epoch_s"] = (three - one) / 2
        print(name, "epoch", result[f"{name}_epoch_s"], flush=True)
    if not args.skip_scvi:
        result["speedup_epoch"] = result["scvi_epoch_s"] / result["ours_epoch_s"]
        result["speedup_whole"] = result["scvi_whole_s"] / result["ours_whole_s"]
    result["load_average_end"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    print(text)
    Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
