"""The scverse workflow, from the user's side (issue 16): counts in a layer or ``.raw``, h5ad and
zarr input, obs dtypes that survive the result file, groupby checks, genes, scores back into the
user's AnnData, plots and merge messages."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from helpers import seed_scvi

import linear_decoder_jax as ldj
from linear_decoder_jax.cli import main
from linear_decoder_jax.demo import demo_files
from linear_decoder_jax.errors import ConfigError, IncompatibleDataError, OutputExistsError

DEMO = demo_files()


@pytest.fixture(scope="module")
def model():
    return ldj.load(DEMO / "model.pt")


def counts() -> anndata.AnnData:
    return anndata.read_h5ad(DEMO / "counts.h5ad")


def scanpy_style() -> anndata.AnnData:
    """Counts in layers["counts"], X log-normalised, .raw holding the log-normalised genes."""
    sc = pytest.importorskip("scanpy")
    adata = counts()
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.raw = adata
    return adata


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# 1. the counts source --------------------------------------------------------------------------
def test_log_normalised_x_names_the_counts_layer(model, tmp_path: Path, capsys) -> None:
    adata = scanpy_style()
    with pytest.raises(IncompatibleDataError) as info:
        ldj.ablate(model, adata)
    message = str(info.value)
    assert "Counts in X contain non-integer values" in message
    assert "Raw counts are in layer 'counts'" in message and "layer='counts'" in message
    assert ".raw" not in message  # .raw holds log-normalised values here: not offered
    expected = ldj.ablate(model, counts()).delta_nll
    np.testing.assert_allclose(ldj.ablate(model, adata, layer="counts").delta_nll, expected)

    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    code, _, err = cli(capsys, "ablate", DEMO / "model.pt", path, "-o", tmp_path / "r.h5ad")
    assert code == 1 and err.count("\n") == 1
    assert "pass --layer counts." in err and "allow-non-integer" not in err
    code, _, err = cli(
        capsys, "ablate", DEMO / "model.pt", path, "-o", tmp_path / "r.h5ad", "--layer", "counts"
    )
    assert code == 0, err
    np.testing.assert_allclose(ldj.AblationResult.read(tmp_path / "r.h5ad").delta_nll, expected)


def test_counts_in_raw(model) -> None:
    adata = counts()
    adata.raw = adata.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X))
    with pytest.raises(IncompatibleDataError, match=r"Raw counts are in \.raw: pass use_raw=True"):
        ldj.ablate(model, adata)
    expected = ldj.ablate(model, counts()).delta_nll
    np.testing.assert_allclose(ldj.ablate(model, adata, use_raw=True).delta_nll, expected)
    with pytest.raises(ConfigError, match="either use_raw=True or layer='x'"):
        ldj.ablate(model, adata, use_raw=True, layer="x")


def test_model_layer_missing_reads_x_with_a_note(model, tmp_path: Path, capsys) -> None:
    import dataclasses

    spec = dataclasses.replace(
        model.spec, data=dataclasses.replace(model.spec.data, layer="counts")
    )
    layered = ldj.LinearSCVI(model.host_params, spec)
    with pytest.warns(UserWarning, match="lacks; reading counts from X"):
        ldj.ablate(layered, counts())
    layered.save(tmp_path / "model")
    argv = ["ablate", tmp_path / "model", DEMO / "counts.h5ad", "-o", tmp_path / "r.h5ad"]
    code, _, err = cli(capsys, *argv)
    assert code == 0
    notes = [line for line in err.splitlines() if "ldj: note:" in line]
    assert notes == [
        "ldj: note: The model was set up with counts in layer 'counts', which this AnnData "
        "lacks; reading counts from X."
    ], err


def test_allow_non_integer_help_warns_about_log_data(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["ablate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "not for log-normalised data" in text and "--use-raw" in text and "--layer" in text


# 2. zarr input ---------------------------------------------------------------------------------
def test_zarr_folder_and_zip_stream(model, tmp_path: Path, capsys) -> None:
    adata = counts()
    adata.X = sp.csr_matrix(adata.X)
    adata.obsm["X_umap"] = np.random.default_rng(0).normal(size=(adata.n_obs, 2))
    store = tmp_path / "cells.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr format notices
        adata.write_zarr(store)
    zipped = Path(shutil.make_archive(str(tmp_path / "cells"), "zip", store))
    expected = ldj.ablate(model, adata, batch_size=16).delta_nll
    for path in (store, zipped):
        result = ldj.ablate(model, str(path), batch_size=16)
        np.testing.assert_allclose(result.delta_nll, expected)
        assert "X_umap" in result.embeddings
    out = tmp_path / "r.h5ad"
    code, _, err = cli(capsys, "ablate", DEMO / "model.pt", store, "-o", out, "--groupby", "group")
    assert code == 0, err
    code, _, err = cli(capsys, "report", out, "-o", tmp_path / "r.html", "--data", store)
    assert code == 0, err


# 3. obs dtypes survive the result file ---------------------------------------------------------
def _odd_obs(adata: anndata.AnnData) -> anndata.AnnData:
    n = adata.n_obs
    adata.obs["donor"] = pd.array(["d1", None] * (n // 2) + ["d2"] * (n % 2), dtype="string")
    adata.obs["age"] = pd.array([30, None] * (n // 2) + [40] * (n % 2), dtype="Int64")
    adata.obs["qc"] = pd.array([True, None] * (n // 2) + [False] * (n % 2), dtype="boolean")
    adata.obs["site"] = pd.Categorical(["a", np.nan] * (n // 2) + ["b"] * (n % 2))
    return adata


def test_nullable_obs_columns_round_trip(model, tmp_path: Path, capsys) -> None:
    adata = _odd_obs(counts())
    path = tmp_path / "cells.h5ad"
    with anndata.settings.override(allow_write_nullable_strings=True):
        adata.write_h5ad(path)
    out = tmp_path / "r.h5ad"
    code, _, err = cli(capsys, "ablate", DEMO / "model.pt", path, "-o", out)
    assert code == 0, err
    back = anndata.read_h5ad(out).obs
    for column in ("donor", "age", "qc", "site"):
        pd.testing.assert_series_equal(
            back[column].astype(object), adata.obs[column].astype(object), check_names=False
        )
    assert anndata.settings.allow_write_nullable_strings is False  # scoped, not left behind
    result = ldj.ablate(model, adata)
    result.write(tmp_path / "mem.h5ad")
    assert anndata.read_h5ad(tmp_path / "mem.h5ad").obs["donor"].isna().sum() > 0


def test_unwritable_obs_fails_before_the_sweep(model, monkeypatch) -> None:
    from linear_decoder_jax import assemble

    adata = counts()
    adata.obs["bad"] = [object()] * adata.n_obs
    monkeypatch.setattr(assemble, "execute", lambda *a, **k: pytest.fail("the sweep started"))
    monkeypatch.setattr(
        assemble, "decoder_inputs", lambda *a, **k: pytest.fail("the stats started")
    )
    for baseline in ("zero", "mean"):  # "mean": before the baseline's pass over the cells too
        with pytest.raises(IncompatibleDataError, match="obs column 'bad' .* cannot be written"):
            ldj.ablate(model, adata, baseline=baseline)


# 4. groupby ------------------------------------------------------------------------------------
def test_continuous_groupby_is_refused_and_nan_groups_counted(model, tmp_path, capsys) -> None:
    adata = counts()
    adata.obs["total_counts"] = np.asarray(adata.X.sum(1)).ravel().astype(np.float32)
    path = tmp_path / "cells.h5ad"
    adata.obs["group_nan"] = adata.obs["group"].astype(object)
    adata.obs.iloc[:7, adata.obs.columns.get_loc("group_nan")] = np.nan
    adata.write_h5ad(path)
    out = tmp_path / "r.h5ad"
    code, _, err = cli(
        capsys, "ablate", DEMO / "model.pt", path, "-o", out, "--groupby", "total_counts"
    )
    assert code == 1 and "bin it first, e.g." in err and "pd.cut" in err
    assert "--groupby-max" in err and not out.exists()
    code, stdout, err = cli(
        capsys, "ablate", DEMO / "model.pt", path, "-o", out, "--groupby", "group_nan"
    )
    assert code == 0, err
    assert "top latents per group_nan (7 cells without a value left out):" in stdout
    result = ldj.AblationResult.read(out)
    assert int(result.groups["n_no_group"]) == 7
    assert int(result.groups["n_cells"]["n_cells"].sum()) == adata.n_obs - 7
    ok = ldj.ablate(model, adata, groupby="total_counts", groupby_max=10**6)
    assert len(ok.groups["n_cells"]) > 50


# 5. genes and 7. warnings ----------------------------------------------------------------------
def test_unused_duplicate_genes_and_one_line_note(model, tmp_path: Path, capsys) -> None:
    adata = counts()
    extra = anndata.AnnData(
        X=np.ones((adata.n_obs, 3), np.float32),
        obs=adata.obs[[]],
        var=pd.DataFrame(index=["MT-X", "MT-X", "MT-Y"]),
    )
    wide = anndata.concat([adata, extra], axis=1, merge="first")
    with pytest.warns(UserWarning, match="Dropping 3 genes"):
        np.testing.assert_allclose(
            ldj.ablate(model, wide).delta_nll, ldj.ablate(model, adata).delta_nll
        )
    path = tmp_path / "wide.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata: "var_names are not unique"
        wide.write_h5ad(path)
    code, _, err = cli(capsys, "ablate", DEMO / "model.pt", path, "-o", tmp_path / "r.h5ad")
    assert code == 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["ldj: note: Dropping 3 genes of the AnnData that the model does not use."], err


# 6. prefixes and CLI words ---------------------------------------------------------------------
def test_prefixed_folder_and_cli_words(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "saved"
    folder.mkdir()
    shutil.copy(DEMO / "model.pt", folder / "pbmc_model.pt")
    code, out, err = cli(capsys, "info", folder)
    assert code == 0 and "latents:" in out, err
    shutil.copy(DEMO / "model.pt", folder / "other_model.pt")
    code, _, err = cli(capsys, "info", folder)
    assert code == 1 and "other_model.pt, pbmc_model.pt" in err and "--prefix other_" in err
    code, _, err = cli(capsys, "info", DEMO / "model.pt", "--prefix", "foo")
    assert code == 1 and "internal error" not in err and "--prefix applies only to a folder" in err
    code, _, err = cli(capsys, "info", folder, "--prefix", "nope_")
    assert code == 1 and "pass it with --prefix." in err and "prefix=" not in err
    (tmp_path / "out.h5ad").write_text("")
    code, _, err = cli(capsys, "merge", tmp_path / "out.h5ad", "-o", tmp_path / "out.h5ad")
    assert (
        err
        == f"ldj: error: {tmp_path / 'out.h5ad'} already exists; pass --overwrite to replace it.\n"
    )


# 8. plots --------------------------------------------------------------------------------------
def test_embedding_basis_and_save_folders(model, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = ldj.ablate(model, counts())
    with pytest.raises(IncompatibleDataError, match=r"embeddings present \(none\), got 'X_pca'"):
        ldj.pl.embedding(result, "Z_3", basis="X_pca")
    target = tmp_path / "sub" / "dir" / "e.png"
    ldj.pl.embedding(result, "Z_3", save=target)
    assert target.stat().st_size > 0


# 9. scores back into the AnnData, merge, output names -----------------------------------------
def test_add_to_and_refusals(model) -> None:
    adata = counts()
    result = ldj.ablate(model, adata, latents=[3, 0])
    columns = result.add_to(adata)
    assert columns[:3] == ["nll", "delta_nll_Z_3", "delta_nll_Z_0"]
    np.testing.assert_array_equal(adata.obs["delta_nll_Z_0"], result.delta_nll[:, 1])
    np.testing.assert_array_equal(adata.obsm["ablation_delta_nll"], result.delta_nll)
    assert adata.uns["ablation"]["latent_names"] == ["Z_3", "Z_0"]
    with pytest.raises(OutputExistsError, match="already has 'ablation_delta_nll'"):
        result.add_to(adata)
    result.add_to(adata, overwrite=True)
    result.add_to(adata, key_added="run2")
    assert "run2_delta_nll_Z_3" in adata.obs and "run2_delta_nll" in adata.obsm
    with pytest.raises(IncompatibleDataError, match="same order"):
        result.add_to(adata[::-1].copy(), overwrite=True)
    with pytest.raises(IncompatibleDataError, match="got 10 cells"):
        result.add_to(adata[:10].copy(), overwrite=True)


def test_merge_of_whole_runs_and_output_names(model, tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "a.h5ad", tmp_path / "b.h5ad"
    for path in (a, b):
        assert cli(capsys, "ablate", DEMO / "model.pt", DEMO / "counts.h5ad", "-o", path)[0] == 0
    code, _, err = cli(capsys, "merge", a, b, "-o", tmp_path / "m.h5ad")
    assert code == 1 and "are whole runs, not shard parts of one run" in err
    code, _, err = cli(
        capsys, "ablate", DEMO / "model.pt", DEMO / "counts.h5ad", "-o", tmp_path / "out.csv"
    )
    assert code == 1 and "ending in .h5ad, got" in err and not (tmp_path / "out.csv").exists()
    with pytest.raises(ConfigError, match="ending in .h5ad"):
        ldj.ablate(model, counts(), output=tmp_path / "out.csv")


# The scanpy workflow: HVG model trained on layers["counts"], X_umap, scores back, sc.pl.umap -----
def test_scanpy_workflow(tmp_path: Path) -> None:
    sc = pytest.importorskip("scanpy")
    scvi = pytest.importorskip("scvi")
    import matplotlib

    matplotlib.use("Agg")
    adata = scanpy_style()
    sc.pp.highly_variable_genes(adata, n_top_genes=120)
    hvg = adata[:, adata.var["highly_variable"]].copy()
    seed_scvi(0)
    scvi.settings.verbosity = 40
    scvi.model.LinearSCVI.setup_anndata(hvg, layer="counts")
    trained = scvi.model.LinearSCVI(hvg, n_latent=4, n_hidden=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained.train(max_epochs=3, accelerator="cpu", enable_progress_bar=False)
    trained.save(tmp_path / "scvi_model", save_anndata=False)
    sc.pp.pca(adata, n_comps=10)
    sc.pp.neighbors(adata, n_neighbors=10)
    sc.tl.umap(adata)

    model = ldj.load(tmp_path / "scvi_model")
    with pytest.warns(UserWarning, match="Dropping"):  # all genes in, the model uses the HVGs
        result = ldj.ablate(model, adata)  # counts from the model's layer "counts"
    result.add_to(adata)
    ax = sc.pl.umap(adata, color="delta_nll_Z_0", show=False)
    assert ax is not None
    ours = model.get_latent_representation(hvg)
    np.testing.assert_allclose(ours, trained.get_latent_representation(hvg), rtol=1e-4, atol=1e-5)
