"""Attribution (linear_decoder_jax.attribution): per-gene group scores and Shapley values against
brute force written independently in numpy float64, and every identity of the module docstring."""

from __future__ import annotations

import itertools
import math

import jax
import numpy as np
import pandas as pd
import pytest
from helpers import plan_for, random_adata, random_model
from scipy.special import gammaln

from linear_decoder_jax import ablation, attribution, options, pipeline, results, schema
from linear_decoder_jax.errors import ConfigError

EPS = 1e-8
LIKELIHOODS = [
    {"gene_likelihood": "nb"},
    {"gene_likelihood": "zinb"},
    {"gene_likelihood": "poisson", "n_batch": 1},
    {"gene_likelihood": "nb", "latent_distribution": "ln", "dispersion": "gene-batch"},
]
IDS = ["nb", "zinb", "poisson", "ln"]
GROUPS = ("A", "B", "empty", "solo")


def _softplus(x):
    return np.logaddexp(0.0, x)


def loglik(x, mu, theta, zi, likelihood):
    """Per-gene log-likelihood, scvi-tools' formulas in numpy float64."""
    if likelihood == "poisson":
        return x * np.log(mu) - mu - gammaln(x + 1)
    lg = gammaln(x + theta) - gammaln(theta) - gammaln(x + 1)
    log_tm = np.log(theta + mu + EPS)
    x_log = x * (np.log(mu + EPS) - log_tm)
    if likelihood == "nb":
        return theta * (np.log(theta + EPS) - log_tm) + x_log + lg
    sp = _softplus(-zi)
    pi_theta_log = -zi + theta * (np.log(theta + EPS) - log_tm)
    zero = _softplus(pi_theta_log) - sp
    nonzero = -sp + pi_theta_log + x_log + lg
    return np.where(x < EPS, zero, nonzero)


class Truth:
    """Decoder inputs, library and counts of every cell, and a numpy float64 decode."""

    def __init__(self, model, adata):
        data = model.prepare(adata)
        self.model, self.data = model, data
        self.x = np.asarray(data.rows(0, data.n_obs), np.float64)
        with model.precision():  # counts in the model's dtype, as the run encodes them
            x = self.x.astype(model.dtype)
            enc = pipeline.encode(model.family, model.params, x, data.batch, data.label)
            z, lib = enc.z, enc.log_library
        self.z = np.asarray(z, np.float64)
        self.lib = np.asarray(lib, np.float64)[:, 0]
        self.lik = model.config.gene_likelihood

    def decode(self, z):
        d = self.model.decode(
            z, batch_index=self.data.batch, label_index=self.data.label, library=self.lib
        )
        zi = None if d.zi_logits is None else np.asarray(d.zi_logits, np.float64)
        return np.asarray(d.scale, np.float64), np.asarray(d.theta, np.float64), zi

    def gene_ll(self, z):
        """(cells, genes) log-likelihood and log rho for decoder input ``z``."""
        scale, theta, zi = self.decode(z)
        mu = np.exp(self.lib)[:, None] * scale
        return loglik(self.x, mu, theta, zi, self.lik), np.log(scale)


def execute(model, adata, scorers, *, baseline, groups=None, batch_size=16, **plan_kw):
    """Run ``scorers(plan, place)`` over the cells; (per-cell rows, finished totals)."""
    data = model.prepare(adata)
    names = GROUPS if groups is not None else ()
    plan = plan_for(
        model, data.n_obs, baseline, batch_size=batch_size, group_names=names, **plan_kw
    )
    with model.precision():
        place = pipeline.Placement(plan.devices)
        made = scorers(plan, place)
        sizes = {"obs": data.n_obs, "ablated": len(plan.latents), "latent": model.n_latent}
        fields = [schema.BY_NAME[k] for s in made for k in s.fields]
        sink = {f.name: np.empty(schema.shape(f, sizes)) for f in fields}
        totals = pipeline.execute(
            model.family, model.params, data, plan, made, sink, place=place, groups=groups
        )
    return sink, totals


def gene_run(model, adata, *, baseline, mode, groups):
    def make(plan, place):
        return [
            ablation.SweepScorer(model.family, model.params, plan, place=place, gene_scores=True)
        ]

    return execute(model, adata, make, baseline=baseline, groups=groups, mode=mode)


def shapley_run(model, adata, *, baseline, method="exact", n_permutations=0, seed=0):
    def make(plan, place):
        return [
            attribution.ShapleyScorer(
                model.family,
                model.params,
                plan,
                place=place,
                method=method,
                n_permutations=n_permutations,
            )
        ]

    return execute(model, adata, make, baseline=baseline, seed=seed)[0]


