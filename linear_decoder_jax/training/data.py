"""Data for training: the registry built from an AnnData, scvi-tools' split, the library prior and
minibatches read by row index (in memory, or streamed from an h5ad/zarr file).

scvi-tools 1.4.2 sources mirrored: ``dataloaders/_data_splitting.py`` (``validate_data_split``,
``DataSplitter.setup``), ``model/_utils.py`` (``get_max_epochs_heuristic``,
``_init_library_size``) and ``data/fields/_layer_field``/``_obs_field`` (category order: a
categorical column's own categories, otherwise the sorted unique values).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy as np

from linear_decoder_jax import anndata_io
from linear_decoder_jax._text import preview
from linear_decoder_jax.anndata_io import CellData
from linear_decoder_jax.config import DataRegistry
from linear_decoder_jax.errors import ConfigError, IncompatibleDataError
from linear_decoder_jax.sources import H5CSR, StoreSource

READ_ROWS = 4096  # rows per block of the checking pass


def max_epochs_heuristic(n_obs: int, epochs_cap: int = 400, decay_at_n_obs: int = 20_000) -> int:
    """``get_max_epochs_heuristic``: min(round(20000 / n_obs * 400), 400), at least 1."""
    return max(min(round((decay_at_n_obs / n_obs) * epochs_cap), epochs_cap), 1)


def validate_data_split(
    n_samples: int,
    train_size: float,
    validation_size: float | None,
    batch_size: int,
    train_size_is_none: bool,
) -> tuple[int, int]:
    """scvi-tools' ``validate_data_split`` (``drop_last=False``): (n_train, n_val).

    With ``train_size=None`` a last training minibatch of one or two cells is moved into
    validation (when there is a validation set), as scvi-tools does.
    """
    if train_size > 1.0 or train_size <= 0.0:
        raise ConfigError(f"Expected 0 < train_size <= 1, got {train_size!r} instead.")
    n_train = math.ceil(train_size * n_samples)
    if validation_size is None:
        n_val = n_samples - n_train
    elif validation_size >= 1.0 or validation_size < 0.0:
        raise ConfigError(f"Expected 0 <= validation_size < 1, got {validation_size!r} instead.")
    elif train_size + validation_size > 1:
        msg = f"Expected train_size + validation_size <= 1, got {train_size + validation_size}."
        raise ConfigError(msg)
    else:
        n_val = math.floor(n_samples * validation_size)
    if n_train == 0:
        msg = (
            f"With {n_samples} cells, train_size={train_size} and validation_size="
            f"{validation_size} the training set is empty; adjust them."
        )
        raise ConfigError(msg)
    left = n_train % batch_size
    if 0 < left < 3 and train_size_is_none and n_val > 0:
        n_train -= left
        n_val += left
        warnings.warn(
            f"{left} cells moved from the training set to the validation set (scvi-tools' rule "
            "for a last minibatch of one or two cells); pass train_size to avoid it.",
            stacklevel=3,
        )
    return n_train, n_val


def split_indices(
    n_obs: int, n_train: int, n_val: int, *, shuffle_set_split: bool, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``DataSplitter.setup``: (train, validation, test) indices; with ``shuffle_set_split`` the
    permutation is ``np.random.RandomState(seed)``'s, as scvi-tools draws it from
    ``scvi.settings.seed``."""
    indices = np.arange(n_obs)
    if shuffle_set_split:
        indices = np.random.RandomState(seed=seed).permutation(indices)
    return indices[n_val : n_val + n_train], indices[:n_val], indices[n_val + n_train :]


def _column(adata: Any, key: str) -> np.ndarray | None:
    if isinstance(adata, StoreSource):
        return adata.obs_column(key)
    return adata.obs[key].to_numpy() if key in adata.obs else None


