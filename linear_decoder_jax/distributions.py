"""NB, ZINB and Poisson log-likelihoods with scvi-tools' exact formulas (one implementation).

Each likelihood is split into the part that depends on the decoder output (``mu``, ``zi_logits``)
and the part that depends only on ``x`` and ``theta`` (the lgamma terms). ``log_prob`` adds them;
the ablation engine differences the first part alone, so the large constant cancels exactly
instead of in float32 rounding. That part splits again into its value at ``x = 0``
(:func:`rate_term`, dense over genes) and what a count adds (:func:`count_term`, zero at
``x = 0``), so the engine evaluates the second at the non-zero counts only.

Formulas: ``log_nb_positive`` and ``log_zinb_positive`` in scvi-tools
``src/scvi/distributions/_negative_binomial.py`` (eps = 1e-8), and torch's ``Poisson.log_prob``
(``xlogy(x, rate) - rate - lgamma(x + 1)``). The lgamma terms are 0 at ``x = 0`` and are set to
exactly 0 there; in float32 they use :func:`lgamma`, which is faster than XLA's and as accurate.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.scipy.special import gammaln, xlogy

from linear_decoder_jax._typing import Counts, Dispersion, PerGene

Array = jax.Array
EPS = 1e-8  # scvi-tools log_nb_positive / log_zinb_positive default eps

Likelihood = Literal["nb", "zinb", "poisson"]

_HALF_LOG_2PI = 0.9189385332046727  # log(2 pi) / 2
_NO_SHIFT = 1e8  # from here on Stirling's series alone is exact in float32


def _lgamma_parts(z: Array) -> tuple[Array, tuple[Array, ...]]:
    """Stirling's series at ``w = z + 4`` minus ``log(z (z+1) (z+2) (z+3))`` (float32, z > 0),
    and what :func:`_digamma_from` reuses."""
    big = z >= _NO_SHIFT
    zc = jnp.where(big, 1.0, z)  # no shift (and no overflow of the product) for large z
    u = zc * (zc + 3.0)  # the product is u (u + 2)
    w = jnp.where(big, z, zc + 4.0)
    r = 1.0 / w
    r2 = r * r
    # B_2k / (2k (2k - 1) w^(2k - 1)), k = 1..6: truncation below 1e-10 for w >= 4
    series = r * (1 / 12 + r2 * (-1 / 360 + r2 * (1 / 1260 + r2 * (-1 / 1680 + r2 * (
        1 / 1188 + r2 * (-691 / 360360))))))  # fmt: skip
    log_w = jnp.log(w)
    value = (w - 0.5) * log_w - w + _HALF_LOG_2PI + series
    value = value - jnp.where(big, 0.0, jnp.log(u * (u + 2.0)))
    return value, (big, zc, u, r, r2, log_w)


def _digamma_from(big: Array, zc: Array, u: Array, r: Array, r2: Array, log_w: Array) -> Array:
    """digamma(z) from :func:`_lgamma_parts`: the asymptotic series at ``w`` minus
    ``sum_k 1 / (z + k)`` (= ``(2z + 3) (1/u + 1/(u + 2))``)."""
    series = r2 * (1 / 12 + r2 * (-1 / 120 + r2 * (1 / 252 + r2 * (-1 / 240 + r2 * (1 / 132)))))
    shift = (2.0 * zc + 3.0) * (1.0 / u + 1.0 / (u + 2.0))
    return log_w - 0.5 * r - series - jnp.where(big, 0.0, shift)


@jax.custom_jvp
def _lgamma32(z: Array) -> Array:
    return _lgamma_parts(z)[0]


@_lgamma32.defjvp
def _lgamma32_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (z,), (dz,) = primals, tangents
    value, parts = _lgamma_parts(z)  # the derivative shares the shift and log(w)
    return value, dz * _digamma_from(*parts)


def _count_lgamma_parts(x: Array, theta: Array) -> tuple[Array, tuple[tuple[Array, ...], ...]]:
    value_xt, parts_xt = _lgamma_parts(x + theta)
    value_t, parts_t = _lgamma_parts(theta)
    value_x1, parts_x1 = _lgamma_parts(x + 1.0)
    value = jnp.where(x != 0, value_xt - value_t - value_x1, 0.0)
    return value, (parts_xt, parts_t, parts_x1)


@jax.custom_jvp
def _count_lgamma32(x: Array, theta: Array) -> Array:
    return _count_lgamma_parts(x, theta)[0]


def _count_lgamma32_jvp(
    primals: tuple[Array, Array], tangents: tuple[Any, Any]
) -> tuple[Array, Array]:
    """One pass gives the value and its theta-derivative ``digamma(x + theta) - digamma(theta)``
    (0 at ``x = 0``), held as one array (the optimisation barrier keeps XLA from carrying every
    intermediate of the shift and the series into the backward pass instead)."""
    (x, theta), (dx, dtheta) = primals, tangents
    value, (parts_xt, parts_t, parts_x1) = _count_lgamma_parts(x, theta)
    digamma_xt = _digamma_from(*parts_xt)
    out = jnp.zeros_like(value)
    if not isinstance(dtheta, SymbolicZero):
        slope = jnp.where(x != 0, digamma_xt - _digamma_from(*parts_t), 0.0)
        value, slope = jax.lax.optimization_barrier((value, slope))
        out = out + dtheta * slope
    if not isinstance(dx, SymbolicZero):
        out = out + dx * jnp.where(x != 0, digamma_xt - _digamma_from(*parts_x1), 0.0)
    return value, out


_count_lgamma32.defjvp(_count_lgamma32_jvp, symbolic_zeros=True)


def count_lgamma(x: Counts, theta: Dispersion) -> PerGene:
    """``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``, exactly 0 where ``x = 0``: NB's
    lgamma terms. ``theta`` may be per gene (1, n_vars): its own terms then run once per gene.
    float32 in one fused pass with its derivatives (:func:`lgamma`)."""
    if x.dtype != jnp.float32 or theta.dtype != jnp.float32:
        const = gammaln(x + theta) - gammaln(theta) - gammaln(x + 1.0)
        return jnp.where(x != 0, const, 0.0)
    return _count_lgamma32(x, theta)


def lgamma(z: Array) -> Array:
    """``log Gamma(z)`` for ``z > 0`` (its derivative is digamma).

    float32: shift to ``z + 4`` and Stirling's series, branch free: a third of the time of
    ``jax.scipy.special.gammaln`` (no reflection for ``z < 0.5``, no Lanczos divisions), and its
    error against float64 is below XLA's (1.5e-6 of ``max(1, |lgamma|)``, digamma 4e-7). Other
    dtypes: ``gammaln``.
    """
    if z.dtype != jnp.float32:
        return gammaln(z)
    return _lgamma32(z)


def _log_theta_mu(mu: Array, theta: Array) -> Array:
    return jnp.log(theta + mu + EPS)


def _softplus(x: Array) -> Array:
    """``log(1 + exp(x))`` for finite ``x``, without the selects of ``jax.nn.softplus``: XLA:CPU
    then fuses it into the reduction that follows (measured 4x faster)."""
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _zinb_parts(mu: Array, theta: Array, zi_logits: Array | None) -> tuple[Array, Array, Array]:
    """``softplus(-zi)``, ``pi_theta_log`` and ``log(theta + mu + eps)`` of scvi-tools'
    ``log_zinb_positive``."""
    if zi_logits is None:
        raise ValueError("ZINB needs zi_logits.")
    log_theta_mu_eps = _log_theta_mu(mu, theta)
    softplus_pi = _softplus(-zi_logits)
    pi_theta_log = -zi_logits + theta * (jnp.log(theta + EPS) - log_theta_mu_eps)
    return softplus_pi, pi_theta_log, log_theta_mu_eps


def rate_term(
    mu: Array, theta: Array, zi_logits: Array | None = None, *, likelihood: Likelihood
) -> Array:
    """The z-dependent log-likelihood at ``x = 0``, per gene: ``-theta log(theta + mu + eps)``
    for NB, ``-mu`` for Poisson, ZINB's zero case. Dense over genes; with :func:`count_term`
    it makes :func:`log_prob_varying`."""
    if likelihood == "poisson":
        return -mu
    if likelihood == "nb":
        return -theta * _log_theta_mu(mu, theta)
    softplus_pi, pi_theta_log, _ = _zinb_parts(mu, theta, zi_logits)
    return _softplus(pi_theta_log) - softplus_pi


def count_term(
    x: Array, mu: Array, theta: Array, zi_logits: Array | None = None, *, likelihood: Likelihood
) -> Array:
    """What a count ``x`` adds to :func:`rate_term`: zero where ``x == 0``, so it can be evaluated
    on the non-zero counts alone (for ZINB, the non-zero case minus the zero case)."""
    if likelihood == "poisson":
        return xlogy(x, mu)
    if likelihood == "nb":
        return x * (jnp.log(mu + EPS) - _log_theta_mu(mu, theta))
    _, pi_theta_log, log_theta_mu_eps = _zinb_parts(mu, theta, zi_logits)
    x_log = x * (jnp.log(mu + EPS) - log_theta_mu_eps)
    nonzero = jnp.sign(jnp.maximum(x - EPS, 0.0))  # scvi-tools' x > eps, fusible (no select)
    return nonzero * (x_log - _softplus(-pi_theta_log))


def rate_reference(
    mu: Array, theta: Array, zi_logits: Array | None = None, *, likelihood: Likelihood
) -> Array:
    """Per-gene value at the reference decoder output that :func:`rate_term_change` differences
    against (computed once, reused for every latent): ``log(theta + mu + eps)`` for NB, ``mu`` for
    Poisson, :func:`rate_term` for ZINB."""
    if likelihood == "poisson":
        return mu
    if likelihood == "nb":
        return _log_theta_mu(mu, theta)
    return rate_term(mu, theta, zi_logits, likelihood=likelihood)


def rate_term_gene_change(
    mu_new: Array,
    theta: Array,
    reference: Array,
    zi_new: Array | None = None,
    *,
    likelihood: Likelihood,
) -> Array:
    """Per-gene ``rate_term(new) - rate_term(reference)`` (shape of ``mu_new``), differenced gene
    by gene; ``reference`` is :func:`rate_reference`."""
    if likelihood == "poisson":
        return -(mu_new - reference)
    if likelihood == "nb":
        return -(theta * (_log_theta_mu(mu_new, theta) - reference))
    return rate_term(mu_new, theta, zi_new, likelihood=likelihood) - reference


def rate_term_change(
    mu_new: Array,
    theta: Array,
    reference: Array,
    zi_new: Array | None = None,
    *,
    likelihood: Likelihood,
) -> Array:
    """Per-cell ``sum_g rate_term(new) - rate_term(reference)``: :func:`rate_term_gene_change`
    summed over genes (no cancellation of two large sums)."""
    return rate_term_gene_change(mu_new, theta, reference, zi_new, likelihood=likelihood).sum(
        axis=-1
    )


def log_prob_varying(
    x: Counts, mu: PerGene, theta: Dispersion, zi_logits: PerGene | None, *, likelihood: Likelihood
) -> PerGene:
    """Per-gene log-likelihood terms that depend on ``mu``/``zi_logits`` (shape of ``x``)."""
    if likelihood in ("nb", "poisson"):
        # theta * log(theta + eps) of NB is in log_prob_constant
        return rate_term(mu, theta, likelihood=likelihood) + count_term(
            x, mu, theta, likelihood=likelihood
        )
    # scvi-tools' own case split, term for term
    softplus_pi, pi_theta_log, log_theta_mu_eps = _zinb_parts(mu, theta, zi_logits)
    x_log = x * (jnp.log(mu + EPS) - log_theta_mu_eps)
    case_zero = _softplus(pi_theta_log) - softplus_pi
    case_non_zero = -softplus_pi + pi_theta_log + x_log
    return jnp.where(x < EPS, case_zero, 0.0) + jnp.where(x > EPS, case_non_zero, 0.0)


def log_prob_constant(x: Counts, theta: Dispersion, *, likelihood: Likelihood) -> PerGene:
    """Per-gene log-likelihood terms that depend on ``x`` and ``theta`` only (the lgamma terms
    exactly 0 at ``x = 0``, where they cancel)."""
    if likelihood == "poisson":
        return jnp.where(x != 0, -lgamma(x + 1.0), 0.0)
    const = count_lgamma(x, theta)
    if likelihood == "zinb":  # scvi-tools adds the lgamma terms in the non-zero case only
        return jnp.where(x > EPS, const, 0.0)
    return const + theta * jnp.log(theta + EPS)


def log_prob_constant_at_zero(theta: Array, *, likelihood: Likelihood) -> Array:
    """:func:`log_prob_constant` at ``x = 0``, where the lgamma terms cancel exactly:
    ``theta * log(theta + eps)`` for NB, 0 for ZINB and Poisson. Lets callers evaluate the
    constant at the non-zero counts only."""
    if likelihood == "nb":
        return theta * jnp.log(theta + EPS)
    return jnp.zeros_like(theta)


def log_prob(
    x: Counts, mu: PerGene, theta: Dispersion, zi_logits: PerGene | None, *, likelihood: Likelihood
) -> PerGene:
    """Per-gene log-likelihood of counts ``x`` (n_obs, n_vars), as scvi-tools' ``px.log_prob``."""
    varying = log_prob_varying(x, mu, theta, zi_logits, likelihood=likelihood)
    return varying + log_prob_constant(x, theta, likelihood=likelihood)
