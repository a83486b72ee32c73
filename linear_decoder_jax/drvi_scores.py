"""DRVI's own interpretability scores, computed on the DRVI family's pure functions with jit/vmap.

A module of its own (not inside ``families/drvi.py``): these are DRVI's *analysis* functions, with
drvi-py's output names and shapes, built on the family's public functions (encode, per-split
values); the family module stays the model and nothing else, as LinearSCVI's maths and the
ablation scorers are kept apart.

Each function equals its drvi-py 0.2.8 counterpart (``scvi_tools_based/model/base/
_interpretability_mixin.py``; tests run both on the same model) and keeps its options:

* :func:`get_reconstruction_effect_of_each_split` (also per cell, ``aggregate_over_cells=False``),
* :func:`get_effect_of_splits_within_distribution` (``max``, ``linear_weighted_mean``,
  ``exp_weighted_mean``; directional or not),
* :func:`set_latent_dimension_stats` (``embed.var``: ``reconstruction_effect``, ``order``,
  ``max_value``, ``mean``, ``min``, ``max``, ``std``, ``std_abs``, ``title`` "DR k",
  ``vanished`` and its two directional flags),
* :func:`get_effect_of_splits_out_of_distribution` (``min_possible``, ``max_possible``,
  ``combined``),
* :func:`calculate_interpretability_scores` (``embed.varm["IND_*"/"OOD_*"]``) and
  :func:`get_interpretability_scores` (genes x "DR k+/-" DataFrame),
* :func:`traverse_latent` and :func:`calculate_differential_vars` (drvi-py's ``utils.tl``: the
  traversal AnnData and its ``max_possible``/``min_possible``/``combined_score`` effects).

Differences from drvi-py, by design: the minibatches are larger (1024 cells) and jitted; the
sums and maxima over cells are fused reductions of (cells, splits) weights instead of (cells, 2,
splits, genes) products; the ``logsumexp`` effect takes one exp and one log per element; the
out-of-distribution effect takes its covariate combinations as an argument (drvi-py draws them
with ``np.random.permutation``: pass the same draws to compare); the traversal draws its noise
and covariates as drvi-py does (numpy's global state, same order) or takes them as arguments, and
decodes the control rows once per sample. As drvi-py, the
within-distribution effect supports the ``logsumexp`` and ``sum`` aggregations only
(``ConfigError`` where drvi-py raises ``NotImplementedError``), and the directional variants
need one latent per split.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from linear_decoder_jax.errors import ConfigError
from linear_decoder_jax.families.drvi import (
    DRVI,
    DRVIParams,
    covariate_codes,
    head_bias,
    posterior,
    split_values,
)

Array = jax.Array
Aggregation = Literal["max", "linear_weighted_mean", "exp_weighted_mean"]
ALL_AGGREGATIONS: tuple[Aggregation, ...] = ("max", "linear_weighted_mean", "exp_weighted_mean")
BATCH_SIZE = 1024


def _check_effect(family: DRVI, directional: bool) -> None:
    agg = family.config.split_aggregation
    if agg not in ("logsumexp", "sum"):
        msg = f"DRVI's split effects support split_aggregation 'logsumexp' and 'sum' only (as drvi-py), got {agg!r}."
        raise ConfigError(msg)
    if directional and family.config.n_split != family.config.n_latent:
        msg = f"Directional effects need one latent per split (n_split == n_latent), got {family.config.n_split} splits of {family.config.n_latent} latents."
        raise ConfigError(msg)


def split_effects(values: Array, *, aggregation: str, add_to_counts: float) -> Array:
    """Each split's effect per gene (b, n_split, n_vars) from the per-split values (drvi-py's
    ``iterate_on_effect_of_splits_within_distribution``): ``-log(1 - softmax)`` over the splits
    and a pseudo-count term for ``logsumexp``, ``|values|`` for ``sum``."""
    if aggregation == "sum":
        return jnp.abs(values)
    # drvi-py: softmax over the splits of [values, log_add] per gene, log_add = logsumexp over
    # splits and genes + log(add_to_counts / 1e6). With e = exp(values - max per cell) the
    # pseudo-count term is sum(e) * add_to_counts / 1e6: one exp and one log per element (drvi-py
    # takes three transcendentals); equal up to float32 rounding, except that a share below
    # exp(-87) of the cell's largest term is 0 here (its effect is that small).
    m = jax.lax.stop_gradient(values.max(axis=(1, 2), keepdims=True))
    e = jnp.exp(values - m)
    pad = e.sum(axis=(1, 2), keepdims=True) * (add_to_counts / 1e6)
    share = e / (e.sum(axis=1, keepdims=True) + pad)
    return -jnp.log(1.0 - share)


def _max_over_cells(a: Array) -> Array:
    """``a.max(axis=0)`` as a tree of elementwise maxima: XLA:CPU's reduction over the leading
    axis is about 4x slower (measured at 1024 x 2 x 32 x 2000); exact either way."""
    while a.shape[0] > 1:
        if a.shape[0] % 2:
            a = jnp.concatenate([a, a[-1:]])
        half = a.shape[0] // 2
        a = jnp.maximum(a[:half], a[half:])
    return a[0]


@functools.partial(
    jax.jit,
    static_argnames=("family", "add_to_counts", "directional", "skip_threshold", "aggregate"),
)
def _within_batch(
    family: DRVI,
    params: DRVIParams,
    x: Array,
    codes: Array,
    valid: Array,
    *,
    add_to_counts: float,
    directional: bool,
    skip_threshold: float,
    aggregate: bool,
) -> dict[str, Array]:
    """One minibatch of the within-distribution pass: per-cell effect shares and (``aggregate``)
    the sums/maxima of every aggregation (padded rows, ``valid`` 0, contribute nothing)."""
    config = family.config
    latent, _ = posterior(params, x, config=config)
    values = split_values(params, latent, codes, config=config)
    effect = split_effects(
        values, aggregation=config.split_aggregation, add_to_counts=add_to_counts
    )
    v = valid.astype(effect.dtype)[:, None]  # (b, 1)
    # the cells' weights per split, (b, s) each direction; drvi-py stacks the masked effects into
    # (b, 2, s, G) and multiplies: here the masks and weights go into (b, s) vectors and each sum
    # over cells is one contraction (no (b, 2, s, G) array)
    if directional:
        masks = [(latent > 0).astype(effect.dtype) * v, (latent < 0).astype(effect.dtype) * v]
        weights = [
            jnp.maximum(latent, skip_threshold) - skip_threshold,
            jnp.maximum(-latent, skip_threshold) - skip_threshold,
        ]
    else:
        masks, weights = [v * jnp.ones_like(latent)], [latent]
    share = effect.sum(axis=-1)  # (b, s)
    out = {"share": jnp.stack([share * mk for mk in masks], axis=1) if directional else share * v}
    if not aggregate:
        return out

    def stack(parts: list[Array]) -> Array:
        return jnp.stack(parts) if directional else parts[0]

    # (b, 1, s, G) x (b, w, s, 1) reduced over cells: XLA fuses the product into the reduction
    # (measured 7x faster on CPU than the einsum's transposes)
    mk = jnp.stack(masks, axis=1)[..., None]
    maxima = _max_over_cells(effect[:, None] * mk)
    out["max"] = maxima if directional else maxima[0]
    lin = [w * mk for w, mk in zip(weights, masks, strict=True)]
    ex = [(jnp.exp(w) - 1.0) * mk for w, mk in zip(weights, masks, strict=True)]
    # drvi-py multiplies the *masked* effect by the weights, so a weight counts only where its
    # direction's mask is on; every weighted sum in one contraction (one read of the effects)
    sums = (effect[:, None] * jnp.stack(lin + ex, axis=1)[..., None]).sum(axis=0)
    d = len(masks)
    out["linear_weighted_mean"] = stack([sums[i] for i in range(d)])
    out["exp_weighted_mean"] = stack([sums[d + i] for i in range(d)])
    # the weights' sums are over every (valid) cell, mask or not
    out["linear_weights"] = stack([(w * v).sum(axis=0)[:, None] for w in weights])
    out["exp_weights"] = stack([((jnp.exp(w) - 1.0) * v).sum(axis=0)[:, None] for w in weights])
    return out


def _dense_rows(x: Any, start: int, stop: int) -> np.ndarray:
    rows = x[start:stop]
    if hasattr(rows, "toarray"):
        rows = rows.toarray()
    return np.asarray(rows, dtype=np.float32)


def _within_pass(
    family: DRVI,
    params: DRVIParams,
    x: Any,
    batch: Any,
    *,
    add_to_counts: float,
    directional: bool,
    skip_threshold: float,
    batch_size: int,
    aggregate: bool = True,
) -> dict[str, np.ndarray]:
    """The within-distribution pass over all cells, minibatch by minibatch (padded to one shape)."""
    _check_effect(family, directional)
    n = x.shape[0]
    codes_all = np.asarray(covariate_codes(family.config, jnp.asarray(np.asarray(batch))))
    size = min(batch_size, max(n, 1))
    totals: dict[str, np.ndarray] = {}
    shares = []
    for start in range(0, n, size):
        stop = min(start + size, n)
        xb = np.zeros((size, x.shape[1]), np.float32)
        xb[: stop - start] = _dense_rows(x, start, stop)
        cb = np.zeros((size, codes_all.shape[1]), np.int32)
        cb[: stop - start] = codes_all[start:stop]
        valid = np.arange(size) < stop - start
        out = _within_batch(
            family,
            params,
            jnp.asarray(xb),
            jnp.asarray(cb),
            jnp.asarray(valid),
            add_to_counts=float(add_to_counts),
            directional=bool(directional),
            skip_threshold=float(skip_threshold),
            aggregate=aggregate,
        )
        out = jax.device_get(out)
        shares.append(out.pop("share")[: stop - start])
        for key, value in out.items():
            if key not in totals:
                totals[key] = np.asarray(value, np.float64)
            elif key == "max":
                totals[key] = np.maximum(totals[key], value)
            else:
                totals[key] = totals[key] + value
    totals["share"] = np.concatenate(shares, axis=0)
    return totals


def get_reconstruction_effect_of_each_split(
    family: DRVI,
    params: DRVIParams,
    x: Any,
    batch: Any,
    *,
    add_to_counts: float = 1.0,
    aggregate_over_cells: bool = True,
    directional: bool = False,
    batch_size: int = BATCH_SIZE,
) -> np.ndarray:
    """Each split's share of the reconstruction (drvi-py's ``get_reconstruction_effect_of_each_split``).

    Parameters
    ----------
    family, params
        The DRVI family and its parameters.
    x
        Counts (n_obs, n_vars), dense or scipy sparse.
    batch
        Covariate codes (n_obs,) or (n_obs, n_cov), batch first.

    Returns
    -------
    numpy.ndarray
        (n_split,) summed over cells, or (n_obs, n_split) with ``aggregate_over_cells=False``;
        a direction axis of 2 (positive, negative) after the cells' axis with ``directional``.
    """
    out = _within_pass(
        family, params, x, batch, add_to_counts=add_to_counts, directional=directional,
        skip_threshold=1.0, batch_size=batch_size, aggregate=False,
    )  # fmt: skip
    share = out["share"]
    return (share.sum(axis=0) if aggregate_over_cells else share).astype(np.float32)


def get_effect_of_splits_within_distribution(
    family: DRVI,
    params: DRVIParams,
    x: Any,
    batch: Any,
    *,
    add_to_counts: float = 1.0,
    directional: bool = True,
    aggregations: Sequence[Aggregation] | str = "ALL",
    skip_threshold: float = 1.0,
    batch_size: int = BATCH_SIZE,
) -> dict[str, np.ndarray]:
    """drvi-py's ``get_effect_of_splits_within_distribution``: per aggregation, (2, n_split,
    n_vars) with ``directional`` (positive, negative), else (n_split, n_vars)."""
    if aggregations == "ALL":
        aggregations = list(ALL_AGGREGATIONS)
    elif isinstance(aggregations, str):
        aggregations = [aggregations]  # type: ignore[list-item]
    for agg in aggregations:
        if agg not in ALL_AGGREGATIONS:
            raise ConfigError(
                f"Expected aggregations among {ALL_AGGREGATIONS}, got {agg!r} instead."
            )
    out = _within_pass(
        family, params, x, batch, add_to_counts=add_to_counts, directional=directional,
        skip_threshold=skip_threshold, batch_size=batch_size,
    )  # fmt: skip
    results: dict[str, np.ndarray] = {}
    for agg in aggregations:
        if agg == "max":
            results[agg] = out["max"].astype(np.float32)
        else:
            weights = out["linear_weights" if agg == "linear_weighted_mean" else "exp_weights"]
            results[agg] = (out[agg] / np.maximum(weights, 1.0)).astype(np.float32)
    return results


def set_latent_dimension_stats(
    embed: Any, reconstruction_effect: np.ndarray, *, vanished_threshold: float = 0.5
) -> None:
    """drvi-py's ``set_latent_dimension_stats``: fill ``embed.var`` (an AnnData of the latent
    representation, one var per latent) with the columns drvi-py writes; ``reconstruction_effect``
    is :func:`get_reconstruction_effect_of_each_split`."""
    from scipy import sparse

    var = embed.var
    if "original_dim_id" not in var:
        var["original_dim_id"] = np.arange(var.shape[0])
    var["reconstruction_effect"] = 0.0
    var.loc[var.sort_values("original_dim_id").index, "reconstruction_effect"] = (
        reconstruction_effect
    )
    var["order"] = (-var["reconstruction_effect"]).argsort().argsort()
    X = embed.X
    dense = X.toarray() if sparse.issparse(X) else np.asarray(X)
    var["max_value"] = np.abs(dense).max(axis=0).ravel()
    var["mean"] = dense.mean(axis=0).ravel()
    var["min"] = dense.min(axis=0).ravel()
    var["max"] = dense.max(axis=0).ravel()
    var["std"] = dense.std(axis=0)
    var["std_abs"] = np.abs(dense).std(axis=0)
    var["title"] = "DR " + (1 + var["order"]).astype(str)
    var["vanished"] = var["max_value"] < vanished_threshold
    var["vanished_positive_direction"] = var["max"] < vanished_threshold
    var["vanished_negative_direction"] = var["min"] > -vanished_threshold


def all_covariate_combinations(family: DRVI) -> np.ndarray:
    """Every combination of covariate codes (n_comb, n_cov), batch first, in drvi-py's order
    (``itertools.product``) before its random permutation."""
    return np.asarray(list(itertools.product(*[range(n) for n in family.config.n_cats_per_cov])))


@functools.partial(jax.jit, static_argnames=("family", "n_steps", "add_to_counts", "directional"))
def _ood_combinations(
    family: DRVI,
    params: DRVIParams,
    dim_mins: Array,
    dim_maxs: Array,
    combos: Array,
    valid: Array,
    *,
    n_steps: int,
    add_to_counts: float,
    directional: bool,
) -> dict[str, Array]:
    """Sums over a chunk of covariate combinations of drvi-py's out-of-distribution statistics."""
    config = family.config
    half = n_steps // 2
    steps = jnp.asarray(np.linspace(1, 0, num=half, endpoint=False), jnp.float32)
    span = jnp.concatenate([steps[:, None] * dim_maxs[None, :], steps[:, None] * dim_mins[None, :]])

    bias = head_bias(params)

    def one(codes: Array) -> dict[str, Array]:
        cb = jnp.broadcast_to(codes[None, :], (n_steps, codes.shape[0]))
        # the bias is added after the min and max (exact), so that nothing but these two reads
        # the (n_steps, s, G) product: XLA otherwise wrote it back with the bias added and
        # recomputed the maxima inside each consumer (2 of 10 ms)
        values = split_values(params, span, cb, config=config, with_head_bias=False)
        values = values.reshape(2, half, *values.shape[1:])
        # min and max over the steps one step at a time: XLA's CPU reduction over this major axis
        # took 20 ms of a 25 ms combination at 32 splits x 2,000 genes, these elementwise 0.5 ms
        by_step = [values[:, i] for i in range(half)]  # (2, s, G) each
        up, down = functools.reduce(jnp.maximum, by_step), functools.reduce(jnp.minimum, by_step)
        up, down = jax.lax.optimization_barrier((up, down))
        if bias is not None:
            up, down = up + bias[None], down + bias[None]
        return _ood_effects(up, down, add_to_counts=add_to_counts, directional=directional)

    out = jax.vmap(one)(combos)
    # the sum over combinations, elementwise (XLA:CPU's reduction over a major axis is slow)
    return {
        k: functools.reduce(jnp.add, [jnp.where(valid[i], v[i], 0.0) for i in range(len(v))])
        for k, v in out.items()
    }


