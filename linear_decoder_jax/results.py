"""``AblationResult``: the scores of a sweep, group summaries, and the result h5ad schema.

Schema of ``to_anndata()`` / ``write()`` (n_obs cells, n_vars genes, K latents, A ablated latents):

* ``obs``: the input's obs columns, same obs_names in the same order; ``obs["nll"]`` full NLL.
* ``obsm["delta_nll"]`` (n_obs, A), ``obsm["delta_l1"]`` (n_obs, A), ``obsm["latent"]`` (n_obs, K)
  decoder input; ``obsm["delta_nll_se"]`` (n_obs, A) when ``n_samples > 0``; the input's 2-D
  embeddings (``X_umap`` ...) carried over. With ``refit=True``: ``obsm["unique_delta_nll"]``,
  ``obsm["refit_grad_norm"]`` (n_obs, A) and ``obsm["refit_converged"]`` (n_obs, A) bool.
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
from linear_decoder_jax.errors import IncompatibleDataError

TOP_CELLS = 10
_REFIT_KEYS = ("unique_delta_nll", "refit_grad_norm", "refit_converged")


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
    unique_delta_nll: np.ndarray | None = None  # (n_obs, A), refit=True only
    refit_grad_norm: np.ndarray | None = None  # (n_obs, A)
    refit_converged: np.ndarray | None = None  # (n_obs, A) bool

    @property
    def latent_names(self) -> list[str]:
        return list(self.settings["latent_names"])

    @property
    def obs_names(self) -> np.ndarray:
        return self.obs.index.to_numpy()

    def top_cells(self, n_top: int = TOP_CELLS):
        """The ``n_top`` cells with the largest delta_nll per latent: a DataFrame with columns
        ``latent``, ``rank``, ``cell`` and ``delta_nll`` (``uns["ablation_top_cells"]``)."""
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
            from linear_decoder_jax import stats

            lines.append(f"top latents per {self.settings['groupby']}:")
            table = self.groups["mean"]
            tests = stats.group_stats(self)
            mark = stats.significant_marks(tests)
            for group, row in table.iterrows():
                best = row.sort_values(ascending=False).head(n_top)
                frac = self.groups["frac_positive"].loc[group]
                items = ", ".join(
                    f"{k}{mark[str(group), k]} {v:.2f} ({frac[k]:.0%}>0)" for k, v in best.items()
                )
                lines.append(f"  {group}: {items}")
            lines.append(
                f"  * higher in the group than in the other cells (BH padj < {stats.ALPHA})"
            )
        if self.unique_delta_nll is not None and self.refit_converged is not None:
            unique = np.asarray(self.unique_delta_nll).mean(axis=0)
            lines.append(
                "mean unique_delta_nll (nats/cell): "
                + ", ".join(f"{names[j]} {unique[j]:.2f}" for j in order)
                + f"; refit converged: {np.asarray(self.refit_converged).mean():.1%} of fits"
            )
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
        for key in _REFIT_KEYS:
            if getattr(self, key) is not None:
                adata.obsm[key] = getattr(self, key)
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

    @classmethod
    def read(cls, path: str | os.PathLike, *, memmap: bool = True) -> AblationResult:
        """Read a result h5ad; the large obsm arrays are memory-mapped, not loaded, when possible."""
        try:
            return cls._read(path, memmap=memmap)
        except IncompatibleDataError:
            raise
        except Exception as err:  # h5py/anndata raise many types for a foreign or damaged file
            msg = (
                f"{path} is not an ldj ablation result ({type(err).__name__}: {err}); "
                "pass files written by `ldj ablate`."
            )
            raise IncompatibleDataError(msg) from err

    @classmethod
    def _read(cls, path: str | os.PathLike, *, memmap: bool) -> AblationResult:
        import h5py
        from anndata.io import read_elem

        if not Path(path).is_file():
            raise IncompatibleDataError(f"{path}: no such file.")
        with h5py.File(path, "r") as f:
            obs = read_elem(f["obs"])
            nll = obs.pop("nll").to_numpy()
            uns = read_elem(f["uns"])
            arrays = {}
            for key in ("delta_nll", "delta_l1", "latent", "delta_nll_se", *_REFIT_KEYS):
                if key in f["obsm"]:
                    arrays[key] = _mapped(path, f["obsm"][key]) if memmap else f["obsm"][key][...]
            embeddings = {k: np.asarray(v[...]) for k, v in f["obsm"].items() if k not in arrays}
            varm = {k: np.asarray(v[...]) for k, v in f["varm"].items()}
            var_names = list(read_elem(f["var"]).index)
        settings = dict(uns["ablation"])
        return cls(
            delta_nll=arrays["delta_nll"],
            delta_l1=arrays["delta_l1"],
            latent=arrays["latent"],
            nll=nll,
            mean_lfc=varm["mean_lfc"],
            loadings=varm["loadings"],
            obs=obs,
            var_names=var_names,
            settings=settings,
            embeddings=embeddings,
            delta_nll_se=arrays.get("delta_nll_se"),
            groups=uns.get("ablation_groups"),
            **{k: arrays[k] for k in _REFIT_KEYS if k in arrays},
        )

    def group_stats(self, groupby: str | None = None, *, score: str = "delta_nll"):
        """Per group and latent: mean with 95 % CI, median, AUROC, Mann-Whitney p and BH padj
        (a DataFrame; definitions and assumptions in :func:`linear_decoder_jax.stats.group_stats`)."""
        from linear_decoder_jax import stats

        return stats.group_stats(self, groupby, score=score)  # type: ignore[arg-type]

    def associations(self, data: Any = None, columns: list[str] | None = None):
        """Spearman / Kruskal-Wallis association of each latent with each obs covariate, BH
        (a DataFrame; see :func:`linear_decoder_jax.stats.associations`)."""
        from linear_decoder_jax import stats

        return stats.associations(self, data, columns)


def _mapped(path: str | os.PathLike, dataset: Any) -> np.ndarray:
    """A read-only memmap of a contiguous, uncompressed HDF5 dataset (else it is read)."""
    offset = dataset.id.get_offset()
    if offset is None or dataset.chunks is not None or dataset.compression is not None:
        return dataset[...]
    return np.memmap(path, mode="r", dtype=dataset.dtype, shape=dataset.shape, offset=offset)


class H5adStream:
    """Write a result h5ad while the sweep runs: the (n_obs, ...) obsm arrays are contiguous
    on-disk datasets filled minibatch by minibatch, so no full copy is held in memory; the rest of
    the schema is written by :meth:`finish`. Used inside :func:`_atomic.atomic_path`.
    """

    def __init__(self, path: Path, shapes: dict[str, tuple[tuple[int, ...], Any]]):
        import h5py

        self.path = path
        self.file = h5py.File(path, "w")
        self.file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        obsm = self.file.create_group("obsm")
        obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        self.arrays: dict[str, Any] = {}
        for key, (shape, dtype) in shapes.items():
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            space = h5py.h5s.create_simple(shape)
            dsid = h5py.h5d.create(
                obsm.id, key.encode(), h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl
            )
            ds = h5py.Dataset(dsid)
            ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            self.arrays[key] = ds

    def finish(self, result: AblationResult) -> None:
        """Write obs, var, varm, uns and an empty X; ``result`` arrays may be these datasets."""
        import pandas as pd
        import scipy.sparse as sp
        from anndata.io import write_elem

        f = self.file
        n, g = len(result.obs), len(result.var_names)
        obs = result.obs.copy()
        obs["nll"] = np.asarray(result.nll)
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=pd.Index(result.var_names)))
        write_elem(f, "X", sp.csr_matrix((n, g), dtype=np.float32))
        for key, value in result.embeddings.items():
            write_elem(f["obsm"], key, value)
        write_elem(f, "varm", {"mean_lfc": result.mean_lfc, "loadings": result.loadings})
        uns: dict[str, Any] = {"ablation": dict(result.settings)}
        if result.groups is not None:
            uns["ablation_groups"] = dict(result.groups)
        uns["ablation_top_cells"] = result.top_cells()
        write_elem(f, "uns", uns)
        for key in ("layers", "obsp", "varp"):
            write_elem(f, key, {})
        f.close()
