"""Group statistics and covariate associations, each checked against scipy on the stored arrays."""

from __future__ import annotations

import functools

import anndata
import numpy as np
import pytest
from scipy import stats as sps

import linear_decoder_jax as ldj
from linear_decoder_jax import stats
from linear_decoder_jax.demo import demo_files
from linear_decoder_jax.errors import ConfigError, IncompatibleDataError


@functools.cache
def demo_result() -> ldj.AblationResult:
    model = ldj.load(demo_files() / "model.pt")
    adata = anndata.read_h5ad(demo_files() / "counts.h5ad")
    return ldj.ablate(model, adata, groupby="cell_type")


def _with(result: ldj.AblationResult, **obs_columns) -> ldj.AblationResult:
    obs = result.obs.copy()
    for key, value in obs_columns.items():
        obs[key] = value
    return result.replace(obs=obs)


def test_group_stats_against_scipy():
    result = demo_result()
    table = result.group_stats()
    delta = np.asarray(result.delta_nll, dtype=np.float64)
    labels = result.obs["cell_type"].astype(str).to_numpy()
    groups = sorted(set(labels))
    assert len(table) == len(groups) * delta.shape[1]
    assert list(table.columns) == [
        "group", "latent", "n_cells", "mean", "ci_low", "ci_high", "median",
        "frac_positive", "auroc", "pval", "padj", "inactive",
    ]  # fmt: skip
    for r in table.itertuples():
        j = result.latent_names.index(r.latent)
        inside, outside = delta[labels == r.group, j], delta[labels != r.group, j]
        n1, n2 = len(inside), len(outside)
        test = sps.mannwhitneyu(inside, outside, alternative="two-sided", method="asymptotic")
        assert r.n_cells == n1
        assert r.auroc == pytest.approx(test.statistic / (n1 * n2), rel=1e-12)
        assert r.pval == pytest.approx(test.pvalue, rel=1e-9)
        assert r.mean == pytest.approx(inside.mean())
        assert r.median == pytest.approx(np.median(inside))
        assert r.frac_positive == pytest.approx((inside > 0).mean())
        low, high = sps.t.interval(0.95, n1 - 1, loc=inside.mean(), scale=sps.sem(inside))
        assert (r.ci_low, r.ci_high) == (pytest.approx(low), pytest.approx(high))
        assert not r.inactive
    np.testing.assert_allclose(table["padj"], sps.false_discovery_control(table["pval"]))


def test_demo_planted_latent_is_specific_to_planted_cells():
    model = ldj.load(demo_files() / "model.pt")
    adata = anndata.read_h5ad(demo_files() / "counts.h5ad")
    table = ldj.ablate(model, adata, groupby="group").group_stats()
    row = table[(table["group"] == "planted") & (table["latent"] == "Z_3")].iloc[0]
    assert row["auroc"] > 0.99 and row["padj"] < 1e-6
    marks = stats.significant_marks(table)
    assert [key for key, mark in marks.items() if mark] == [("planted", "Z_3")]


def test_bh_matches_scipy_and_skips_nan():
    p = np.random.default_rng(0).uniform(size=40) ** 3
    np.testing.assert_allclose(stats.bh(p), sps.false_discovery_control(p))
    with_nan = np.concatenate([p, [np.nan]])
    adjusted = stats.bh(with_nan)
    assert np.isnan(adjusted[-1])
    np.testing.assert_allclose(adjusted[:-1], sps.false_discovery_control(p))
    assert np.isnan(stats.bh(np.array([np.nan]))).all()


def test_single_cell_group_and_constant_inactive_latent():
    result = demo_result()
    groups = np.where(np.arange(len(result.obs)) == 5, "alone", "rest")
    delta = np.array(result.delta_nll, dtype=np.float64)
    delta[:, 2] = 0.0  # a latent that changes nothing anywhere
    result = _with(result, g=groups).replace(delta_nll=delta)
    table = result.group_stats("g")
    alone = table[table["group"] == "alone"].set_index("latent")
    assert (alone["n_cells"] == 1).all()
    assert alone["ci_low"].isna().all() and alone["ci_high"].isna().all()
    j = 0
    test = sps.mannwhitneyu(delta[5:6, j], np.delete(delta[:, j], 5), method="asymptotic")
    assert alone.loc["Z_0", "pval"] == pytest.approx(test.pvalue)
    assert alone.loc["Z_0", "auroc"] == pytest.approx(test.statistic / (len(delta) - 1))
    constant = table[table["latent"] == "Z_2"]
    assert constant["inactive"].all() and (constant["auroc"] == 0.5).all()
    assert (constant["pval"] == 1.0).all()
    assert not table.loc[table["latent"] != "Z_2", "inactive"].any()


