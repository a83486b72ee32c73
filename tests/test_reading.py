"""The reading path: non-zeros and count checks straight from the stored values (CSR, CSC,
dense; in memory and streamed), equal to a scan of the dense matrix."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import random_adata, random_model

from linear_decoder_jax import anndata_io
from linear_decoder_jax.errors import IncompatibleDataError

LAYOUTS = ["csr", "csc", "dense", "csr_int", "csr_stored_zeros"]


def _dense_scan(x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Reference: each row's non-zero genes (ascending) and counts, from the dense matrix."""
    return [(np.flatnonzero(row), row[row != 0]) for row in x]


def _layout(x: np.ndarray, layout: str):
    if layout == "csr":
        return sp.csr_matrix(x)
    if layout == "csc":
        return sp.csc_matrix(x)
    if layout == "csr_int":
        return sp.csr_matrix(x.astype(np.int64))
    if layout == "csr_stored_zeros":
        m = sp.csr_matrix(x)
        m.data[::3] = 0  # explicit zeros must not count as non-zeros
        return m
    return x


def _adata(layout: str, *, reorder: bool):
    model = random_model(n_input=40)
    adata = random_adata(model, n_obs=70, zero_cells=3)
    adata.X[10] = 0  # a cell with no counts in the middle too
    adata.X[11, :] = 0
    adata.X[11, 39] = 7  # only the last gene
    adata.X = _layout(np.asarray(adata.X), layout)
    if reorder:  # other gene order plus an extra gene: taken at gene_index
        adata = adata[:, ::-1].copy()
        extra = adata[:, :1].copy()
        extra.var_names = ["extra"]
        import anndata

        adata = anndata.concat([adata, extra], axis=1, merge="first")
    return model, adata


@pytest.mark.parametrize("reorder", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.filterwarnings("ignore:Dropping")
def test_nonzeros_equal_the_dense_scan(layout, reorder, tmp_path):
    model, adata = _adata(layout, reorder=reorder)
    plain = _adata(layout, reorder=False)[1].X  # model gene order
    expected = np.asarray(plain.toarray() if sp.issparse(plain) else plain, np.float32)
    assert expected[:3].sum() == expected[10].sum() == 0
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    with anndata_io.BackedAnnData(path) as backed:
        for source in (adata, backed):
            data = model.prepare(source)
            np.testing.assert_array_equal(data.rows(0, 70), expected)
            seen = 0
            for mb in anndata_io.minibatches(data, 16):
                assert mb.nz_index.shape == mb.nz_count.shape and mb.nz_index.shape[0] == 16
                assert mb.nz_index.dtype == np.int32 and mb.nz_count.dtype == np.float32
                reference = _dense_scan(expected[mb.start : mb.start + mb.n_valid])
                for i, (genes, counts) in enumerate(reference):
                    k = len(genes)
                    np.testing.assert_array_equal(mb.nz_index[i, :k], genes)
                    np.testing.assert_array_equal(mb.nz_count[i, :k], counts)
                    assert not mb.nz_count[i, k:].any() and not mb.nz_index[i, k:].any()
                assert not mb.nz_count[mb.n_valid :].any()  # padding rows
                np.testing.assert_array_equal(
                    mb.x[: mb.n_valid], expected[mb.start : mb.start + mb.n_valid]
                )
                seen += mb.n_valid
            assert seen == 70


def test_read_blocks_are_split_into_minibatches(monkeypatch):
    """Reads are blocks of several minibatches (fewer h5py calls), same minibatches as before."""
    model, adata = _adata("csr", reorder=False)
    data = model.prepare(adata)
    monkeypatch.setattr(anndata_io, "_READ_BYTES", 4 * 40 * 32)  # 32 rows a read
    reads = []
    csr = anndata_io.CellData.csr

    def counting(self, start, stop):
        reads.append((start, stop))
        return csr(self, start, stop)

    monkeypatch.setattr(anndata_io.CellData, "csr", counting)
    starts = [mb.start for mb in anndata_io.minibatches(data, 8)]
    assert starts == list(range(0, 70, 8))
    assert reads == [(0, 32), (32, 64), (64, 70)]


@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, "NaN or infinite"),
        (np.inf, "NaN or infinite"),
        (-2.0, "negative"),
        (2.5, "non-integer"),
    ],
)
def test_bad_counts_name_the_first_bad_cell(layout, value, message):
    model, adata = _adata("dense", reorder=False)
    clean = model.prepare(adata)
    x = np.asarray(adata.X).copy()
    x[45, 7] = value
    x[60, 2] = value
    adata.X = _layout(x, layout)
    # prepare samples rows up front (NaN is left to the reader); the reader checks every row
    if message != "NaN or infinite":
        with pytest.raises(IncompatibleDataError, match=rf"{message} .*first in cell 45\)"):
            model.prepare(adata)
    data = dataclasses.replace(clean, counts=adata.X)
    with pytest.raises(IncompatibleDataError, match=rf"{message} .*first in cell 45\)"):
        list(anndata_io.minibatches(data, 16))
    # a shard starting past the first bad cell names the next one, in input numbering
    with pytest.raises(IncompatibleDataError, match=r"first in cell 60\)"):
        list(anndata_io.minibatches(data.restrict(50, 70), 16))
    if message == "non-integer":  # allowed on request, and then kept as they are
        data = model.prepare(adata, allow_non_integer=True)
        assert data.rows(45, 46)[0, 7] == 2.5


def test_check_counts_dense_and_sparse_agree():
    x = np.zeros((5, 4), np.float32)
    x[3, 1] = -1
    for form in (x, sp.csr_matrix(x)):
        with pytest.raises(IncompatibleDataError, match=r"negative .*first in cell 13\)"):
            anndata_io.check_counts(form, allow_non_integer=False, first_row=10)
    anndata_io.check_counts(np.abs(x), allow_non_integer=False)
    with pytest.raises(IncompatibleDataError, match=r"first in cell 3\)"):
        anndata_io.check_counts(sp.csr_matrix(x.astype(np.int32)), allow_non_integer=False)
