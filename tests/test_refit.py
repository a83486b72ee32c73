"""Refit ablation (unique contribution): scipy agreement, semantics, definitions, plumbing."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import plan_for, random_adata, random_model
from scipy import optimize, special

import linear_decoder_jax as ldj
from linear_decoder_jax import pipeline, refit
from linear_decoder_jax.cli import main
from linear_decoder_jax.config import ModelSpec

EPS = 1e-8  # scvi-tools log_nb_positive / log_zinb_positive eps
TESTS = Path(__file__).parent


# -- an independent numpy/scipy objective with its analytic gradient ------------------------------
def log_lik_and_grads(x, mu, theta, zi, likelihood):
    """Per-gene log p(x | mu, theta, zi) (scvi-tools formulas, all constants) and d/dmu, d/dzi."""
    if likelihood == "poisson":
        return x * np.log(mu) - mu - special.gammaln(x + 1), x / mu - 1.0, None
    log_tm = np.log(theta + mu + EPS)
    lgam = special.gammaln(x + theta) - special.gammaln(theta) - special.gammaln(x + 1)
    x_part = x * (np.log(mu + EPS) - log_tm)
    dx_part = x / (mu + EPS) - x / (theta + mu + EPS)
    if likelihood == "nb":
        ll = theta * (np.log(theta + EPS) - log_tm) + x_part + lgam
        return ll, dx_part - theta / (theta + mu + EPS), None
    a = -zi + theta * (np.log(theta + EPS) - log_tm)  # pi_theta_log
    da_dmu = -theta / (theta + mu + EPS)
    sp_neg_zi = np.logaddexp(0.0, -zi)
    zero, nonzero = x < EPS, x > EPS
    ll = np.where(zero, np.logaddexp(0.0, a) - sp_neg_zi, 0.0)
    ll = ll + np.where(nonzero, -sp_neg_zi + a + x_part + lgam, 0.0)
    sig_a, sig_neg_zi = special.expit(a), special.expit(-zi)
    dmu = np.where(zero, sig_a * da_dmu, 0.0) + np.where(nonzero, da_dmu + dx_part, 0.0)
    dzi = np.where(zero, -sig_a + sig_neg_zi, 0.0) + np.where(nonzero, sig_neg_zi - 1.0, 0.0)
    return ll, dmu, dzi


class Cell:
    """J(z) = -log p(x | z) + 0.5 ||z||^2 for one cell of a Gaussian-latent model, in float64."""

    def __init__(self, model, adata, c):
        data = model.prepare(adata)
        dec = model.get_affine_decoder()
        b = int(data.batch[c])
        self.x = np.asarray(data.rows(c, c + 1)[0], np.float64)
        self.lib = float(model.encode(data)["library"][c, 0])
        self.L = dec.scale.loadings.astype(np.float64)
        self.o = (dec.scale.offsets[b] + dec.scale.intercept).astype(np.float64)
        self.Lz = self.oz = None
        if dec.zi_logits is not None:
            self.Lz = dec.zi_logits.loadings.astype(np.float64)
            self.oz = (dec.zi_logits.offsets[b] + dec.zi_logits.intercept).astype(np.float64)
        px_r = np.asarray(model.host_params.px_r, np.float64)
        self.theta = np.exp(px_r if px_r.ndim == 1 else px_r[:, b])
        self.lik = model.config.gene_likelihood
        self.qz_m = model.get_latent_representation(adata, return_dist=True)[0][c].astype(float)

    def nll(self, w):
        """-log p(x | w) and its gradient in the decoder input ``w``."""
        eta = self.L @ w + self.o
        rho = special.softmax(eta)
        mu = np.exp(self.lib) * rho
        zi = None if self.Lz is None else self.Lz @ w + self.oz
        ll, dmu, dzi = log_lik_and_grads(self.x, mu, self.theta, zi, self.lik)
        a = dmu * mu
        d_eta = a - rho * a.sum()
        grad = self.L.T @ d_eta
        if self.Lz is not None:
            grad = grad + self.Lz.T @ dzi
        return -ll.sum(), -grad

    def __call__(self, z):
        value, grad = self.nll(z)
        return value + 0.5 * z @ z, grad + z

    def minimize(self, z0, fixed=None, value=0.0):
        bounds = [(None, None)] * len(z0)
        z0 = np.array(z0, dtype=np.float64)
        if fixed is not None:
            bounds[fixed] = (value, value)
            z0[fixed] = value
        return lbfgs(self, z0, bounds)


def lbfgs(fun, x0, bounds=None):
    res = optimize.minimize(
        fun,
        x0,
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 10_000, "maxcor": 20},
    )
    return res.fun, res.x


class LnCell(Cell):
    """J(u) = -log p(x | softmax(u)) + 0.5 ||u||^2 for one cell of an "ln" model; the constrained
    problem softmax(u)_k = b in the free coordinates u_-k, u_k = logit(b) + logsumexp(u_-k)."""

    def __call__(self, u):
        w = special.softmax(u)
        value, g = self.nll(w)
        return value + 0.5 * u @ u, w * (g - w @ g) + u

    @staticmethod
    def complete(free, k, b):
        return np.insert(free, k, special.logit(b) + special.logsumexp(free))

    def constrained(self, free, k, b):
        value, grad = self(self.complete(free, k, b))
        return value, np.delete(grad, k) + grad[k] * special.softmax(free)

    def minimize(self, u0, fixed=None, value=0.0):
        if fixed is None:
            return lbfgs(self, np.asarray(u0, np.float64))
        fun, free = lbfgs(lambda f: self.constrained(f, fixed, value), np.delete(u0, fixed))
        return fun, self.complete(free, fixed, value)


def scipy_unique(cell, baseline, n_latent):
    """min over z_k = b_k minus min over z, the same protocol (start points, restart) as ours."""
    full, z_full = cell.minimize(cell.qz_m)
    con = [cell.minimize(z_full, fixed=k, value=baseline[k]) for k in range(n_latent)]
    best = min(range(n_latent), key=lambda k: con[k][0])
    if con[best][0] < full:  # non-convex: restart the full fit from the lower point
        full = min(full, cell.minimize(con[best][1])[0])
    return full, np.array([v for v, _ in con])


N_OBS = 16  # one lane shape for every test: the solver compiles once per model configuration
N_SCIPY = 6  # cells checked against scipy

LIKELIHOODS = [
    {"gene_likelihood": "nb"},
    {"gene_likelihood": "zinb"},
    {"gene_likelihood": "poisson", "n_batch": 1},
]


def refit_sweep(model, adata, baseline, *, vectorize=False):
    """The refit scorer's scores per minibatch (valid rows), to read the full optimum values."""
    data = model.prepare(adata)
    plan = plan_for(model, data.n_obs, baseline, vectorize=vectorize)
    scorer = refit.RefitScorer(
        model.family, model.params, plan, optimizer="lbfgs", steps=100, tol=1e-6
    )
    out = []
    with model.precision():
        place = pipeline.Placement(plan.devices)
        for _, n_valid, batch in pipeline.batches(
            model.family, model.params, data, plan, place=place
        ):
            with jax.enable_x64(True):
                scores = scorer.minibatch(batch)
            out.append(refit.RefitScores(*(a[:n_valid] for a in scores)))
    return out


