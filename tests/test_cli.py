"""``ldj`` end to end: convert, info, ablate (every schema field), errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

import anndata
import numpy as np
import pytest
from helpers import random_adata, random_model

import linear_decoder_jax as ldj
from linear_decoder_jax.cli import main

pytest.importorskip("scvi")


@pytest.fixture(scope="module")
def converted(trained_models, tmp_path_factory):
    t = trained_models("batch3_gene_batch")
    root = tmp_path_factory.mktemp("cli")
    data = root / "cells.h5ad"
    t.adata.write_h5ad(data)
    return t, root, data


def test_convert_info_ablate(converted, capsys):
    t, root, data = converted
    model_dir = root / "model"
    assert main(["convert", str(t.saved), str(model_dir)]) == 0
    assert (model_dir / "config.json").is_file()
    assert main(["info", str(model_dir)]) == 0
    info = capsys.readouterr().out
    assert "likelihood:   nb, dispersion gene-batch" in info
    assert "b0, b1, b2" in info and "gene0" in info
    out = root / "res.h5ad"
    argv = [
        "ablate",
        str(model_dir),
        str(data),
        "-o",
        str(out),
        "--groupby",
        "cell_type",
        "--baseline",
        "mean",
        "--mode",
        "keep",
        "--latents",
        "2,0",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "top latents per cell_type" in printed
    res = anndata.read_h5ad(out)
    adata = t.adata
    assert list(res.obs_names) == list(adata.obs_names)
    assert {"batch", "cell_type", "nll"} <= set(res.obs.columns)
    assert res.obsm["delta_nll"].shape == (adata.n_obs, 2)
    assert res.obsm["delta_l1"].shape == (adata.n_obs, 2)
    assert res.obsm["latent"].shape == (adata.n_obs, 4)
    np.testing.assert_array_equal(res.obsm["X_umap"], adata.obsm["X_umap"])
    assert res.varm["mean_lfc"].shape == (adata.n_vars, 2)
    assert res.varm["loadings"].shape == (adata.n_vars, 4)
    u = res.uns["ablation"]
    assert u["mode"] == "keep" and u["baseline"] == "mean" and u["library"] == "model"
    assert list(u["latents"]) == [2, 0] and list(u["latent_names"]) == ["Z_2", "Z_0"]
    assert u["n_devices"] >= 1 and u["dtype"] == "float32" and "jax" in u["versions"]
    assert u["source_model"] == str(model_dir.absolute())
    np.testing.assert_allclose(u["baseline_values"], res.obsm["latent"].mean(0), rtol=1e-5)
    groups = res.uns["ablation_groups"]
    assert set(groups["mean"].index) == {"T", "B"}
    assert list(groups["mean"].columns) == ["Z_2", "Z_0"]
    assert len(res.uns["ablation_top_cells"]) == 20
    assert res.X.nnz == 0  # no count matrix copied
    # same numbers as the API
    api = ldj.ablate(ldj.load(model_dir), adata, baseline="mean", mode="keep", latents=[2, 0])
    np.testing.assert_allclose(res.obsm["delta_nll"], api.delta_nll, rtol=1e-6)


def test_ablate_from_scvi_directory_and_refuses_overwrite(converted, capsys):
    t, root, data = converted
    out = root / "direct.h5ad"
    assert main(["ablate", str(t.saved), str(data), "-o", str(out)]) == 0
    before = out.read_bytes()
    assert main(["ablate", str(t.saved), str(data), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert out.read_bytes() == before
    assert main(["ablate", str(t.saved), str(data), "-o", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "/nonexistent/model"], "ldj: error:"),
        (["ablate", "{model}", "/nonexistent.h5ad", "-o", "{root}/x.h5ad"], "no such file"),
        (["ablate", "{model}", "{bad}", "-o", "{root}/x.h5ad"], "not a readable h5ad"),
        (["ablate", "{model}", "{data}", "-o", "{root}/x.h5ad", "--latents", "7"], "out of range"),
        (["ablate", "{model}", "{data}", "-o", "{root}/x.h5ad", "--groupby", "nope"], "groupby"),
    ],
)
def test_errors_are_one_line(converted, argv, message, tmp_path):
    t, root, data = converted
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    fmt = {"model": str(t.saved), "root": str(tmp_path), "data": str(data), "bad": str(bad)}
    proc = subprocess.run(
        [sys.executable, "-m", "linear_decoder_jax", *[a.format(**fmt) for a in argv]],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldj: error:"), proc.stderr
    assert message in lines[0]
    assert not (tmp_path / "x.h5ad").exists()


def test_command_output_is_complete_despite_the_fast_exit(converted, tmp_path):
    """``ldj`` ends without the interpreter's teardown (``os._exit``): the result file, the
    summary on a pipe (block-buffered) and the exit code must all be there."""
    import anndata

    t, _, data = converted
    out = tmp_path / "r.h5ad"
    proc = subprocess.run(
        [sys.executable, "-m", "linear_decoder_jax", "ablate", str(t.saved), str(data), "-o", out],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith(f"wrote {out}")
    back = anndata.read_h5ad(out)
    assert back.obsm["delta_nll"].shape[0] == back.n_obs > 0
    assert not list(tmp_path.glob(".r.h5ad*"))


def test_help_does_not_import_jax():
    code = (
        "import sys; from linear_decoder_jax.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'jax' not in sys.modules, 'jax imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_result_write_is_atomic(tmp_path, monkeypatch):
    model = random_model()
    adata = random_adata(model)
    res = ldj.ablate(model, adata)
    path = tmp_path / "r.h5ad"
    res.write(path)
    before = path.read_bytes()

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(anndata.AnnData, "write_h5ad", boom)
    with pytest.raises(KeyboardInterrupt):
        res.write(path, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5ad"]
