"""Latent traversal: each latent moved over a grid of values, cell by cell, for any model family.

For every cell (encoded once, at its posterior mean), latent k of the decoder input is set to each
grid value ``v`` with the other latents kept at the cell's own values, and decoded. Per group of
cells (the run's ``groupby`` groups, then all cells) the scorer keeps:

* ``traverse_lfc`` (groups, A, steps, genes): the mean over the group's cells of
  ``ln rho(z_k = v) - ln rho(z)``, the log fold change of the normalized expression against the
  cell's own reconstruction (the library is the cell's, so it is also the fold change of the mean);
* ``traverse_delta_nll`` (groups, A, steps): the mean NLL change ``NLL(z_k = v) - NLL(z)`` in nats,
  0 where the grid value is the cell's own.

The grid (``options.TraversalOptions``) is resolved before the pass: by default ``steps`` values
evenly spaced between the latent's 1st and 99th percentile over the input cells' decoder inputs
(where the data lives, robust to a few extreme cells), or those quantiles themselves, or values
given. It is recorded in ``uns["ablation"]["traverse_values"]`` (A, steps).

A family's ``decode`` is all the generic path needs (any family). An affine family
(``family.AffineFamily``, LinearSCVI) moves its logits by the rank-one term
``(v - z_k) * loadings[:, k]`` instead of decoding again, and takes the NLL change from the
z-dependent likelihood terms only, as the sweep does (the lgamma terms cancel and are never
evaluated). A split family with one latent per split (``family.SplitFamily``, DRVI's default)
re-aggregates only the moved latent's split, decoded once per covariate combination (its input is
the grid value alone). Every path is checked against a float64 brute force (tests/test_traversal.py,
tests/test_drvi.py) and against the generic one (tests/test_family.py, tests/test_drvi.py). On CPU
the rank-one path costs about what the generic one does (``benchmarks/bench_traverse.py``): one
(cells, genes) softmax and likelihood per grid value dominates either way, so a traversal costs
about ``steps`` sweeps; DRVI's per-split path is 4x faster than decoding every split per value.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from linear_decoder_jax import ablation, attribution, options, schema
from linear_decoder_jax.distributions import count_term, rate_reference, rate_term_change
from linear_decoder_jax.errors import ConfigError
from linear_decoder_jax.family import (
    AffineFamily,
    Family,
    Rates,
    SplitFamily,
    affine_logits,
    one_latent_per_split,
    split_layout,
)
from linear_decoder_jax.pipeline import Batch, Placement, Plan

Array = jax.Array


class TraversalSums(NamedTuple):
    """Running sums over cells, per group row (the groups, then all cells)."""

    lfc: Array | np.ndarray  # (rows, A, steps, n_vars)
    delta_nll: Array | np.ndarray  # (rows, A, steps)
    n_cells: Array | np.ndarray  # (rows,)


def resolve_grid(
    spec: Any, latent: np.ndarray | None, n_traversed: int, steps: int
) -> tuple[str, np.ndarray]:
    """(name, (n_traversed, steps) float64 values) of a grid spec; ``latent`` holds the traversed
    latents' decoder inputs over the input cells (n_obs, n_traversed), needed by the named grids.
    """
    tail = options.TRAVERSE_TAIL
    if isinstance(spec, str):
        if spec not in options.TRAVERSE_GRIDS:
            msg = f"Expected traverse_grid one of {options.TRAVERSE_GRIDS} or values, got {spec!r} instead."
            raise ConfigError(msg)
        if latent is None:  # pragma: no cover - callers pass it for the named grids
            raise ValueError("latent needed")
        data = np.asarray(latent, np.float64)
        if spec == "range":
            lo, hi = np.quantile(data, [tail, 1.0 - tail], axis=0)
            return spec, np.linspace(lo, hi, steps, axis=1)
        return spec, np.quantile(data, np.linspace(tail, 1.0 - tail, steps), axis=0).T
    values = np.asarray(spec, dtype=np.float64)
    if values.ndim == 1:
        values = np.tile(values, (n_traversed, 1))
    if values.ndim != 2 or values.shape[0] != n_traversed or values.shape[1] < 1:
        msg = (
            f"Expected traversal grid values as one list for every latent or {n_traversed} rows "
            f"(one per traversed latent), got shape {np.shape(spec)} instead."
        )
        raise ConfigError(msg)
    if not np.all(np.isfinite(values)):
        raise ConfigError("Traversal grid values must be finite.")
    return "values", values


def check_budget(n_groups: int, n_traversed: int, steps: int, n_vars: int) -> None:
    """Refuse a ``traverse_lfc`` table (float64 at finish) over ``options.GENE_SCORES_BUDGET``."""
    need = 8 * (n_groups + 1) * n_traversed * steps * n_vars
    if need > options.GENE_SCORES_BUDGET:
        msg = (
            f"A traversal of {n_traversed} latents x {steps} values x {n_vars} genes for "
            f"{n_groups} groups (+ all cells) needs {need / 2**30:.1f} GiB, over the "
            f"{options.GENE_SCORES_BUDGET / 2**30:.1f} GiB budget: pass fewer `latents`, fewer "
            "`traverse_steps` or a `groupby` with fewer categories."
        )
        raise ConfigError(msg)


# (latent k, value) -> (what the NLL change needs, log normalized expression) of the moved decode
Mover = Callable[[Array, Array], tuple[Any, Array]]
NLLChange = Callable[[Any, Array], Array]


def _affine_parts(
    family: AffineFamily, params: Any, batch: Batch
) -> tuple[Array, Mover, NLLChange]:
    """(full log scale, mover, NLL change) of the rank-one path: latent k at ``value`` moves each
    head's logits by ``(value - z_k) * loadings[:, k]``. The NLL change is taken as the sweep
    takes it (``ablation``): the z-dependent terms only, dense at ``x = 0`` and at the non-zero
    counts, so the lgamma terms cancel exactly and cost nothing."""
    lik = family.likelihood
    heads = family.affine_heads(params)
    full_logits = [affine_logits(h, batch.z, batch.batch) for h in heads]
    theta = family.dispersion(params, batch.batch, batch.label)
    lib = jnp.exp(batch.log_library)
    at_nz = functools.partial(jnp.take_along_axis, indices=batch.nz_index, axis=1)
    theta_nz = at_nz(theta)

    def rates(logits: list[Array], top: Array) -> tuple[Rates, Array]:
        """Rates and log scale with one exp per entry; ``top`` (b, 1) bounds the scale logits
        from above (within :data:`ablation.SHIFT_SLACK` of their maximum)."""
        e = jnp.exp(logits[0] - top)
        total = e.sum(axis=-1, keepdims=True)
        scale = e * (1.0 / total)
        log_scale = logits[0] - (top + jnp.log(total))
        zi = logits[1] if len(logits) > 1 else None
        return Rates(scale=scale, mu=lib * scale, theta=theta, zi_logits=zi), log_scale

    def counts(log_scale: Array, zi: Array | None) -> Array:
        """count_term at the non-zero counts (b, width)."""
        mu_nz = jnp.exp(at_nz(log_scale) + batch.log_library)
        zi_nz = [] if zi is None else [at_nz(zi)]
        return count_term(batch.nz_count, mu_nz, theta_nz, *zi_nz, likelihood=lik)

    top_full = full_logits[0].max(axis=-1, keepdims=True)
    full, log_scale = rates(full_logits, top_full)
    reference = rate_reference(full.mu, theta, full.zi_logits, likelihood=lik)
    count_full = counts(log_scale, full.zi_logits)
    hi, lo = heads[0].loadings.max(axis=0), heads[0].loadings.min(axis=0)  # (K,)

    def moved(k: Array, value: Array) -> tuple[Rates, Array]:
        d = (value - batch.z[:, k])[:, None]
        logits = [
            f + d * h.loadings[:, k][None, :] for f, h in zip(full_logits, heads, strict=True)
        ]
        # the moved maximum is at most the full one plus the largest shift, read off the
        # loadings' range (no pass over the genes) unless that range is too wide to trust
        bound = top_full + jnp.maximum(d * hi[k], d * lo[k])
        narrow = jnp.all(jnp.abs(d) * (hi[k] - lo[k]) <= ablation.SHIFT_SLACK)
        top = jax.lax.cond(narrow, lambda: bound, lambda: logits[0].max(axis=-1, keepdims=True))
        return rates(logits, top)

    def nll_change(r: Rates, log_scale_k: Array) -> Array:
        zi = [] if r.zi_logits is None else [r.zi_logits]
        gain = rate_term_change(r.mu, theta, reference, *zi, likelihood=lik)
        return -(gain + (counts(log_scale_k, r.zi_logits) - count_full).sum(-1))

    return log_scale, moved, nll_change


def _generic_parts(family: Family, params: Any, batch: Batch) -> tuple[Array, Mover, NLLChange]:
    """(full log scale, mover, NLL change) decoding the whole decoder input again per value."""

    def decode(z: Array) -> tuple[Rates, Array]:
        rates = family.decode(params, z, batch.log_library, batch.batch, batch.label)
        return rates, jnp.log(rates.scale)

    def moved(k: Array, value: Array) -> tuple[Rates, Array]:
        return decode(batch.z.at[:, k].set(value))

    full, log_scale = decode(batch.z)
    lp_full = family.log_prob(batch.x, full)  # (b, n_vars)

    def nll_change(r: Rates, log_scale_k: Array) -> Array:
        return (lp_full - family.log_prob(batch.x, r)).sum(-1)

    return log_scale, moved, nll_change


def _split_parts(family: SplitFamily, params: Any, batch: Batch) -> tuple[Array, Mover, NLLChange]:
    """(full log scale, mover, NLL change) of the per-split path: moving latent k changes only
    the term of its split, whose input (the value alone) is the same for every cell of a
    covariate combination, so each (latent, value) decodes one row per combination
    (``constant_split_values``) and re-aggregates the split's complement (``leave_one_out``) with
    it; the NLL change takes ``aggregate_log_prob``'s terms that depend on the decode."""
    x, lib, cov = batch.x, batch.log_library, batch.batch
    values = family.split_values(params, batch.z, cov)  # (b, n_splits, n_vars)
    _, log_scale, lp_full = family.aggregate_log_prob(params, x, family.aggregate(values), lib, cov)
    rest = family.leave_one_out(values)
    split_of_k = jnp.asarray(split_layout(family)[0])
    pick = functools.partial(jax.lax.dynamic_index_in_dim, axis=1, keepdims=False)

    def moved(k: Array, value: Array) -> tuple[Array, Array]:
        s = split_of_k[k]
        z_row = jnp.zeros(batch.z.shape[1], batch.z.dtype).at[k].set(value)
        term = pick(family.constant_split_values(params, z_row, cov), s)
        _, log_scale_k, lp_k = family.aggregate_log_prob(
            params, x, family.aggregate_with(pick(rest, s), term), lib, cov
        )
        return lp_k, log_scale_k

    def nll_change(lp_k: Array, log_scale_k: Array) -> Array:
        return (lp_full - lp_k).sum(-1)

    return log_scale, moved, nll_change