@pytest.fixture(scope="module", params=LIKELIHOODS, ids=lambda c: c["gene_likelihood"])
def refitted(request):
    """A float64 model, its plain + refit result and our optimum values."""
    model = random_model(seed=3, dtype="float64", **request.param)
    adata = random_adata(model, n_obs=N_OBS, seed=4)
    res = ldj.ablate(model, adata, refit=True, refit_tol=1e-6)
    scores = refit_sweep(model, adata, np.zeros(model.n_latent))
    objective = np.concatenate([s.objective for s in scores])
    return model, adata, res, objective


def test_vmapped_lanes_match_mapped_lanes(refitted):
    """The accelerator path (lanes vmapped, ``Plan.vectorize``) equals the CPU one (lax.map)."""
    model, adata, res, objective = refitted
    if model.config.gene_likelihood != "zinb":
        pytest.skip("one likelihood is enough (it compiles the solver once more)")
    other = refit_sweep(model, adata, np.zeros(model.n_latent), vectorize=True)
    np.testing.assert_allclose(np.concatenate([s.objective for s in other]), objective, rtol=1e-12)
    unique = np.concatenate([s.unique_delta_nll for s in other])
    np.testing.assert_allclose(unique, res.unique_delta_nll, atol=1e-9)


def test_matches_scipy(refitted):
    model, adata, res, objective = refitted
    k = model.n_latent
    worst_full = worst_con = worst_unique = 0.0
    for c in range(N_SCIPY):
        cell = Cell(model, adata, c)
        full, con = scipy_unique(cell, np.zeros(k), k)
        ours_con = objective[c] + res.unique_delta_nll[c]
        worst_full = max(worst_full, abs(objective[c] - full) / abs(full))
        worst_con = max(worst_con, np.max(np.abs(ours_con - con) / np.abs(con)))
        worst_unique = max(worst_unique, np.max(np.abs(res.unique_delta_nll[c] - (con - full))))
    print(
        f"\n{model.config.gene_likelihood}: max rel diff full {worst_full:.1e}, constrained "
        f"{worst_con:.1e}; max abs diff unique_delta {worst_unique:.1e} nats"
    )
    assert worst_full <= 1e-4 and worst_con <= 1e-4
    assert worst_unique <= 1e-5
    assert res.refit_converged.all()


