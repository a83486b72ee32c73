"""``AblationResult``: the scores of a run, group summaries, and the result h5ad.

The file's layout is ``schema.FIELDS`` (one row per array: slot, dimensions, dtype, when present,
meaning); the in-memory writer (:meth:`AblationResult.to_anndata`), the streamed writer
(:class:`H5adStream`) and the reader (:meth:`AblationResult.read`) all iterate over it. Besides the
scorers' fields: ``varm["loadings"]``, the input's obs columns and 2-D embeddings, and ``uns``
(settings, group tables, top cells). ``X`` is empty (all zeros, sparse): no counts are copied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from linear_decoder_jax import schema
from linear_decoder_jax._atomic import atomic_path
from linear_decoder_jax.errors import ConfigError, IncompatibleDataError, OutputExistsError
from linear_decoder_jax.schema import latent_names

TOP_CELLS = 10


def group_tables(delta: np.ndarray, groups: np.ndarray, latent_names: list[str]) -> dict[str, Any]:
    """Per-group mean, median, fraction of cells with delta > 0, and cell counts; cells without a
    group (NaN) are left out and counted in ``n_no_group``."""
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
    tables["n_no_group"] = int((cats.codes < 0).sum())
    return tables


def explained_shares(
    gain: np.ndarray, phi: np.ndarray, groups: Any, latent_names: list[str]
) -> Any:
    """DataFrame groups x latents: share of each group's mean gain explained by each latent
    (``attribution`` identity S8),
    plus an ``all cells`` row. ``groups``: per-cell labels (a categorical keeps its empty
    categories; NaN: no group)."""
    import pandas as pd

    cats = pd.Categorical(groups)
    names = [str(c) for c in cats.categories]
    gain = np.asarray(gain, np.float64)
    phi = np.asarray(phi, np.float64)
    rows = []
    for code in range(len(names)):
        sel = cats.codes == code
        with np.errstate(invalid="ignore", divide="ignore"):
            rows.append(phi[sel].sum(0) / gain[sel].sum())
    rows.append(phi.sum(0) / gain.sum())
    return pd.DataFrame(np.asarray(rows), index=[*names, schema.ALL_CELLS], columns=latent_names)


def gene_effects(
    loadings: np.ndarray | None, mean_lfc: np.ndarray, latents: np.ndarray, n_latent: int
) -> np.ndarray:
    """(n_vars, n_latent) per-gene effect of each latent: a linear family's loadings, else (a
    family without loadings) the sweep's ``mean_lfc`` in the ablated latents' columns (NaN in the
    others)."""
    if loadings is not None:
        return np.asarray(loadings)
    out = np.full((mean_lfc.shape[0], n_latent), np.nan, np.asarray(mean_lfc).dtype)
    out[:, np.asarray(latents, np.int64)] = np.asarray(mean_lfc)
    return out


def derive(
    arrays: dict[str, Any], obs: Any, settings: dict[str, Any]
) -> tuple[dict[str, Any] | None, Any]:
    """The group tables of a finished result (``uns["ablation_groups"]`` and, with Shapley
    values, ``uns["ablation_explained"]``), or ``(None, None)`` without a ``groupby``. One
    place for a run (``assemble``) and a merge of its parts (``merge``)."""
    groupby = settings.get("groupby") or None
    if groupby is None:
        return None, None
    groups = group_tables(
        arrays["delta_nll"], obs[groupby].to_numpy(), list(settings["latent_names"])
    )
    explained = None
    if arrays.get("shapley_nll") is not None:
        k = arrays["shapley_nll"].shape[1]
        names = list(settings.get("all_latent_names", latent_names(k)))
        explained = explained_shares(
            np.asarray(arrays["gain_nll"]), np.asarray(arrays["shapley_nll"]), obs[groupby], names
        )
    return groups, explained


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
    """Scores of ``ldj.ablate``; arrays are numpy (or read-only memory maps), cells in input obs
    order. Every field of ``schema.FIELDS`` is an attribute (``result.delta_nll``, ...), None when
    the run did not compute it."""

    arrays: dict[str, np.ndarray]  # schema fields present, by name
    # (n_vars, K) a linear family's loadings; None for a family without (``family`` module:
    # ``mean_lfc`` stands in for them)
    loadings: np.ndarray | None
    obs: Any  # pandas DataFrame indexed by obs_names (input obs columns)
    var_names: list[str]
    settings: dict[str, Any]
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    groups: dict[str, Any] | None = None
    explained_table: Any = None  # uns["ablation_explained"]: shapley with groupby

    @property
    def gain(self) -> np.ndarray | None:
        """``gain_nll`` (n_obs,): NLL with every latent at its baseline minus the full NLL."""
        return self.arrays.get("gain_nll")

    @property
    def shapley(self) -> np.ndarray | None:
        """``shapley_nll`` (n_obs, K): each latent's Shapley share of the gain; rows sum to it."""
        return self.arrays.get("shapley_nll")

    def explained(self, groupby: str | None = None):
        """DataFrame groups (+ ``all cells``) x K latents: the share of each group's mean gain
        explained by each latent (``attribution`` identity S8). ``groupby``: an obs column (default
        the run's)."""
        if self.shapley is None:
            raise IncompatibleDataError("No Shapley values: run ablate with shapley='exact'.")
        groupby = groupby or self.settings.get("groupby") or None
        if groupby is None:
            raise IncompatibleDataError("Pass groupby: the run had none.")
        if groupby == self.settings.get("groupby") and self.explained_table is not None:
            return self.explained_table
        if groupby not in self.obs:
            raise IncompatibleDataError(f"groupby column {groupby!r} is not in the result's obs.")
        names = list(self.settings.get("all_latent_names", latent_names(self.shapley.shape[1])))
        return explained_shares(
            np.asarray(self.gain), np.asarray(self.shapley), self.obs[groupby], names
        )

    def gene_table(self, latent: int | str, group: str | None = None, n_top: int | None = None):
        """Per-gene scores of one ablated latent in one group (default all cells): a DataFrame
        indexed by gene with columns ``delta_nll`` (mean NLL change of the gene over the group's
        cells) and ``lfc`` (mean log fold change of rho), sorted by ``delta_nll`` descending."""
        import pandas as pd

        if self.gene_delta_nll is None:
            raise IncompatibleDataError("No gene scores: run ablate with gene_scores=True.")
        names = self.latent_names
        if isinstance(latent, str):
            if latent not in names:
                raise IncompatibleDataError(f"Latent {latent!r} was not ablated ({names}).")
            j = names.index(latent)
        else:
            ablated = [int(i) for i in self.settings["latents"]]
            if int(latent) not in ablated:
                raise IncompatibleDataError(f"Latent {latent} was not ablated ({ablated}).")
            j = ablated.index(int(latent))
        rows = [str(g) for g in self.settings["gene_groups"]]
        key = schema.ALL_CELLS if group is None else str(group)
        if key not in rows:
            raise IncompatibleDataError(f"Group {group!r} not among {rows[:-1]}.")
        r = rows.index(key)
        table = pd.DataFrame(
            {
                "delta_nll": np.asarray(self.gene_delta_nll[r, j]),
                "lfc": np.asarray(self.gene_lfc[r, j]),
            },
            index=pd.Index(self.var_names, name="gene"),
        )
        table = table.sort_values("delta_nll", ascending=False, kind="stable")
        return table if n_top is None else table.head(n_top)

    def __getattr__(self, name: str) -> Any:
        if name in schema.BY_NAME and "arrays" in self.__dict__:
            return self.__dict__["arrays"].get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def replace(self, **changes: Any) -> AblationResult:
        """A copy with some attributes replaced; schema fields (``delta_nll=``, ...) included."""
        import dataclasses

        arrays = dict(changes.pop("arrays", self.arrays))
        for name in [k for k in changes if k in schema.BY_NAME]:
            arrays[name] = changes.pop(name)
        return dataclasses.replace(self, arrays=arrays, **changes)

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

            left_out = int(self.groups.get("n_no_group", 0))
            note = f" ({left_out} cells without a value left out)" if left_out else ""
            lines.append(f"top latents per {self.settings['groupby']}{note}:")
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
        if self.shapley is not None and self.gain is not None:
            # S8 over every cell: each latent's share of the mean likelihood gain
            every = list(self.settings.get("all_latent_names", latent_names(self.shapley.shape[1])))
            share = np.asarray(self.shapley, np.float64).sum(0) / np.asarray(self.gain).sum()
            top = np.argsort(-share)[:n_top]
            lines.append(
                f"explained (Shapley, share of the mean gain {np.asarray(self.gain).mean():.2f} "
                "nats/cell): " + ", ".join(f"{every[k]} {share[k]:.0%}" for k in top)
            )
        return "\n".join(lines)

    def to_anndata(self):
        """The result as AnnData (layout: ``schema.FIELDS``); readable by scanpy."""
        import anndata
        import pandas as pd
        import scipy.sparse as sp

        n, g = len(self.obs), len(self.var_names)
        adata = anndata.AnnData(
            X=sp.csr_matrix((n, g), dtype=np.float32),
            obs=self.obs.copy(),
            var=pd.DataFrame(index=pd.Index(self.var_names, name=None)),
        )
        for f in schema.FIELDS:
            value = self.arrays.get(f.name)
            if value is not None and f.slot != "uns":  # uns fields: _uns
                getattr(adata, f.slot)[f.name] = np.asarray(value)
        for key, value in self.embeddings.items():
            adata.obsm[key] = value
        if self.loadings is not None:
            adata.varm[schema.LOADINGS.name] = self.loadings
        adata.uns.update(self._uns())
        return adata

    def _uns(self) -> dict[str, Any]:
        uns: dict[str, Any] = {"ablation": dict(self.settings)}
        if self.groups is not None:
            uns["ablation_groups"] = dict(self.groups)
        uns["ablation_top_cells"] = self.top_cells()
        if self.explained_table is not None:
            uns["ablation_explained"] = self.explained_table
        for f in schema.fields("uns"):
            if self.arrays.get(f.name) is not None:
                uns[f.name] = np.asarray(self.arrays[f.name])
        return uns

    def add_to(
        self, adata: Any, *, key_added: str | None = None, overwrite: bool = False
    ) -> list[str]:
        """Put the scores back into ``adata`` (same cells, same order): obsm arrays and one obs
        column per ablated latent (``delta_nll_Z_3``); see :func:`add_to`."""
        return add_to(self, adata, key_added=key_added, overwrite=overwrite)

    def write(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the result h5ad atomically; an existing ``path`` needs ``overwrite=True``."""
        from linear_decoder_jax.anndata_io import obs_writing

        h5ad_name(path)
        adata = self.to_anndata()
        with atomic_path(path, overwrite=overwrite, directory=False) as tmp, obs_writing():
            adata.write_h5ad(tmp)
        return Path(path).absolute()

    @classmethod
    def read(cls, path: str | os.PathLike, *, memmap: bool = True) -> AblationResult:
        """Read a result h5ad; the large obsm arrays are memory-mapped, not loaded, when possible
        (:func:`read_result`)."""
        return read_result(path, memmap=memmap)

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


def read_result(src: Any, *, memmap: bool = True) -> AblationResult:
    """The one reader of an ablation result: a result h5ad, or an AnnData of one.

    Parameters
    ----------
    src
        The path of a result h5ad (written by ``ldj ablate``, ``ldj merge`` or
        :meth:`AblationResult.write`), an AnnData holding a result (read from such a file by
        anndata or scanpy, or :meth:`AblationResult.to_anndata`), or an ``AblationResult``,
        returned as it is.
    memmap
        For a path: memory-map the per-cell ``obsm`` arrays (contiguous, uncompressed datasets)
        instead of loading them.

    Returns
    -------
    AblationResult
        The fields of ``schema.FIELDS`` that the result holds, its loadings, obs, embeddings,
        settings and group tables.
    """
    if isinstance(src, AblationResult):
        return src
    if not isinstance(src, str | os.PathLike):
        return _from_slots(_AnnDataSlots(src), f"{type(src).__name__}")
    path = Path(src)
    if not path.is_file():
        raise IncompatibleDataError(f"{src}: no such file.")
    import h5py

    try:
        f = h5py.File(path, "r")
    except Exception as err:  # h5py raises OSError and others for a file of another kind
        msg = f"{src} is not a readable h5ad file ({type(err).__name__}: {err})."
        raise IncompatibleDataError(msg) from err
    with f:
        try:
            return _from_slots(_H5Slots(f, path, memmap=memmap), os.fspath(src))
        except IncompatibleDataError:
            raise
        except Exception as err:  # h5py/anndata raise many types for a foreign or damaged file
            msg = (
                f"{src} is not an ldj ablation result ({type(err).__name__}: {err}); "
                "pass files written by `ldj ablate`."
            )
            raise IncompatibleDataError(msg) from err


class _H5Slots:
    """The slots of a result h5ad, read with h5py and anndata's element reader."""

    def __init__(self, f: Any, path: Path, *, memmap: bool):
        from anndata.io import read_elem

        self.f, self.path, self.memmap = f, path, memmap
        self.obs = read_elem(f["obs"]) if "obs" in f else None
        self.uns = read_elem(f["uns"]) if "uns" in f else {}
        self.var_names = list(read_elem(f["var"]).index) if "var" in f else []

    def keys(self, slot: str) -> list[str]:
        return list(self.f[slot]) if slot in self.f else []

    def get(self, slot: str, name: str, *, per_cell: bool) -> np.ndarray:
        node = self.f[slot][name]
        return mapped(self.path, node) if self.memmap and per_cell else np.asarray(node[...])


class _AnnDataSlots:
    """The slots of an AnnData holding a result (in memory or backed)."""

    def __init__(self, adata: Any):
        obs = getattr(adata, "obs", None)
        self.adata = adata
        self.obs = None if obs is None else obs.copy()
        self.uns = dict(getattr(adata, "uns", None) or {})
        self.var_names = [str(v) for v in getattr(adata, "var_names", [])]

    def keys(self, slot: str) -> list[str]:
        return list(getattr(self.adata, slot, {}).keys())

    def get(self, slot: str, name: str, *, per_cell: bool) -> np.ndarray:
        return np.asarray(getattr(self.adata, slot)[name])


def _from_slots(slots: _H5Slots | _AnnDataSlots, what: str) -> AblationResult:
    """An ``AblationResult`` from the slots of a result, whatever holds them."""
    uns = dict(slots.uns)
    if "ablation" not in uns or slots.obs is None:
        msg = (
            f"Expected an ldj ablation result, got {what} without uns['ablation'] instead; "
            "run `ldj ablate` first."
        )
        raise IncompatibleDataError(msg)
    obs = slots.obs
    arrays: dict[str, np.ndarray] = {}
    for fld in schema.FIELDS:
        if fld.slot == "uns":
            if fld.name in uns:
                arrays[fld.name] = np.asarray(uns.pop(fld.name))
        elif fld.slot == "obs":
            if fld.name in obs:
                arrays[fld.name] = obs.pop(fld.name).to_numpy()
        elif fld.name in slots.keys(fld.slot):
            arrays[fld.name] = slots.get(fld.slot, fld.name, per_cell=fld.per_cell)
    missing = [x.name for x in schema.FIELDS if x.when == schema.ALWAYS and x.name not in arrays]
    has_loadings = schema.LOADINGS.name in slots.keys("varm")
    if not has_loadings and uns["ablation"].get("has_loadings", True):  # a linear family's
        missing.append(schema.LOADINGS.name)
    if missing:
        raise IncompatibleDataError(f"{what} lacks the result fields {missing}.")
    embeddings = {}  # the input's 2-D embeddings carried over (X_umap, ...)
    for key in slots.keys("obsm"):
        if key not in schema.obsm_keys():
            value = slots.get("obsm", key, per_cell=False)
            if value.shape == (len(obs), 2):
                embeddings[key] = value
    return AblationResult(
        arrays=arrays,
        loadings=slots.get("varm", schema.LOADINGS.name, per_cell=False) if has_loadings else None,
        obs=obs,
        var_names=slots.var_names,
        settings=dict(uns["ablation"]),
        embeddings=embeddings,
        groups=uns.get("ablation_groups"),
        explained_table=uns.get("ablation_explained"),
    )


def mapped(path: str | os.PathLike, dataset: Any) -> np.ndarray:
    """A read-only memmap of a contiguous, uncompressed HDF5 dataset (else it is read)."""
    offset = dataset.id.get_offset()
    if offset is None or dataset.chunks is not None or dataset.compression is not None:
        return dataset[...]
    return np.memmap(path, mode="r", dtype=dataset.dtype, shape=dataset.shape, offset=offset)


class H5adStream:
    """Write a result h5ad while the sweep runs: the per-cell ``obsm`` fields are contiguous
    on-disk datasets filled minibatch by minibatch, so no full copy is held in memory; the rest of
    the schema is written by :meth:`finish`. Used inside :func:`_atomic.atomic_path`.
    """

    def __init__(self, path: Path, shapes: dict[str, tuple[tuple[int, ...], Any]]):
        """``shapes``: (shape, dtype) of each per-cell field to stream; ``obs`` fields are kept
        in memory (one value per cell) and written with obs."""
        import h5py

        self.path = path
        self.file = h5py.File(path, "w")
        self.file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        obsm = self.file.create_group("obsm")
        obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        self.arrays: dict[str, Any] = {}
        for key, (shape, dtype) in shapes.items():
            if schema.BY_NAME[key].slot == "obs":
                self.arrays[key] = np.empty(shape, dtype)
                continue
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            space = h5py.h5s.create_simple(shape)
            dsid = h5py.h5d.create(
                obsm.id, key.encode(), h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl
            )
            ds = h5py.Dataset(dsid)
            ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            self.arrays[key] = ds

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def read_back(self) -> dict[str, np.ndarray]:
        """The streamed fields, flushed and read back as memory maps (obs fields as they are)."""
        self.file.flush()
        return {
            k: v if isinstance(v, np.ndarray) else mapped(self.path, v)
            for k, v in self.arrays.items()
        }

    def finish(self, result: AblationResult) -> None:
        """Write obs, var, varm, uns, the non-streamed fields and an empty X, then close."""
        import pandas as pd
        import scipy.sparse as sp
        from anndata.io import write_elem

        from linear_decoder_jax.anndata_io import obs_writing

        f = self.file
        n, g = len(result.obs), len(result.var_names)
        obs = result.obs.copy()
        varm: dict[str, Any] = {}
        if result.loadings is not None:
            varm[schema.LOADINGS.name] = result.loadings
        for fld in schema.FIELDS:
            value = result.arrays.get(fld.name)
            if value is None:
                continue
            if fld.slot == "obs":
                obs[fld.name] = np.asarray(value)
            elif fld.slot == "varm":
                varm[fld.name] = np.asarray(value)
            elif fld.slot == "obsm" and fld.name not in f["obsm"]:
                write_elem(f["obsm"], fld.name, np.asarray(value))
        with obs_writing():
            write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=pd.Index(result.var_names)))
        write_elem(f, "X", sp.csr_matrix((n, g), dtype=np.float32))
        for key, value in result.embeddings.items():
            write_elem(f["obsm"], key, value)
        write_elem(f, "varm", varm)
        write_elem(f, "uns", result._uns())
        for key in ("layers", "obsp", "varp"):
            write_elem(f, key, {})
        f.close()


