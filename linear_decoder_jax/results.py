"""``AblationResult``: the scores of a sweep, group summaries, and the result h5ad schema.

Schema of ``to_anndata()`` / ``write()`` (n_obs cells, n_vars genes, K latents, A ablated latents):

* ``obs``: the input's obs columns, same obs_names in the same order; ``obs["nll"]`` full NLL.
* ``obsm["delta_nll"]`` (n_obs, A), ``obsm["delta_l1"]`` (n_obs, A), ``obsm["latent"]`` (n_obs, K)
  decoder input; ``obsm["delta_nll_se"]`` (n_obs, A) when ``n_samples > 0``; the input's 2-D
  embeddings (``X_umap`` ...) carried over.
* ``varm["mean_lfc"]`` (n_vars, A), ``varm["loadings"]`` (n_vars, K) effective loadings.
* ``uns["ablation"]``: settings and provenance; ``uns["ablation_groups"]`` (with ``groupby``):
  DataFrames groups x ablated latents ``mean``, ``median``, ``frac_positive`` and ``n_cells``;
  ``uns["ablation_top_cells"]``: the cells with the largest delta_nll per ablated latent.
* ``X`` is empty (all zeros, sparse): no count matrix is copied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from linear_decoder_jax._atomic import atomic_path

TOP_CELLS = 10


def group_tables(delta: np.ndarray, groups: np.ndarray, latent_names: list[str]) -> dict[str, Any]:
    """Per-group mean, median, fraction of cells with delta > 0, and cell counts."""
    import pandas as pd

    cats = pd.Categorical(groups)
    names = [str(c) for c in cats.categories]
    rows: dict[str, list[np.ndarray]] = {"mean": [], "median": [], "frac_positive": []}
    counts = []
    for code in range(len(names)):
        block = delta[cats.codes == code]
        counts.append(len(block))
        rows["mean"].append(block.mean(axis=0))
        rows["median"].append(np.median(block, axis=0))
        rows["frac_positive"].append((block > 0).mean(axis=0))
    tables: dict[str, Any] = {
        k: pd.DataFrame(np.asarray(v), index=names, columns=latent_names) for k, v in rows.items()
    }
    tables["n_cells"] = pd.DataFrame({"n_cells": np.asarray(counts, dtype=np.int64)}, index=names)
    return tables


def top_cells(
    delta: np.ndarray, obs_names: np.ndarray, latent_names: list[str], n_top: int = TOP_CELLS
):
    """Long table of the ``n_top`` cells with the largest delta_nll for each ablated latent."""
    import pandas as pd

    records = []
    n_top = min(n_top, len(delta))
    for j, name in enumerate(latent_names):
        order = np.argsort(-delta[:, j], kind="stable")[:n_top]
        for rank, i in enumerate(order):
            records.append((name, rank + 1, str(obs_names[i]), float(delta[i, j])))
    return pd.DataFrame.from_records(records, columns=["latent", "rank", "cell", "delta_nll"])


@dataclass
class AblationResult:
    """Scores of ``ldj.ablate``; arrays are numpy, cells in input obs order."""

    delta_nll: np.ndarray  # (n_obs, A)
    delta_l1: np.ndarray  # (n_obs, A)
    latent: np.ndarray  # (n_obs, K)
    nll: np.ndarray  # (n_obs,)
    mean_lfc: np.ndarray  # (n_vars, A)
    loadings: np.ndarray  # (n_vars, K)
    obs: Any  # pandas DataFrame indexed by obs_names (input obs columns)
    var_names: list[str]
    settings: dict[str, Any]
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    delta_nll_se: np.ndarray | None = None
    groups: dict[str, Any] | None = None

    @property
    def latent_names(self) -> list[str]:
        return list(self.settings["latent_names"])

    @property
    def obs_names(self) -> np.ndarray:
        return self.obs.index.to_numpy()

    def top_cells(self, n_top: int = TOP_CELLS):
        return top_cells(self.delta_nll, self.obs_names, self.latent_names, n_top)

    def summary(self, n_top: int = 3) -> str:
        """A one-screen text summary: strongest latents overall and per group."""
        names = self.latent_names
        mean = self.delta_nll.mean(axis=0)
        order = np.argsort(-mean)[:n_top]
        lines = [
            f"{len(self.delta_nll)} cells x {len(names)} latents, mode={self.settings['mode']}, "
            f"baseline={self.settings['baseline']}",
            "mean delta_nll (nats/cell): " + ", ".join(f"{names[j]} {mean[j]:.2f}" for j in order),
        ]
        if self.groups is not None:
            lines.append(f"top latents per {self.settings['groupby']}:")
            table = self.groups["mean"]
            for group, row in table.iterrows():
                best = row.sort_values(ascending=False).head(n_top)
                frac = self.groups["frac_positive"].loc[group]
                items = ", ".join(f"{k} {v:.2f} ({frac[k]:.0%}>0)" for k, v in best.items())
                lines.append(f"  {group}: {items}")
        return "\n".join(lines)

    def to_anndata(self):
        """The result as AnnData (schema in this module's docstring); readable by scanpy."""
        import anndata
        import pandas as pd
        import scipy.sparse as sp

        n, g = len(self.delta_nll), len(self.var_names)
        obs = self.obs.copy()
        obs["nll"] = self.nll
        adata = anndata.AnnData(
            X=sp.csr_matrix((n, g), dtype=np.float32),
            obs=obs,
            var=pd.DataFrame(index=pd.Index(self.var_names, name=None)),
        )
        adata.obsm["delta_nll"] = self.delta_nll
        adata.obsm["delta_l1"] = self.delta_l1
        adata.obsm["latent"] = self.latent
        if self.delta_nll_se is not None:
            adata.obsm["delta_nll_se"] = self.delta_nll_se
        for key, value in self.embeddings.items():
            adata.obsm[key] = value
        adata.varm["mean_lfc"] = self.mean_lfc
        adata.varm["loadings"] = self.loadings
        adata.uns["ablation"] = dict(self.settings)
        if self.groups is not None:
            adata.uns["ablation_groups"] = dict(self.groups)
        adata.uns["ablation_top_cells"] = self.top_cells()
        return adata

    def write(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the result h5ad atomically; an existing ``path`` needs ``overwrite=True``."""
        adata = self.to_anndata()
        with atomic_path(path, overwrite=overwrite, directory=False) as tmp:
            adata.write_h5ad(tmp)
        return Path(path).absolute()