@functools.partial(jax.jit, static_argnames=("family", "n_groups", "vectorize"))
def traverse_minibatch(
    family: Family,
    params: Any,
    batch: Batch,
    grid: Array,
    latents: Array,
    totals: TraversalSums,
    *,
    n_groups: int,
    vectorize: bool,
) -> TraversalSums:
    """``totals`` plus one minibatch's group sums of the log fold changes and NLL changes at every
    (latent, grid value): ``grid`` (A, steps) for the model latents ``latents`` (A,)."""
    if isinstance(family, AffineFamily):
        log_scale, moved, nll_change = _affine_parts(family, params, batch)
    elif one_latent_per_split(family):
        assert isinstance(family, SplitFamily)
        log_scale, moved, nll_change = _split_parts(family, params, batch)
    else:
        log_scale, moved, nll_change = _generic_parts(family, params, batch)
    weights = attribution.group_weights(batch.group, batch.valid, n_groups)  # (rows, b)

    def one(args: tuple[Array, Array]) -> tuple[Array, Array]:
        rates, log_scale_k = moved(*args)
        delta = nll_change(rates, log_scale_k)  # (b,)
        lfc = attribution.segment_total(weights, log_scale_k - log_scale)  # (rows, n_vars)
        return lfc, attribution.segment_total(weights, delta[:, None])[:, 0]

    n_traversed, steps = grid.shape
    pairs = (jnp.repeat(latents, steps), grid.reshape(-1))
    # pipeline.vectorize_default: batched on accelerators, one value after another on CPU
    lfc, delta = jax.vmap(one)(pairs) if vectorize else jax.lax.map(one, pairs)
    rows = weights.shape[0]
    lfc = lfc.reshape(n_traversed, steps, rows, -1).transpose(2, 0, 1, 3)
    delta = delta.reshape(n_traversed, steps, rows).transpose(2, 0, 1)
    return TraversalSums(
        lfc=totals.lfc + lfc,
        delta_nll=totals.delta_nll + delta,
        n_cells=totals.n_cells + weights.sum(axis=1),
    )


