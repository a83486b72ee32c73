"""``distributions``: the float32 ``lgamma`` (and its derivative, digamma) against scipy in
float64, and the likelihoods against a float64 brute force of scvi-tools' formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from linear_decoder_jax import distributions

# below 0.5, the reflection region of XLA's gammaln; up to counts and large dispersions
Z = np.concatenate(
    [np.logspace(-6, 12, 4000), np.arange(1, 3000), np.linspace(0.3, 4.0, 2000)]
).astype(np.float32)


def _relative(ours, ref):
    return np.max(np.abs(np.asarray(ours, np.float64) - ref) / np.maximum(np.abs(ref), 1.0))


def test_lgamma_and_digamma_float32_against_float64():
    z64 = Z.astype(np.float64)  # the float32 inputs, exactly
    value = jax.jit(distributions.lgamma)(Z)
    slope = jax.jit(jax.vmap(jax.grad(distributions.lgamma)))(Z)
    assert value.dtype == jnp.float32
    assert _relative(value, special.gammaln(z64)) < 2e-6
    assert _relative(slope, special.digamma(z64)) < 1e-6
    # no worse than XLA's own float32 lgamma
    xla = jax.jit(jax.scipy.special.gammaln)(Z)
    assert _relative(value, special.gammaln(z64)) <= _relative(xla, special.gammaln(z64))


def test_lgamma_float64_is_exact():
    with jax.enable_x64(True):
        z = jnp.asarray(Z, jnp.float64)
        ref = special.gammaln(Z.astype(np.float64))
        np.testing.assert_allclose(distributions.lgamma(z), ref, rtol=1e-11, atol=1e-13)


def _brute_force(x, mu, theta, zi, likelihood):
    """scvi-tools' log_nb_positive / log_zinb_positive and torch's Poisson, float64."""
    eps = 1e-8
    if likelihood == "poisson":
        return special.xlogy(x, mu) - mu - special.gammaln(x + 1)
    log_theta_mu = np.log(theta + mu + eps)
    lg = special.gammaln(x + theta) - special.gammaln(theta) - special.gammaln(x + 1)
    nb = theta * (np.log(theta + eps) - log_theta_mu) + x * (np.log(mu + eps) - log_theta_mu) + lg
    if likelihood == "nb":
        return nb
    softplus = np.logaddexp(0.0, -zi)
    pi_theta_log = -zi + theta * (np.log(theta + eps) - log_theta_mu)
    zero = np.logaddexp(0.0, pi_theta_log) - softplus
    return np.where(x < eps, zero, nb - softplus - zi)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_log_prob_against_float64_brute_force(likelihood):
    rng = np.random.default_rng(0)
    x = rng.negative_binomial(0.5, 0.05, (64, 300)).astype(np.float32)  # ~30 % zeros, some large
    mu = rng.gamma(1.0, 5.0, (64, 300)).astype(np.float32)
    theta = np.exp(rng.normal(0.0, 2.0, 300)).astype(np.float32)[None, :].repeat(64, 0)
    zi = rng.normal(0.0, 2.0, (64, 300)).astype(np.float32)
    zi_arg = jnp.asarray(zi) if likelihood == "zinb" else None
    ours = distributions.log_prob(
        jnp.asarray(x), jnp.asarray(mu), jnp.asarray(theta), zi_arg, likelihood=likelihood
    )
    ref = _brute_force(*(a.astype(np.float64) for a in (x, mu, theta, zi)), likelihood)
    # per cell, as the loss sums them
    np.testing.assert_allclose(np.asarray(ours, np.float64).sum(1), ref.sum(1), rtol=1e-6)
    # per entry, the lgamma terms: float32 rounding of each term, nothing more
    if likelihood != "poisson":
        x64, t64 = x.astype(np.float64), theta.astype(np.float64)
        terms = [special.gammaln(x64 + t64), special.gammaln(t64), special.gammaln(x64 + 1)]
        const = distributions.log_prob_constant(jnp.asarray(x), jnp.asarray(theta), likelihood="nb")
        const = np.asarray(const, np.float64) - t64 * np.log(t64 + 1e-8)
        scale = 1.0 + sum(np.abs(t) for t in terms)
        assert np.max(np.abs(const - (terms[0] - terms[1] - terms[2])) / scale) < 1.5e-6
    # where x = 0 the lgamma terms are exactly 0
    zeros, theta = jnp.zeros(x.shape), jnp.asarray(theta)
    const = distributions.log_prob_constant(zeros, theta, likelihood=likelihood)
    at_zero = distributions.log_prob_constant_at_zero(theta, likelihood=likelihood)
    np.testing.assert_array_equal(const, np.broadcast_to(at_zero, const.shape))
