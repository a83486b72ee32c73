"""The ablation engine: for every cell and latent, how much worse the reconstruction gets.

``delta_nll[c, k] = NLL(x_c | latent k replaced) - NLL(x_c | full)`` in nats, with the model's own
likelihood, dispersion and library. Removing latent k moves the decoder logits by a rank-one term,
``(baseline_k - z_k) * loadings[:, k]`` (BatchNorm folded in, ``Family.affine_heads``), so one
minibatch is encoded and decoded once, then every latent is scored inside the same ``jit``: its
log softmax is the full one plus that shift minus one log-normaliser per cell. The difference is
taken gene by gene on the z-dependent part of the log-likelihood only (its value at ``x = 0``
densely, what each count adds at the non-zero counts only; ``distributions``): the lgamma terms
cancel exactly instead of in rounding.

Per (cell, latent, gene) the sweep costs one exp, shared by the normaliser, the moved rates and the
L1 change, and one log (NB; ZINB adds its softplus terms). On CPU the latents run one after another
(``lax.map``) on (cells, genes) arrays that stay in cache, which XLA:CPU compiles into fused
reductions; on accelerators they are batched (``vmap``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from linear_decoder_jax import attribution, schema
from linear_decoder_jax.distributions import (
    count_term,
    log_prob_constant,
    log_prob_constant_at_zero,
    rate_reference,
    rate_term,
    rate_term_change,
    rate_term_gene_change,
)
from linear_decoder_jax.errors import ConfigError
from linear_decoder_jax.family import (
    AffineFamily,
    Family,
    SplitFamily,
    affine_logits,
    sample_gaussian,
    split_layout,
    split_local,
)
from linear_decoder_jax.options import BASELINES, Baseline, Mode
from linear_decoder_jax.pipeline import Batch, Placement, Plan

BaselineSpec = Baseline | float | Sequence[float] | np.ndarray

# Widest range of a latent's logit shift over genes taken without a max pass: its largest
# exp(r - c) term is then above exp(-60) times a softmax entry, far from float32 underflow.
SHIFT_SLACK = 60.0


class MinibatchScores(NamedTuple):
    """Scores of one padded minibatch (rows past ``n_valid`` are padding)."""

    delta_nll: jax.Array  # (batch, n_ablated)
    delta_nll_se: jax.Array  # (batch, n_ablated); zeros unless n_samples > 0
    delta_l1: jax.Array  # (batch, n_ablated)
    nll: jax.Array  # (batch,)
    lfc_sum: jax.Array  # (n_vars, n_ablated) sum over valid cells of ln rho_ablated - ln rho
    genes: attribution.GeneSums | None = None  # per-gene, per-group sums (gene scores only)


def _score(
    family: AffineFamily,
    params: Any,
    nz_index: jax.Array,
    nz_count: jax.Array,
    z: jax.Array,
    log_library: jax.Array,
    batch: jax.Array,
    label: jax.Array,
    valid: jax.Array,
    baseline: jax.Array,
    latents: jax.Array,
    group: jax.Array,
    *,
    mode: Mode,
    vectorize: bool,
    n_groups: int | None = None,
):
    """The rank-one fast path of an affine family (``family.AffineFamily``): delta_nll, delta_l1, full NLL and the lfc sums for decoder input ``z`` (batch, n_latent);
    with ``n_groups`` (gene scores) also the per-gene, per-group sums (``attribution.GeneSums``)
    of the cells' ``group`` codes.

    The likelihood is split into its value at ``x = 0`` (dense over genes) and what each count
    adds, evaluated at the non-zero counts only (``nz_index``/``nz_count``). Everything the
    latents share (the full model's softmax, its per-gene reference terms, theta) is computed
    once, then each latent's body works on (batch, n_vars) arrays.
    """
    lik = family.likelihood
    theta = family.dispersion(params, batch, label)
    heads = family.affine_heads(params)

    full = [affine_logits(h, z, batch) for h in heads]
    # "keep" ablates from the all-baseline point: every latent but k at its baseline.
    if mode == "drop":
        start = full
    else:
        start = [affine_logits(h, jnp.broadcast_to(baseline, z.shape), batch) for h in heads]

    def softmax(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(rho, log normaliser) with one exp per entry."""
        top = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
        e = jnp.exp(logits - top)
        total = e.sum(axis=-1, keepdims=True)
        return e * (1.0 / total), top + jnp.log(total)

    rho, lse = softmax(full[0])
    lib = jnp.exp(log_library)
    mu = lib * rho
    at_nz = functools.partial(jnp.take_along_axis, indices=nz_index, axis=1)
    theta_nz = at_nz(theta)
    zi = full[1] if lik == "zinb" else None

    def at_counts(mu_nz: jax.Array, zi_nz: list[jax.Array]) -> jax.Array:
        """count_term at the non-zero counts."""
        return count_term(nz_count, mu_nz, theta_nz, *zi_nz, likelihood=lik)

    # z-dependent terms: the value at x = 0 (dense), plus what each count adds (at the non-zero
    # counts only); then the lgamma terms, also at the non-zero counts (at x = 0 they cancel).
    count_full = at_counts(at_nz(mu), [at_nz(f) for f in full[1:]])
    v_full = rate_term(mu, theta, zi, likelihood=lik).sum(-1) + count_full.sum(-1)
    reference = rate_reference(mu, theta, zi, likelihood=lik)
    at_zero = log_prob_constant_at_zero(theta, likelihood=lik)
    nz_const = log_prob_constant(nz_count, theta_nz, likelihood=lik) - at_nz(at_zero)
    constant = at_zero.sum(-1) + jnp.where(nz_count > 0, nz_const, 0.0).sum(-1)
    nll = -(v_full + constant)

    # Latent k moves the start logits by r = d * loadings[:, k] (rank one): its log softmax is
    # log_rho + r - log_z, log_z = logsumexp(log_rho + r), with log_rho that of the start. The
    # shift c = max_g r is read off the loadings' range; log_rho <= 0, so exp(log_rho + r - c) <= 1.
    base_lse = lse if mode == "drop" else softmax(start[0])[1]
    log_rho = start[0] - base_lse
    log_mu = log_rho + log_library
    log_mu_nz = at_nz(log_mu)
    start_zi_nz = [at_nz(s) for s in start[1:]]

    # A latent moves a cell's decoder outputs only where its shift is non-zero and its loadings
    # are; unmoved cells score exactly 0 (no rounding noise from recomputing the softmax).
    active = jnp.stack([jnp.any(h.loadings != 0, axis=0) for h in heads]).any(0)  # (n_latent,)
    off_baseline = (z != baseline[None, :]) & active[None, :]  # (batch, n_latent)
    load_hi, load_lo = heads[0].loadings.max(axis=0), heads[0].loadings.min(axis=0)

    zt = z.T[latents]  # (n_ablated, batch): each latent's inputs as contiguous rows
    b = baseline[latents][:, None]
    shift = (b - zt) if mode == "drop" else (zt - b)
    if mode == "drop":
        moved_any = off_baseline.T[latents]
    else:  # moved from the full model by every other latent that sits off its baseline
        others = off_baseline.sum(axis=1)[None, :] - off_baseline.T[latents]
        moved_any = others > 0
    per_latent = (
        shift,
        moved_any,
        [h.loadings.T[latents] for h in heads],
        jnp.maximum(shift * load_hi[latents][:, None], shift * load_lo[latents][:, None]),
        # where the loadings' range is this wide, exp(log_rho + r - c) could underflow for
        # every gene: take c as the moved log softmax's maximum (a pass over the genes)
        jnp.abs(shift) * (load_hi - load_lo)[latents][:, None] <= SHIFT_SLACK,
    )

    weights = None if n_groups is None else attribution.group_weights(group, valid, n_groups)

    def one(args):
        d, moved_any, loadings, c, narrow = args  # d, c: (batch,) for latent k
        r = d[:, None] * loadings[0][None, :]
        c = jax.lax.cond(
            jnp.all(narrow),
            lambda: c,
            lambda: (log_rho + d[:, None] * loadings[0][None, :]).max(axis=-1),
        )[:, None]
        # One exp per (cell, gene): the normaliser, the moved rates and the L1 change all reuse it
        # (measured on XLA:CPU: 20% faster than re-taking the exp in each fused pass).
        e = jnp.exp(log_rho + r - c)
        total = e.sum(axis=-1, keepdims=True)
        log_z = c + jnp.log(total)
        rho_k = e * (1.0 / total)
        zi_k = [s + d[:, None] * lk[None, :] for s, lk in zip(start[1:], loadings[1:], strict=True)]
        mu_k = lib * rho_k
        r_nz = d[:, None] * loadings[0][nz_index]
        zi_nz = [
            s + d[:, None] * lk[nz_index] for s, lk in zip(start_zi_nz, loadings[1:], strict=True)
        ]
        counts = at_counts(jnp.exp(log_mu_nz + r_nz - log_z), zi_nz) - count_full
        if weights is None:
            gain = rate_term_change(mu_k, theta, reference, *zi_k, likelihood=lik)
            genes = None
        else:  # the same terms per gene, reduced over each group's cells that the latent moves
            dense = rate_term_gene_change(mu_k, theta, reference, *zi_k, likelihood=lik)
            gain = dense.sum(-1)
            moved_weights = weights * moved_any[None, :].astype(weights.dtype)
            genes = -attribution.gene_group_sums(moved_weights, dense, counts, nz_index, group)
        gain = gain + counts.sum(-1)
        l1 = jnp.abs(rho_k - rho).sum(-1)
        delta = jnp.where(moved_any, -gain, 0.0)
        l1 = jnp.where(moved_any, l1, 0.0)
        # ln rho_k - ln rho = r - log_z + (base_lse - lse) + (start - full), over valid cells
        lse_change = (log_z + base_lse - lse)[:, 0]
        if mode == "drop":
            lfc = loadings[0] * jnp.sum(d * valid) - jnp.sum(lse_change * valid)
        else:
            moved = start[0] + r - full[0] - lse_change[:, None]
            lfc = jnp.sum(moved * valid[:, None], axis=0)
        if weights is None:
            return delta, l1, lfc, None
        return delta, l1, lfc, (genes, attribution.segment_total(weights, lse_change))

    # pipeline.vectorize_default: the batched body on accelerators, a loop over latents on CPU
    if vectorize:
        delta, l1, lfc, per_gene = jax.vmap(one)(per_latent)
    else:
        delta, l1, lfc, per_gene = jax.lax.map(one, per_latent)
    sums = None
    if weights is not None:
        gene_delta, lse_sums = per_gene  # (n_ablated, rows, n_vars), (n_ablated, rows)
        sums = attribution.GeneSums(
            delta_nll=gene_delta.transpose(1, 0, 2),
            lse_change=lse_sums.T,
            shift=attribution.segment_total(weights, baseline[None, :] - z),
            n_cells=weights.sum(axis=1),
        )
    return delta.T, l1.T, nll, lfc.T, sums


class _UnitTerms(NamedTuple):
    """What the sweep needs from one decode: the normalized expression, its log and the per-gene
    log-likelihood (or, on the per-split path, its terms that depend on the decode)."""

    scale: jax.Array
    log_scale: jax.Array
    log_prob: jax.Array


def _split_terms(
    family: SplitFamily,
    params: Any,
    x: jax.Array,
    z: jax.Array,
    log_library: jax.Array,
    batch: jax.Array,
    baseline: jax.Array,
    *,
    units: tuple[tuple[int, ...], ...] | None,
    mode: Mode,
):
    """The per-split fast path of :func:`_score_generic`: (full rates, full terms, terms of
    ablated unit k) with ``family.aggregate_log_prob``'s terms.

    Replacing latent k changes only the term of split ``s(k)``, so the splits are decoded once at
    ``z`` and once per position p within a split with the latents at p replaced (every split at
    once: one latent of each), instead of once per latent; each unit then re-aggregates its
    split's complement (``leave_one_out``) with its one replaced term. With one latent per split
    the replaced decode is the baseline's, the same for every cell of a covariate combination
    (``constant_split_values``). Removing a split (``units``) decodes nothing more."""
    values = family.split_values(params, z, batch)  # (b, n_splits, n_vars)
    mean = family.aggregate(values)
    full = family.rates_from_aggregate(params, mean, log_library, batch)

    def terms_of(mean: jax.Array) -> _UnitTerms:
        return _UnitTerms(*family.aggregate_log_prob(params, x, mean, log_library, batch))

    split = functools.partial(jax.lax.dynamic_index_in_dim, axis=1, keepdims=False)
    if units is not None:  # a split removed from the aggregation, or kept alone
        if mode == "drop":
            rest = family.leave_one_out(values)
            return (
                full,
                terms_of(mean),
                lambda k: terms_of(family.aggregate_with(split(rest, k), None)),
            )
        return (
            full,
            terms_of(mean),
            lambda k: terms_of(family.aggregate_with(None, split(values, k))),
        )
    split_of, position = split_layout(family)
    n_positions = int(position.max()) + 1
    constant = family.constant_split_values(params, baseline, batch)  # every latent at baseline
    # drop: split s(k) with latent k at its baseline, into the full aggregation; keep: split s(k)
    # with latent k alone off its baseline, into the baseline's aggregation
    drop = mode == "drop"
    base, alone = (values, constant) if drop else (constant, values)
    moved, kept = (baseline, z) if drop else (z, baseline)
    replaced = [
        alone
        if n_positions == 1
        else family.split_values(params, jnp.where(position == p, moved, kept), batch)
        for p in range(n_positions)
    ]
    rest = family.leave_one_out(base)  # (b, n_splits, n_vars)
    terms = jnp.stack(replaced)  # (n_positions, b, n_splits, n_vars)
    split_of_k, position_of_k = jnp.asarray(split_of), jnp.asarray(position)

    def unit(k: jax.Array) -> _UnitTerms:
        s = split_of_k[k]
        term = split(jax.lax.dynamic_index_in_dim(terms, position_of_k[k], keepdims=False), s)
        return terms_of(family.aggregate_with(split(rest, s), term))

    return full, terms_of(mean), unit


def _score_generic(
    family: Family,
    params: Any,
    x: jax.Array,
    z: jax.Array,
    log_library: jax.Array,
    batch: jax.Array,
    label: jax.Array,
    valid: jax.Array,
    baseline: jax.Array,
    latents: jax.Array,
    group: jax.Array,
    *,
    units: tuple[tuple[int, ...], ...] | None,
    mode: Mode,
    vectorize: bool,
    n_groups: int | None = None,
):
    """The same scores as :func:`_score` for any family, by decoding once per ablated unit.

    A latent unit is replaced in ``z`` (``where(mask, baseline, z)`` for "drop", the reverse for
    "keep"); a split unit (``units``) is removed from the decoder's aggregation (``split_mask``),
    or kept alone. The NLL change is the per-gene difference of the family's log-likelihood, the
    log fold change that of the log normalized expression. A family whose splits see their own
    latents (``family.split_local``) decodes each split twice instead (:func:`_split_terms`)."""
    n_latent = z.shape[1]
    split_unit = None
    if split_local(family):
        assert isinstance(family, SplitFamily)
        full, full_terms, split_unit = _split_terms(
            family, params, x, z, log_library, batch, baseline, units=units, mode=mode
        )
        nll = -family.log_prob(x, full).sum(-1)
    else:
        full = family.decode(params, z, log_library, batch, label)
        full_terms = _UnitTerms(full.scale, jnp.log(full.scale), family.log_prob(x, full))
        nll = -full_terms.log_prob.sum(-1)
    weights = None if n_groups is None else attribution.group_weights(group, valid, n_groups)
    if units is None:
        masks = jax.nn.one_hot(latents, n_latent, dtype=bool)  # (n_ablated, n_latent)
    else:
        masks = jax.nn.one_hot(latents, len(units), dtype=bool)  # (n_ablated, n_splits)
    off = z != baseline[None, :]  # (b, n_latent)

    def one(args: tuple[jax.Array, jax.Array]):
        mask, k = args
        if units is not None:  # remove the split from the aggregation, or keep it alone
            moved = jnp.ones(z.shape[0], bool)
        elif mode == "drop":
            moved = jnp.any(off & mask[None, :], axis=1)
        else:
            moved = jnp.any(off & ~mask[None, :], axis=1)
        if split_unit is not None:
            terms = split_unit(k)
        else:
            if units is not None:
                keep = ~mask if mode == "drop" else mask
                rates = family.decode(
                    params, z, log_library, batch, label, split_mask=keep.astype(z.dtype)
                )
            else:
                if mode == "drop":
                    zk = jnp.where(mask[None, :], baseline[None, :], z)
                else:
                    zk = jnp.where(mask[None, :], z, baseline[None, :])
                rates = family.decode(params, zk, log_library, batch, label)
            terms = _UnitTerms(rates.scale, jnp.log(rates.scale), family.log_prob(x, rates))
        per_gene = full_terms.log_prob - terms.log_prob  # NLL change per gene
        delta = jnp.where(moved, per_gene.sum(-1), 0.0)
        l1 = jnp.where(moved, jnp.abs(terms.scale - full_terms.scale).sum(-1), 0.0)
        lfc_cells = jnp.where(moved[:, None], terms.log_scale - full_terms.log_scale, 0.0)
        lfc = jnp.sum(lfc_cells * valid[:, None], axis=0)
        if weights is None:
            return delta, l1, lfc, None
        moved_weights = weights * moved[None, :].astype(weights.dtype)
        genes = attribution.segment_total(moved_weights, per_gene)
        return delta, l1, lfc, (genes, attribution.segment_total(weights, lfc_cells))

    if vectorize:
        delta, l1, lfc, per_gene = jax.vmap(one)((masks, latents))
    else:
        delta, l1, lfc, per_gene = jax.lax.map(one, (masks, latents))
    sums = None
    if weights is not None:
        gene_delta, gene_lfc = per_gene  # (n_ablated, rows, n_vars) each
        sums = attribution.GeneSums(
            delta_nll=gene_delta.transpose(1, 0, 2),
            lse_change=jnp.zeros((weights.shape[0], masks.shape[0]), z.dtype),
            shift=jnp.zeros((weights.shape[0], n_latent), z.dtype),
            n_cells=weights.sum(axis=1),
            lfc=gene_lfc.transpose(1, 0, 2),
        )
    return delta.T, l1.T, nll, lfc.T, sums


@functools.partial(
    jax.jit, static_argnames=("family", "units", "mode", "n_samples", "vectorize", "n_groups")
)
def sweep_minibatch(
    family: Family,
    params: Any,
    batch: Batch,
    baseline: jax.Array,
    latents: jax.Array,
    key: jax.Array,
    *,
    mode: Mode,
    n_samples: int,
    vectorize: bool,
    n_groups: int | None = None,
    units: tuple[tuple[int, ...], ...] | None = None,
) -> MinibatchScores:
    """Score every unit in ``latents`` for one encoded minibatch; see the module docstring.

    An affine family (``family.AffineFamily``) ablating latents takes the rank-one fast path
    (:func:`_score`), any other the generic path (:func:`_score_generic`). ``n_samples > 0``
    averages over draws z ~ q(z|x) made from ``key`` and adds their standard error;
    ``vectorize`` batches the latents (``vmap``) instead of looping over them. ``n_groups`` (at
    the posterior mean only, ``n_samples == 0``): also the per-gene scores summed over each of
    the ``n_groups`` groups of ``batch.group`` and over all cells (``attribution.GeneSums``).
    """
    if n_groups is not None and n_samples:
        raise ConfigError("Gene scores are computed at the posterior mean: use n_samples=0.")
    shared: dict[str, Any] = dict(
        log_library=batch.log_library,
        batch=batch.batch,
        label=batch.label,
        valid=batch.valid,
        baseline=baseline,
        latents=latents,
        group=batch.group,
        mode=mode,
        vectorize=vectorize,
    )
    if units is None and isinstance(family, AffineFamily):
        score = functools.partial(_score, family, params, batch.nz_index, batch.nz_count, **shared)
    else:
        score = functools.partial(_score_generic, family, params, batch.x, units=units, **shared)
    delta, l1, nll, lfc, genes = score(z=batch.z, n_groups=n_groups)
    se = jnp.zeros_like(delta)
    if n_samples:

        def draw(carry, k):
            zs = family.decoder_input(sample_gaussian(batch.qz_m, batch.qz_v, key=k))
            d = score(z=zs)[0]
            return (carry[0] + d, carry[1] + d * d), None

        zero = jnp.zeros_like(delta)
        (s1, s2), _ = jax.lax.scan(draw, (zero, zero), jax.random.split(key, n_samples))
        delta = s1 / n_samples
        var = jnp.maximum(s2 / n_samples - delta * delta, 0.0) * n_samples / max(n_samples - 1, 1)
        se = jnp.sqrt(var / n_samples)
    return MinibatchScores(delta, se, l1, nll, lfc, genes)


class SweepScorer:
    """The plain sweep as a scorer of the run pipeline (``pipeline.execute``): per cell ``nll``,
    ``delta_nll``, ``delta_l1`` and ``latent`` (plus ``delta_nll_se`` with ``n_samples > 0``);
    totals: the summed log fold changes, finished as ``mean_lfc``. ``gene_scores``: also the
    per-gene, per-group sums of the same pass (``attribution.GeneSums``), finished as
    ``gene_delta_nll``, ``gene_lfc`` and ``gene_n_cells``."""

    def __init__(
        self,
        family: Family,
        params: Any,
        plan: Plan,
        *,
        place: Placement,
        gene_scores: bool = False,
    ):
        self.family, self.params, self.plan = family, params, plan
        self.n_groups = len(plan.group_names) if gene_scores else None
        self.baseline = place.replicated(np.asarray(plan.baseline, dtype=plan.dtype))
        self.latents = place.replicated(np.asarray(plan.latents, dtype=np.int32))
        self.place = place
        self.needs_key = plan.n_samples > 0
        self.fast = plan.units is None and isinstance(family, AffineFamily)
        self.fields = ("nll", "delta_nll", "delta_l1", "latent") + (
            ("delta_nll_se",) if plan.n_samples else ()
        )

    def init(self) -> tuple[jax.Array, attribution.GeneSums | None]:
        shape = (self.family.n_vars, len(self.plan.latents))
        genes = None
        if self.n_groups is not None:
            genes = attribution.GeneSums.zeros(
                self.n_groups,
                len(self.plan.latents),
                self.family.n_vars,
                self.family.n_latent,
                dtype=self.plan.dtype,
                lfc=not self.fast,
            )
        return self.place.replicated((np.zeros(shape, self.plan.dtype), genes))

    def score(self, batch: Batch, totals: jax.Array, key: jax.Array):
        out = sweep_minibatch(
            self.family,
            self.params,
            batch,
            self.baseline,
            self.latents,
            key,
            mode=self.plan.mode,
            n_samples=self.plan.n_samples,
            vectorize=self.plan.vectorize,
            n_groups=self.n_groups,
            units=self.plan.units,
        )
        rows = {"nll": out.nll, "delta_nll": out.delta_nll, "delta_l1": out.delta_l1}
        rows["latent"] = batch.z
        if self.plan.n_samples:
            rows["delta_nll_se"] = out.delta_nll_se
        lfc_sum, genes = totals
        if genes is not None:
            genes = attribution.add_sums(genes, out.genes)
        return rows, (lfc_sum + out.lfc_sum, genes)

    def finish(self, totals: tuple[Any, Any], n_obs: int) -> dict[str, np.ndarray]:
        lfc_sum, genes = totals
        out = {"mean_lfc": np.asarray(lfc_sum) / n_obs}
        if genes is not None:
            loadings = None if not self.fast else np.asarray(self.family.loadings(self.params))
            out.update(
                attribution.finish_gene_scores(
                    genes, loadings, self.plan.latents, mode=self.plan.mode
                )
            )
        return out

    def settings(self) -> dict[str, Any]:
        """The names of the gene tables' group rows (gene scores)."""
        if self.n_groups is None:
            return {}
        return {"gene_groups": [*self.plan.group_names, schema.ALL_CELLS]}


def resolve_baseline(
    baseline: BaselineSpec, latent: np.ndarray | None, n_latent: int
) -> tuple[str, np.ndarray]:
    """(name, values of length n_latent) for a baseline spec; stats need the latent matrix."""
    if isinstance(baseline, str):
        if baseline not in BASELINES:
            msg = f"Expected baseline one of {BASELINES}, a number or {n_latent} values, got {baseline!r} instead."
            raise ConfigError(msg)
        if baseline == "zero":
            return "zero", np.zeros(n_latent)
        if latent is None:  # pragma: no cover - callers pass it for stats
            raise ValueError("latent needed")
        fn = np.mean if baseline == "mean" else np.median
        return baseline, fn(latent.astype(np.float64), axis=0)
    values = np.asarray(baseline, dtype=np.float64)
    if values.ndim == 0:
        return "value", np.full(n_latent, float(values))
    if values.shape != (n_latent,):
        msg = f"Expected {n_latent} baseline values (one per latent), got shape {values.shape} instead."
        raise ConfigError(msg)
    if not np.all(np.isfinite(values)):
        raise ConfigError("Baseline values must be finite.")
    return "values", values


def resolve_latents(latents: Sequence[int] | None, n_latent: int) -> np.ndarray:
    if latents is None:
        return np.arange(n_latent, dtype=np.int32)
    idx = np.asarray(list(latents))
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ConfigError(
            f"Expected latents as a non-empty list of integers, got {latents!r} instead."
        )
    bad = idx[(idx < 0) | (idx >= n_latent)]
    if bad.size:
        raise ConfigError(
            f"Latent index {int(bad[0])} out of range: the model has {n_latent} latents."
        )
    if len(set(idx.tolist())) != idx.size:
        raise ConfigError(f"Duplicated latent indices in {idx.tolist()}.")
    return idx.astype(np.int32)
