"""The ablation engine against a brute-force loop over latents (no scvi-tools needed)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import random_adata, random_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import linear_decoder_jax as ldj
from linear_decoder_jax import ablation


def brute_force(model, adata, *, baseline, mode="drop", latents=None, library="model"):
    """delta_nll by decoding every ablated latent matrix in full, one latent at a time."""
    data = model.prepare(adata)
    z = model.get_latent_representation(adata)
    x = np.asarray(data.rows(0, data.n_obs), np.float64)
    if library == "observed":
        lib = np.log(x.sum(1))
    else:
        lib = model.encode(data)["library"][:, 0]

    def nll(zz):
        dec = model.decode(zz, batch_index=data.batch, label_index=data.label, library=lib)
        import jax.numpy as jnp

        from linear_decoder_jax.distributions import log_prob

        lp = log_prob(
            jnp.asarray(x, np.float32),
            jnp.asarray(dec.mu),
            jnp.asarray(dec.theta),
            None if dec.zi_logits is None else jnp.asarray(dec.zi_logits),
            likelihood=model.config.gene_likelihood,
        )
        return -np.asarray(lp).sum(1)

    full = nll(z)
    cols = []
    for k in latents if latents is not None else range(model.n_latent):
        za = z.copy()
        if mode == "drop":
            za[:, k] = baseline[k]
        else:
            za[:] = baseline
            za[:, k] = z[:, k]
        cols.append(nll(za) - full)
    return np.stack(cols, 1), full


def assert_close(ours, ref, nll):
    tol = 5e-6 * np.abs(nll).max() + 1e-5 * np.abs(ref).max() + 1e-6
    assert np.abs(ours - ref).max() <= tol, (np.abs(ours - ref).max(), tol)


CONFIGS = [
    {},
    {"gene_likelihood": "zinb"},
    {"gene_likelihood": "poisson", "n_batch": 1},
    {"latent_distribution": "ln", "dispersion": "gene-batch"},
    {"dispersion": "gene-label", "decoder_batch_norm": False, "decoder_bias": True},
    {"use_observed_lib_size": True, "n_layers": 2},
]


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"
)
@pytest.mark.parametrize("mode", ["drop", "keep"])
@pytest.mark.parametrize("baseline", ["zero", "mean", "median", 0.5, "array"])
def test_matches_brute_force(cfg, mode, baseline):
    model = random_model(**cfg)
    adata = random_adata(model)
    spec = np.linspace(-1, 1, model.n_latent) if baseline == "array" else baseline
    res = ldj.ablate(model, adata, baseline=spec, mode=mode, batch_size=16)
    ref, full = brute_force(model, adata, baseline=res.settings["baseline_values"], mode=mode)
    assert_close(res.delta_nll, ref, full)
    np.testing.assert_allclose(res.nll, full, rtol=2e-6, atol=1e-4)
    assert res.delta_nll.shape == (adata.n_obs, model.n_latent)


@pytest.mark.parametrize("cfg", [{}, {"gene_likelihood": "zinb"}], ids=["nb", "zinb"])
@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_wide_logit_shifts_take_the_exact_normaliser(cfg, mode):
    """A latent whose logit shift spans more than ablation.SHIFT_SLACK over genes: the softmax
    shift is then the moved log softmax's maximum, not the bound read off the loadings."""
    model = random_model(seed=7, **cfg)
    adata = random_adata(model)

    def span(m):
        loadings = m.get_loadings().to_numpy()[:, 0]
        return np.abs(m.get_latent_representation(adata)[:, 0]) * np.ptp(loadings)

    p = model.host_params
    head = p.decoder.factor
    kernel = np.array(head.dense.kernel)  # rows: latents, then batch one-hot columns
    kernel[0] *= 3 * ablation.SHIFT_SLACK / np.median(span(model))
    head = head._replace(dense=head.dense._replace(kernel=kernel))
    model = ldj.LinearSCVI(p._replace(decoder=p.decoder._replace(factor=head)), model.spec)
    assert (span(model) > ablation.SHIFT_SLACK).mean() > 0.5  # most minibatches: exact path
    res = ldj.ablate(model, adata, mode=mode, batch_size=16)
    ref, full = brute_force(model, adata, baseline=res.settings["baseline_values"], mode=mode)
    assert_close(res.delta_nll, ref, full)
    assert np.isfinite(res.delta_l1).all() and np.isfinite(res.mean_lfc).all()


def test_baseline_statistics_are_over_all_cells():
    model = random_model()
    adata = random_adata(model, n_obs=50)
    z = model.get_latent_representation(adata)
    mean = ldj.ablate(model, adata, baseline="mean", batch_size=8).settings["baseline_values"]
    median = ldj.ablate(model, adata, baseline="median", batch_size=8).settings["baseline_values"]
    np.testing.assert_allclose(mean, z.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(median, np.median(z, 0), rtol=1e-6, atol=1e-7)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_obs=st.integers(1, 40),
    batch_size=st.integers(1, 17),
    subset=st.lists(st.integers(0, 4), min_size=1, max_size=5, unique=True),
    mode=st.sampled_from(["drop", "keep"]),
    sparse=st.booleans(),
    library=st.sampled_from(["model", "observed"]),
    seed=st.integers(0, 3),
)
def test_property_subsets_minibatches_sparse(
    n_obs, batch_size, subset, mode, sparse, library, seed
):
    model = random_model(seed=seed, gene_likelihood=["nb", "zinb", "poisson", "nb"][seed])
    adata = random_adata(model, n_obs=n_obs, seed=seed + 10)
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
    base = np.zeros(model.n_latent)
    res = ldj.ablate(
        model, adata, latents=subset, mode=mode, batch_size=batch_size, library=library
    )
    ref, full = brute_force(model, adata, baseline=base, mode=mode, latents=subset, library=library)
    assert_close(res.delta_nll, ref, full)
    assert res.settings["latent_names"] == [f"Z_{k}" for k in subset]
    assert list(res.settings["latents"]) == subset


