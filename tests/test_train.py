"""``ldj.train``, ``ldj train`` and ``export_scvi``: the parts of scvi-tools' training set-up
(split, max_epochs, library prior, categories) against scvi-tools itself, the history and split
kept with the saved model, streamed == in memory, bad inputs before training, and an exported
model loaded by scvi-tools giving our outputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import make_adata  # noqa: E402  (tests/ is on the path)

import linear_decoder_jax as ldj
from linear_decoder_jax import cli
from linear_decoder_jax.errors import ConfigError, IncompatibleDataError
from linear_decoder_jax.training import data as tdata
from linear_decoder_jax.training.loop import TRAIN_KEYS, VALIDATION_KEYS

SMALL = dict(n_latent=3, n_hidden=16, max_epochs=3, batch_size=32, progress_bar=False)


@pytest.fixture(scope="module")
def adata():
    return make_adata(1, n_obs=150, n_vars=30)


@pytest.fixture(scope="module")
def trained(adata, tmp_path_factory):
    """One small model with validation every epoch (early stopping on), saved."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ldj.train(adata, batch_key="batch", early_stopping=True, seed=3, **SMALL)
    path = tmp_path_factory.mktemp("train") / "model"
    model.save(path)
    return model, path


def _scvi_model(adata, **setup):
    scvi = pytest.importorskip("scvi")
    a = adata.copy()
    scvi.model.LinearSCVI.setup_anndata(a, **setup)
    return scvi, scvi.model.LinearSCVI(a), a


@pytest.mark.parametrize("n_obs", [100, 203, 1000, 20_000, 45_000, 10**7])
def test_max_epochs_heuristic_equals_scvi_tools(n_obs):
    pytest.importorskip("scvi")
    from scvi.model._utils import get_max_epochs_heuristic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tdata.max_epochs_heuristic(n_obs) == get_max_epochs_heuristic(n_obs)


@pytest.mark.parametrize(
    ("n_obs", "train_size", "validation_size", "batch_size"),
    [(150, None, None, 32), (131, None, None, 128), (258, None, None, 128),
     (300, 0.8, 0.1, 64), (100, 1.0, None, 16), (137, 0.7, 0.2, 16)],
)  # fmt: skip
def test_split_equals_scvi_tools_data_splitter(
    adata, n_obs, train_size, validation_size, batch_size
):
    from scvi import settings
    from scvi.dataloaders import DataSplitter

    a = make_adata(2, n_obs=n_obs, n_vars=10)
    _, model, a = _scvi_model(a)
    settings.seed = 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = DataSplitter(model.adata_manager, train_size=train_size,
                          validation_size=validation_size, batch_size=batch_size)  # fmt: skip
        ds.setup()
        n_train, n_val = tdata.validate_data_split(
            n_obs, train_size or 0.9, validation_size, batch_size, not train_size
        )
    train, val, test = tdata.split_indices(n_obs, n_train, n_val, shuffle_set_split=True, seed=7)
    np.testing.assert_array_equal(train, ds.train_idx)
    np.testing.assert_array_equal(val, ds.val_idx)
    np.testing.assert_array_equal(test, ds.test_idx)


def test_library_prior_and_categories_equal_scvi_tools(adata):
    from scvi.model._utils import _init_library_size

    a = adata.copy()
    a.obs["batch"] = a.obs["batch"].astype(str)  # not categorical: sorted unique values
    a.X[5] = 0  # an empty cell counts as log library 0
    _, model, a = _scvi_model(a, batch_key="batch")
    registry = tdata.registry(a, layer=None, batch_key="batch", labels_key=None)
    mapping = model.adata_manager.get_state_registry("batch").categorical_mapping
    assert registry.batch_categories == tuple(mapping)
    spec = ldj.ModelSpec(ldj.LDVAEConfig(n_input=30, n_latent=3, n_batch=3), registry)
    from linear_decoder_jax import anndata_io

    cells = anndata_io.prepare(a, spec, layer=None)
    scan = tdata.scan(cells, keep=False)
    assert scan.empty == 1
    means, variances = tdata.library_size_prior(scan.log_library, cells.batch, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _init_library_size(model.adata_manager, 3)
    np.testing.assert_allclose(means, expected[0], rtol=1e-6)
    np.testing.assert_allclose(variances, expected[1], rtol=1e-5)


def test_history_split_and_saved_record(trained, adata):
    model, path = trained
    history = model.history_
    assert set(history) == set(TRAIN_KEYS) | set(VALIDATION_KEYS)  # scvi-tools' keys
    for key, frame in history.items():
        assert frame.index.name == "epoch" and list(frame.columns) == [key]
        assert len(frame) == 3 and np.isfinite(frame.to_numpy()).all()
    n_train, n_val = len(model.train_indices), len(model.validation_indices)
    assert (n_train, n_val) == (135, 15)
    allidx = np.concatenate([model.train_indices, model.validation_indices, model.test_indices])
    np.testing.assert_array_equal(np.sort(allidx), np.arange(adata.n_obs))
    loaded = ldj.load(path)
    for key, frame in history.items():
        np.testing.assert_array_equal(loaded.history_[key].to_numpy(), frame.to_numpy())
    np.testing.assert_array_equal(loaded.train_indices, model.train_indices)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(adata), model.get_latent_representation(adata)
    )


