"""Where cells come from: one narrow interface over an AnnData in memory or a file on disk.

A data source gives what aligning cells with a model needs (``anndata_io.prepare``) and what a
run carries into its result, nothing more:

* ``n_obs``, ``obs_names``, ``var_names``;
* a count matrix by its element name: ``"X"``, ``"layers/<key>"`` or ``"raw/X"``
  (:meth:`Source.counts`), read by row range (``matrix[lo:hi]``) as a ``scipy.sparse`` matrix or
  a dense array; ``layer_names`` and ``raw_var_names`` say which exist;
* one obs column (:meth:`Source.obs_column`), the whole obs table (``obs``) and whether it is in
  memory already (``obs_loaded``), and the 2-D embeddings (``obsm``).

Implementations:

* :class:`AnnDataSource`: an ``anndata.AnnData`` (in memory or opened by anndata in backed mode);
  its attributes as they are.
* :class:`StoreSource`: an ``.h5ad`` file or a ``.zarr`` store (folder or zip) read with anndata's
  element API (``anndata.io.read_elem``, ``sparse_dataset``): var names, covariate columns and
  embeddings when opened; counts by row range when a minibatch needs them; the obs table on first
  use.
* :class:`H5Source`, what ``StoreSource(path)`` opens for an ``.h5ad`` file: the same with h5py
  alone for var names, plain obs columns (categorical, string and numeric arrays) and CSR row
  ranges (:class:`H5CSR`), anndata's element API for everything else. It keeps anndata and pandas
  (~0.8 s to import, measured) out of the way until the whole obs table is asked for, so a run
  spends that time beside the sweep instead of before it, and a CSR row range costs one h5py read
  per array instead of anndata's indexing layer (timings: ``benchmarks/bench_reading.py``).
"""

from __future__ import annotations

import os
import threading
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from linear_decoder_jax.errors import IncompatibleDataError

X = "X"
RAW = "raw/X"
LAYERS = "layers/"


def layer(key: str) -> str:
    """The element name of layer ``key`` (``"layers/<key>"``)."""
    return LAYERS + key


@runtime_checkable
class Source(Protocol):
    """Cells to score, wherever they are (see the module docstring)."""

    @property
    def n_obs(self) -> int: ...

    @property
    def obs_names(self) -> np.ndarray:
        """(n_obs,) cell names."""
        ...

    @property
    def var_names(self) -> np.ndarray:
        """(n_vars,) gene names of X and the layers."""
        ...

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The layers' keys (``counts(layer(key))`` reads one)."""
        ...

    @property
    def raw_var_names(self) -> np.ndarray | None:
        """Gene names of ``.raw`` (None without ``.raw`` counts)."""
        ...

    def counts(self, name: str) -> Any:
        """The matrix ``name`` (``"X"``, ``"layers/<key>"``, ``"raw/X"``) or None when absent:
        ``shape`` and row ranges ``[lo:hi]`` as ``scipy.sparse`` or a dense array."""
        ...

    def obs_column(self, key: str) -> np.ndarray | None:
        """The (n_obs,) values of obs column ``key``; None when there is no such column."""
        ...

    @property
    def obs(self) -> Any:
        """The obs table (a pandas DataFrame indexed by obs_names)."""
        ...

    @property
    def obs_loaded(self) -> bool:
        """Whether ``obs`` is in memory (False: reading it may take a while, e.g. importing
        anndata and pandas for a streamed file)."""
        ...

    @property
    def obsm(self) -> Mapping[str, Any]:
        """The per-cell arrays of obsm (a file source reads the 2-D embeddings only)."""
        ...


class AnnDataSource:
    """An ``anndata.AnnData`` (in memory, or opened by anndata in backed mode) as a source."""

    def __init__(self, adata: Any):
        self.adata = adata

    @property
    def n_obs(self) -> int:
        return int(self.adata.n_obs)

    @property
    def obs_names(self) -> np.ndarray:
        return np.asarray(self.adata.obs_names)

    @property
    def var_names(self) -> np.ndarray:
        return np.asarray(self.adata.var_names)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(self.adata.layers.keys())

    @property
    def raw_var_names(self) -> np.ndarray | None:
        raw = getattr(self.adata, "raw", None)
        if raw is None or raw.X is None:
            return None
        return np.asarray(raw.var_names)

    def counts(self, name: str) -> Any:
        if name == X:
            return self.adata.X
        if name == RAW:
            raw = getattr(self.adata, "raw", None)
            return None if raw is None else raw.X
        if name.startswith(LAYERS) and name[len(LAYERS) :] in self.adata.layers:
            return self.adata.layers[name[len(LAYERS) :]]
        return None

    def obs_column(self, key: str) -> np.ndarray | None:
        obs = self.adata.obs
        return obs[key].to_numpy() if key in obs else None

    @property
    def obs(self) -> Any:
        return self.adata.obs

    @property
    def obs_loaded(self) -> bool:
        return True

    @property
    def obsm(self) -> Mapping[str, Any]:
        return self.adata.obsm


