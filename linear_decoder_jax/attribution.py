"""Attribution: which genes carry each latent in each group, and how much of each cell's
likelihood each latent explains (Shapley values over the latents).

Notation: cell c with decoder input ``z`` (K latents; for "ln" models the softmax output, so every
coalition below lives in decoder-input space, as the plain sweep), baseline ``b``, factor-head
loadings ``L`` (genes x K, BatchNorm folded, ``Family.affine_heads``), ``NLL(S)`` the cell's NLL with
the latents in S at ``z`` and the others at ``b`` (``N`` all latents: the full model).

**Per-gene scores** (computed inside the plain sweep's per-latent body, ``ablation._score``): the
sweep's likelihood change is a sum over genes of the z-dependent terms (value at ``x = 0`` plus the
count terms at the non-zero counts), so the same terms, kept per gene and summed over a group's
cells with segment sums, give

* (G1) ``sum_g gene_delta[c, k, g] = delta_nll[c, k]`` (cell by cell, hence group by group);
* (G2) ``ln rho_k[c, g] - ln rho[c, g] = sum_j m_kj (b_j - z_cj) L_gj - s_ck`` with ``m_k`` the
  unit vector e_k ("drop") or its complement ("keep") and ``s_ck`` the change of the cell's log
  normaliser: the group sum of the log fold change needs only the group sums of ``b - z`` (K
  numbers) and of ``s`` (one per latent), never a (cells, genes) array;
* (G3) the all-cells row of ``gene_lfc`` is ``mean_lfc`` (its transpose).

Groups are the ``groupby`` codes (-1: no group, dropped); row ``n_groups`` is all cells. Totals are
plain sums (parts of a run add); means are sums over group counts, NaN for an empty group.

**Likelihood explained.** ``v(S) = NLL(empty) - NLL(S)``, gain ``G = v(N)``. Identities:

* (S1) coalition logits: ``logits(S) = logits(empty) + sum_{k in S} (z_k - b_k) L[:, k]``, i.e. the
  decode of ``where(S, z, b)`` (the zero-inflation head likewise);
* (S2) ``phi_k = sum_{S not containing k} w(|S|) (v(S + k) - v(S))``, ``w(s) = s! (K-s-1)! / K!``,
  written as ``phi = v @ M`` with ``M[S, k] = w(|S|-1)`` if k in S else ``-w(|S|)``;
* (S3) every column of M sums to 0, so any per-cell constant in ``v`` cancels: we use
  ``u(S) = LL(S) - LL(N)``, differenced gene by gene against the full model (like the sweep), and
  ``v(S) = u(S) - u(empty)``;
* (S4) efficiency: the row sums of M are +1 at N, -1 at the empty set, 0 elsewhere, so
  ``sum_k phi_k = v(N) - v(empty) = G``;
* (S5) symmetry (identical loadings and inputs give equal values) and the null player (a latent
  with zero loadings, or at its baseline, gets 0);
* (S6) one latent: ``phi = G = delta_nll`` (drop); two latents:
  ``phi_1 = (G + delta_drop_1 - delta_keep_1) / 2``;
* (S7) permutation mode: along a permutation, the marginal contributions telescope to ``G``; the
  mean over ``M`` permutations (``M / 2`` antithetic pairs: a permutation and its reverse, shared by
  a minibatch's cells, drawn from the minibatch key) is unbiased, its standard error is the
  standard deviation of the pair means over ``sqrt(M / 2)``;
* (S8) per group: ``share[group, k] = sum_c phi_ck / sum_c G_c`` over the group's cells (the share
  of the group's mean gain), rows summing to 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from linear_decoder_jax import sizing
from linear_decoder_jax.distributions import (
    Likelihood,
    count_term,
    rate_reference,
    rate_term_change,
)
from linear_decoder_jax.errors import ConfigError
from linear_decoder_jax.family import (
    AffineDecoder,
    AffineFamily,
    Family,
    SplitFamily,
    one_latent_per_split,
)
from linear_decoder_jax.options import Shapley
from linear_decoder_jax.pipeline import Batch

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


# -- per-gene, per-group sums -----------------------------------------------------------------------
class GeneSums(NamedTuple):
    """Sums over each group's cells (rows: the groups, then all cells) of one run or minibatch."""

    delta_nll: Array | np.ndarray  # (rows, n_ablated, n_vars) per-gene NLL change
    lse_change: Array | np.ndarray  # (rows, n_ablated) change of the log normaliser of rho
    shift: Array | np.ndarray  # (rows, n_latent) baseline - z
    n_cells: Array | np.ndarray  # (rows,)
    # (rows, n_ablated, n_vars) summed log fold changes (the generic path); None: an affine
    # family's fast path, whose lfc comes from ``shift`` and ``lse_change`` (G2)
    lfc: Array | np.ndarray | None = None

    @staticmethod
    def zeros(
        n_groups: int, n_ablated: int, n_vars: int, n_latent: int, *, dtype: Any, lfc: bool
    ) -> GeneSums:
        rows = n_groups + 1
        return GeneSums(
            np.zeros((rows, n_ablated, n_vars), dtype),
            np.zeros((rows, n_ablated), dtype),
            np.zeros((rows, n_latent), dtype),
            np.zeros(rows, dtype),
            np.zeros((rows, n_ablated, n_vars), dtype) if lfc else None,
        )