def test_group_stats_refusals():
    result = demo_result()
    with pytest.raises(ConfigError, match="has no 'unique_delta_nll'.*refit=True"):
        result.group_stats(score="unique_delta_nll")
    with pytest.raises(ConfigError, match="Expected score in"):
        result.group_stats(score="nope")  # type: ignore[arg-type]
    with pytest.raises(IncompatibleDataError, match="'nope' is not in the result's obs"):
        result.group_stats("nope")
    bare = result.replace(settings={**result.settings, "groupby": ""})
    with pytest.raises(ConfigError, match="without groupby; pass groupby="):
        bare.group_stats()
    # one group of all cells: no "other" cells to compare with
    table = _with(result, one="x").group_stats("one")
    assert table["auroc"].isna().all() and table["padj"].isna().all()


def test_unique_delta_nll_score_is_used_when_present():
    result = demo_result()
    unique = np.asarray(result.delta_nll) * 0.5 + 1.0
    table = result.replace(unique_delta_nll=unique).group_stats(score="unique_delta_nll")
    plain = result.group_stats()
    np.testing.assert_allclose(table["mean"], plain["mean"] * 0.5 + 1.0, rtol=1e-6)
    np.testing.assert_allclose(table["auroc"], plain["auroc"])


def test_associations_against_scipy():
    result = demo_result()
    rng = np.random.default_rng(3)
    n = len(result.obs)
    depth = rng.normal(size=n)
    depth[[1, 4, 9]] = np.nan
    result = _with(result, depth=depth, empty=np.full(n, np.nan))
    table = result.associations(columns=["depth", "cell_type", "empty"])
    assert len(table) == 3 * 2 * len(result.latent_names)
    scores = {
        "latent": np.asarray(result.latent, dtype=np.float64),
        "delta_nll": np.asarray(result.delta_nll, dtype=np.float64),
    }
    keep = np.isfinite(depth)
    labels = result.obs["cell_type"].astype(str).to_numpy()
    for r in table.itertuples():
        j = result.latent_names.index(r.latent)
        y = scores[r.score][:, j]
        if r.covariate == "depth":
            rho, p = sps.spearmanr(depth[keep], y[keep])
            assert (r.kind, r.test, r.n_cells, r.n_dropped) == ("numeric", "spearman", n - 3, 3)
            assert r.statistic == pytest.approx(rho) and r.effect_size == pytest.approx(rho)
            assert r.pval == pytest.approx(p)
        elif r.covariate == "cell_type":
            h, p = sps.kruskal(*(y[labels == g] for g in sorted(set(labels))))
            assert (r.kind, r.test, r.n_cells, r.n_dropped) == ("categorical", "kruskal", n, 0)
            assert r.statistic == pytest.approx(h) and r.pval == pytest.approx(p)
            assert r.effect_size == pytest.approx(h / (n - 1))
        else:  # all-NaN covariate: every cell dropped, nothing tested
            assert (r.n_cells, r.n_dropped) == (0, n)
            assert np.isnan([r.statistic, r.effect_size, r.pval, r.padj]).all()
    tested = table["pval"].notna()
    np.testing.assert_allclose(
        table.loc[tested, "padj"], sps.false_discovery_control(table.loc[tested, "pval"])
    )


def test_associations_default_columns_and_data():
    result = demo_result()
    bare = result.replace(obs=result.obs[["batch"]])
    adata = anndata.read_h5ad(demo_files() / "counts.h5ad")
    adata.obs["score"] = np.arange(adata.n_obs, dtype=float)
    adata.obs["barcode"] = adata.obs_names.astype(str)  # one level per cell: skipped
    table = bare.associations(adata)
    assert set(table["covariate"]) == {"batch", "planted", "group", "cell_type", "score"}
    with pytest.raises(IncompatibleDataError, match=r"\['nope'\] are not obs columns"):
        bare.associations(columns=["nope"])
    other = adata[:10].copy()
    with pytest.raises(IncompatibleDataError, match="70 cells of the result are not in the data"):
        bare.associations(other)


def test_summary_marks_significant_entries():
    text = demo_result().summary()
    assert "* higher in the group than in the other cells (BH padj < 0.05)" in text
    table = demo_result().group_stats()
    starred = {key for key, mark in stats.significant_marks(table).items() if mark}
    for line in text.splitlines():
        for group, latent in starred:
            if line.strip().startswith(f"{group}:") and f" {latent} " in f" {line} ":
                pytest.fail(f"{latent} in {group} should carry a star: {line}")
    assert text.count("*") >= 2
