"""Session fixtures: real scvi-tools 1.4.2 LinearSCVI models trained across the parity matrix.

Each configuration trains a few epochs on small synthetic counts with low-rank structure (and one
on Seurat's real PBMC counts), is saved the way a user saves it, and is converted by our
converter. Models are trained lazily, once per session, on first use. scvi-tools and torch are
test-only dependencies; tests that need them skip cleanly when they are absent.
"""

from __future__ import annotations

import os
import pickle
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TESTS = Path(__file__).parent
DATA = TESTS / "data"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(DATA))

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Shapes and dtypes in the core's signatures (linear_decoder_jax._typing) are checked at run time
# under the test suite only, as equinox does: the hook decorates these modules' functions with
# jaxtyping + beartype as they are imported, so it must run before anything imports them.
_CHECKED = ("linear_decoder_jax.model", "linear_decoder_jax.distributions")


def _check_shapes() -> None:
    from jaxtyping import install_import_hook

    loaded = [m for m in _CHECKED if m in sys.modules]
    assert not loaded, f"{loaded} imported before the jaxtyping hook"
    install_import_hook(list(_CHECKED), "beartype.beartype")


_check_shapes()


def _strict_jax() -> None:
    import jax

    jax.config.update("jax_numpy_rank_promotion", "raise")


_strict_jax()

from helpers import accelerator_precision, seed_scvi  # noqa: E402 - after the jaxtyping hook

accelerator_precision()  # float32 products at full precision on a GPU (TF32 off)


def synthetic_counts(n_obs: int = 240, n_vars: int = 60, n_factors: int = 3, seed: int = 0):
    """Counts from a low-rank NB model: cells load on a few gene programmes."""
    rng = np.random.default_rng(seed)
    usage = rng.gamma(1.0, 1.0, size=(n_obs, n_factors))
    programmes = rng.gamma(0.6, 1.0, size=(n_factors, n_vars))
    rate = usage @ programmes
    rate = rate / rate.sum(1, keepdims=True) * rng.lognormal(np.log(300), 0.4, size=(n_obs, 1))
    counts = rng.negative_binomial(5, 5 / (5 + rate))
    counts[:, 0] += 1  # no all-zero cell in training data (observed library would be log 0)
    return counts.astype(np.float32)


def make_adata(seed: int = 0, n_obs: int = 240, n_vars: int = 60):
    import anndata
    import pandas as pd

    rng = np.random.default_rng(seed + 100)
    counts = synthetic_counts(n_obs, n_vars, seed=seed)
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(rng.choice(["b0", "b1", "b2"], n_obs)),
            "cell_type": pd.Categorical(rng.choice(["T", "B"], n_obs)),
        },
        index=[f"cell{i}" for i in range(n_obs)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_vars)])
    adata = anndata.AnnData(X=counts, obs=obs, var=var)
    adata.obsm["X_umap"] = rng.normal(size=(n_obs, 2)).astype(np.float32)
    return adata


# name -> (setup_anndata kwargs, model kwargs, save kwargs, data variant)
MATRIX: dict[str, tuple[dict, dict, dict, str]] = {
    "nb_gene": ({}, {}, {}, "synthetic"),
    "batch3_gene_batch": ({"batch_key": "batch"}, {"dispersion": "gene-batch"}, {}, "synthetic"),
    "labels_gene_label": (
        {"labels_key": "cell_type"},
        {"dispersion": "gene-label", "n_labels": 2},
        {},
        "synthetic",
    ),
    "zinb": ({"batch_key": "batch"}, {"gene_likelihood": "zinb"}, {}, "synthetic"),
    "poisson": ({}, {"gene_likelihood": "poisson"}, {}, "synthetic"),
    "ln": ({"batch_key": "batch"}, {"latent_distribution": "ln"}, {}, "synthetic"),
    "observed_lib": ({}, {"use_observed_lib_size": True}, {}, "synthetic"),
    "n_layers_2": ({}, {"n_layers": 2}, {}, "synthetic"),
    "bias": ({"batch_key": "batch"}, {"bias": True}, {}, "synthetic"),
    "no_batch_norm": ({}, {"use_batch_norm": False}, {}, "synthetic"),
    "batch_norm_encoder": ({}, {"use_batch_norm": "encoder"}, {}, "synthetic"),
    "batch_norm_none": ({}, {"use_batch_norm": "none"}, {}, "synthetic"),
    "layer_sparse_x": ({"layer": "counts"}, {}, {}, "layer"),
    "prefix": ({}, {}, {"prefix": "run1_"}, "synthetic"),
    "legacy": ({"batch_key": "batch"}, {}, {}, "legacy"),
    "pbmc_real": ({}, {"gene_likelihood": "zinb"}, {}, "pbmc"),
}