def test_all_zero_cells_are_finite():
    for lib in (False, True):
        model = random_model(use_observed_lib_size=lib, gene_likelihood="zinb")
        adata = random_adata(model, zero_cells=3)
        res = ldj.ablate(model, adata, library="model")
        for arr in (res.delta_nll, res.delta_l1, res.nll, res.mean_lfc):
            assert np.isfinite(arr).all()


def test_shuffled_obs_keep_their_order():
    model = random_model()
    adata = random_adata(model, n_obs=30)
    res = ldj.ablate(model, adata, batch_size=7)
    perm = np.random.default_rng(0).permutation(adata.n_obs)
    shuffled = ldj.ablate(model, adata[perm].copy(), batch_size=7)
    np.testing.assert_array_equal(shuffled.obs_names, adata.obs_names[perm])
    np.testing.assert_allclose(shuffled.delta_nll, res.delta_nll[perm], rtol=1e-5, atol=1e-4)


def test_delta_l1_and_mean_lfc_definitions():
    model = random_model(latent_distribution="ln")
    adata = random_adata(model)
    res = ldj.ablate(model, adata)
    data = model.prepare(adata)
    z = model.get_latent_representation(adata)
    rho = model.decode(z, batch_index=data.batch).scale
    l1, lfc = [], []
    for k in range(model.n_latent):
        za = z.copy()
        za[:, k] = 0.0  # "ln": overwrite in decoder-input space, no renormalisation
        rho_k = model.decode(za, batch_index=data.batch).scale
        l1.append(np.abs(rho_k - rho).sum(1))
        lfc.append((np.log(rho_k) - np.log(rho)).mean(0))
    np.testing.assert_allclose(res.delta_l1, np.stack(l1, 1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.mean_lfc, np.stack(lfc, 1), rtol=1e-4, atol=1e-5)


def test_monte_carlo_mean_and_standard_error():
    model = random_model()
    adata = random_adata(model)
    res = ldj.ablate(model, adata, n_samples=64, seed=3)
    again = ldj.ablate(model, adata, n_samples=64, seed=3)
    np.testing.assert_array_equal(res.delta_nll, again.delta_nll)
    assert res.delta_nll_se is not None and (res.delta_nll_se >= 0).all()
    at_mean = ldj.ablate(model, adata)
    # the MC mean differs from the posterior-mean score, and agrees within a few standard errors
    assert not np.allclose(res.delta_nll, at_mean.delta_nll)
    z = np.abs(res.delta_nll - at_mean.delta_nll) / np.maximum(res.delta_nll_se, 1e-6)
    assert np.median(z) < 10


def test_float64_option_agrees():
    m32 = random_model()
    m64 = random_model(dtype="float64")
    adata = random_adata(m32)
    r32, r64 = ldj.ablate(m32, adata), ldj.ablate(m64, adata)
    assert r64.delta_nll.dtype == np.float64 and r32.delta_nll.dtype == np.float32
    assert_close(r32.delta_nll, r64.delta_nll, r64.nll)


def test_group_tables_and_top_cells():
    model = random_model()
    adata = random_adata(model, n_obs=60)
    res = ldj.ablate(model, adata, groupby="group")
    g = adata.obs["group"].to_numpy()
    for name in ("A", "B", "C"):
        block = res.delta_nll[g == name]
        np.testing.assert_allclose(
            res.groups["mean"].loc[name].to_numpy(), block.mean(0), rtol=1e-6
        )
        np.testing.assert_allclose(
            res.groups["median"].loc[name].to_numpy(), np.median(block, 0), rtol=1e-6
        )
        np.testing.assert_allclose(
            res.groups["frac_positive"].loc[name].to_numpy(), (block > 0).mean(0)
        )
        assert res.groups["n_cells"].loc[name, "n_cells"] == (g == name).sum()
    top = res.top_cells()
    best = top[(top.latent == "Z_0") & (top["rank"] == 1)].cell.item()
    assert best == adata.obs_names[np.argmax(res.delta_nll[:, 0])]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "both"}, "mode"),
        ({"baseline": "average"}, "baseline"),
        ({"baseline": [1.0, 2.0]}, "baseline values"),
        ({"latents": [0, 9]}, "out of range"),
        ({"latents": [1, 1]}, "Duplicated"),
        ({"library": "size"}, "library"),
        ({"groupby": "nope"}, "groupby"),
    ],
)
def test_bad_options_raise(kwargs, match):
    model = random_model()
    adata = random_adata(model)
    with pytest.raises(ldj.LDJError, match=match):
        ldj.ablate(model, adata, **kwargs)
