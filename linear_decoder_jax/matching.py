"""Latents across models: correlate every pair on cells and on loadings, match them one to one.

Two models over the same genes (other seeds, other releases, a fine-tuned copy) each encode the
same cells. Latent ``i`` of model A and latent ``j`` of model B are compared by the Pearson
correlation of their decoder inputs at the posterior mean over the cells (``corr_cells``) and of
their effective loadings over the genes (``corr_loadings``). The one-to-one matching maximises the
summed ``|corr_cells|`` (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``); ``sign``
is the sign of the matched ``corr_cells`` (a latent may come back negated).

Assumptions: a latent is identified up to sign and order only (a rotation inside the latent space
is not undone: rotated latents show as several mid-sized correlations); Pearson measures linear
agreement, so "ln" models' softmax inputs compare on their own scale.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from linear_decoder_jax.errors import ConfigError, IncompatibleDataError

Genes = Literal["same", "intersection"]


def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of ``a`` (n, p) with every column of ``b`` (n, q).

    Returns
    -------
    numpy.ndarray
        (p, q); NaN where a column is constant.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    norm = np.outer(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (a.T @ b) / norm
    return np.where(norm > 0, np.clip(corr, -1.0, 1.0), np.nan)


def _shared_genes(model_a: Any, model_b: Any, genes: Genes) -> list[str]:
    if genes not in ("same", "intersection"):
        msg = f"Expected genes 'same' or 'intersection', got {genes!r} instead."
        raise ConfigError(msg)
    names_a, names_b = list(model_a.var_names), list(model_b.var_names)
    in_b = set(names_b)
    shared = [g for g in names_a if g in in_b]
    if genes == "same" and (len(shared) != len(names_a) or len(shared) != len(names_b)):
        only_a = [g for g in names_a if g not in in_b][:3]
        only_b = [g for g in names_b if g not in set(names_a)][:3]
        msg = (
            f"The models are over different genes ({len(names_a)} and {len(names_b)} genes, "
            f"{len(shared)} shared; only in A e.g. {only_a}, only in B e.g. {only_b}); pass "
            "genes='intersection' (CLI: --genes intersection) to compare loadings on the shared "
            "genes."
        )
        raise IncompatibleDataError(msg)
    if len(shared) < 2:
        raise IncompatibleDataError(f"The models share {len(shared)} genes; need at least 2.")
    return shared


def gene_effects(model: Any, adata: Any) -> pd.DataFrame:
    """Genes x latents: the effective loadings of a linear family, else (a family without
    loadings) the mean log-fold change of each gene when the latent is set to zero over the cells
    of ``adata`` (the sweep's ``mean_lfc``; ``family`` module)."""
    if hasattr(model, "get_loadings"):
        return model.get_loadings()
    from linear_decoder_jax.api import ablate

    result = ablate(model, adata)
    return pd.DataFrame(
        np.asarray(result.arrays["mean_lfc"]), index=model.var_names, columns=result.latent_names
    )


def compare(
    model_a: Any,
    model_b: Any,
    adata: Any,
    *,
    genes: Genes = "same",
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Match the latents of two models one to one by their correlation on the same cells.

    Parameters
    ----------
    model_a, model_b
        ``LinearSCVI`` models.
    adata
        Cells both models encode (each reads its own genes and categories from it).
    genes
        ``"same"``: the models must be over the same genes (any order). ``"intersection"``:
        loadings are correlated over the shared genes.
    batch_size
        Cells per minibatch when encoding.

    Returns
    -------
    pandas.DataFrame
        One row per matched pair, in model A's order, columns ``latent_a``, ``latent_b``,
        ``sign`` (+1 or -1), ``corr_cells``, ``corr_loadings``; then one row per unmatched latent
        of the larger model (the other name None, the rest missing). ``attrs`` holds the full
        matrices ``"corr_cells"`` and ``"corr_loadings"`` (DataFrames, A's latents x B's latents),
        which ``ldj.pl.latent_correlation`` draws in matched order.
    """
    families = (model_a.family.name, model_b.family.name)
    if families[0] != families[1]:
        msg = f"Cannot compare latents of two model families ({families[0]} and {families[1]})."
        raise IncompatibleDataError(msg)
    shared = _shared_genes(model_a, model_b, genes)
    z_a = model_a.get_latent_representation(adata, batch_size=batch_size)
    z_b = model_b.get_latent_representation(adata, batch_size=batch_size)
    cells = correlation(z_a, z_b)
    load_a = gene_effects(model_a, adata).loc[shared]
    load_b = gene_effects(model_b, adata).loc[shared]
    loadings = correlation(load_a.to_numpy(), load_b.to_numpy())
    names_a, names_b = list(load_a.columns), list(load_b.columns)
    rows, cols = linear_sum_assignment(np.nan_to_num(np.abs(cells)), maximize=True)
    records: list[tuple[Any, ...]] = []
    for i, j in zip(rows, cols, strict=True):
        sign = -1 if cells[i, j] < 0 else 1
        records.append((names_a[i], names_b[j], sign, cells[i, j], loadings[i, j]))
    for i in sorted(set(range(len(names_a))) - set(rows.tolist())):
        records.append((names_a[i], None, pd.NA, np.nan, np.nan))
    for j in sorted(set(range(len(names_b))) - set(cols.tolist())):
        records.append((None, names_b[j], pd.NA, np.nan, np.nan))
    columns = ["latent_a", "latent_b", "sign", "corr_cells", "corr_loadings"]
    table = pd.DataFrame.from_records(records, columns=columns)
    table["sign"] = table["sign"].astype("Int64")
    table.attrs["corr_cells"] = pd.DataFrame(cells, index=names_a, columns=names_b)
    table.attrs["corr_loadings"] = pd.DataFrame(loadings, index=names_a, columns=names_b)
    return table
