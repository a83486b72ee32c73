"""Tiny scvi-tools LinearSCVI models for the converter tests: cases, training, expected values."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

N_CELLS, N_GENES, N_HIDDEN, N_LATENT = 150, 40, 16, 3
GENES = [f"gene_{i}" for i in range(N_GENES - 1)] + ["Gène-α"]
BATCHES = ["b0", "b1", "b2"]
CELL_TYPES = ["t0", "t1"]

#: name -> (setup_anndata kwargs, LinearSCVI kwargs, expected config entries that differ
#: from BASE_CONFIG)
CASES: dict[str, tuple[dict, dict, dict]] = {
    "default": ({}, {}, {}),
    "batch_gene_batch": (
        {"batch_key": "batch", "layer": "counts"},
        {"dispersion": "gene-batch"},
        {
            "n_batch": 3,
            "dispersion": "gene-batch",
            "batch_key": "batch",
            "batch_categories": BATCHES,
            "layer": "counts",
        },
    ),
    "labels_gene_label": (
        {"labels_key": "cell_type"},
        {"dispersion": "gene-label", "n_labels": 2},
        {
            "n_labels": 2,
            "dispersion": "gene-label",
            "labels_key": "cell_type",
            "label_categories": CELL_TYPES,
        },
    ),
    "zinb": ({}, {"gene_likelihood": "zinb"}, {"gene_likelihood": "zinb"}),
    "poisson": ({}, {"gene_likelihood": "poisson"}, {"gene_likelihood": "poisson"}),
    "ln": ({}, {"latent_distribution": "ln"}, {"latent_distribution": "ln"}),
    "observed_lib": (
        {"batch_key": "batch"},
        {"use_observed_lib_size": True},
        {
            "use_observed_lib_size": True,
            "n_batch": 3,
            "batch_key": "batch",
            "batch_categories": BATCHES,
        },
    ),
    "two_layers": ({}, {"n_layers": 2}, {"n_layers": 2}),
    "bias": (
        {"batch_key": "batch"},
        {"bias": True},
        {"decoder_bias": True, "n_batch": 3, "batch_key": "batch", "batch_categories": BATCHES},
    ),
    "no_batch_norm": ({}, {"use_batch_norm": False}, {"decoder_batch_norm": False}),
    # a truthy string: scvi-tools still builds BatchNorm in the decoder
    "batch_norm_encoder": ({}, {"use_batch_norm": "encoder"}, {}),
}

BASE_CONFIG: dict[str, Any] = {
    "n_input": N_GENES,
    "n_latent": N_LATENT,
    "n_hidden": N_HIDDEN,
    "n_layers": 1,
    "n_batch": 1,
    "n_labels": 1,
    "gene_likelihood": "nb",
    "dispersion": "gene",
    "latent_distribution": "normal",
    "use_observed_lib_size": False,
    "log_variational": True,
    "decoder_batch_norm": True,
    "decoder_bias": False,
    "var_names": GENES,
    "batch_key": None,
    "batch_categories": ["0"],
    "labels_key": None,
    "label_categories": ["0"],
    "layer": None,
}


class Trained(NamedTuple):
    model: Any  # a trained scvi-tools model
    path: Path  # the directory it was saved to


def make_adata() -> Any:
    import anndata

    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(5, 0.3, size=(N_CELLS, N_GENES)).astype(np.float32)
    adata = anndata.AnnData(counts.copy())
    adata.var_names = GENES
    adata.layers["counts"] = counts
    adata.obs["batch"] = np.array(BATCHES)[rng.integers(0, 3, N_CELLS)]
    adata.obs["cell_type"] = np.array(CELL_TYPES)[rng.integers(0, 2, N_CELLS)]
    return adata


def train(model_cls: Any, setup: dict, kwargs: dict) -> Any:
    adata = make_adata()
    model_cls.setup_anndata(adata, **setup)
    model = model_cls(adata, n_hidden=N_HIDDEN, n_latent=N_LATENT, **kwargs)
    model.train(
        max_epochs=2,
        accelerator="cpu",
        batch_size=N_CELLS,
        enable_progress_bar=False,
        log_every_n_steps=1,
    )
    return model


_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def expected_params(state_dict: dict) -> dict[str, np.ndarray]:
    """A torch LDVAE state dict in our layout, mapped independently of the converter."""
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        value = tensor.detach().cpu().numpy()
        encoder = re.fullmatch(
            r"([zl]_encoder)\.encoder\.fc_layers\.Layer (\d+)\.([01])\.(\w+)", key
        )
        head = re.fullmatch(r"([zl]_encoder)\.(mean|var)_encoder\.(weight|bias)", key)
        decoder = re.fullmatch(r"decoder\.(\w+)\.fc_layers\.Layer 0\.([01])\.(\w+)", key)
        if encoder:
            enc, layer, sub, name = encoder.groups()
            if sub == "0":
                path, value = f"{enc}/layers/{layer}/dense/", value.T
                path += "kernel" if name == "weight" else "bias"
            else:
                path = f"{enc}/layers/{layer}/bn/{_BN[name]}"
        elif head:
            enc, which, name = head.groups()
            path = f"{enc}/{which}/{'kernel' if name == 'weight' else 'bias'}"
            value = value.T if name == "weight" else value
        elif decoder:
            dec, sub, name = decoder.groups()
            dec = {"factor_regressor": "factor", "px_dropout_decoder": "dropout"}[dec]
            if sub == "0":
                path, value = f"decoder/{dec}/dense/", value.T
                path += "kernel" if name == "weight" else "bias"
            else:
                path = f"decoder/{dec}/bn/{_BN[name]}"
        else:
            path = key  # px_r, library_log_means, library_log_vars
        out[path] = value
    return out
