"""Every data error of ``anndata_io``: in memory, streamed from disk, and through ``ldj ablate``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anndata
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from helpers import random_adata, random_model
from reliability_tools import (
    BAD_DATA,
    DEMO_MODEL,
    GOLDEN,
    _rename_batch,
    _set,
    entries,
)

import linear_decoder_jax as ldj
from linear_decoder_jax.errors import (
    IncompatibleDataError,
)

# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["memory", "disk"])
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_a_clear_error(
    demo_model, demo_adata, tmp_path: Path, case: str, source: str
) -> None:
    edit, fragments = BAD_DATA[case]
    adata = edit(demo_adata.copy())
    if source == "disk":
        adata.write_h5ad(tmp_path / "cells.h5ad")
        adata = str(tmp_path / "cells.h5ad")
    out = tmp_path / "result.h5ad"
    with pytest.raises(IncompatibleDataError) as info:
        ldj.ablate(demo_model, adata, batch_size=16, output=out)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert entries(tmp_path) == (["cells.h5ad"] if source == "disk" else [])


@pytest.mark.parametrize("method", ["latent", "expression", "reconstruction"])
def test_bad_data_in_query_methods(demo_model, demo_adata, method: str) -> None:
    adata = _set(3, 7, np.nan)(demo_adata.copy())
    call_ = {
        "latent": demo_model.get_latent_representation,
        "expression": demo_model.get_normalized_expression,
        "reconstruction": demo_model.get_reconstruction_error,
    }[method]
    with pytest.raises(IncompatibleDataError, match="NaN or infinite values"):
        call_(adata)
    with pytest.raises(IncompatibleDataError, match="never saw: 'batch-9'"):
        call_(_rename_batch(demo_adata.copy()))


def test_allow_non_integer_switch(demo_model, demo_adata) -> None:
    adata = demo_adata.copy()
    adata.X = adata.X * 0.37  # normalised-looking values
    with pytest.raises(IncompatibleDataError, match="non-integer"):
        ldj.ablate(demo_model, adata, batch_size=16)
    result = ldj.ablate(demo_model, adata, allow_non_integer=True, batch_size=16)
    assert np.isfinite(result.delta_nll).all() and np.isfinite(result.nll).all()
    adata.X[0, 0] = np.nan  # the switch allows fractions only
    with pytest.raises(IncompatibleDataError, match="NaN"):
        ldj.ablate(demo_model, adata, allow_non_integer=True, batch_size=16)


def test_labels_unknown_or_missing() -> None:
    model = random_model(dispersion="gene-label")
    adata = random_adata(model)
    adata.obs["label"] = adata.obs["label"].cat.rename_categories({"l1": "l7"})
    with pytest.raises(IncompatibleDataError, match=r"labels column 'label' holds .* 'l7'"):
        ldj.ablate(model, adata)
    del adata.obs["label"]
    with pytest.raises(IncompatibleDataError, match="labels column 'label' in adata.obs"):
        ldj.ablate(model, adata)


def test_layer_the_model_reads_is_missing(demo_model, demo_adata) -> None:
    spec = dataclasses.replace(
        demo_model.spec, data=dataclasses.replace(demo_model.spec.data, layer="counts")
    )
    model = ldj.LinearSCVI(demo_model.host_params, spec)
    adata = demo_adata.copy()
    adata.layers["raw"] = adata.X.copy()
    with pytest.raises(IncompatibleDataError, match=r"lacks layer 'counts' \(layers: 'raw'\)"):
        ldj.ablate(model, adata, batch_size=16, layer="counts")
    with pytest.warns(UserWarning, match="layer 'counts', which this AnnData lacks; reading .* X"):
        assert np.isfinite(ldj.ablate(model, adata, batch_size=16).delta_nll).all()
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X * 0.5  # the model must read the layer, not X
    assert np.isfinite(ldj.ablate(model, adata, batch_size=16).delta_nll).all()


def test_files_that_are_not_h5ad(demo_model, tmp_path: Path) -> None:
    text = tmp_path / "cells.h5ad"
    text.write_text("cell,gene\n")
    other_hdf5 = tmp_path / "other.h5"
    with h5py.File(other_hdf5, "w") as f:
        f["matrix"] = np.zeros((3, 3))
    for path in (text, other_hdf5, DEMO_MODEL, GOLDEN.parent / "counts.npz", tmp_path):
        with pytest.raises(IncompatibleDataError, match="is not a readable h5ad file"):
            ldj.ablate(demo_model, str(path))
    for path in (tmp_path / "missing.h5ad", tmp_path / "missing.zarr"):
        with pytest.raises(IncompatibleDataError, match="no such file"):
            ldj.ablate(demo_model, str(path))


def test_count_matrix_of_the_wrong_shape(demo_model, demo_adata, tmp_path: Path) -> None:
    path = tmp_path / "cells.h5ad"
    demo_adata.write_h5ad(path)
    with h5py.File(path, "a") as f:  # X one gene short of var: a damaged file
        x = f["X"][:, :-1]
        del f["X"]
        f["X"] = x
        f["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    with pytest.raises(IncompatibleDataError, match=r"shape \(80, 229\) but .* 80 cells and 230"):
        ldj.ablate(demo_model, str(path))


def test_damaged_counts_are_a_clear_error(demo_model, demo_adata, tmp_path: Path) -> None:
    path = tmp_path / "cells.h5ad"
    demo_adata.write_h5ad(path, compression="gzip")
    with h5py.File(path, "r") as f:
        offset = f["X"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 8 : offset + 40] = bytes(32)  # inside the first gzip chunk of X
    path.write_bytes(bytes(data))
    out = tmp_path / "result.h5ad"
    with pytest.raises(IncompatibleDataError, match="Cannot read the counts of cells 0 to"):
        ldj.ablate(demo_model, str(path), output=out, batch_size=16)
    assert not out.exists()


@pytest.mark.parametrize("layout", ["dense", "csr", "disk"])
def test_cells_with_zero_counts_give_finite_results(
    demo_model, demo_adata, tmp_path: Path, layout: str
) -> None:
    adata = demo_adata.copy()
    adata.X[[0, 17, 79]] = 0
    if layout == "csr":
        adata.X = sp.csr_matrix(adata.X)
    data = adata
    if layout == "disk":
        adata.write_h5ad(tmp_path / "cells.h5ad")
        data = str(tmp_path / "cells.h5ad")
    for library, n_samples in (("model", 0), ("observed", 2)):
        res = ldj.ablate(
            demo_model, data, library=library, n_samples=n_samples, baseline="mean", batch_size=16
        )
        for key in ("delta_nll", "delta_l1", "latent", "nll", "mean_lfc"):
            assert np.isfinite(np.asarray(getattr(res, key))).all(), (library, key)
        assert n_samples == 0 or np.isfinite(res.delta_nll_se).all()
    assert np.isfinite(demo_model.get_latent_representation(adata)).all()
    assert np.isfinite(demo_model.get_reconstruction_error(adata)).all()
    expr = demo_model.get_normalized_expression(adata, return_numpy=True)
    assert np.isfinite(expr).all()
    mu = demo_model.get_normalized_expression(adata, library_size="latent", return_numpy=True)
    assert np.isfinite(mu).all()


def test_reordered_and_extra_genes_are_handled(demo_model, demo_adata) -> None:
    reference = ldj.ablate(demo_model, demo_adata, batch_size=16)
    order = np.random.default_rng(0).permutation(demo_adata.n_vars)
    shuffled = demo_adata[:, order].copy()
    extra = anndata.AnnData(
        np.hstack([demo_adata.X, np.ones((demo_adata.n_obs, 2), np.float32)]),
        obs=demo_adata.obs.copy(),
    )
    extra.var_names = [*demo_adata.var_names, "EXTRA1", "EXTRA2"]
    with pytest.warns(UserWarning, match="Dropping 2 genes"):
        widened = ldj.ablate(demo_model, extra, batch_size=16)
    for result in (ldj.ablate(demo_model, shuffled, batch_size=16), widened):
        np.testing.assert_allclose(result.delta_nll, reference.delta_nll, rtol=1e-5, atol=1e-4)
