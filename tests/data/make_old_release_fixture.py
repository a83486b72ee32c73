"""Write an older scvi-tools release's LinearSCVI checkpoint and its reference outputs.

Output: ``tests/data/old_release/<scvi version>/`` with

- ``model.pt``: ``model.save(dir, save_anndata=False)`` as that release writes it (before 0.15:
  ``model_params.pt``, ``attr.pkl`` and ``var_names.csv`` instead);
- ``counts.npz``: the exact input (``X`` float32 cells x genes, ``batch``, ``obs_names``,
  ``var_names``; read it back with ``tests/data/pbmc.py:load_counts_npz``);
- ``expected.npz``: ``tests/scvi_ref.py:scvi_reference(model, adata)`` computed in that release
  (qz_m, qz_v, z, library, scale, mu, theta, nll, scale_zeroed, nll_zeroed, loadings, plus
  ``delta_nll_zero_drop`` = ``scvi_ablation_loop(baseline=zeros, mode="drop")``);
- ``versions.json``: the package versions and the model / training settings used.

The model: LinearSCVI on Seurat's 80-cell PBMC counts (``pbmc.py``), 2 batches ("b0"/"b1", by cell
parity), n_latent 4, n_hidden 16, NB likelihood, gene dispersion, 20 epochs, batch size 32,
``scvi.settings.seed = 0``, on CPU.

It runs inside a virtualenv OUTSIDE the repository that holds the older release; the same script
serves every release (it branches only where the API differs: ``setup_anndata`` before 0.15 is
``scvi.data.setup_anndata``, training before 0.20 takes ``use_gpu``, and before 0.15 the module
returns plain tensors, so ``legacy_reference`` below computes the same arrays as
``tests/scvi_ref.py`` from them). The venvs used for the committed fixtures (Python 3.11 unless
said; the CPU torch wheel is installed first so pip does not pull a CUDA build: this machine has it
locally, elsewhere add ``--index-url https://download.pytorch.org/whl/cpu`` to that line):

scvi-tools 1.1.6.post2 (its pins are loose: the jax/flax/lightning of mid-2024 must be pinned by
hand, newer jax lacks ``jaxlib.xla_extension``; lightning 2.3 imports ``pkg_resources``, hence
setuptools < 81, and torch 2.13 wants setuptools >= 77.0.3)::

    python3.11 -m venv /tmp/venv-old
    /tmp/venv-old/bin/pip install torch==2.13.0
    /tmp/venv-old/bin/pip install scvi-tools==1.1.6.post2 pooch torch==2.13.0 jax==0.4.30 \
        jaxlib==0.4.30 flax==0.8.5 optax==0.2.3 numpyro==0.15.2 orbax-checkpoint==0.5.23 \
        chex==0.1.86 pandas==2.2.2 lightning==2.3.3 torchmetrics==1.4.0 scipy==1.13.1 \
        scikit-learn==1.5.1 pyro-ppl==1.9.1 ml_dtypes==0.4.0 "setuptools>=77.0.3,<81"
    /tmp/venv-old/bin/python tests/data/make_old_release_fixture.py

scvi-tools 0.20.3 (pandas 1.5 / numpy 1.24 era)::

    python3.11 -m venv /tmp/venv-020
    /tmp/venv-020/bin/pip install torch==2.13.0
    /tmp/venv-020/bin/pip install scvi-tools==0.20.3 torch==2.13.0 numpy==1.24.4 \
        "setuptools>=77.0.3,<81" jax==0.4.13 jaxlib==0.4.13 flax==0.6.11 optax==0.1.7 chex==0.1.7 \
        numpyro==0.12.1 "orbax-checkpoint<0.3" ml_dtypes==0.2.0 pandas==1.5.3 anndata==0.8.0 \
        mudata==0.2.3 torchmetrics==0.11.4 scipy==1.10.1 scikit-learn==1.2.2 pyro-ppl==1.8.4 \
        h5py==3.8.0 requests
    /tmp/venv-020/bin/python tests/data/make_old_release_fixture.py

scvi-tools 0.14.6 (pre-0.15 legacy layout: model_params.pt + attr.pkl + var_names.csv). Python
3.10: pytorch-lightning 1.3 breaks on 3.11's enum formatting; torch 1.13.1 (the PyPI CUDA build,
run on CPU); PyYAML 5.4.1 (pinned by pytorch-lightning 1.3) has no wheel and builds only with
Cython < 3 and no build isolation::

    python3.10 -m venv /tmp/venv-014    # here: /root/.pyenv/versions/3.10.13/bin/python
    /tmp/venv-014/bin/pip install "cython<3" wheel setuptools==59.5.0
    /tmp/venv-014/bin/pip install --no-build-isolation PyYAML==5.4.1
    /tmp/venv-014/bin/pip install scvi-tools==0.14.6 torch==1.13.1 pytorch-lightning==1.3.8 \
        torchmetrics==0.6.2 numpy==1.23.5 pandas==1.5.3 anndata==0.8.0 scipy==1.10.1 \
        scikit-learn==1.2.2 h5py==3.8.0 numba==0.57.1 pyro-ppl==1.8.4 setuptools==59.5.0 \
        PyYAML==5.4.1
    /tmp/venv-014/bin/python tests/data/make_old_release_fixture.py

Training is seeded and, in the same venv, bit-for-bit repeatable (``expected.npz`` identical on
re-runs; for 1.1.6.post2 also in a venv built afresh from the commands above); the
checkpoint files differ between runs in their random ``_scvi_uuid``.
``OUT_ROOT=/some/dir`` writes ``/some/dir/<version>/`` instead of ``tests/data/old_release/``.

Run from anywhere; it finds ``tests/`` from its own path. Re-running overwrites the folder.
"""