def _ood_effects(
    up: Array, down: Array, *, add_to_counts: float, directional: bool
) -> dict[str, Array]:
    """drvi-py's out-of-distribution effects of one covariate combination from each direction's
    largest and smallest split values ``up``/``down`` (2, s, G).

    drvi-py's formulas exponentiate log-sum-exps and take logs again; here every exponential is
    taken once, shifted by each gene's largest term ``M`` (so nothing overflows), and each effect
    is one ``log1p`` of a ratio: with ``E = exp(v - M)``, ``P`` the pseudo-count term and
    ``S = sum_s E + P`` (over the splits),
    ``max_possible = log1p((E_dmax - E_lo) / S_lo)`` and
    ``min_possible = log1p((E_dmax - E_lo) / (S_hi - E_hi + E_lo))``, equal to drvi-py's
    ``log(exp(lse_min) - exp(lo) + exp(dmax)) - lse_min`` and its ratio for ``min_possible``
    (3 exponentials and 4 logarithms per split and gene, directional, where drvi-py takes 10 and
    5), and exact where drvi-py's ``exp(lse_max) - exp(hi)`` cancels (one split far above the
    others)."""
    lo, hi = jnp.minimum(down[0], down[1]), jnp.maximum(up[0], up[1])  # (s, G)
    m = hi.max(axis=0, keepdims=True)  # (1, G)
    e_up = jnp.exp(up - m[None])  # (2, s, G), <= 1
    e_hi = jnp.maximum(e_up[0], e_up[1])
    # log_add = logsumexp(hi) over splits and genes + log(add_to_counts / 1e6), from e_hi
    log_add = jax.scipy.special.logsumexp(m + jnp.log(e_hi.sum(axis=0, keepdims=True)))
    log_add = log_add + math.log(add_to_counts / 1e6)
    top = jnp.maximum(m, log_add)  # the shift M: every term below is <= 1
    rescale = jnp.exp(m - top)
    e_hi, e_lo = e_hi * rescale, jnp.exp(lo - top)
    pad = jnp.exp(log_add - top)
    s_lo = e_lo.sum(axis=0, keepdims=True) + pad  # (1, G): exp(lse_min - M)
    s_hi = e_hi.sum(axis=0, keepdims=True) + pad  # exp(lse_max - M)
    # the other splits' sum: s_hi - e_hi keeps the largest term (or the pad) in it, so loses no
    # precision, except for a split that alone holds the largest term: summed again without it
    is_top = e_hi == e_hi.max(axis=0, keepdims=True)
    only_top = is_top & (is_top.sum(axis=0, keepdims=True) == 1)
    rest = jnp.where(only_top, 0.0, e_hi).sum(axis=0, keepdims=True) + pad
    other = jnp.where(only_top, rest, s_hi - e_hi) + e_lo  # (s, G)
    if directional:  # exp(dmax - M) - exp(lo - M), per direction
        gain = e_up * rescale[None] - e_lo[None]
        s_lo, other = s_lo[None], other[None]
    else:
        gain = e_hi - e_lo
    max_possible = jnp.log1p(gain / s_lo)
    min_possible = jnp.log1p(gain / other)
    return {
        "min_possible": min_possible,
        "max_possible": max_possible,
        "combined": max_possible * min_possible,
    }