@dataclass
class Trained:
    """A trained scvi-tools model, its saved directory and the data it was trained on."""

    name: str
    scvi_model: Any
    adata: Any
    saved: Path  # what a user points ldj at
    prefix: str | None


def _data_for(variant: str):
    import scipy.sparse as sp

    if variant == "pbmc":
        from pbmc import load_pbmc

        return load_pbmc()
    adata = make_adata()
    if variant == "layer":
        adata.layers["counts"] = sp.csr_matrix(adata.X.copy())
        norm = adata.X / adata.X.sum(1, keepdims=True) * 1e4
        adata.X = sp.csr_matrix(np.log1p(norm).astype(np.float32))
    return adata


def write_legacy(model: Any, folder: Path) -> None:
    """Write the scvi-tools < 0.15 layout by hand (1.4.2 cannot): state dict, attr.pkl, genes."""
    import torch

    folder.mkdir(parents=True)
    torch.save(model.module.state_dict(), folder / "model_params.pt")
    attrs = {
        "init_params_": model.init_params_,
        "registry_": model.adata_manager.registry,
        "is_trained_": True,
    }
    with open(folder / "attr.pkl", "wb") as fh:
        pickle.dump(attrs, fh)
    np.savetxt(folder / "var_names.csv", model.adata.var_names.to_numpy(), fmt="%s")


def train(name: str, root: Path) -> Trained:
    scvi = pytest.importorskip("scvi")
    import torch

    setup, kwargs, save, variant = MATRIX[name]
    torch.set_num_threads(2)
    seed_scvi(0)
    scvi.settings.verbosity = 40
    adata = _data_for(variant)
    scvi.model.LinearSCVI.setup_anndata(adata, **setup)
    kwargs = {"n_latent": 4, "n_hidden": 16, **kwargs}
    model = scvi.model.LinearSCVI(adata, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=8, accelerator="cpu", enable_progress_bar=False, batch_size=128)
    folder = root / name
    prefix = save.get("prefix")
    if variant == "legacy":
        write_legacy(model, folder)
    else:
        model.save(folder, overwrite=True, save_anndata=False, **save)
    return Trained(name, model, adata, folder, prefix)


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory):
    """Lazy cache: ``trained_models(name)`` trains the configuration on first use."""
    root = tmp_path_factory.mktemp("scvi_models")
    cache: dict[str, Trained] = {}

    def get(name: str) -> Trained:
        if name not in cache:
            cache[name] = train(name, root)
        return cache[name]

    return get


@pytest.fixture
def key():
    import jax

    return jax.random.key(0)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|: the parity metric of the foundation issue."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


# --------------------------------------------------------------------------------------------
# Fixtures of the reliability tests (the demo model and data, a converted copy)
# (demo files imported lazily: this module must not import linear_decoder_jax before the hook)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model() -> Any:
    import linear_decoder_jax as ldj
    from linear_decoder_jax.demo import demo_files

    return ldj.load(demo_files() / "model.pt")


@pytest.fixture(scope="module")
def demo_adata() -> Any:
    import anndata

    from linear_decoder_jax.demo import demo_files

    return anndata.read_h5ad(demo_files() / "counts.h5ad")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoint converted to our format."""
    import linear_decoder_jax as ldj
    from linear_decoder_jax.demo import demo_files

    return ldj.convert(demo_files() / "model.pt", tmp_path_factory.mktemp("converted") / "model")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module: every XLA CPU executable maps memory,
    and one process running the whole suite passed Linux's default limit of 65,530 maps
    (``vm.max_map_count``) and died with a segmentation fault around test 730."""
    yield
    import jax

    jax.clear_caches()