from __future__ import annotations

import json
import os
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
MODEL_KWARGS = dict(n_latent=4, n_hidden=16, gene_likelihood="nb", dispersion="gene")
MAX_EPOCHS = 20
BATCH_SIZE = 32


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in (
        "scvi-tools",
        "torch",
        "numpy",
        "pandas",
        "anndata",
        "lightning",
        "pytorch-lightning",
        "jax",
        "flax",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _train(model) -> None:
    """Train on CPU: >= 0.20 takes ``accelerator``; older releases took ``use_gpu``."""
    try:
        model.train(
            max_epochs=MAX_EPOCHS,
            batch_size=BATCH_SIZE,
            accelerator="cpu",
            enable_progress_bar=False,
        )
    except TypeError:
        model.train(
            max_epochs=MAX_EPOCHS, batch_size=BATCH_SIZE, use_gpu=False, progress_bar_refresh_rate=0
        )


def _setup(adata) -> None:
    import scvi

    if hasattr(scvi.model.LinearSCVI, "setup_anndata"):
        scvi.model.LinearSCVI.setup_anndata(adata, batch_key="batch")
    else:  # < 0.15: one module-level setup shared by all models
        scvi.data.setup_anndata(adata, batch_key="batch")


def _is_legacy_module(model, adata) -> bool:
    """< 0.15 modules return plain tensors (qz_m, px_rate, ...) instead of distributions."""
    return not hasattr(model, "adata_manager") and not hasattr(model, "registry_")


# --- < 0.15 (legacy) module API: the same arrays as scvi_ref.py, from dict outputs --------------


def _legacy_batches(model, adata, batch_size):
    from scvi import _CONSTANTS as C

    dl = model._make_data_loader(adata=adata, batch_size=batch_size, shuffle=False)
    for t in dl:
        yield t[C.X_KEY].float(), t[C.BATCH_KEY].long(), t[C.LABELS_KEY].long()


def _legacy_decode(module, z, lib, b, y, x):
    gen = module.generative(z, lib, b, y=y)
    px_r = gen["px_r"]
    nll = module.get_reconstruction_loss(x, gen["px_rate"], px_r, gen["px_dropout"])
    return gen, px_r, nll


def _legacy_input(module, x, b):
    inf = module.inference(x, b)
    z = module.z_encoder.z_transformation(inf["qz_m"])
    lib = inf["library"] if module.use_observed_lib_size else inf["ql_m"]
    return inf, z, lib


def legacy_reference(model, adata, *, zero_latent: int = 0, batch_size: int = 128) -> dict:
    import torch

    module = model.module
    module.eval()
    out: dict[str, list] = {}

    def add(key, value):
        out.setdefault(key, []).append(value.detach().cpu().numpy())

    with torch.no_grad():
        for x, b, y in _legacy_batches(model, adata, batch_size):
            inf, z, lib = _legacy_input(module, x, b)
            add("qz_m", inf["qz_m"])
            add("qz_v", inf["qz_v"])
            add("z", z)
            add("library", lib)
            gen, px_r, nll = _legacy_decode(module, z, lib, b, y, x)
            add("scale", gen["px_scale"])
            add("mu", gen["px_rate"])
            add("theta", px_r.expand_as(gen["px_rate"]))
            if module.gene_likelihood == "zinb":
                add("zi_logits", gen["px_dropout"])
            add("nll", nll)
            z0 = z.clone()
            z0[:, zero_latent] = 0.0
            gen0, _, nll0 = _legacy_decode(module, z0, lib, b, y, x)
            add("scale_zeroed", gen0["px_scale"])
            add("nll_zeroed", nll0)
    ref = {k: np.concatenate(v, axis=0) for k, v in out.items()}
    ref["loadings"] = np.asarray(model.get_loadings())
    return ref


def legacy_ablation_loop(model, adata, *, baseline, batch_size: int = 1024) -> np.ndarray:
    import torch

    module = model.module
    module.eval()
    base = torch.as_tensor(np.asarray(baseline, dtype=np.float32))
    rows = []
    with torch.no_grad():
        for x, b, y in _legacy_batches(model, adata, batch_size):
            _, z, lib = _legacy_input(module, x, b)
            full = _legacy_decode(module, z, lib, b, y, x)[2]
            cols = []
            for k in range(z.shape[1]):
                za = z.clone()
                za[:, k] = base[k]
                cols.append(_legacy_decode(module, za, lib, b, y, x)[2] - full)
            rows.append(torch.stack(cols, dim=1).numpy())
    return np.concatenate(rows, axis=0)


def main(out_root: Path | None = None) -> Path:
    import scvi
    import torch
    from pbmc import load_pbmc, save_counts_npz
    from scvi_ref import scvi_ablation_loop, scvi_reference

    torch.set_num_threads(1)
    scvi.settings.seed = SEED

    adata = load_pbmc()
    adata.obs = adata.obs[["batch"]].copy()
    _setup(adata)
    model = scvi.model.LinearSCVI(adata, **MODEL_KWARGS)
    _train(model)

    out = (out_root or HERE / "old_release") / scvi.__version__
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*"):
        if stale.is_file():
            stale.unlink()
    model.save(str(out), save_anndata=False, overwrite=True)

    save_counts_npz(out / "counts.npz", adata)
    legacy = _is_legacy_module(model, adata)
    if legacy:
        ref = legacy_reference(model, adata)
        zeros = np.zeros(ref["z"].shape[1], np.float32)
        ref["delta_nll_zero_drop"] = legacy_ablation_loop(model, adata, baseline=zeros)
    else:
        ref = scvi_reference(model, adata)
        zeros = np.zeros(ref["z"].shape[1], np.float32)
        ref["delta_nll_zero_drop"] = scvi_ablation_loop(model, adata, baseline=zeros, mode="drop")
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
        "expected_keys": sorted(ref),
        "zero_latent": 0,
        "reference": "legacy_reference (dict module API)" if legacy else "tests/scvi_ref.py",
        "files": sorted(p.name for p in out.iterdir() if p.suffix in (".pt", ".pkl", ".csv")),
    }
    (out / "versions.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"wrote {out}: " + ", ".join(f"{p.name} {p.stat().st_size}" for p in sorted(out.iterdir()))
    )
    return out


if __name__ == "__main__":
    main(Path(os.environ["OUT_ROOT"]) if os.environ.get("OUT_ROOT") else None)
