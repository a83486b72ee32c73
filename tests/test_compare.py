"""``ldj.compare``: a model with latents permuted and sign-flipped is matched back exactly."""

from __future__ import annotations

import functools

import anndata
import numpy as np
import pandas as pd
import pytest
from helpers import random_adata, random_model

import linear_decoder_jax as ldj
from linear_decoder_jax.cli import main
from linear_decoder_jax.demo import demo_files
from linear_decoder_jax.errors import ConfigError, IncompatibleDataError
from linear_decoder_jax.matching import correlation

PERM = np.array([2, 0, 5, 1, 4, 3])  # latent k of the copy is latent PERM[k] of the original
FLIP = np.array([1.0, -1.0, 1.0, 1.0, -1.0, 1.0])  # two latents negated


@functools.cache
def demo() -> tuple[ldj.LinearSCVI, anndata.AnnData]:
    return ldj.load(demo_files() / "model.pt"), anndata.read_h5ad(demo_files() / "counts.h5ad")


def permuted(model: ldj.LinearSCVI, perm: np.ndarray, flip: np.ndarray) -> ldj.LinearSCVI:
    """A copy whose latent k is ``flip[k]`` times the original's latent ``perm[k]``.

    The z-encoder's mean head is permuted and negated (its variance head only permuted), the
    decoder's rows for z (scale head and, for ZINB, the dropout head) likewise, so every decode is
    unchanged.
    """
    p = model.host_params
    k = model.n_latent
    enc = p.z_encoder
    mean = enc.mean._replace(
        kernel=enc.mean.kernel[:, perm] * flip, bias=enc.mean.bias[perm] * flip
    )
    var = enc.var._replace(kernel=enc.var.kernel[:, perm], bias=enc.var.bias[perm])

    def head(layer):
        w = np.array(layer.dense.kernel)
        w[:k] = w[:k][perm] * flip[:, None]
        return layer._replace(dense=layer.dense._replace(kernel=w))

    dec = p.decoder._replace(factor=head(p.decoder.factor), dropout=head(p.decoder.dropout))
    params = p._replace(z_encoder=enc._replace(mean=mean, var=var), decoder=dec)
    return ldj.LinearSCVI(params, model.spec, dtype=model.dtype)


def _check_decodes_equal(a: ldj.LinearSCVI, b: ldj.LinearSCVI, adata) -> None:
    np.testing.assert_allclose(
        a.get_normalized_expression(adata, return_numpy=True),
        b.get_normalized_expression(adata, return_numpy=True),
        rtol=1e-5,
        atol=1e-7,
    )
    np.testing.assert_allclose(
        a.get_reconstruction_error(adata, return_mean=False),
        b.get_reconstruction_error(adata, return_mean=False),
        rtol=1e-5,
    )


def _check_matched_back(table: pd.DataFrame, names: list[str], perm, flip) -> None:
    assert list(table["latent_a"]) == names
    expected = {names[perm[k]]: (names[k], int(flip[k])) for k in range(len(perm))}
    for row in table.itertuples():
        assert (row.latent_b, row.sign) == expected[row.latent_a]
    np.testing.assert_allclose(table["corr_cells"] * table["sign"], 1.0, atol=1e-5)
    np.testing.assert_allclose(table["corr_loadings"] * table["sign"], 1.0, atol=1e-5)


def test_demo_copy_permuted_and_flipped_is_matched_back():
    model, adata = demo()
    copy = permuted(model, PERM, FLIP)
    _check_decodes_equal(model, copy, adata)
    table = ldj.compare(model, copy, adata)
    _check_matched_back(table, model.latent_names, PERM, FLIP)
    cells = table.attrs["corr_cells"]
    assert cells.shape == (6, 6)
    np.testing.assert_allclose(np.abs(cells.to_numpy()).max(axis=1), 1.0, atol=1e-5)


def test_zinb_copy_permuted_and_flipped_is_matched_back():
    model = random_model(seed=3, n_latent=6, gene_likelihood="zinb")
    adata = random_adata(model, n_obs=60)
    copy = permuted(model, PERM, FLIP)
    _check_decodes_equal(model, copy, adata)
    zi = model.get_affine_decoder().zi_logits.loadings
    zi_copy = copy.get_affine_decoder().zi_logits.loadings
    np.testing.assert_allclose(zi_copy, zi[:, PERM] * FLIP, rtol=1e-6)
    _check_matched_back(ldj.compare(model, copy, adata), model.latent_names, PERM, FLIP)