def get_effect_of_splits_out_of_distribution(
    family: DRVI,
    params: DRVIParams,
    dim_mins: np.ndarray,
    dim_maxs: np.ndarray,
    *,
    combinations: np.ndarray | None = None,
    n_steps: int = 20,
    add_to_counts: float = 1.0,
    directional: bool = True,
    chunk: int = 16,
) -> dict[str, np.ndarray]:
    """drvi-py's ``get_effect_of_splits_out_of_distribution``: each split's effect when every
    latent moves from 0 to the data's extremes (``embed.var["min"/"max"]``), per covariate
    combination, averaged. Returns ``min_possible``, ``max_possible`` and ``combined``, each
    (2, n_split, n_vars) with ``directional`` else (n_split, n_vars).

    ``combinations`` (n, n_cov) defaults to all of :func:`all_covariate_combinations`; drvi-py
    draws ``np.random.permutation(all)[:n_samples]``, so pass that draw to reproduce it.
    """
    if n_steps % 2:
        raise ConfigError(f"Expected an even n_steps, got {n_steps} instead.")
    if combinations is None:
        combinations = all_covariate_combinations(family)
    combos = np.asarray(combinations, dtype=np.int32).reshape(len(combinations), -1)
    mins = jnp.asarray(np.minimum(np.asarray(dim_mins, np.float32), 0.0))
    maxs = jnp.asarray(np.maximum(np.asarray(dim_maxs, np.float32), 0.0))
    totals: dict[str, np.ndarray] = {}
    size = min(chunk, len(combos))
    for start in range(0, len(combos), size):
        part = combos[start : start + size]
        pad = np.zeros((size, combos.shape[1]), np.int32)
        pad[: len(part)] = part
        valid = np.arange(size) < len(part)
        out = jax.device_get(
            _ood_combinations(
                family, params, mins, maxs, jnp.asarray(pad), jnp.asarray(valid),
                n_steps=n_steps, add_to_counts=float(add_to_counts), directional=bool(directional),
            )
        )  # fmt: skip
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
    return {k: (v / len(combos)).astype(np.float32) for k, v in totals.items()}