def test_unique_is_nonnegative_and_diagnostics(refitted):
    model, adata, res, *_ = refitted
    assert (res.unique_delta_nll >= 0).all()  # exactly, by construction
    assert res.refit_grad_norm.shape == res.delta_nll.shape
    assert (res.refit_grad_norm <= 1e-6).all()
    assert res.settings["refit"] and res.settings["refit_optimizer"] == "lbfgs"
    assert res.settings["refit_tol"] == 1e-6 and res.settings["refit_steps"] == 100
    assert "refit converged: 100.0% of fits" in res.summary()


def test_zero_steps_is_plain_delta_plus_prior_change(refitted):
    model, adata, res, *_ = refitted
    zero = ldj.ablate(model, adata, refit=True, refit_steps=0)
    z = res.latent
    prior = np.stack([0.5 * (-(z[:, k] ** 2)) for k in range(model.n_latent)], 1)  # z_k -> 0
    np.testing.assert_allclose(zero.unique_delta_nll, res.delta_nll + prior, rtol=1e-7, atol=1e-7)


LN_BASELINES = ["mean", 0.05]


@pytest.fixture(scope="module", params=LIKELIHOODS, ids=lambda c: c["gene_likelihood"])
def ln_refitted(request):
    """A float64 "ln" model; per baseline its refit result and the full optimum values."""
    model = random_model(seed=3, dtype="float64", latent_distribution="ln", **request.param)
    adata = random_adata(model, n_obs=N_OBS, seed=4)
    out = {}
    for baseline in LN_BASELINES:
        res = ldj.ablate(model, adata, baseline=baseline, refit=True, refit_tol=1e-6)
        sweep = refit_sweep(model, adata, res.settings["baseline_values"])
        out[baseline] = res, np.concatenate([s.objective for s in sweep])
    return model, adata, out