def test_streamed_equals_in_memory(adata, tmp_path):
    file = tmp_path / "data.h5ad"
    a = adata.copy()
    import scipy.sparse as sp

    a.X = sp.csr_matrix(a.X)
    a.write_h5ad(file)
    kwargs = dict(SMALL, max_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memory = ldj.train(adata, batch_key="batch", seed=1, **kwargs)
        streamed = ldj.train(file, batch_key="batch", seed=1, **kwargs)
    for key in memory.history_:
        np.testing.assert_allclose(
            streamed.history_[key].to_numpy(), memory.history_[key].to_numpy(), rtol=1e-4
        )
    np.testing.assert_allclose(
        streamed.get_latent_representation(adata),
        memory.get_latent_representation(adata),
        rtol=1e-3,
        atol=1e-4,
    )


@pytest.mark.parametrize(("sparse", "zarr_format"), [(True, 3), (False, 2)],
                         ids=["csr-zarr3", "dense-zarr2"])  # fmt: skip
def test_zarr_streamed_equals_in_memory_reading_rows_only(
    adata, tmp_path, monkeypatch, sparse, zarr_format
):
    """A .zarr store trains the in-memory model, and its matrix is never read whole: every
    read is of at most ``limit`` rows (the data has 150), and all reads together are the count
    check's samples, one checking pass and one pass per epoch over the training cells."""
    import scipy.sparse as sp

    from linear_decoder_jax import anndata_io, sources

    a = adata.copy()
    if sparse:
        a.X = sp.csr_matrix(a.X)
    store = tmp_path / "data.zarr"
    import anndata

    with anndata.settings.override(zarr_write_format=zarr_format):
        a.write_zarr(store)
    assert (store / ("zarr.json" if zarr_format == 3 else ".zgroup")).exists()
    limit, reads = 64, []

    class FewRowsOnly:
        def __init__(self, matrix):
            self.matrix, self.shape = matrix, matrix.shape

        def __getitem__(self, rows):
            n = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
            if n > limit or not isinstance(rows, slice | np.ndarray):
                raise AssertionError(f"read {rows} of the matrix")
            reads.append(n)
            return self.matrix[rows]

    read = sources.StoreSource._matrix
    monkeypatch.setattr(
        sources.StoreSource, "_matrix", lambda self, node: FewRowsOnly(read(self, node))
    )
    monkeypatch.setattr(tdata, "READ_ROWS", limit)
    kwargs = dict(SMALL, max_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memory = ldj.train(adata, batch_key="batch", seed=1, **kwargs)
        streamed = ldj.train(store, batch_key="batch", seed=1, **kwargs)
    n_train = len(memory.train_indices)
    assert 0 < sum(reads) <= 3 * anndata_io._SAMPLE_ROWS + adata.n_obs + 2 * n_train
    for key in memory.history_:
        np.testing.assert_allclose(
            streamed.history_[key].to_numpy(), memory.history_[key].to_numpy(), rtol=1e-4
        )
    np.testing.assert_allclose(
        streamed.get_latent_representation(adata),
        memory.get_latent_representation(adata),
        rtol=1e-3,
        atol=1e-4,
    )


def test_h5ad_rows_taken_by_runs_equal_the_matrix(tmp_path):
    """``H5CSR.take_rows`` (a training minibatch from an h5ad file) against scipy, for rows
    with runs, single rows, empty rows and the last row."""
    import h5py
    import scipy.sparse as sp

    from linear_decoder_jax.sources import H5CSR

    rng = np.random.default_rng(0)
    matrix = sp.random(200, 30, density=0.1, format="csr", random_state=1, dtype=np.float32)
    matrix[10:20] = 0  # empty rows
    matrix.eliminate_zeros()
    a = make_adata(0, n_obs=200, n_vars=30)
    a.X = matrix
    a.write_h5ad(tmp_path / "m.h5ad")
    with h5py.File(tmp_path / "m.h5ad") as f:
        csr = H5CSR(f["X"])
        for rows in ([0, 1, 2, 15, 16, 199], np.sort(rng.choice(200, 64, replace=False)), [12]):
            rows = np.asarray(rows)
            got = csr.take_rows(rows)
            np.testing.assert_array_equal(got.toarray(), matrix[rows].toarray())


def test_a_csc_matrix_on_disk_is_not_streamed(adata, tmp_path):
    import scipy.sparse as sp

    a = adata.copy()
    a.X = sp.csc_matrix(a.X)
    a.write_zarr(tmp_path / "csc.zarr")
    with pytest.raises(IncompatibleDataError, match="CSC matrix on disk"):
        ldj.train(tmp_path / "csc.zarr", **SMALL)


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_padded_minibatch_equals_the_minibatch_alone(likelihood):
    """An epoch's last, smaller minibatch runs padded to batch_size with masked cells (one
    compiled step): its loss, per-cell parts, gradients and BatchNorm statistics are those of the
    minibatch alone, whatever the padding cells hold."""
    import jax
    import jax.numpy as jnp

    from linear_decoder_jax.config import LDVAEConfig
    from linear_decoder_jax.params import to_flat
    from linear_decoder_jax.training import loop, objective

    config = LDVAEConfig(n_input=30, n_latent=3, n_hidden=16, n_batch=2, gene_likelihood=likelihood)
    rng = np.random.default_rng(0)
    params = loop.init_params(config, jax.random.key(0), np.full((1, 2), 4.0), np.ones((1, 2)))
    params = jax.tree.map(jnp.asarray, params)
    n, pad = 10, 6
    x = rng.poisson(3.0, (n + pad, 30)).astype(np.float32)
    x[n:] *= 50  # padding cells far from the rest: they would move every statistic
    batch = rng.integers(0, 2, n + pad)
    label = np.zeros(n + pad, int)
    noise = objective.draw_noise(jax.random.key(1), n + pad, config=config, dropout_rate=0.1)
    valid = jnp.asarray(np.arange(n + pad) < n, jnp.float32)

    def run(rows, valid):
        def loss_fn(p):
            parts, new = objective.train_loss(
                p, jnp.asarray(x[rows]), jnp.asarray(batch[rows]), jnp.asarray(label[rows]),
                jax.tree.map(lambda a: a[rows], noise), 0.3, config=config, dropout_rate=0.1,
                valid=valid,
            )  # fmt: skip
            return parts.loss, (parts, new)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, (parts, new)), grads = run(np.arange(n), None)
    (loss_p, (parts_p, new_p)), grads_p = run(np.arange(n + pad), valid)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
    for ours, alone in zip(parts_p[1:], parts[1:], strict=True):
        np.testing.assert_allclose(ours[:n], alone, rtol=1e-5, atol=1e-6)
    for flat_p, flat in ((to_flat(grads_p), to_flat(grads)), (to_flat(new_p), to_flat(new))):
        for key, value in flat.items():
            scale = 1e-5 * max(1.0, float(np.max(np.abs(value))))
            np.testing.assert_allclose(flat_p[key], value, rtol=1e-4, atol=scale, err_msg=key)


def test_bad_inputs_fail_before_training(adata):
    a = adata.copy()
    a.X = a.X / 2.5
    with pytest.raises(IncompatibleDataError, match="non-integer"):
        ldj.train(a, **SMALL)
    a = adata.copy()
    a.X[7, 3] = np.nan
    with pytest.raises(IncompatibleDataError, match="NaN"):
        ldj.train(a, **SMALL)
    a = adata.copy()
    a.obs["batch"] = a.obs["batch"].cat.add_categories("lonely")
    a.obs.iloc[4, a.obs.columns.get_loc("batch")] = "lonely"
    with pytest.raises(IncompatibleDataError, match="single cell: 'lonely'"):
        ldj.train(a, batch_key="batch", **SMALL)
    with pytest.raises(ConfigError, match="labels_key"):
        ldj.train(adata, dispersion="gene-label", **SMALL)
    with pytest.raises(ConfigError, match="optimizer"):
        ldj.train(adata, optimizer="SGD", **SMALL)
    with pytest.raises(ConfigError, match="need a validation set"):
        ldj.train(adata, train_size=1.0, early_stopping=True, **SMALL)


def test_cli_train_and_export_one_line_errors(adata, tmp_path, capsys):
    file = tmp_path / "bad.h5ad"
    a = adata.copy()
    a.X = np.log1p(a.X)
    a.write_h5ad(file)
    assert cli.main(["train", str(file), "-o", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ldj: error: Counts in X contain non-integer")
    assert not (tmp_path / "m").exists()


def test_export_loads_in_scvi_tools_with_equal_outputs(trained, adata, tmp_path, capsys):
    scvi = pytest.importorskip("scvi")
    from scvi_ref import scvi_reference

    model, path = trained
    out = tmp_path / "scvi_model"
    assert cli.main(["export", str(path), str(out)]) == 0
    assert "model.pt" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = scvi.model.LinearSCVI.load(str(out), adata=adata.copy())
    ref = scvi_reference(theirs, theirs.adata)
    np.testing.assert_allclose(model.get_latent_representation(adata), ref["qz_m"], rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    ours_scale = model.get_normalized_expression(adata, return_numpy=True)
    np.testing.assert_allclose(ours_scale, ref["scale"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.get_loadings().to_numpy(), theirs.get_loadings().to_numpy(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    nll = model.get_reconstruction_error(adata)
    np.testing.assert_allclose(nll, ref["nll"], rtol=1e-5)
    assert set(theirs.history_) == set(model.history_)
    np.testing.assert_array_equal(theirs.train_indices, model.train_indices)
    # our converter reads it back: the same weights
    back = ldj.load(out)
    from linear_decoder_jax.params import to_flat

    flat_back, flat = to_flat(back.host_params), to_flat(model.host_params)
    assert set(flat_back) == set(flat)
    for key in flat:
        np.testing.assert_array_equal(flat_back[key], flat[key], err_msg=key)


def test_resume_after_interruption_equals_uninterrupted(adata, tmp_path, monkeypatch):
    from linear_decoder_jax.params import to_flat
    from linear_decoder_jax.training import loop

    kwargs = dict(SMALL, max_epochs=4, progress_bar=True, reduce_lr_on_plateau=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = ldj.train(adata, batch_key="batch", seed=2, **kwargs)
        state = tmp_path / "state.npz"

        def interrupt(line):
            if line.startswith("Epoch 3/4"):
                raise KeyboardInterrupt  # killed during epoch 4, after the epoch-2 checkpoint

        monkeypatch.setattr(loop, "stderr_progress", interrupt)
        with pytest.raises(KeyboardInterrupt):
            ldj.train(adata, batch_key="batch", seed=2, checkpoint=state, checkpoint_every=2,
                      **kwargs)  # fmt: skip
        assert state.is_file()
        monkeypatch.setattr(loop, "stderr_progress", lambda line: None)
        resumed = ldj.train(
            adata, batch_key="batch", seed=2, checkpoint=state, resume=True, **kwargs
        )
        with pytest.raises(ConfigError, match="other data or options"):
            ldj.train(adata, batch_key="batch", seed=2, checkpoint=state, resume=True,
                      **(kwargs | {"lr": 0.5}))  # fmt: skip
    a, b = to_flat(straight.host_params), to_flat(resumed.host_params)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-7, err_msg=key)
    for key, frame in straight.history_.items():
        np.testing.assert_allclose(resumed.history_[key].to_numpy(), frame.to_numpy(), rtol=1e-6)


def test_export_other_options_load_in_scvi_tools(adata, tmp_path):
    """ZINB, gene-label dispersion, "ln", observed library, 2 layers, decoder bias, no decoder
    BatchNorm: scvi-tools builds the same module from the exported registry and init params."""
    scvi = pytest.importorskip("scvi")
    from scvi_ref import scvi_reference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ldj.train(
            adata, batch_key="batch", labels_key="cell_type", gene_likelihood="zinb",
            dispersion="gene-label", latent_distribution="ln", use_observed_lib_size=True,
            n_layers=2, bias=True, use_batch_norm=False, **(SMALL | {"max_epochs": 1}),
        )  # fmt: skip
        model.export_scvi(tmp_path / "scvi")
        theirs = scvi.model.LinearSCVI.load(str(tmp_path / "scvi"), adata=adata.copy())
    ref = scvi_reference(theirs, theirs.adata)
    ours = model.get_normalized_expression(adata, return_numpy=True)
    np.testing.assert_allclose(ours, ref["scale"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.get_reconstruction_error(adata), ref["nll"], rtol=1e-5)