def h5ad_name(path: str | os.PathLike) -> Path:
    """``path`` if it ends in ``.h5ad``; any other name is refused (results are always h5ad)."""
    if Path(path).suffix != ".h5ad":
        msg = (
            f"Expected an output name ending in .h5ad, got {os.fspath(path)!r} instead: results "
            "are written as h5ad (read them with anndata or scanpy)."
        )
        raise ConfigError(msg)
    return Path(path)


def _added(result: AblationResult, key_added: str | None) -> tuple[dict, dict]:
    """(obsm arrays, obs columns) that :func:`add_to` writes, by key."""
    obs_prefix = "" if key_added is None else f"{key_added}_"
    obsm_prefix = f"{key_added or 'ablation'}_"
    obsm: dict[str, np.ndarray] = {}
    columns: dict[str, np.ndarray] = {}
    for fld in schema.FIELDS:
        value = result.arrays.get(fld.name)
        if value is None or not fld.per_cell:
            continue
        if fld.slot == "obs":
            columns[f"{obs_prefix}{fld.name}"] = np.asarray(value)
            continue
        obsm[f"{obsm_prefix}{fld.name}"] = np.asarray(value)
        if fld.dims == ("obs", "ablated"):
            for j, name in enumerate(result.latent_names):
                columns[f"{obs_prefix}{fld.name}_{name}"] = np.asarray(value[:, j])
    return obsm, columns


