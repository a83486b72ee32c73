"""The reading path: non-zeros and count checks straight from the stored values (CSR, CSC,
dense; in memory and streamed), equal to a scan of the dense matrix."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import random_adata, random_model

from linear_decoder_jax import anndata_io, sources
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
@pytest.mark.filterwarnings("ignore:Dropping", "ignore:Writing zarr v2")
def test_nonzeros_equal_the_dense_scan(layout, reorder, tmp_path):
    model, adata = _adata(layout, reorder=reorder)
    plain = _adata(layout, reorder=False)[1].X  # model gene order
    expected = np.asarray(plain.toarray() if sp.issparse(plain) else plain, np.float32)
    assert expected[:3].sum() == expected[10].sum() == 0
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    adata.write_zarr(tmp_path / "cells.zarr")
    with (
        sources.StoreSource(path) as backed,
        sources.StoreSource(path, fast=False) as element,
        sources.StoreSource(tmp_path / "cells.zarr") as zarr_store,
    ):
        assert type(backed) is sources.H5Source and type(element) is sources.StoreSource
        for source in (adata, backed, element, zarr_store):
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


# Streamed h5ad: h5py alone until the obs table is needed -----------------------------------------
def test_streamed_h5ad_reads_counts_and_covariates_without_anndata(tmp_path):
    """Opening a file, aligning it with the model and reading every minibatch imports neither
    anndata nor pandas (their ~0.8 s import then overlaps the sweep), and gives the same
    minibatches as the in-memory AnnData."""
    import subprocess
    import sys

    model = random_model(0, dispersion="gene-label")  # batch and label columns both read
    adata = random_adata(model, n_obs=45)
    adata.X = sp.csr_matrix(adata.X)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    model.save(tmp_path / "model")
    code = f"""
import sys
import numpy as np
import linear_decoder_jax as ldj
from linear_decoder_jax import anndata_io, sources
model = ldj.load({str(tmp_path / "model")!r})
with sources.StoreSource({str(path)!r}) as backed:
    data = model.prepare(backed)
    mbs = list(anndata_io.minibatches(data, 16))
assert "anndata" not in sys.modules and "pandas" not in sys.modules, "imported"
np.savez({str(tmp_path / "mb.npz")!r}, batch=data.batch, label=data.label,
         names=data.obs_names.astype(str), index=np.stack([m.nz_index for m in mbs]),
         count=np.stack([m.nz_count for m in mbs]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = np.load(tmp_path / "mb.npz")
    data = model.prepare(adata)
    mbs = list(anndata_io.minibatches(data, 16))
    np.testing.assert_array_equal(got["batch"], data.batch)
    np.testing.assert_array_equal(got["label"], data.label)
    np.testing.assert_array_equal(got["names"], data.obs_names.astype(str))
    np.testing.assert_array_equal(got["index"], np.stack([m.nz_index for m in mbs]))
    np.testing.assert_array_equal(got["count"], np.stack([m.nz_count for m in mbs]))


def test_obs_columns_read_with_h5py_equal_anndata(tmp_path):
    import anndata
    import pandas as pd

    n = 12
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n)])
    obs["cat"] = pd.Categorical(["a", "b", None, "c"] * 3)  # a missing category too
    obs["strings"] = pd.array([f"s{i % 4}" for i in range(n)], dtype=object)
    obs["ints"] = np.arange(n) % 3
    obs["floats"] = np.linspace(0, 1, n)
    obs["flags"] = np.arange(n) % 2 == 0
    obs["nullable"] = pd.array([1, None, 3] * 4, dtype="Int64")  # anndata's reader
    obs["int_cats"] = pd.Categorical(np.arange(n) % 2)  # so are numeric categories
    adata = anndata.AnnData(X=np.zeros((n, 3), np.float32), obs=obs)
    path = tmp_path / "obs.h5ad"
    adata.write_h5ad(path)
    with sources.StoreSource(path) as backed:
        np.testing.assert_array_equal(backed.obs_names, adata.obs_names.to_numpy())
        # plain encodings with h5py; the others ("nullable", "int_cats") through anndata
        for column in obs.columns:
            assert backed.obs_loaded == (column == "int_cats")
            got = backed.obs_column(column)
            want = adata.obs[column].to_numpy()
            np.testing.assert_array_equal(np.asarray(got).astype(str), want.astype(str), column)
        assert backed.obs_loaded and backed.obs_column("missing") is None
    # anndata's element API reads one column at a time, never the whole table
    with sources.StoreSource(path, fast=False) as element:
        np.testing.assert_array_equal(element.obs_names, adata.obs_names.to_numpy())
        for column in obs.columns:
            got = element.obs_column(column)
            want = adata.obs[column].to_numpy()
            np.testing.assert_array_equal(np.asarray(got).astype(str), want.astype(str), column)
        assert not element.obs_loaded and element.obs_column("missing") is None


@pytest.mark.parametrize("rows", [(0, 0), (0, 29), (5, 17), (26, 29), (27, 40), (10, 11)])
def test_h5csr_row_ranges_equal_anndata(tmp_path, rows):
    import anndata
    import h5py

    rng = np.random.default_rng(3)
    dense = sp.random(29, 11, density=0.3, random_state=rng, dtype=np.float32).toarray()
    dense[[3, 26]] = 0  # empty rows
    x = sp.csr_matrix(dense)
    path = tmp_path / "x.h5ad"
    anndata.AnnData(X=x).write_h5ad(path)
    lo, hi = rows
    with h5py.File(path, "r") as f:
        ours = sources.H5CSR(f["X"])[lo:hi]
        theirs = anndata.io.sparse_dataset(f["X"])[lo:hi]
        assert ours.shape == theirs.shape and sources.H5CSR(f["X"]).shape == (29, 11)
        np.testing.assert_array_equal(ours.toarray(), theirs.toarray())


def test_streamed_obs_error_stops_the_run_early(tmp_path, monkeypatch):
    """The obs table of a streamed file is read beside the sweep; its error stops the sweep at
    the next minibatch (not at the end) and nothing is written."""
    import time

    import linear_decoder_jax as ldj
    from linear_decoder_jax import ablation

    model = random_model(0)
    adata = random_adata(model, n_obs=400)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)

    def unwritable(obs, **kw):
        raise IncompatibleDataError("obs column 'x' cannot be written")

    scored = []
    score = ablation.SweepScorer.score

    def slow(self, *args):
        scored.append(1)
        time.sleep(0.05)  # 100 minibatches: 5 s, far longer than reading obs
        return score(self, *args)

    monkeypatch.setattr(anndata_io, "check_obs_writable", unwritable)
    monkeypatch.setattr(ablation.SweepScorer, "score", slow)
    out = tmp_path / "out.h5ad"
    with pytest.raises(IncompatibleDataError, match="cannot be written"):
        ldj.ablate(model, path, output=out, batch_size=4)
    assert len(scored) < 50
    assert not out.exists() and not list(tmp_path.glob(".out.h5ad*"))