def group_weights(group: Array, valid: Array, n_groups: int) -> Array:
    """(n_groups + 1, b): one-hot group membership of the valid cells, then every valid cell."""
    onehot = (group[None, :] == jnp.arange(n_groups, dtype=group.dtype)[:, None]).astype(
        valid.dtype
    )
    return jnp.concatenate([onehot * valid[None, :], valid[None, :]], axis=0)


def segment_total(weights: Array, values: Array) -> Array:
    """Weighted sums over cells, ``weights @ values``: a segment sum over the groups' cells."""
    return jnp.matmul(weights, values, precision=_HIGHEST)


def gene_group_sums(
    weights: Array, dense: Array, counts: Array, nz_index: Array, group: Array
) -> Array:
    """(rows, n_vars) group sums of per-gene terms: ``dense`` (b, n_vars) over every gene plus
    ``counts`` (b, width) at the non-zero genes ``nz_index``. ``weights`` from
    :func:`group_weights`: its last row, each cell's weight, also weights its group's row.

    The counts go through one scatter-add into the groups' rows plus a row for cells of no
    group (-1), whose column sums are the total: scatters cost ~15 ns per element on XLA:CPU,
    so this halves the cost of scattering the groups and the total separately (measured)."""
    n_groups, n_vars = weights.shape[0] - 1, dense.shape[1]
    row = jnp.where(group >= 0, group, n_groups)[:, None]  # (b, 1)
    values = (counts * weights[-1][:, None]).ravel()
    by_row = jax.ops.segment_sum(values, (row * n_vars + nz_index).ravel(), (n_groups + 1) * n_vars)
    by_row = by_row.reshape(n_groups + 1, n_vars)
    at_counts = jnp.concatenate([by_row[:n_groups], by_row.sum(0, keepdims=True)], axis=0)
    return segment_total(weights, dense) + at_counts


def add_sums(a: GeneSums, b: GeneSums) -> GeneSums:
    """Totals of two parts (sums add)."""
    return jax.tree.map(lambda x, y: x + y, a, b)