def calculate_interpretability_scores(
    family: DRVI,
    params: DRVIParams,
    embed: Any,
    x: Any = None,
    batch: Any = None,
    *,
    methods: Sequence[str] | str = "OOD",
    directional: bool = True,
    add_to_counts: float = 1.0,
    inplace: bool = True,
    combinations: np.ndarray | None = None,
    n_steps: int = 20,
    skip_threshold: float = 1.0,
    batch_size: int = BATCH_SIZE,
) -> dict[str, np.ndarray] | None:
    """drvi-py's ``calculate_interpretability_scores``: ``IND_<agg>[_positive|_negative]`` and
    ``OOD_<stat>[_positive|_negative]`` arrays (n_split, n_vars), written to ``embed.varm`` (or
    returned with ``inplace=False``). ``IND`` needs the counts ``x`` and covariate codes."""
    if methods == "ALL":
        methods = ["IND", "OOD"]
    elif isinstance(methods, str):
        methods = [methods]
    results: dict[str, np.ndarray] = {}
    if any(m.startswith("IND") for m in methods):
        if x is None or batch is None:
            raise ConfigError(
                "Within-distribution (IND) scores need the counts x and covariate codes."
            )
        ind = get_effect_of_splits_within_distribution(
            family, params, x, batch, add_to_counts=add_to_counts, directional=directional,
            skip_threshold=skip_threshold, batch_size=batch_size,
        )  # fmt: skip
        _collect(results, "IND", ind, methods, directional)
    if any(m.startswith("OOD") for m in methods):
        ood = get_effect_of_splits_out_of_distribution(
            family, params, embed.var["min"].values, embed.var["max"].values,
            combinations=combinations, n_steps=n_steps, add_to_counts=add_to_counts,
            directional=directional,
        )  # fmt: skip
        _collect(results, "OOD", ood, methods, directional)
    if not inplace:
        return results
    for key, value in results.items():
        embed.varm[key] = value
    return None