def test_correlation_is_pearson_and_constant_columns_are_nan():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 3)), rng.normal(size=(50, 2))
    a[:, 2] = 1.0
    corr = correlation(a, b)
    for i in range(2):
        for j in range(2):
            assert corr[i, j] == pytest.approx(np.corrcoef(a[:, i], b[:, j])[0, 1], abs=1e-12)
    assert np.isnan(corr[2]).all()


def _sub_model(model: ldj.LinearSCVI, keep: list[int]) -> ldj.LinearSCVI:
    """The model restricted to some latents (a model with fewer latents, same genes)."""
    import dataclasses

    p = model.host_params
    keep_idx = np.asarray(keep)
    enc = p.z_encoder
    mean = enc.mean._replace(kernel=enc.mean.kernel[:, keep_idx], bias=enc.mean.bias[keep_idx])
    var = enc.var._replace(kernel=enc.var.kernel[:, keep_idx], bias=enc.var.bias[keep_idx])
    k = model.n_latent

    def head(layer):
        w = np.asarray(layer.dense.kernel)
        rows = np.concatenate([keep_idx, np.arange(k, len(w))])
        return layer._replace(dense=layer.dense._replace(kernel=w[rows]))

    dec = p.decoder._replace(factor=head(p.decoder.factor), dropout=head(p.decoder.dropout))
    params = p._replace(z_encoder=enc._replace(mean=mean, var=var), decoder=dec)
    config = dataclasses.replace(model.config, n_latent=len(keep))
    spec = dataclasses.replace(model.spec, model=config)
    return ldj.LinearSCVI(params, spec, dtype=model.dtype)


def test_unmatched_latents_are_listed_when_counts_differ():
    model, adata = demo()
    small = _sub_model(model, [4, 1, 3])
    table = ldj.compare(model, small, adata)
    matched = table.dropna(subset=["latent_a", "latent_b"])
    assert dict(zip(matched["latent_b"], matched["latent_a"], strict=True)) == {
        "Z_0": "Z_4",
        "Z_1": "Z_1",
        "Z_2": "Z_3",
    }
    unmatched = table[table["latent_b"].isna()]
    assert sorted(unmatched["latent_a"]) == ["Z_0", "Z_2", "Z_5"]
    assert unmatched["sign"].isna().all() and unmatched["corr_cells"].isna().all()
    # B has the fewer latents: the reverse comparison lists A's extra latents under latent_b
    reverse = ldj.compare(small, model, adata)
    assert sorted(reverse.loc[reverse["latent_a"].isna(), "latent_b"]) == ["Z_0", "Z_2", "Z_5"]


def test_different_genes_are_refused_unless_intersection():
    a = random_model(seed=0)
    b = random_model(seed=1, n_input=32)
    adata = random_adata(b, n_obs=40)
    with pytest.raises(IncompatibleDataError, match="different genes .*genes='intersection'"):
        ldj.compare(a, b, adata)
    table = ldj.compare(a, b, adata, genes="intersection")
    assert len(table) == a.n_latent
    with pytest.raises(ConfigError, match="Expected genes 'same' or 'intersection'"):
        ldj.compare(a, b, adata, genes="union")  # type: ignore[arg-type]


def test_cli_compare_writes_the_table(tmp_path, capsys):
    model, adata = demo()
    a, b = tmp_path / "a", tmp_path / "b"
    model.save(a)
    permuted(model, PERM, FLIP).save(b)
    out = tmp_path / "match.csv"
    assert main(["compare", str(a), str(b), str(demo_files() / "counts.h5ad"), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "latent_a" in printed and str(out) in printed
    table = pd.read_csv(out)
    _check_matched_back(table, model.latent_names, PERM, FLIP)
    assert main(["compare", str(a), str(b), str(tmp_path / "missing.h5ad")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldj: error:") and "missing.h5ad" in err and "\n" not in err
    assert main(["compare", str(a), str(b), str(demo_files() / "counts.h5ad"), "-o", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_pl_latent_correlation_draws_the_matrix_in_matched_order():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from linear_decoder_jax import pl

    model, adata = demo()
    table = ldj.compare(model, permuted(model, PERM, FLIP), adata)
    ax = pl.latent_correlation(table, ax=Figure().add_subplot())
    shown = ax.get_images()[0].get_array()
    np.testing.assert_allclose(np.abs(np.diag(shown)), 1.0, atol=1e-5)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(table["latent_a"])
    assert [t.get_text() for t in ax.get_xticklabels()] == list(table["latent_b"])
    with pytest.raises(ConfigError, match="table returned by ldj.compare"):
        pl.latent_correlation(pd.DataFrame({"latent_a": []}))
