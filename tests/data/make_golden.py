"""Regenerate ``tests/data/golden/``: a scvi-tools LinearSCVI checkpoint and its exact outputs.

The golden fixture lets tests check parity without scvi-tools installed: they load ``model.pt``
with the project's own reader, rebuild the input from ``counts.npz`` and compare against
``expected.npz``.

- ``model.pt``: ``model.save(dir, save_anndata=False)`` (scvi-tools 1.4.2, torch 2.13 CPU);
- ``counts.npz``: the exact input (``X`` float32 cells x genes, ``batch`` str, ``obs_names``,
  ``var_names``; ``tests/data/pbmc.py:load_counts_npz`` reads it back as the AnnData the model was
  set up with, batch key "batch");
- ``expected.npz``: ``tests/scvi_ref.py:scvi_reference(model, adata)`` (qz_m, qz_v, z, library,
  scale, mu, theta, zi_logits, nll, scale_zeroed / nll_zeroed with latent 0 set to 0, loadings) and
  ``delta_nll_zero_drop`` = ``scvi_ablation_loop(model, adata, baseline=zeros, mode="drop")``
  (cells x latents), all float32 in obs order;
- ``versions.json``: package versions, settings.

Model: LinearSCVI on Seurat's 80-cell PBMC counts (``pbmc.py``), batches "b0"/"b1" by cell parity,
ZINB likelihood, dispersion "gene-batch", n_latent 5, n_hidden 32, 30 epochs, batch size 32,
``scvi.settings.seed = 0``, CPU, one torch thread.

Run with the project's test environment (scvi-tools 1.4.2 installed)::

    python tests/data/make_golden.py

Training is seeded, but a different scvi-tools / torch / BLAS may train slightly different weights:
the fixture's truth is the committed ``model.pt`` together with the ``expected.npz`` computed from
it, not the training run. Regenerate both together, never one alone.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(TESTS))

warnings.filterwarnings("ignore")

SEED = 0
MODEL_KWARGS = dict(n_latent=5, n_hidden=32, gene_likelihood="zinb", dispersion="gene-batch")
MAX_EPOCHS = 30
BATCH_SIZE = 32


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("scvi-tools", "torch", "numpy", "pandas", "anndata", "lightning"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def main(out: Path | None = None) -> Path:
    import scvi
    import torch
    from pbmc import load_pbmc, save_counts_npz
    from scvi_ref import scvi_ablation_loop, scvi_reference

    torch.set_num_threads(1)
    scvi.settings.seed = SEED

    adata = load_pbmc()
    adata.obs = adata.obs[["batch"]].copy()
    scvi.model.LinearSCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.LinearSCVI(adata, **MODEL_KWARGS)
    model.train(
        max_epochs=MAX_EPOCHS,
        batch_size=BATCH_SIZE,
        accelerator="cpu",
        enable_progress_bar=False,
    )

    out = out or HERE / "golden"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*"):
        if stale.is_file():
            stale.unlink()
    model.save(str(out), save_anndata=False, overwrite=True)
    save_counts_npz(out / "counts.npz", adata)

    ref = scvi_reference(model, adata, zero_latent=0)
    n_latent = ref["z"].shape[1]
    ref["delta_nll_zero_drop"] = scvi_ablation_loop(
        model, adata, baseline=np.zeros(n_latent, np.float32), mode="drop"
    )
    np.savez_compressed(
        out / "expected.npz", **{k: np.asarray(v, np.float32) for k, v in ref.items()}
    )
    meta = {
        "versions": _versions(),
        "seed": SEED,
        "model_kwargs": MODEL_KWARGS,
        "max_epochs": MAX_EPOCHS,
        "batch_size": BATCH_SIZE,
        "batch_key": "batch",
        "batch_rule": "cell i -> 'b{i % 2}' in pbmc_raw order",
        "zero_latent": 0,
        "expected_keys": sorted(ref),
    }
    (out / "versions.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"wrote {out}: " + ", ".join(f"{p.name} {p.stat().st_size}" for p in sorted(out.iterdir()))
    )
    return out


if __name__ == "__main__":
    main()