@pytest.mark.parametrize("baseline", LN_BASELINES)
def test_ln_unique_is_nonnegative_and_matches_scipy(ln_refitted, baseline):
    """ "ln": softmax(u)_k = b is an exact restriction of the full problem (u_k completed)."""
    model, adata, out = ln_refitted
    res, objective = out[baseline]
    b = res.settings["baseline_values"]
    k = model.n_latent
    assert (res.unique_delta_nll >= 0).all()  # exactly, by construction
    assert res.refit_converged.all()
    worst_full = worst_con = 0.0
    for c in range(N_SCIPY):
        cell = LnCell(model, adata, c)
        full, con = scipy_unique(cell, b, k)
        ours_con = objective[c] + res.unique_delta_nll[c]
        worst_full = max(worst_full, abs(objective[c] - full) / abs(full))
        worst_con = max(worst_con, np.max(np.abs(ours_con - con) / np.abs(con)))
    print(
        f"\nln {model.config.gene_likelihood} baseline {baseline}: min unique "
        f"{res.unique_delta_nll.min():.2e}; max rel diff to scipy full {worst_full:.1e}, "
        f"constrained {worst_con:.1e}"
    )
    assert worst_full <= 1e-6 and worst_con <= 1e-6


def test_ln_constraint_holds_at_end_points(ln_refitted, monkeypatch):
    """Every constrained end point has softmax(u)_k = b_k and the full objective's value there."""
    model, adata, out = ln_refitted
    b = out[0.05][0].settings["baseline_values"]
    records = []
    fit_lanes = refit.fit_lanes

    def recording(heads, lanes, v0, baseline, *args, **kwargs):
        fit = fit_lanes(heads, lanes, v0, baseline, *args, **kwargs)
        at = refit.full_objective(heads, lanes, fit.v, baseline, family=kwargs["family"])
        records.append([np.asarray(a) for a in (lanes.mask, fit.v, fit.value, at)])
        return fit

    monkeypatch.setattr(refit, "fit_lanes", recording)
    for _ in refit_sweep(model, adata, b):
        pass
    constrained = [r for r in records if r[0].any()]
    assert len(constrained) >= model.n_latent
    for mask, u, value, at in constrained:
        np.testing.assert_allclose(special.softmax(u, axis=1)[mask], b[mask.argmax(1)], atol=1e-12)
        np.testing.assert_allclose(at, value, rtol=1e-12, atol=1e-9)


def test_zero_steps_ln_is_objective_at_the_completed_start(ln_refitted):
    """ "ln", no steps: J at the encoder mean u completed with softmax(u)_k = b_k, minus J(u)."""
    model, adata, out = ln_refitted
    zero = ldj.ablate(model, adata, baseline="mean", refit=True, refit_steps=0)
    b = zero.settings["baseline_values"]
    expected = np.empty_like(zero.unique_delta_nll)
    for c in range(N_OBS):
        cell = LnCell(model, adata, c)
        u = cell.qz_m
        for k in range(model.n_latent):
            completed = cell.complete(np.delete(u, k), k, b[k])
            expected[c, k] = cell(completed)[0] - cell(u)[0]
    np.testing.assert_allclose(zero.unique_delta_nll, expected, rtol=1e-7, atol=1e-8)
    assert not np.allclose(zero.unique_delta_nll, zero.delta_nll)  # the plain sweep: no renorm


@pytest.mark.parametrize("baseline", ["zero", 1.0, [0.2, 0.2, 0.2, 1.5, 0.2]])
def test_ln_refit_needs_baseline_in_open_unit_interval(baseline):
    model = random_model(latent_distribution="ln")
    adata = random_adata(model, n_obs=N_OBS)
    with pytest.raises(ldj.ConfigError, match=r'Z_\d=\S+\. Use baseline="mean" or a value in'):
        ldj.ablate(model, adata, baseline=baseline, refit=True)
    if isinstance(baseline, list):  # latents not ablated need no valid baseline
        res = ldj.ablate(model, adata, baseline=baseline, latents=[0], refit=True)
        assert res.refit_converged.all() and (res.unique_delta_nll >= 0).all()