def add_to(
    result: AblationResult, adata: Any, *, key_added: str | None = None, overwrite: bool = False
) -> list[str]:
    """Write ``result``'s per-cell scores into ``adata`` (scanpy's ``tl`` convention).

    Each per-cell score of one value per ablated latent becomes one obs column per latent
    (``delta_nll_Z_3``, ``delta_l1_Z_3``, ...; ``nll`` as is), so that
    ``sc.pl.umap(adata, color="delta_nll_Z_3")`` works; the arrays also go to obsm
    (``ablation_delta_nll``, ``ablation_latent``, ...) and the settings, latent names and column
    names to ``uns["ablation"]``. ``key_added`` prefixes every obs column and replaces
    "ablation" (to keep two runs side by side). ``adata`` must hold the result's cells in the same
    order; existing keys are replaced only with ``overwrite=True``. Returns the obs columns.
    """
    n = len(result.obs)
    same = adata.n_obs == n and np.array_equal(
        np.asarray(adata.obs_names).astype(str), result.obs_names.astype(str)
    )
    if not same:
        how = "in another order or with other names" if adata.n_obs == n else ""
        msg = (
            f"Expected an AnnData with the result's {n} cells in the same order (obs_names), got "
            f"{adata.n_obs} cells {how} instead; subset it with adata[result.obs_names]."
        )
        raise IncompatibleDataError(" ".join(msg.split()))
    obsm, columns = _added(result, key_added)
    uns_key = key_added or "ablation"
    taken = [k for k in obsm if k in adata.obsm] + [k for k in columns if k in adata.obs]
    taken += [uns_key] if uns_key in adata.uns else []
    if taken and not overwrite:
        msg = (
            f"The AnnData already has {', '.join(repr(k) for k in taken[:5])}; pass "
            "overwrite=True to replace them, or another key_added."
        )
        raise OutputExistsError(msg)
    for key, value in obsm.items():
        adata.obsm[key] = value
    for key, value in columns.items():
        adata.obs[key] = value
    adata.uns[uns_key] = {
        "latent_names": list(result.latent_names),
        "obs_columns": list(columns),
        "params": {k: v for k, v in result.settings.items() if k != "versions"},
    }
    return list(columns)
