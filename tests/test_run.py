"""The run pipeline: one read, the accelerator (vectorised) path on CPU, schema-driven outputs."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pytest
from helpers import plan_for, random_adata, random_model

import linear_decoder_jax as ldj
from linear_decoder_jax import ablation, anndata_io, pipeline, pl, schema
from linear_decoder_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    {"gene_likelihood": "nb"},
    {"gene_likelihood": "zinb"},
    {"gene_likelihood": "poisson", "n_batch": 1},
    {"gene_likelihood": "nb", "latent_distribution": "ln"},
]


def _sweep(model, adata, *, vectorize, mode, n_samples=0):
    """Every per-cell row and the finished totals of the plain sweep scorer."""
    data = model.prepare(adata)
    plan = plan_for(
        model,
        data.n_obs,
        np.full(model.n_latent, 0.1),
        vectorize=vectorize,
        mode=mode,
        n_samples=n_samples,
        batch_size=16,
    )
    with model.precision():
        place = pipeline.Placement(plan.devices)
        scorer = ablation.SweepScorer(model.family, model.params, plan, place=place)
        sizes = {"obs": data.n_obs, "ablated": model.n_latent, "latent": model.n_latent}
        sink = {k: np.empty(schema.shape(schema.BY_NAME[k], sizes)) for k in scorer.fields}
        totals = pipeline.execute(
            model.family, model.params, data, plan, [scorer], sink, place=place
        )
    return sink, totals


@pytest.mark.parametrize("overrides", CASES, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_vectorised_sweep_equals_sequential(overrides, mode):
    """The accelerator path (latents vmapped) runs on CPU and equals the CPU path (lax.map): the
    same maths in another loop order, so float64 agrees to rounding."""
    model = random_model(seed=5, dtype="float64", **overrides)
    adata = random_adata(model, n_obs=37, seed=6)
    seq, seq_totals = _sweep(model, adata, vectorize=False, mode=mode, n_samples=2)
    vec, vec_totals = _sweep(model, adata, vectorize=True, mode=mode, n_samples=2)
    assert set(seq) == {"nll", "delta_nll", "delta_l1", "latent", "delta_nll_se"}
    for key in seq:
        np.testing.assert_allclose(vec[key], seq[key], rtol=1e-10, atol=1e-10, err_msg=key)
    np.testing.assert_allclose(
        vec_totals["mean_lfc"], seq_totals["mean_lfc"], rtol=1e-10, atol=1e-12
    )


def test_refit_reads_and_encodes_the_input_once(monkeypatch):
    """refit=True reads each row once and encodes each minibatch once (as the plain sweep)."""
    model = random_model(seed=3, dtype="float64")
    adata = random_adata(model, n_obs=40, seed=4)
    reads, encodes = [], []
    csr, encode = anndata_io.CellData.csr, pipeline.encode_counts

    def counting_csr(self, start, stop):
        reads.append(stop - start)
        return csr(self, start, stop)

    def counting_encode(*args, **kwargs):
        encodes.append(1)
        return encode(*args, **kwargs)

    monkeypatch.setattr(anndata_io.CellData, "csr", counting_csr)
    monkeypatch.setattr(pipeline, "encode_counts", counting_encode)
    plain = ldj.ablate(model, adata, batch_size=16)
    n_reads, n_encodes = len(reads), len(encodes)
    assert sum(reads) == adata.n_obs and n_encodes == 3  # one read block, three minibatches
    refitted = ldj.ablate(model, adata, batch_size=16, refit=True, refit_steps=5)
    assert sum(reads[n_reads:]) == adata.n_obs and len(encodes) - n_encodes == 3
    np.testing.assert_array_equal(refitted.delta_nll, plain.delta_nll)


def test_schema_table_in_docs_is_generated():
    for name in ("docs/result-schema.md",):
        text = (ROOT / name).read_text()
        assert schema.embed(text) == text, (
            f"{name}: run `python -m linear_decoder_jax.schema {name}` to regenerate the table"
        )


def test_every_schema_field_round_trips(tmp_path):
    """Writers and reader iterate one table: every field present in a run comes back."""
    model = random_model(seed=3, dtype="float64")
    adata = random_adata(model, n_obs=20, seed=4)
    adata.obsm["X_umap"] = np.random.default_rng(0).normal(size=(20, 2))
    runs = [  # gene scores need n_samples=0: two runs fill every field
        {"latents": [0, 2], "n_samples": 2, "refit": True, "refit_steps": 3},
        {
            "latents": [0, 2],
            "groupby": "group",
            "gene_scores": True,
            "shapley": "permutation",
            "n_permutations": 4,
            "traverse": True,
            "traverse_steps": 3,
        },
    ]
    present = set()
    for i, kwargs in enumerate(runs):
        res = ldj.ablate(model, adata, **kwargs)
        present |= {f.name for f in schema.FIELDS if getattr(res, f.name) is not None}
        streamed = ldj.ablate(model, adata, **kwargs, output=tmp_path / f"s{i}.h5ad")
        res.write(tmp_path / f"m{i}.h5ad")
        for other in (streamed, ldj.AblationResult.read(tmp_path / f"m{i}.h5ad")):
            for f in schema.FIELDS:
                if getattr(res, f.name) is None:
                    assert getattr(other, f.name) is None
                    continue
                np.testing.assert_allclose(
                    np.asarray(getattr(other, f.name), float),
                    np.asarray(getattr(res, f.name), float),
                )
            assert set(other.embeddings) == {"X_umap"}
    assert present == {f.name for f in schema.FIELDS}


def test_refit_arrays_are_not_embeddings(tmp_path):
    """Two ablated latents with refit=True give (n_obs, 2) score arrays: never cell maps."""
    model = random_model(seed=3, dtype="float64")
    adata = random_adata(model, n_obs=20, seed=4)
    out = tmp_path / "r.h5ad"
    ldj.ablate(model, adata, latents=[0, 1], refit=True, refit_steps=3, output=out)
    v = pl.view(anndata.read_h5ad(out))
    assert set(v.embeddings) == set()
    assert set(ldj.AblationResult.read(out).embeddings) == set()


def test_fingerprint_ignores_where_the_model_was_converted(tmp_path):
    """One model converted to two paths: same fingerprint, and their shards merge."""
    model = random_model(seed=7)
    adata = random_adata(model, n_obs=30, seed=8)
    data = tmp_path / "cells.h5ad"
    adata.write_h5ad(data)
    parts = []
    for i, where in enumerate(("a", "b")):
        model.save(tmp_path / where)
        part = tmp_path / f"part{i}.h5ad"
        assert (
            main(["ablate", str(tmp_path / where), str(data), "-o", str(part), "--shard", f"{i}/2"])
            == 0
        )
        parts.append(str(part))
    loaded = [ldj.load(tmp_path / w) for w in ("a", "b")]
    assert loaded[0].path != loaded[1].path
    assert loaded[0].fingerprint() == loaded[1].fingerprint() == model.fingerprint()
    assert ldj.load(tmp_path / "a", dtype="float64").fingerprint() == model.fingerprint()
    assert main(["merge", *parts, "-o", str(tmp_path / "merged.h5ad")]) == 0
    merged = ldj.AblationResult.read(tmp_path / "merged.h5ad")
    whole = ldj.ablate(model, adata)
    np.testing.assert_allclose(merged.delta_nll, whole.delta_nll, rtol=1e-6, atol=1e-6)


def test_float64_model_encodes_in_float64_everywhere():
    """The facade's dense minibatches carry the model's dtype: a float64 model's
    ``get_latent_representation`` equals the run's encoding to the last bit (float32 counts
    once put its ``log1p`` in float32, 1e-8 off)."""
    model = random_model(seed=3, dtype="float64")
    adata = random_adata(model, n_obs=40, seed=4)
    z = model.get_latent_representation(adata)
    run = ldj.ablate(model, adata)
    assert z.dtype == np.float64
    np.testing.assert_array_equal(z, np.asarray(run.arrays["latent"]))