def test_cli_ln_refit_with_zero_baseline_is_one_error_line(tmp_path, capsys):
    model = random_model(latent_distribution="ln")
    model.save(tmp_path / "model")
    random_adata(model, n_obs=N_OBS).write_h5ad(tmp_path / "cells.h5ad")
    argv = ["ablate", str(tmp_path / "model"), str(tmp_path / "cells.h5ad"), "--refit"]
    assert main([*argv, "-o", str(tmp_path / "res.h5ad")]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldj: error: refit=True"), err
    assert "Z_0=0" in err and 'baseline="mean"' in err and "Traceback" not in err
    assert not (tmp_path / "res.h5ad").exists()


def edited_model():
    """ZINB model whose latents 0 and 1 decode identically (both heads); latent 2 decodes nothing."""
    model = random_model(seed=5, gene_likelihood="zinb")
    p = model.host_params
    heads = {}
    for name in ("factor", "dropout"):  # kernel rows: latents, then batch one-hot columns
        head = getattr(p.decoder, name)
        kernel = np.array(head.dense.kernel)
        kernel[1] = kernel[0]
        kernel[2] = 0.0
        heads[name] = head._replace(dense=head.dense._replace(kernel=kernel))
    params = p._replace(decoder=p.decoder._replace(**heads))
    return ldj.LinearSCVI(params, model.spec)


def split_latent(model, a: int, scale: float = 2.0):
    """A model with one more latent: latent ``a`` and the new last latent both decode with
    ``scale * loadings[:, a]`` (both heads) and get ``z_a / (2 * scale)`` from the encoder, so
    the model decodes every cell exactly as before."""
    p, k = model.host_params, model.n_latent
    enc = p.z_encoder
    kernel, bias = np.array(enc.mean.kernel), np.array(enc.mean.bias)
    kernel[:, a] /= 2 * scale
    bias[a] /= 2 * scale
    mean = enc.mean._replace(
        kernel=np.concatenate([kernel, kernel[:, a : a + 1]], 1), bias=np.append(bias, bias[a])
    )
    var = enc.var._replace(
        kernel=np.concatenate([enc.var.kernel, enc.var.kernel[:, a : a + 1]], 1),
        bias=np.append(enc.var.bias, enc.var.bias[a]),
    )
    heads = {}
    for name in ("factor", "dropout"):
        head = getattr(p.decoder, name)
        rows = np.array(head.dense.kernel)
        rows[a] *= scale
        rows = np.concatenate([rows[:k], rows[a : a + 1], rows[k:]], 0)
        heads[name] = head._replace(dense=head.dense._replace(kernel=rows))
    params = p._replace(
        z_encoder=enc._replace(mean=mean, var=var), decoder=p.decoder._replace(**heads)
    )
    config = dataclasses.replace(model.config, n_latent=k + 1)
    return ldj.LinearSCVI(params, ModelSpec(config, model.spec.data, model.spec.source))


def test_duplicated_latent_in_a_real_checkpoint():
    """The bundled demo model (scvi-tools, trained on PBMC counts) with latent 0 split in two."""
    import anndata

    demo = Path(ldj.__file__).parent / "data" / "demo"
    original = ldj.load(demo)
    adata = anndata.read_h5ad(demo / "counts.h5ad")
    model = split_latent(original, 0)
    res = ldj.ablate(model, adata, refit=True)
    np.testing.assert_allclose(res.nll, ldj.ablate(original, adata).nll, rtol=1e-5)
    plain = np.median(res.delta_nll[:, [0, -1]], axis=0)
    unique = np.median(res.unique_delta_nll[:, [0, -1]], axis=0)
    print(f"\nsplit latent: median plain {plain}, median unique {unique}")
    assert (plain > 1.0).all()  # either copy alone carries a lot of the reconstruction ...
    assert (unique <= 0.25 * plain).all()  # ... but the other copy can take over
    assert res.refit_converged.all() and (res.unique_delta_nll >= 0).all()


def test_identical_columns_and_silent_latent():
    model = edited_model()
    adata = random_adata(model, n_obs=N_OBS, seed=6)
    res = ldj.ablate(model, adata, refit=True)
    # identical columns: the MAP splits z evenly, so removing either copy costs the same
    np.testing.assert_allclose(res.unique_delta_nll[:, 0], res.unique_delta_nll[:, 1], atol=1e-5)
    # a latent with all-zero loadings (scale and zero-inflation heads): nothing, both ways
    assert np.abs(res.delta_nll[:, 2]).max() == 0.0
    assert np.abs(res.unique_delta_nll[:, 2]).max() <= 1e-6
    assert res.refit_converged.all() and (res.unique_delta_nll >= 0).all()


def test_all_zero_cells_with_observed_library():
    model = edited_model()
    adata = random_adata(model, n_obs=N_OBS, seed=10, zero_cells=3)
    res = ldj.ablate(model, adata, refit=True, library="observed")
    assert np.isfinite(res.unique_delta_nll).all() and res.refit_converged.all()
    assert np.abs(res.unique_delta_nll[:3]).max() <= 1e-6  # nothing to explain: z = 0 is optimal


def test_adam_agrees_with_lbfgs():
    model = edited_model()
    adata = random_adata(model, n_obs=N_OBS, seed=7)
    lbfgs = ldj.ablate(model, adata, refit=True)
    adam = ldj.ablate(model, adata, refit=True, optimizer="adam")
    assert adam.settings["refit_optimizer"] == "adam" and adam.settings["refit_steps"] == 2000
    np.testing.assert_allclose(adam.unique_delta_nll, lbfgs.unique_delta_nll, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "keep"}, 'mode="drop"'),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"refit_steps": -1}, "refit_steps"),
        ({"refit_tol": -1.0}, "refit_tol"),
    ],
)
def test_bad_refit_options(kwargs, match):
    model = random_model()
    with pytest.raises(ldj.ConfigError, match=match):
        ldj.ablate(model, random_adata(model), refit=True, **kwargs)


