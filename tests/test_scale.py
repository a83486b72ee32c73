"""Streaming from disk, several devices, and shard + merge give the in-memory numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import random_adata, random_model

import linear_decoder_jax as ldj
from linear_decoder_jax import ablation

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    model = random_model(gene_likelihood="zinb")
    model_dir = root / "model"
    model.save(model_dir)
    adata = random_adata(model, n_obs=203, zero_cells=2)
    adata.obsm["X_umap"] = np.random.default_rng(0).normal(size=(adata.n_obs, 2))
    return ldj.load(model_dir), model_dir, adata, root


def _delta_tol(b) -> float:
    """The tolerance of the ablation tests for delta_nll (and its group means)."""
    return 5e-6 * np.abs(b.nll).max() + 1e-5 * np.abs(np.asarray(b.delta_nll)).max()


def _same(a, b):
    """Equal up to float32 rounding (minibatch shapes change the summation order); delta_nll with
    the tolerance of the ablation tests: 5e-6 * max|NLL| + 1e-5 * max|delta|."""
    assert np.abs(np.asarray(a.delta_nll) - np.asarray(b.delta_nll)).max() <= _delta_tol(b)
    for key in ("delta_l1", "latent", "nll", "mean_lfc", "loadings"):
        np.testing.assert_allclose(
            np.asarray(getattr(a, key)),
            np.asarray(getattr(b, key)),
            rtol=1e-5,
            atol=1e-5,
            err_msg=key,
        )
    np.testing.assert_array_equal(np.asarray(a.obs_names), np.asarray(b.obs_names))


@pytest.mark.parametrize("layout", ["dense", "csr", "csc", "layer"])
def test_streamed_equals_in_memory(setup, layout, tmp_path):
    model, _, adata, _ = setup
    disk = adata.copy()
    if layout == "csr":
        disk.X = sp.csr_matrix(disk.X)
    elif layout == "csc":
        disk.X = sp.csc_matrix(disk.X)
    path = tmp_path / "cells.h5ad"
    if layout == "layer":  # the model reads X; put the counts in a layer of a re-registered spec
        disk.layers["counts"] = sp.csr_matrix(disk.X)
        disk.X = sp.csr_matrix(disk.X.shape, dtype=np.float32)
        import dataclasses

        spec = dataclasses.replace(
            model.spec, data=dataclasses.replace(model.spec.data, layer="counts")
        )
        model = ldj.LinearSCVI(model.host_params, spec)
    disk.write_h5ad(path)
    memory = ldj.ablate(model, disk, groupby="group", baseline="median", batch_size=16)
    out = tmp_path / "res.h5ad"
    streamed = ldj.ablate(
        model, str(path), groupby="group", baseline="median", batch_size=16, output=out
    )
    _same(memory, streamed)
    assert isinstance(streamed.delta_nll, np.memmap)  # big arrays stay on disk
    np.testing.assert_allclose(
        streamed.groups["median"].to_numpy(),
        memory.groups["median"].to_numpy(),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_array_equal(streamed.embeddings["X_umap"], adata.obsm["X_umap"])
    with pytest.raises(ldj.OutputExistsError):
        ldj.ablate(model, str(path), output=out)


def test_crash_leaves_no_partial_output(setup, tmp_path, monkeypatch):
    model, _, adata, _ = setup
    out = tmp_path / "res.h5ad"
    out.write_bytes(b"previous result")
    calls = {"n": 0}
    original = ablation.sweep_minibatch

    def crash_after_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(ablation, "sweep_minibatch", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        ldj.ablate(model, adata, output=out, overwrite=True, batch_size=16)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.h5ad"]


def _python(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,  # a hung child fails the test instead of CI
    )


def test_four_devices_equal_one(setup, tmp_path):
    _, model_dir, adata, _ = setup
    data = tmp_path / "cells.h5ad"
    adata.write_h5ad(data)
    proc = _python(
        f"""
        import jax, numpy as np, linear_decoder_jax as ldj
        assert len(jax.devices()) == 4, jax.devices()
        m = ldj.load({str(model_dir)!r})
        one = ldj.ablate(m, {str(data)!r}, devices=1, batch_size=24)
        four = ldj.ablate(m, {str(data)!r}, batch_size=24)
        assert four.settings["n_devices"] == 4 and one.settings["n_devices"] == 1
        for k in ("delta_l1", "nll", "mean_lfc"):
            a, b = np.asarray(getattr(one, k)), np.asarray(getattr(four, k))
            err = np.abs(a - b).max() / np.abs(a).max()
            assert err <= 1e-5, (k, err)
        # delta_nll carries the float32 rounding of the NLL: the ablation tolerance
        a, b = np.asarray(one.delta_nll), np.asarray(four.delta_nll)
        tol = 5e-6 * np.abs(np.asarray(one.nll)).max() + 1e-5 * np.abs(a).max()
        assert np.abs(a - b).max() <= tol, ("delta_nll", np.abs(a - b).max(), tol)
        # the attribution scorers on a mesh: group gene sums and Shapley values reduce alike
        kw = dict(batch_size=24, groupby="group", gene_scores=True, shapley="exact")
        one, four = ldj.ablate(m, {str(data)!r}, devices=1, **kw), ldj.ablate(m, {str(data)!r}, **kw)
        for k in ("gene_delta_nll", "gene_lfc", "gain_nll", "shapley_nll"):
            a, b = np.asarray(getattr(one, k)), np.asarray(getattr(four, k))
            scale = np.nanmax(np.abs(a))
            assert np.allclose(a, b, rtol=1e-4, atol=1e-4 * scale, equal_nan=True), k
        print("ok")
    """,
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_shards_in_parallel_processes_merge_to_the_whole(setup, tmp_path):
    model, model_dir, adata, _ = setup
    data = tmp_path / "cells.h5ad"
    adata.write_h5ad(data)
    ldj_cmd = [sys.executable, "-m", "linear_decoder_jax"]
    procs = [
        subprocess.Popen(
            [
                *ldj_cmd,
                "ablate",
                str(model_dir),
                str(data),
                "-o",
                str(tmp_path / f"part{i}.h5ad"),
                "--shard",
                f"{i}/3",
                "--baseline",
                "mean",
                "--groupby",
                "group",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    parts = [str(tmp_path / f"part{i}.h5ad") for i in (2, 0, 1)]
    merged_path = tmp_path / "merged.h5ad"
    proc = subprocess.run(
        [*ldj_cmd, "merge", *parts, "-o", str(merged_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    merged = ldj.AblationResult.read(merged_path)
    whole = ldj.ablate(model, adata, baseline="mean", groupby="group")
    _same(whole, merged)
    np.testing.assert_allclose(
        merged.groups["mean"].to_numpy(), whole.groups["mean"].to_numpy(), atol=_delta_tol(whole)
    )
    # incomplete or mixed parts are refused with one line
    proc = subprocess.run(
        [*ldj_cmd, "merge", parts[0], parts[1], "-o", str(tmp_path / "x.h5ad")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "missing [1]" in proc.stderr
    other = tmp_path / "other.h5ad"
    ldj.ablate(model, adata, baseline="zero", shard=(1, 3), output=other)
    proc = subprocess.run(
        [*ldj_cmd, "merge", parts[1], str(other), parts[0], "-o", str(tmp_path / "x.h5ad")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "same model and settings" in proc.stderr
    assert not (tmp_path / "x.h5ad").exists()


def test_merge_keeps_refit_arrays(setup, tmp_path):
    model, _, adata, _ = setup
    small = adata[:30].copy()
    parts = []
    for i in range(2):
        path = tmp_path / f"part{i}.h5ad"
        ldj.ablate(model, small, shard=(i, 2), refit=True, refit_steps=20, output=path)
        parts.append(path)
    from linear_decoder_jax.merge import merge_parts

    merged = merge_parts(parts, tmp_path / "merged.h5ad")
    whole = ldj.ablate(model, small, refit=True, refit_steps=20)
    for key in ("unique_delta_nll", "refit_converged"):
        np.testing.assert_allclose(
            np.asarray(getattr(merged, key), float),
            np.asarray(getattr(whole, key), float),
            rtol=1e-5,
            atol=1e-4,
            err_msg=key,
        )