def finish_gene_scores(
    sums: GeneSums, loadings: np.ndarray | None, latents: Sequence[int], *, mode: str
) -> dict[str, np.ndarray]:
    """Group means of the per-gene scores: ``gene_delta_nll`` and ``gene_lfc`` (rows x n_ablated x
    n_vars; NaN for an empty group) and ``gene_n_cells``. ``loadings``: the factor head
    (n_vars, K) of the fast path (G2); None when the sums hold the log fold changes."""
    delta = np.asarray(sums.delta_nll, np.float64)
    n = np.asarray(sums.n_cells, np.float64)
    if loadings is None:
        lfc = np.asarray(sums.lfc, np.float64)
    else:
        shift = np.asarray(sums.shift, np.float64)
        k = loadings.shape[1]
        pick = np.eye(k)[list(latents)]  # (n_ablated, K): m_k of identity (G2)
        mask = pick if mode == "drop" else 1.0 - pick
        lfc = np.einsum("aj,rj,gj->rag", mask, shift, np.asarray(loadings, np.float64))
        lfc -= np.asarray(sums.lse_change, np.float64)[:, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(n > 0, 1.0 / n, np.nan)[:, None, None]
    dtype = np.asarray(sums.delta_nll).dtype
    return {
        "gene_delta_nll": (delta * scale).astype(dtype),
        "gene_lfc": (lfc * scale).astype(dtype),
        "gene_n_cells": n.astype(dtype),
    }


def check_gene_budget(n_groups: int, n_ablated: int, n_vars: int, *, budget: int) -> None:
    """Refuse gene tables (2 arrays of groups x latents x genes, float64 at finish) over
    ``budget`` bytes, naming the options that lower it."""
    need = 2 * 8 * (n_groups + 1) * n_ablated * n_vars
    if need > budget:
        msg = (
            f"Gene scores for {n_groups} groups (+ all cells) x {n_ablated} latents x {n_vars} "
            f"genes need {need / 2**30:.1f} GiB, over the {budget / 2**30:.1f} GiB budget: pass "
            "fewer `latents`, a `groupby` with fewer categories, or `gene_scores=False`."
        )
        raise ConfigError(msg)


# -- Shapley values over the latents ---------------------------------------------------------------
def coalition_masks(n_latent: int) -> np.ndarray:
    """(2^K, K) float: row S has a 1 for each latent in coalition S (bit k of S)."""
    s = np.arange(2**n_latent)[:, None]
    return ((s >> np.arange(n_latent)[None, :]) & 1).astype(np.float64)


def shapley_matrix(n_latent: int) -> np.ndarray:
    """(2^K, K) float64 M with ``phi = v @ M`` (S2)."""
    masks = coalition_masks(n_latent)
    size = masks.sum(1).astype(int)
    fact = [math.factorial(i) for i in range(n_latent + 1)]

    def w(s: int) -> float:
        return fact[s] * fact[n_latent - s - 1] / fact[n_latent]

    inside = np.array([w(s - 1) if s > 0 else 0.0 for s in size])
    outside = np.array([-w(s) if s < n_latent else 0.0 for s in size])
    return np.where(masks > 0, inside[:, None], outside[:, None])


class _Context(NamedTuple):
    """What every coalition of one minibatch shares: the full model's reference terms."""

    heads: list[AffineDecoder]
    theta: Array
    reference: Array
    count_full: Array


def _context(family: AffineFamily, params: Any, batch: Batch) -> _Context:
    lik = family.likelihood
    heads = family.affine_heads(params)
    theta = family.dispersion(params, batch.batch, batch.label)
    mu, zi = _decode(heads, batch.z, batch)
    count_full = _counts(mu, zi, theta, batch, likelihood=lik)
    return _Context(heads, theta, rate_reference(mu, theta, zi, likelihood=lik), count_full)


def _decode(heads: list[AffineDecoder], z: Array, batch: Batch) -> tuple[Array, Array | None]:
    """(mu, zero-inflation logits or None) for decoder input ``z``."""
    logits = [
        jnp.matmul(z, h.loadings.T, precision=_HIGHEST)
        + h.offsets[batch.batch]
        + h.intercept[None, :]
        for h in heads
    ]
    mu = jnp.exp(jax.nn.log_softmax(logits[0], axis=-1) + batch.log_library)
    return mu, (logits[1] if len(logits) > 1 else None)


def _counts(
    mu: Array, zi: Array | None, theta: Array, batch: Batch, *, likelihood: Likelihood
) -> Array:
    """count_term at the non-zero counts (b, width)."""
    at = functools.partial(jnp.take_along_axis, indices=batch.nz_index, axis=1)
    zi_nz = None if zi is None else at(zi)
    return count_term(batch.nz_count, at(mu), at(theta), zi_nz, likelihood=likelihood)


def coalition_loglik(
    family: AffineFamily, ctx: _Context, batch: Batch, baseline: Array, mask: Array
) -> Array:
    """``u(S) = LL(S) - LL(N)`` per cell (b,) for coalition ``mask`` (K,) (S1, S3): the affine
    fast path (coalition logits without the rest of the decoder)."""
    lik = family.likelihood
    z = jnp.where(mask[None, :] > 0, batch.z, baseline[None, :])
    mu, zi = _decode(ctx.heads, z, batch)
    dense = rate_term_change(mu, ctx.theta, ctx.reference, zi, likelihood=lik)
    counts = _counts(mu, zi, ctx.theta, batch, likelihood=lik) - ctx.count_full
    return dense + counts.sum(-1)


def _split_coalitions(
    family: SplitFamily, params: Any, batch: Batch, baseline: Array
) -> Callable[[Array], Array]:
    """``u(S)`` of one coalition mask (K,) for a family with one latent per split: each split's
    term is either its term at ``z`` or at the baseline (the same for every cell of a covariate
    combination), both decoded once per minibatch; a coalition only re-aggregates them, with
    ``aggregate_log_prob``'s terms that depend on the decode (the others cancel in ``u``)."""
    x, lib, cov = batch.x, batch.log_library, batch.batch
    values = family.split_values(params, batch.z, cov)  # (b, n_splits, n_vars)
    base = family.constant_split_values(params, baseline, cov)
    latent_of = jnp.asarray([u[0] for u in family.unit_latents()], jnp.int32)  # per split

    def loglik(mean: Array) -> Array:  # (b, n_vars)
        return family.aggregate_log_prob(params, x, mean, lib, cov)[2]

    full = loglik(family.aggregate(values))

    def one(mask: Array) -> Array:  # differenced gene by gene, as the generic path
        keep = mask[latent_of][None, :, None] > 0
        return (loglik(family.aggregate(jnp.where(keep, values, base))) - full).sum(-1)

    return one


def _values(
    family: Family,
    params: Any,
    batch: Batch,
    baseline: Array,
    masks: Array,
    *,
    chunk: int | None,
) -> Array:
    """``u(S)`` for every coalition of ``masks`` (n, K): (n, b). ``chunk``: coalitions decoded at
    once (``vmap``), None one after another (CPU). Any family: the decode of ``where(S, z, b)``,
    differenced gene by gene against the full model's log-likelihood."""
    if isinstance(family, AffineFamily):
        ctx = _context(family, params, batch)
        fast = functools.partial(coalition_loglik, family, ctx, batch, baseline)
        return jax.lax.map(fast, masks, batch_size=chunk)
    if one_latent_per_split(family):
        assert isinstance(family, SplitFamily)
        return jax.lax.map(
            _split_coalitions(family, params, batch, baseline), masks, batch_size=chunk
        )
    args = (batch.log_library, batch.batch, batch.label)
    full = family.log_prob(batch.x, family.decode(params, batch.z, *args))

    def one(mask: Array) -> Array:
        z = jnp.where(mask[None, :] > 0, batch.z, baseline[None, :])
        return (family.log_prob(batch.x, family.decode(params, z, *args)) - full).sum(-1)

    return jax.lax.map(one, masks, batch_size=chunk)


@functools.partial(jax.jit, static_argnames=("family", "chunk"))
def shapley_exact(
    family: Family,
    params: Any,
    batch: Batch,
    baseline: Array,
    *,
    chunk: int | None = None,
) -> tuple[Array, Array]:
    """(gain (b,), phi (b, K)): exact Shapley values over all 2^K coalitions (S2-S4)."""
    k = family.n_latent
    masks = jnp.asarray(coalition_masks(k), batch.z.dtype)
    u = _values(family, params, batch, baseline, masks, chunk=chunk)  # (2^K, b)
    weights = jnp.asarray(shapley_matrix(k), batch.z.dtype)
    phi = jnp.matmul(u.T, weights, precision=_HIGHEST)
    return u[-1] - u[0], phi


@functools.partial(jax.jit, static_argnames=("family", "n_permutations", "chunk"))
def shapley_permutation(
    family: Family,
    params: Any,
    batch: Batch,
    baseline: Array,
    key: Array,
    *,
    n_permutations: int,
    chunk: int | None = None,
) -> tuple[Array, Array, Array]:
    """(gain (b,), phi (b, K), standard error (b, K)) from ``n_permutations`` permutations drawn
    from ``key`` in antithetic pairs (S7); every permutation's values sum to the gain."""
    k, half = family.n_latent, n_permutations // 2
    perms = jax.vmap(lambda kk: jax.random.permutation(kk, k))(jax.random.split(key, half))
    perms = jnp.concatenate([perms, perms[:, ::-1]], axis=0)  # (M, K): i and i + M/2 reversed
    rank = jnp.argsort(perms, axis=1)  # rank[m, j]: step at which latent j joins
    prefix = rank[:, None, :] < jnp.arange(k + 1)[None, :, None]  # (M, K + 1, K)
    inner = prefix[:, 1:k].reshape(-1, k)  # coalitions strictly between empty and full
    ends = jnp.stack([jnp.zeros(k, bool), jnp.ones(k, bool)])
    masks = jnp.concatenate([ends, inner], axis=0).astype(batch.z.dtype)
    u = _values(family, params, batch, baseline, masks, chunk=chunk)
    b = u.shape[1]
    path = jnp.concatenate(
        [
            jnp.broadcast_to(u[0], (n_permutations, 1, b)),
            u[2:].reshape(n_permutations, k - 1, b),
            jnp.broadcast_to(u[1], (n_permutations, 1, b)),
        ],
        axis=1,
    )  # (M, K + 1, b): u along each permutation
    steps = path[:, 1:] - path[:, :-1]  # (M, K, b): step i adds latent perms[m, i]
    phi_m = jnp.take_along_axis(steps, rank[:, :, None], axis=1)  # (M, K, b) latent order
    pairs = 0.5 * (phi_m[:half] + phi_m[half:])
    phi = pairs.mean(axis=0)
    se = pairs.std(axis=0, ddof=1) / jnp.sqrt(half)
    return u[1] - u[0], phi.T, se.T


class ShapleyScorer:
    """Shapley values of the likelihood gain over all K latents, as a scorer of the run pipeline:
    per cell ``gain_nll`` and ``shapley_nll`` (plus ``shapley_nll_se`` in permutation mode)."""

    def __init__(
        self,
        family: Family,
        params: Any,
        plan: Any,
        *,
        place: Any,
        method: Shapley,
        n_permutations: int,
    ):
        self.family, self.params, self.plan = family, params, plan
        self.method, self.n_permutations = method, n_permutations
        self.baseline = place.replicated(np.asarray(plan.baseline, dtype=plan.dtype))
        self.needs_key = method == "permutation"
        self.fields: tuple[str, ...] = ("gain_nll", "shapley_nll") + (
            ("shapley_nll_se",) if method == "permutation" else ()
        )
        # accelerators decode many coalitions at once; CPU one after another (cache-resident)
        size, itemsize = plan.batch_size, np.dtype(plan.dtype).itemsize
        self.chunk = (
            sizing.shapley_chunk(size, family.n_vars, itemsize, devices=plan.devices)
            if plan.vectorize
            else None
        )

    def init(self) -> tuple[()]:
        return ()

    def score(self, batch: Batch, totals: tuple[()], key: Array) -> tuple[dict[str, Any], Any]:
        if self.method == "exact":
            gain, phi = shapley_exact(
                self.family, self.params, batch, self.baseline, chunk=self.chunk
            )
            return {"gain_nll": gain, "shapley_nll": phi}, totals
        gain, phi, se = shapley_permutation(
            self.family,
            self.params,
            batch,
            self.baseline,
            key,
            n_permutations=self.n_permutations,
            chunk=self.chunk,
        )
        return {"gain_nll": gain, "shapley_nll": phi, "shapley_nll_se": se}, totals

    def finish(self, totals: tuple[()], n_obs: int) -> dict[str, np.ndarray]:
        return {}

    def settings(self) -> dict[str, Any]:
        return {
            "shapley": self.method,
            "n_permutations": self.n_permutations if self.method == "permutation" else 0,
        }