def test_cli_refit_streams_and_writes(tmp_path, capsys):
    model = edited_model()
    adata = random_adata(model, n_obs=N_OBS, seed=8)
    model.save(tmp_path / "model")
    adata.write_h5ad(tmp_path / "cells.h5ad")
    out = tmp_path / "res.h5ad"
    argv = ["ablate", str(tmp_path / "model"), str(tmp_path / "cells.h5ad"), "-o", str(out)]
    assert main([*argv, "--refit", "--refit-steps", "50", "--refit-tol", "1e-4"]) == 0
    assert "refit converged: 100.0% of fits" in capsys.readouterr().out
    import anndata

    res = anndata.read_h5ad(out)
    assert res.obsm["unique_delta_nll"].shape == (N_OBS, 5)
    assert res.obsm["refit_converged"].dtype == bool and res.obsm["refit_converged"].all()
    assert res.obsm["refit_grad_norm"].max() <= 1e-4
    u = res.uns["ablation"]
    assert u["refit"] and u["refit_steps"] == 50 and u["refit_tol"] == 1e-4
    assert u["refit_optimizer"] == "lbfgs"
    api = ldj.ablate(model, adata, refit=True, refit_steps=50, refit_tol=1e-4)
    np.testing.assert_allclose(res.obsm["unique_delta_nll"], api.unique_delta_nll, atol=1e-6)
    assert not ldj.ablate(model, adata).settings["refit"]


def test_two_devices_match_one(tmp_path):
    """Lanes split over two (host) devices give the numbers of one device."""
    model = edited_model()
    adata = random_adata(model, n_obs=N_OBS, seed=9)
    np.save(tmp_path / "one.npy", ldj.ablate(model, adata, refit=True).unique_delta_nll)
    script = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(TESTS)!r})
        import numpy as np
        import test_refit as t
        import linear_decoder_jax as ldj
        from helpers import random_adata
        model = t.edited_model()
        adata = random_adata(model, n_obs=t.N_OBS, seed=9)
        two = ldj.ablate(model, adata, refit=True, devices=2)
        assert two.settings["n_devices"] == 2
        one = np.load({str(tmp_path / "one.npy")!r})
        np.testing.assert_allclose(two.unique_delta_nll, one, atol=1e-9)
        print("ok")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