def group_codes(n_obs: int) -> np.ndarray:
    """A, B alternate; "empty" has no cell, "solo" one; the last cell has no group (-1)."""
    codes = np.arange(n_obs, dtype=np.int32) % 2
    codes[3] = 3
    codes[-1] = -1
    return codes


# -- per-gene scores -------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", LIKELIHOODS, ids=IDS)
@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_gene_scores_match_brute_force(cfg, mode):
    model = random_model(seed=2, dtype="float64", **cfg)
    adata = random_adata(model, n_obs=37, seed=3)
    truth = Truth(model, adata)
    base = np.linspace(-0.2, 0.3, model.n_latent)
    codes = group_codes(adata.n_obs)
    _, totals = gene_run(model, adata, baseline=base, mode=mode, groups=codes)

    ll_full, log_rho = truth.gene_ll(truth.z)
    delta, lfc = [], []
    for k in range(model.n_latent):  # brute force: decode every ablated matrix, gene by gene
        za = truth.z.copy()
        if mode == "drop":
            za[:, k] = base[k]
        else:
            za[:] = base
            za[:, k] = truth.z[:, k]
        ll, lr = truth.gene_ll(za)
        delta.append(ll_full - ll)
        lfc.append(lr - log_rho)
    delta, lfc = np.stack(delta, 1), np.stack(lfc, 1)  # (cells, latents, genes)
    rows = [codes == r for r in range(len(GROUPS))] + [np.ones(adata.n_obs, bool)]
    n = np.array([m.sum() for m in rows], float)
    np.testing.assert_array_equal(totals["gene_n_cells"], n)
    assert n[2] == 0 and n[3] == 1
    for r, m in enumerate(rows):
        if n[r] == 0:
            assert np.isnan(totals["gene_delta_nll"][r]).all()
            assert np.isnan(totals["gene_lfc"][r]).all()
            continue
        np.testing.assert_allclose(
            totals["gene_delta_nll"][r], delta[m].mean(0), rtol=1e-8, atol=1e-9
        )
        np.testing.assert_allclose(totals["gene_lfc"][r], lfc[m].mean(0), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("cfg", LIKELIHOODS, ids=IDS)
@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_gene_scores_sum_to_the_sweep(cfg, mode):
    """(G1) summed over genes, each group's gene scores give its cells' delta_nll; (G3) the
    all-cells lfc row is mean_lfc. float32, to its rounding."""
    model = random_model(seed=4, **cfg)
    adata = random_adata(model, n_obs=45, seed=5)
    codes = group_codes(adata.n_obs)
    sink, totals = gene_run(
        model, adata, baseline=np.full(model.n_latent, 0.1), mode=mode, groups=codes
    )
    delta, n = sink["delta_nll"], totals["gene_n_cells"]
    rows = [codes == r for r in range(len(GROUPS))] + [np.ones(adata.n_obs, bool)]
    scale = np.abs(sink["nll"]).max() * 1e-6 + 1e-5
    for r, m in enumerate(rows):
        if n[r]:
            got = totals["gene_delta_nll"][r].astype(np.float64).sum(-1) * n[r]
            assert np.abs(got - delta[m].sum(0)).max() <= scale * n[r]
    np.testing.assert_allclose(totals["gene_lfc"][-1].T, totals["mean_lfc"], rtol=1e-4, atol=1e-5)


def test_gene_budget_is_refused_naming_the_options():
    attribution.check_gene_budget(10, 10, 2000, budget=2**30)
    with pytest.raises(ConfigError, match="fewer `latents`.*groupby"):
        attribution.check_gene_budget(1000, 50, 30000, budget=2**30)


# -- Shapley values --------------------------------------------------------------------------------
def brute_force_shapley(truth: Truth, base: np.ndarray):
    """(gain, phi) by enumerating coalitions with itertools, NLL summed in numpy float64."""
    k = truth.z.shape[1]

    def nll(coalition):
        z = np.broadcast_to(base, truth.z.shape).copy()
        z[:, list(coalition)] = truth.z[:, list(coalition)]
        return -truth.gene_ll(z)[0].sum(1)

    empty = nll(())
    value = {
        s: empty - nll(s) for size in range(k + 1) for s in itertools.combinations(range(k), size)
    }
    phi = np.zeros_like(truth.z)
    for j in range(k):
        others = [i for i in range(k) if i != j]
        for size in range(k):
            weight = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
            for s in itertools.combinations(others, size):
                with_j = tuple(sorted((*s, j)))
                phi[:, j] += weight * (value[with_j] - value[s])
    return value[tuple(range(k))], phi


@pytest.mark.parametrize("cfg", LIKELIHOODS, ids=IDS)
@pytest.mark.parametrize("n_latent", [3, 6])
def test_exact_shapley_matches_brute_force(cfg, n_latent):
    model = random_model(seed=6, dtype="float64", n_latent=n_latent, **cfg)
    adata = random_adata(model, n_obs=21, seed=7)
    base = np.linspace(0.05, -0.1, n_latent)
    sink = shapley_run(model, adata, baseline=base)
    gain, phi = brute_force_shapley(Truth(model, adata), base)
    np.testing.assert_allclose(sink["gain_nll"], gain, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(sink["shapley_nll"], phi, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("cfg", LIKELIHOODS, ids=IDS)
def test_additivity_to_float32_rounding(cfg):
    """(S4), (S7): exact values and every permutation estimate sum to the gain."""
    model = random_model(seed=8, n_latent=6, **cfg)
    adata = random_adata(model, n_obs=40, seed=9)
    base = np.full(6, 0.1)
    for sink in (
        shapley_run(model, adata, baseline=base),
        shapley_run(model, adata, baseline=base, method="permutation", n_permutations=8),
    ):
        gain, phi = sink["gain_nll"], sink["shapley_nll"]
        tol = 1e-5 * max(np.abs(phi).max(), 1.0)
        assert np.abs(phi.sum(1) - gain).max() <= tol


def _edit_kernels(model, edit):
    """A copy of ``model`` with ``edit(kernel)`` applied to both decoder heads' kernels."""
    import linear_decoder_jax as ldj

    p = model.host_params
    heads = {}
    for name in ("factor", "dropout"):
        head = getattr(p.decoder, name)
        kernel = np.array(head.dense.kernel)
        edit(kernel)
        heads[name] = head._replace(dense=head.dense._replace(kernel=kernel))
    return ldj.LinearSCVI(p._replace(decoder=p.decoder._replace(**heads)), model.spec)


def _batch_values(model, adata, base, z_edit):
    """(gain, phi) of shapley_exact on the first minibatch with decoder inputs edited."""
    data = model.prepare(adata)
    plan = plan_for(model, data.n_obs, base, batch_size=32)
    with model.precision():
        place = pipeline.Placement(plan.devices)
        _, _, batch = next(pipeline.batches(model.family, model.params, data, plan, place=place))
        batch = batch._replace(z=z_edit(np.asarray(batch.z)))
        gain, phi = attribution.shapley_exact(
            model.family, model.params, batch, np.asarray(base, batch.z.dtype)
        )
    return np.asarray(gain), np.asarray(phi)


@pytest.mark.parametrize("cfg", LIKELIHOODS[:2], ids=IDS[:2])
def test_symmetry_and_null_latent(cfg):
    """(S5) latents 0 and 1 identical (loadings, input, baseline): equal values; latent 3 with zero
    loadings in both heads: 0."""

    def edit(kernel):
        kernel[1] = kernel[0]
        kernel[3] = 0.0

    model = _edit_kernels(random_model(seed=10, **cfg), edit)
    adata = random_adata(model, n_obs=30, seed=11)
    base = np.array([0.2, 0.2, -0.1, 0.3, 0.0])

    def same_input(z):
        z = z.copy()
        z[:, 1] = z[:, 0]
        return z

    gain, phi = _batch_values(model, adata, base, same_input)
    scale = np.abs(phi).max()
    np.testing.assert_allclose(phi[:, 0], phi[:, 1], rtol=0, atol=2e-6 * scale)
    assert np.abs(phi[:, 3]).max() <= 2e-6 * scale
    np.testing.assert_allclose(phi.sum(1), gain, rtol=0, atol=2e-6 * scale)


def test_permutation_within_four_standard_errors_of_exact():
    """(S7) on K = 8: unbiased, the reported SE covers the error; SE ~ 1 / sqrt(M)."""
    model = random_model(seed=12, n_latent=8, dtype="float64")
    adata = random_adata(model, n_obs=24, seed=13)
    base = np.full(8, -0.05)
    exact = shapley_run(model, adata, baseline=base)["shapley_nll"]
    small = shapley_run(model, adata, baseline=base, method="permutation", n_permutations=16)
    large = shapley_run(
        model, adata, baseline=base, method="permutation", n_permutations=256, seed=1
    )
    for est in (small, large):
        err = np.abs(est["shapley_nll"] - exact)
        assert (err <= 4 * est["shapley_nll_se"] + 1e-9).mean() >= 0.99
        assert (est["shapley_nll_se"] > 0).mean() > 0.9
    ratio = np.median(small["shapley_nll_se"] / large["shapley_nll_se"])
    assert 4 / 1.4 < ratio < 4 * 1.4  # sqrt(256 / 16)


def test_agrees_with_the_plain_sweep():
    """(S6): one latent, phi = G = drop delta_nll; two latents, phi_1 = (G + drop - keep) / 2."""
    for k in (1, 2):
        model = random_model(seed=14, n_latent=k, dtype="float64")
        adata = random_adata(model, n_obs=30, seed=15)
        base = np.full(k, 0.15)

        def sweep(mode, model=model, adata=adata, base=base):
            def make(plan, place):
                return [ablation.SweepScorer(model.family, model.params, plan, place=place)]

            return execute(model, adata, make, baseline=base, mode=mode)[0]["delta_nll"]

        sink = shapley_run(model, adata, baseline=base)
        gain, phi = sink["gain_nll"], sink["shapley_nll"]
        drop = sweep("drop")
        if k == 1:
            np.testing.assert_allclose(phi[:, 0], gain, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(gain, drop[:, 0], rtol=1e-8, atol=1e-8)
        else:
            keep = sweep("keep")
            np.testing.assert_allclose(
                phi[:, 0], (gain + drop[:, 0] - keep[:, 0]) / 2, rtol=1e-8, atol=1e-8
            )


def test_shapley_matrix_identities():
    """(S3) columns of M sum to 0; (S4) rows sum to +1 at N, -1 at the empty set, else 0."""
    for k in (1, 3, 7):
        m = attribution.shapley_matrix(k)
        np.testing.assert_allclose(m.sum(0), 0.0, atol=1e-12)
        rows = np.zeros(2**k)
        rows[0], rows[-1] = -1.0, 1.0
        np.testing.assert_allclose(m.sum(1), rows, atol=1e-12)


def test_group_shares_sum_to_one():
    """(S8) per group, the shares of the mean gain add up to 1."""
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(50, 4)) + 1.0
    gain = phi.sum(1)
    labels = pd.Categorical(rng.choice(["a", "b"], 50), categories=["a", "b", "c"])
    table = results.explained_shares(gain, phi, labels, ["Z_0", "Z_1", "Z_2", "Z_3"])
    assert list(table.index) == ["a", "b", "c", "all cells"]
    np.testing.assert_allclose(table.loc[["a", "b", "all cells"]].sum(1), 1.0)
    assert table.loc["c"].isna().all()


def test_refusals():
    with pytest.raises(ConfigError, match="permutation"):
        options.ShapleyOptions("exact", 0).check(13)
    with pytest.raises(ConfigError, match="even n_permutations"):
        options.ShapleyOptions("permutation", 5)
    with pytest.raises(ConfigError, match="even n_permutations"):
        options.ShapleyOptions("auto", 3)
    assert options.ShapleyOptions("auto").method(12) == "exact"
    assert options.ShapleyOptions("auto").method(13) == "permutation"
    assert options.ShapleyOptions("exact").method(13) == "exact"  # refused by check(13)
    with pytest.raises(ConfigError, match="shapley one of"):
        options.ShapleyOptions("kernel", 0)  # type: ignore[arg-type]


def test_permutation_key_reproducible():
    model = random_model(seed=16, n_latent=5)
    adata = random_adata(model, n_obs=20, seed=17)
    base = np.zeros(5)
    a = shapley_run(model, adata, baseline=base, method="permutation", n_permutations=8, seed=3)
    b = shapley_run(model, adata, baseline=base, method="permutation", n_permutations=8, seed=3)
    c = shapley_run(model, adata, baseline=base, method="permutation", n_permutations=8, seed=4)
    np.testing.assert_array_equal(a["shapley_nll"], b["shapley_nll"])
    assert not np.array_equal(a["shapley_nll"], c["shapley_nll"])
    assert jax.numpy.isfinite(a["shapley_nll_se"]).all()


# -- through the pipeline: API, streaming, shards, CLI ---------------------------------------------
def test_api_streamed_and_merged_shards_agree(tmp_path):
    import linear_decoder_jax as ldj
    from linear_decoder_jax.merge import merge_parts

    model = random_model(seed=18, dtype="float64")
    adata = random_adata(model, n_obs=30, seed=19)
    kw = {"groupby": "group", "gene_scores": True, "shapley": "exact", "batch_size": 8}
    whole = ldj.ablate(model, adata, **kw)
    parts = [tmp_path / f"p{i}.h5ad" for i in range(3)]
    for i, path in enumerate(parts):
        ldj.ablate(model, adata, **kw, shard=(i, 3), output=path)
    merged = merge_parts(parts, tmp_path / "m.h5ad")
    for name in ("gene_delta_nll", "gene_lfc", "gene_n_cells", "gain_nll", "shapley_nll"):
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), rtol=1e-9)
    pd.testing.assert_frame_equal(merged.explained(), whole.explained())
    table = whole.gene_table("Z_1", group="A", n_top=4)
    assert list(table.columns) == ["delta_nll", "lfc"] and len(table) == 4
    assert table["delta_nll"].is_monotonic_decreasing
    assert set(whole.gene_table(1).index) == set(adata.var_names)
    np.testing.assert_allclose(whole.shapley.sum(1), whole.gain, rtol=1e-9, atol=1e-9)


def test_api_refusals():
    import linear_decoder_jax as ldj

    model = random_model(seed=20, n_latent=13)
    adata = random_adata(model, n_obs=10, seed=21)
    with pytest.raises(ConfigError, match="shapley='permutation'"):
        ldj.ablate(model, adata, shapley="exact")
    with pytest.raises(ConfigError, match="n_samples=0"):
        ldj.ablate(model, adata, gene_scores=True, n_samples=2)
    res = ldj.ablate(model, adata)
    with pytest.raises(ldj.IncompatibleDataError, match="gene_scores=True"):
        res.gene_table(0)


def test_cli_flags(tmp_path):
    from linear_decoder_jax.cli import main

    model = random_model(seed=22)
    adata = random_adata(model, n_obs=16, seed=23)
    model.save(tmp_path / "model")
    adata.write_h5ad(tmp_path / "cells.h5ad")
    out = tmp_path / "out.h5ad"
    args = [str(tmp_path / "model"), str(tmp_path / "cells.h5ad"), "-o", str(out)]
    flags = ["--groupby", "group", "--gene-scores", "--shapley", "permutation"]
    assert main(["ablate", *args, *flags, "--n-permutations", "4"]) == 0
    import linear_decoder_jax as ldj

    res = ldj.AblationResult.read(out)
    assert res.shapley_nll_se.shape == (16, model.n_latent)
    assert res.gene_delta_nll.shape == (4, model.n_latent, model.config.n_input)
    assert list(res.explained().index) == ["A", "B", "C", "all cells"]


def test_plots_use_the_group_scores(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import anndata

    import linear_decoder_jax as ldj

    model = random_model(seed=24)
    adata = random_adata(model, n_obs=24, seed=25)
    res = ldj.ablate(model, adata, groupby="group", gene_scores=True, shapley="exact")
    ax = ldj.pl.explained(res)
    np.testing.assert_allclose(ax.images[0].get_array(), res.explained().to_numpy())
    ax = ldj.pl.latent_genes(res, "Z_2", 5, group="B")
    widths = [p.get_width() for p in ax.patches]
    np.testing.assert_allclose(widths, res.gene_table(2, group="B", n_top=5)["delta_nll"])
    res.write(tmp_path / "r.h5ad")
    top = ldj.pl.top_genes(anndata.read_h5ad(tmp_path / "r.h5ad"), "Z_2", 5, group="B")
    assert list(top["gene"]) == list(res.gene_table(2, group="B", n_top=5).index)
    with pytest.raises(ConfigError, match="Unknown group"):
        ldj.pl.latent_genes(res, "Z_2", group="nope")


def test_shards_missing_a_group_merge_to_the_whole(tmp_path):
    """A group whose cells all sit in one shard: every shard still lists every group (taken over
    all input cells), so the gene tables line up and merge to the whole run."""
    import linear_decoder_jax as ldj
    from linear_decoder_jax.merge import merge_parts

    model = random_model(seed=18, dtype="float64")
    adata = random_adata(model, n_obs=30, seed=19)
    group = adata.obs["group"].astype(str).to_numpy().copy()
    group[:4] = "first_shard_only"
    adata.obs["group"] = group
    kw = {"groupby": "group", "gene_scores": True, "batch_size": 8}
    whole = ldj.ablate(model, adata, **kw)
    parts = [tmp_path / f"p{i}.h5ad" for i in range(3)]
    for i, path in enumerate(parts):
        part = ldj.ablate(model, adata, **kw, shard=(i, 3), output=path)
        assert list(part.settings["gene_groups"]) == list(whole.settings["gene_groups"])
    merged = merge_parts(parts, tmp_path / "m.h5ad")
    for name in ("gene_delta_nll", "gene_lfc", "gene_n_cells"):
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), rtol=1e-9)