def as_source(data: Any) -> Source:
    """``data`` as a :class:`Source`: a source as it is, an AnnData wrapped (nothing is read)."""
    if isinstance(data, AnnDataSource | StoreSource):
        return data
    return AnnDataSource(data)


class H5CSR:
    """A CSR matrix in an h5ad group, read by row range with h5py alone (what anndata's
    ``sparse_dataset`` does for a row slice, without importing anndata)."""

    def __init__(self, group: Any):
        self.group = group
        self.shape = tuple(int(n) for n in group.attrs["shape"])
        self.dtype = group["data"].dtype
        self._indptr: np.ndarray | None = None

    def take_rows(self, rows: np.ndarray) -> Any:
        """The CSR rows ``rows`` (sorted, unique): one read of ``data`` and one of ``indices``
        per contiguous run, ``indptr`` read once and kept (8 bytes a row). A training
        minibatch of 128 scattered rows takes ~3 ms this way against ~110 ms as one
        ``scipy.sparse`` matrix per run stacked (measured)."""
        import scipy.sparse as sp

        if self._indptr is None:
            self._indptr = np.asarray(self.group["indptr"][...], dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        starts, stops = self._indptr[rows], self._indptr[rows + 1]
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1  # runs of consecutive rows
        first = np.concatenate([[0], breaks])
        last = np.concatenate([breaks, [len(rows)]]) - 1
        spans = list(zip(starts[first].tolist(), stops[last].tolist(), strict=True))
        data, indices = self.group["data"], self.group["indices"]
        values = np.concatenate([data[lo:hi] for lo, hi in spans]) if spans else data[:0]
        columns = np.concatenate([indices[lo:hi] for lo, hi in spans]) if spans else indices[:0]
        indptr = np.concatenate([[0], np.cumsum(stops - starts)])
        return sp.csr_matrix((values, columns, indptr), shape=(len(rows), self.shape[1]))

    def __getitem__(self, rows: slice) -> Any:
        import scipy.sparse as sp

        first, last, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("H5CSR reads contiguous row ranges only.")
        last = max(first, last)
        indptr = np.asarray(self.group["indptr"][first : last + 1], dtype=np.int64)
        lo, hi = (int(indptr[0]), int(indptr[-1])) if len(indptr) else (0, 0)
        data = self.group["data"][lo:hi]
        indices = self.group["indices"][lo:hi]
        return sp.csr_matrix((data, indices, indptr - lo), shape=(last - first, self.shape[1]))


def _is_zarr(path: Path) -> bool:
    return path.is_dir() or zipfile.is_zipfile(path)


def _open_store(path: Path) -> tuple[Any, Any]:
    """(root group, object to close) of an ``.h5ad`` file, a ``.zarr`` folder or a zip store."""
    if _is_zarr(path):
        import zarr

        store = zarr.storage.ZipStore(path, mode="r") if path.is_file() else path
        root = zarr.open_group(store, mode="r")
        return root, store if path.is_file() else None
    import h5py

    f = h5py.File(path, "r")
    return f, f


def _strings(node: Any) -> np.ndarray:
    """A string (or other 1-D) dataset of an h5ad file, as str."""
    if node.dtype.kind in "OS":  # variable or fixed-length UTF-8: object arrays, as pandas has
        return np.asarray(node.asstr()[...], dtype=object)
    return np.asarray(node[...]).astype(str).astype(object)


def _read_elem(node: Any) -> Any:
    from anndata.io import read_elem

    return read_elem(node)


class StoreSource:
    """An ``.h5ad`` file or a ``.zarr`` store (folder or zip) opened for streaming, read with
    anndata's element API (``StoreSource(path)`` gives an :class:`H5Source` for an h5ad file).

    Var names, the covariate columns asked for and the 2-D embeddings are read; counts (X, a
    layer or ``.raw``; CSR, CSC or dense) by row range only when a minibatch needs them; the obs
    table on first use. CSR and dense matrices read a row range cheaply; CSC must be read
    column-wise, so streaming a CSC matrix is slow (convert it to CSR once for large data).
    """

    def __new__(cls, path: str | os.PathLike, *, fast: bool = True) -> StoreSource:
        if cls is StoreSource and fast and Path(path).is_file() and not zipfile.is_zipfile(path):
            cls = H5Source
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike, *, fast: bool = True):
        """Open ``path``; ``fast=False`` reads an h5ad file with anndata's element API too (an
        :class:`H5Source` otherwise)."""
        self.path = Path(path)
        if not self.path.exists():
            raise IncompatibleDataError(f"{path}: no such file or folder.")
        self._root: Any = None
        self._handle: Any = None
        self._obs: Any = None
        self._obs_lock = threading.Lock()
        try:
            self._root, self._handle = _open_store(self.path)
            obs = self._root["obs"]
            self.n_obs = int(obs[obs.attrs["_index"]].shape[0])
            self.var_names = self._index(self._root["var"])
            self.n_vars = len(self.var_names)
            self._embeddings: dict[str, np.ndarray] = {}
            if "obsm" in self._root:
                group = self._root["obsm"]
                for key in group:  # zarr groups have no .items()
                    node = group[key]
                    if hasattr(node, "shape") and len(node.shape) == 2 and node.shape[1] == 2:
                        self._embeddings[key] = np.asarray(node[...])
        except Exception as err:  # h5py/zarr/anndata raise many types for a foreign file
            self.close()
            msg = f"{path} is not a readable h5ad file or zarr store ({type(err).__name__}: {err})."
            raise IncompatibleDataError(msg) from err

    # -- what an implementation reads its own way ---------------------------------------------
    def _index(self, group: Any) -> np.ndarray:
        """The index (obs or var names) of a dataframe group, as an object array of str."""
        values = np.asarray(_read_elem(group[group.attrs["_index"]]))
        return (
            values.astype(object)
            if values.dtype.kind in "OTU"
            else values.astype(str).astype(object)
        )

    def _column(self, node: Any) -> np.ndarray:
        """The values of one obs column element."""
        values = np.asarray(_read_elem(node))
        return values.astype(object) if values.dtype.kind == "T" else values  # numpy StringDType

    def _matrix(self, node: Any) -> Any:
        """A count matrix element, readable by row range."""
        kind = node.attrs.get("encoding-type", "")
        if kind in ("csr_matrix", "csc_matrix"):
            from anndata.io import sparse_dataset

            return sparse_dataset(node)
        if hasattr(node, "shape"):
            return node
        raise IncompatibleDataError(f"Unsupported count matrix encoding {kind!r} in {node.name}.")

    # -- the interface ------------------------------------------------------------------------
    @property
    def obs_names(self) -> np.ndarray:
        if self._obs is not None:
            return np.asarray(self._obs.index)
        return self._read("the obs names", lambda: self._index(self._root["obs"]))

    @property
    def layer_names(self) -> tuple[str, ...]:
        root = self._root
        return self._read("the layers", lambda: tuple(root["layers"]) if "layers" in root else ())

    @property
    def raw_var_names(self) -> np.ndarray | None:
        def get() -> np.ndarray | None:
            if "raw" not in self._root or "X" not in self._root["raw"]:
                return None
            return self._index(self._root["raw"]["var"])

        return self._read(".raw", get)

    def counts(self, name: str) -> Any:
        if name != X and name != RAW and not name.startswith(LAYERS):
            return None

        def get() -> Any:
            node = self._root
            for part in name.split("/", 1):  # "X", "raw/X", "layers/<key>"
                if part not in node:
                    return None
                node = node[part]
            return self._matrix(node)

        return self._read(name, get)

    def obs_column(self, key: str) -> np.ndarray | None:
        if self._obs is not None:
            return self._obs[key].to_numpy() if key in self._obs else None
        group = self._root["obs"]
        if key == group.attrs["_index"] or key not in group:
            return None
        return self._read(f"obs column {key!r}", lambda: self._column(group[key]))

    @property
    def obs(self) -> Any:
        """The obs table (a pandas DataFrame), read with anndata on first use (thread-safe)."""
        with self._obs_lock:
            if self._obs is None:
                obs = self._read("obs", lambda: _read_elem(self._root["obs"]))
                if len(obs) != self.n_obs:
                    msg = f"{self.path}: obs has {len(obs)} rows, not {self.n_obs}: it is damaged."
                    raise IncompatibleDataError(msg)
                self._obs = obs
            return self._obs

    @property
    def obs_loaded(self) -> bool:
        return self._obs is not None

    @property
    def obsm(self) -> Mapping[str, Any]:
        return self._embeddings

    # -- plumbing -----------------------------------------------------------------------------
    def _read(self, what: str, get: Callable[[], Any]) -> Any:
        """``get()``, with the store's errors for a damaged file turned into one clear error."""
        try:
            return get()
        except IncompatibleDataError:
            raise
        except Exception as err:  # h5py/zarr/anndata raise many types for a damaged file
            msg = (
                f"Cannot read {what} of {self.path} ({type(err).__name__}: {err}). "
                "The file may be damaged: write it again with anndata."
            )
            raise IncompatibleDataError(msg) from err

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> StoreSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class H5Source(StoreSource):
    """An ``.h5ad`` file read with h5py alone where that suffices (see the module docstring):
    names, plain obs columns and CSR row ranges; anndata's element API for the rest."""

    def _index(self, group: Any) -> np.ndarray:
        return _strings(group[group.attrs["_index"]])

    def _column(self, node: Any) -> np.ndarray:
        kind = node.attrs.get("encoding-type", "")
        if kind == "categorical" and node["categories"].dtype.kind in "OSU":
            categories = _strings(node["categories"])
            codes = node["codes"][...]
            # pandas turns a missing category into NaN: "nan" as a string
            return np.where(codes >= 0, categories[np.maximum(codes, 0)], "nan")
        if kind == "string-array":
            return _strings(node)
        if kind == "array" and node.dtype.kind in "biuf":
            return node[...]
        return self.obs[node.name.rsplit("/", 1)[-1]].to_numpy()  # nullable and others

    def _matrix(self, node: Any) -> Any:
        if node.attrs.get("encoding-type", "") == "csr_matrix":
            return H5CSR(node)
        return super()._matrix(node)