class TraversalScorer:
    """The traversal as a scorer of the run pipeline (``pipeline.execute``): no per-cell rows;
    totals: the group sums (:class:`TraversalSums`), finished as ``traverse_lfc``,
    ``traverse_delta_nll`` and ``gene_n_cells`` (group means; NaN for an empty group). Latent
    units at the posterior mean only (``assemble`` refuses splits and ``n_samples``)."""

    fields: tuple[str, ...] = ()
    needs_key = False

    def __init__(
        self,
        family: Family,
        params: Any,
        plan: Plan,
        grid: tuple[str, np.ndarray],
        *,
        place: Placement,
    ):
        self.family, self.params, self.plan = family, params, plan
        self.grid_name, self.values = grid[0], np.asarray(grid[1], np.float64)
        self.n_groups = len(plan.group_names)
        self.place = place
        self.grid = place.replicated(self.values.astype(plan.dtype))
        self.latents = place.replicated(np.asarray(plan.latents, np.int32))

    def init(self) -> TraversalSums:
        rows, (a, s) = self.n_groups + 1, self.values.shape
        dt = self.plan.dtype
        return self.place.replicated(
            TraversalSums(
                lfc=np.zeros((rows, a, s, self.family.n_vars), dt),
                delta_nll=np.zeros((rows, a, s), dt),
                n_cells=np.zeros(rows, dt),
            )
        )

    def score(self, batch: Batch, totals: TraversalSums, key: Array):
        out = traverse_minibatch(
            self.family,
            self.params,
            batch,
            self.grid,
            self.latents,
            totals,
            n_groups=self.n_groups,
            vectorize=self.plan.vectorize,
        )
        return {}, out

    def finish(self, totals: TraversalSums, n_obs: int) -> dict[str, np.ndarray]:
        n = np.asarray(totals.n_cells, np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(n > 0, 1.0 / n, np.nan)
        dtype = np.dtype(self.plan.dtype)
        lfc = np.asarray(totals.lfc, np.float64) * scale[:, None, None, None]
        delta = np.asarray(totals.delta_nll, np.float64) * scale[:, None, None]
        return {
            "traverse_lfc": lfc.astype(dtype),
            "traverse_delta_nll": delta.astype(dtype),
            "gene_n_cells": n.astype(dtype),
        }

    def settings(self) -> dict[str, Any]:
        """The grid and the names of the group rows."""
        return {
            "traverse": True,
            "traverse_grid": self.grid_name,
            "traverse_values": self.values,
            "gene_groups": [*self.plan.group_names, schema.ALL_CELLS],
        }