def _categories(adata: Any, key: str, what: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """(codes, categories) of an obs column, categories ordered as scvi-tools orders them."""
    import pandas as pd

    values = None
    if not isinstance(adata, StoreSource) and key in adata.obs:
        values = adata.obs[key]
    else:
        raw = _column(adata, key)
        values = None if raw is None else pd.Series(raw)
    if values is None:
        msg = f"The {what} column {key!r} is not in adata.obs."
        raise IncompatibleDataError(msg)
    if values.isna().any():
        msg = f"The {what} column {key!r} has missing values; fill or drop them before training."
        raise IncompatibleDataError(msg)
    if isinstance(values.dtype, pd.CategoricalDtype):
        categories = tuple(str(c) for c in values.cat.categories)  # unused ones kept, as scvi
    else:
        categories = tuple(str(c) for c in pd.Categorical(values).categories)
    codes = anndata_io.map_categories(values.astype(str), categories, what=what, key=key)
    return codes, categories


def registry(
    adata: Any, *, layer: str | None, batch_key: str | None, labels_key: str | None
) -> DataRegistry:
    """The data registry of a model set up on ``adata`` (scvi-tools' ``setup_anndata``)."""
    batch = _categories(adata, batch_key, "batch")[1] if batch_key else ()
    labels = _categories(adata, labels_key, "labels")[1] if labels_key else ()
    return DataRegistry(
        var_names=tuple(str(v) for v in np.asarray(adata.var_names)),
        batch_key=batch_key,
        batch_categories=batch,
        labels_key=labels_key,
        label_categories=labels,
        layer=None if layer in (None, "X") else layer,
    )


class Scan(NamedTuple):
    """What one checking pass over every cell gives."""

    log_library: np.ndarray  # (n_obs,) log total counts; 0 for an empty cell (scvi's filled 0)
    empty: int  # cells without counts
    dense: np.ndarray | None  # (n_obs, n_vars) float32, when kept in memory


def scan(data: CellData, *, keep: bool) -> Scan:
    """Read every cell once in row blocks: validate the counts (NaN, negative, fractional: one
    error naming the first bad cell), total them, and keep the dense matrix when ``keep``."""
    n = data.n_obs
    totals = np.zeros(n, np.float64)
    dense = None
    for start in range(0, n, READ_ROWS):
        stop = min(n, start + READ_ROWS)
        block = data.csr(start, stop)
        totals[start:stop] = np.asarray(block.sum(axis=1)).ravel()
        if keep:
            if dense is None:
                dense = np.empty((n, block.shape[1]), np.float32)
            dense[start:stop] = block.toarray()
    empty = int((totals == 0).sum())
    with np.errstate(divide="ignore"):
        log_library = np.where(totals > 0, np.log(np.maximum(totals, 1e-300)), 0.0)
    return Scan(log_library=log_library, empty=empty, dense=dense)


def library_size_prior(
    log_library: np.ndarray, batch: np.ndarray, n_batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """``_init_library_size``: per batch, the mean and (population) variance of the log library
    of its cells (empty cells count as 0), float32 values, shape (1, n_batch); a batch without
    cells gets mean 0 and variance 1."""
    means = np.zeros(n_batch)
    variances = np.ones(n_batch)
    for b in np.unique(batch):
        values = log_library[batch == b].astype(np.float32)
        means[b] = np.mean(values).astype(np.float32)
        variances[b] = np.var(values).astype(np.float32)
    return means.reshape(1, -1), variances.reshape(1, -1)


def check_batches(batch: np.ndarray, categories: tuple[str, ...], key: str | None) -> None:
    """A batch with a single cell gives a library prior of variance 0: refuse it up front."""
    if key is None:
        return
    counts = np.bincount(batch, minlength=len(categories))
    lonely = [categories[i] for i in np.flatnonzero(counts == 1)]
    if lonely:
        msg = (
            f"The batch column {key!r} has categories with a single cell: {preview(lonely)}; "
            "the library-size prior of such a batch has variance 0. Drop those cells or merge "
            "their batch with another."
        )
        raise IncompatibleDataError(msg)


def check_streamable(data: CellData) -> None:
    """Refuse to stream a CSC matrix from a file: every row range of it reads every column (the
    whole matrix at each minibatch)."""
    if getattr(data.counts, "format", None) == "csc" and not _in_memory(data.counts):
        msg = (
            f"The counts ({data.where}) are a CSC matrix on disk, which cannot be read by rows: "
            "write them as CSR once (adata.X = adata.X.tocsr()) or train on an AnnData in memory."
        )
        raise IncompatibleDataError(msg)


def _in_memory(matrix: Any) -> bool:
    import scipy.sparse as sp

    return isinstance(matrix, np.ndarray) or sp.issparse(matrix)


def take(data: CellData, rows: np.ndarray) -> np.ndarray:
    """Dense float32 counts (len(rows), n_vars) of the sorted cell indices ``rows``, read from
    the matrix without loading the rest of it, in model gene order and validated.

    An h5ad matrix is read by contiguous runs of ``rows`` (cheap h5py reads; CSR:
    :meth:`H5CSR.take_rows`); any other (in memory, or a zarr store's sparse or dense array)
    with one indexed read, which for zarr decompresses each chunk it touches once (one slice
    per run would decompress a chunk per run: ~30x slower per minibatch of 128, measured).
    """
    import scipy.sparse as sp

    matrix = data.counts
    index = rows + data.offset
    if isinstance(matrix, H5CSR):
        block = matrix.take_rows(index)
    elif type(matrix).__module__.startswith("h5py"):  # a dense h5ad matrix
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        runs = np.split(index, breaks)
        block = np.concatenate([matrix[int(run[0]) : int(run[-1]) + 1] for run in runs])
    else:
        block = matrix[index]
    if sp.issparse(block):
        if data.gene_index is not None:
            block = block[:, data.gene_index]
        block = block.tocsr()
        anndata_io.check_counts(
            block, allow_non_integer=data.allow_non_integer, first_row=0, where=data.where
        )
        return np.asarray(block.toarray(), dtype=np.float32)
    dense = np.asarray(block)
    if data.gene_index is not None:
        dense = dense[:, data.gene_index]
    anndata_io.check_counts(
        dense, allow_non_integer=data.allow_non_integer, first_row=0, where=data.where
    )
    return dense.astype(np.float32, copy=False)