def _collect(
    results: dict,
    prefix: str,
    found: dict[str, np.ndarray],
    methods: Sequence[str],
    directional: bool,
) -> None:
    for key, value in found.items():
        if key not in methods and prefix not in methods:  # drvi-py's own filter
            continue
        if directional:
            results[f"{prefix}_{key}_positive"] = value[0]
            results[f"{prefix}_{key}_negative"] = value[1]
        else:
            results[f"{prefix}_{key}"] = value


def get_interpretability_scores(
    embed: Any,
    var_names: Sequence[str],
    *,
    key: str = "OOD_combined",
    directional: bool = True,
    order_col: str = "order",
    title_col: str = "title",
    hide_vanished: bool = True,
) -> Any:
    """drvi-py's ``get_interpretability_scores``: a genes x dimensions DataFrame with columns
    titled "DR k+" / "DR k-" (directional) or "DR k", in order, vanished ones hidden."""
    import pandas as pd

    if directional:
        data = np.concatenate([embed.varm[key + "_positive"], embed.varm[key + "_negative"]])
        info = (
            pd.concat([embed.var.assign(direction="+"), embed.var.assign(direction="-")])
            .assign(title=lambda df: df[title_col] + df["direction"])
            .assign(keep=True)
            .reset_index(drop=True)
        )
        vanished = np.where(
            info["direction"] == "+",
            info["vanished_positive_direction"],
            info["vanished_negative_direction"],
        )
        info["keep"] = ~vanished if hide_vanished else True
    else:
        data = embed.varm[key]
        info = embed.var.assign(title=lambda df: df[title_col]).assign(direction="")
        info["keep"] = ~info["vanished"] if hide_vanished else True
    table = pd.DataFrame(data, columns=list(var_names), index=info["title"])
    return table.loc[info.query("keep == True").sort_values([order_col, "direction"])["title"]].T


# --------------------------------------------------------------------------------------------
# Latent traversal and differential variables (drvi-py's ``utils.tl``)
# --------------------------------------------------------------------------------------------

TRAVERSE_LIBRARY = 1e4  # drvi-py decodes every traversal row with library 10,000


def _traverse_grid(
    dims: np.ndarray, mins: np.ndarray, maxs: np.ndarray, n_steps: int, n_samples: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """drvi-py's ``iterate_dimensions``: the obs columns of the (dims x steps x samples) rows and
    the dense (rows, n_latent) span vectors (float32): latent ``dim`` at ``span_value``."""
    n_rows = len(dims) * n_steps * n_samples
    dim_ids = np.repeat(np.asarray(dims), n_steps * n_samples)
    sample_ids = np.tile(np.arange(n_samples), len(dims) * n_steps)
    step_ids = np.tile(np.repeat(np.arange(n_steps), n_samples), len(dims))
    half = n_steps // 2
    span = np.concatenate(
        [np.linspace(mins, mins * 0.0, num=half), np.linspace(maxs * 0.0, maxs, num=half)], axis=0
    ).T  # (dims, steps), float64 as drvi-py's
    span_values = np.repeat(span.reshape(-1), n_samples)
    vectors = np.zeros((n_rows, int(np.max(dims)) + 1), np.float32)
    vectors[np.arange(n_rows), dim_ids] = span_values
    obs = {
        "original_order": np.arange(n_rows),
        "dim_id": dim_ids,
        "sample_id": sample_ids,
        "step_id": step_ids,
        "span_value": span_values,
    }
    return obs, vectors


@functools.partial(jax.jit, static_argnames=("family",))
def _log_mean(family: DRVI, params: DRVIParams, z: Array, codes: Array) -> Array:
    """``log(px.mean)`` at library :data:`TRAVERSE_LIBRARY` (drvi-py's ``decode_latent_samples``)."""
    log_library = jnp.full((z.shape[0], 1), math.log(TRAVERSE_LIBRARY), z.dtype)
    unused_label = jnp.zeros(z.shape[0], jnp.int32)
    return jnp.log(family.decode(params, z, log_library, codes, unused_label).mu)


def _decode_rows(
    family: DRVI, params: DRVIParams, z: np.ndarray, codes: np.ndarray, batch_size: int
) -> np.ndarray:
    """:func:`_log_mean` of every row, in padded minibatches of one shape (one compile)."""
    n = z.shape[0]
    size = min(batch_size, max(n, 1))
    out = np.empty((n, family.n_vars), np.float32)
    for start in range(0, n, size):
        stop = min(start + size, n)
        zb = np.zeros((size, z.shape[1]), np.float32)
        zb[: stop - start] = z[start:stop]
        cb = np.zeros((size, codes.shape[1]), np.int32)
        cb[: stop - start] = codes[start:stop]
        values = _log_mean(family, params, jnp.asarray(zb), jnp.asarray(cb))
        out[start:stop] = np.asarray(values)[: stop - start]
    return out


def traverse_latent(
    family: DRVI,
    params: DRVIParams,
    embed: Any,
    var: Any,
    *,
    n_steps: int = 20,
    n_samples: int = 100,
    noise_formula: Any = lambda x: x / 2,
    max_noise_std: float = 0.2,
    noise: np.ndarray | None = None,
    covariates: np.ndarray | None = None,
    batch_size: int = BATCH_SIZE,
) -> Any:
    """drvi-py's ``traverse_latent`` (``make_traverse_adata`` + the dimension titles): each latent
    of ``embed.var`` (after :func:`set_latent_dimension_stats`) moved from its ``min`` to 0 and from
    0 to its ``max`` in ``n_steps`` steps, on ``n_samples`` noise vectors, decoded at library 10,000.

    ``var`` is the model's genes: a DataFrame (copied, as ``copy_adata_var_info=True``) or the
    gene names. ``noise`` (n_samples, n_latent) and ``covariates`` (n_samples, n_cov, our code
    layout: batch first) default to drvi-py's own draws from numpy's global state, in its order
    (``np.random.randn`` for the noise, then ``np.random.randint`` per categorical covariate; the
    batch column is 0, as drvi-py decodes without batch values): after the same
    ``np.random.seed`` both give the same AnnData.

    Returns
    -------
    anndata.AnnData
        One row per (dimension, step, sample): ``X`` effect minus control (log mean),
        ``layers["control"|"effect"]``, ``obsm["control_latent"|"effect_latent"]`` (and
        ``obsm["cat_covs"]`` with categorical covariates), obs ``original_order``, ``dim_id``,
        ``sample_id``, ``step_id``, ``span_value``, ``lib_size``, ``title``, ``vanished``,
        ``order``; var the genes with ``original_order``.
    """
    import anndata as ad
    import pandas as pd

    if n_steps % 2:
        raise ConfigError(f"Expected an even n_steps, got {n_steps} instead.")
    if "original_dim_id" not in embed.var:
        msg = 'Column "original_dim_id" not found in `embed.var`: run set_latent_dimension_stats first.'
        raise ConfigError(msg)
    ev = embed.var
    obs, span = _traverse_grid(
        ev["original_dim_id"].values, ev["min"].values, ev["max"].values, n_steps, n_samples
    )
    n_latent = family.n_latent
    span = np.pad(span, ((0, 0), (0, n_latent - span.shape[1])))
    n_cats = family.config.n_cats_per_cov
    if noise is None:
        noise_std = noise_formula(ev["std"].values).clip(0, max_noise_std).reshape(1, -1)
        noise = np.random.randn(n_samples, embed.n_vars).astype(np.float32) * noise_std
    if covariates is None:
        covariates = np.zeros((n_samples, len(n_cats)), np.int64)
        for i, n in enumerate(n_cats[1:], start=1):  # drvi-py: its categorical covariates only
            covariates[:, i] = np.random.randint(0, n, size=n_samples)
    noise, covariates = np.asarray(noise), np.asarray(covariates)
    if noise.shape != (n_samples, n_latent) or covariates.shape != (n_samples, len(n_cats)):
        msg = (
            f"Expected noise ({n_samples}, {n_latent}) and covariates ({n_samples}, "
            f"{len(n_cats)}), got {noise.shape} and {covariates.shape} instead."
        )
        raise ConfigError(msg)
    sample = obs["sample_id"]
    control_latent = noise[sample]
    effect_latent = control_latent + span
    # the control rows repeat each sample's noise: decode the n_samples distinct rows once
    control = _decode_rows(family, params, noise, covariates, batch_size)[sample]
    effect = _decode_rows(family, params, effect_latent, covariates[sample], batch_size)
    if isinstance(var, pd.DataFrame):
        genes = var.copy()
    else:
        genes = pd.DataFrame(index=pd.Index([str(v) for v in var]))
    genes["original_order"] = np.arange(effect.shape[1])
    index = pd.Index(np.arange(len(sample)).astype(str))  # anndata's own str index
    out = ad.AnnData(X=effect - control, obs=pd.DataFrame(obs, index=index), var=genes)
    out.layers["control"] = control
    out.layers["effect"] = effect
    out.obsm["control_latent"] = control_latent
    out.obsm["effect_latent"] = effect_latent
    if len(n_cats) > 1:
        out.obsm["cat_covs"] = covariates[sample][:, 1:]
    out.obs["lib_size"] = np.full(len(sample), TRAVERSE_LIBRARY)
    for col in ["title", "vanished", "order"]:
        mapping = dict(zip(ev["original_dim_id"].values, ev[col].values, strict=False))
        out.obs[col] = out.obs["dim_id"].map(mapping)
    return out


def _traverse_arrays(traverse_adata: Any) -> tuple[np.ndarray, ...]:
    """(span (dims, steps), dim ids (dims,), control and effect (dims, steps, samples, vars),
    var names) in original order, as drvi-py's ``find_differential_effects`` reorders them."""
    obs, var = traverse_adata.obs, traverse_adata.var
    rows = np.argsort(obs["original_order"].to_numpy(), kind="stable")
    cols = np.argsort(var["original_order"].to_numpy(), kind="stable")
    n_dims, n_steps = obs["dim_id"].nunique(), obs["step_id"].nunique()
    n_samples, n_vars = obs["sample_id"].nunique(), traverse_adata.n_vars
    shape = (n_dims, n_steps, n_samples)
    span = obs["span_value"].to_numpy()[rows].reshape(shape)
    if not np.allclose(span, span.max(axis=-1, keepdims=True)):
        raise ConfigError("Expected one span value per dimension and step in traverse_adata.obs.")
    dim_ids = obs["dim_id"].to_numpy()[rows].reshape(shape)[:, 0, 0]

    in_order = np.array_equal(rows, np.arange(len(rows))) and np.array_equal(
        cols, np.arange(n_vars)
    )

    def layer(name: str) -> np.ndarray:
        values = np.asarray(traverse_adata.layers[name])
        if not in_order:
            values = values[rows][:, cols]
        return values.reshape(*shape, n_vars)

    names = traverse_adata.var_names[cols]
    return span[:, :, 0], dim_ids, layer("control"), layer("effect"), names


def _store_directions(
    traverse_adata: Any, key: str, stepwise: np.ndarray, span: np.ndarray, dim_ids, names
) -> None:
    """drvi-py's per-direction maxima over the steps: ``varm[key_traverse_effect_pos|neg]``
    (genes x dimensions, columns as strings) and ``uns[key_traverse_effect_pos|neg_dim_ids]``."""
    import pandas as pd

    traverse_adata.uns[f"{key}_traverse_effect_stepwise"] = stepwise
    for sign in ("pos", "neg"):
        mask = np.where(span >= 0, 1, 0) if sign == "pos" else np.where(span <= 0, 1, 0)
        top = np.max(mask[..., None] * stepwise, axis=1)  # (dims, vars)
        frame = pd.DataFrame(top.T, index=names, columns=dim_ids).loc[traverse_adata.var_names]
        traverse_adata.uns[f"{key}_traverse_effect_{sign}_dim_ids"] = frame.columns.values
        frame.columns = frame.columns.astype(str)
        traverse_adata.varm[f"{key}_traverse_effect_{sign}"] = frame


def calculate_differential_vars(
    traverse_adata: Any, *, add_to_counts: float = 0.1, relax_max_by: float = 0.0
) -> None:
    """drvi-py's ``calculate_differential_vars`` on a :func:`traverse_latent` AnnData, in place:
    for ``max_possible`` (the log-fold change of effect over control, each with a pseudo-count
    ``add_to_counts``), ``min_possible`` (the same against the other dimensions' largest possible
    expression, less ``relax_max_by``) and their ``combined_score`` (the product where
    ``max_possible >= 1`` and either exceeds a half (max) or a tenth (min) of its largest value),
    ``uns["<key>_traverse_effect_stepwise"]`` (dims, steps, vars), ``varm["<key>_traverse_effect_
    pos|neg"]`` (genes x dimensions) and ``uns["<key>_traverse_effect_pos|neg_dim_ids"]``.

    The same operations as drvi-py's numpy code, with ``logaddexp`` in place of ``logsumexp``
    over stacked copies (no (3, dims, steps, samples, vars) arrays)."""
    from scipy.special import logsumexp

    span, dim_ids, control, effect, names = _traverse_arrays(traverse_adata)
    log_add = np.log(add_to_counts)
    max_possible = (np.logaddexp(effect, log_add) - np.logaddexp(control, log_add)).mean(axis=2)
    top = np.maximum(
        effect.max(axis=(1, 2), keepdims=True), control.max(axis=(1, 2), keepdims=True)
    )
    everything = logsumexp(top, axis=0, keepdims=True)
    others = np.log(np.exp(everything) - np.exp(top)) - relax_max_by  # (dims, 1, 1, vars)

    def relative(x: np.ndarray) -> np.ndarray:
        return np.logaddexp(np.logaddexp(x, log_add), others) - others

    min_possible = (relative(effect) - relative(control)).mean(axis=2)
    _store_directions(traverse_adata, "max_possible", max_possible, span, dim_ids, names)
    _store_directions(traverse_adata, "min_possible", min_possible, span, dim_ids, names)
    keep = (max_possible >= 1.0) & (
        (max_possible > max_possible.max(axis=(0, 1), keepdims=True) / 2)
        | (min_possible > min_possible.max(axis=(0, 1), keepdims=True) / 10)
    )
    combined = np.where(keep, max_possible * min_possible, 0)
    _store_directions(traverse_adata, "combined_score", combined, span, dim_ids, names)
