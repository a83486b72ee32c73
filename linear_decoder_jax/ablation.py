"""The ablation engine: for every cell and latent, how much worse the reconstruction gets.

``delta_nll[c, k] = NLL(x_c | latent k replaced) - NLL(x_c | full)`` in nats, with the model's own
likelihood, dispersion and library. Removing latent k moves the decoder logits by a rank-one term,
``(baseline_k - z_k) * loadings[:, k]`` (BatchNorm folded in, ``model.affine_head``), so one
minibatch is encoded and decoded once, then every latent is scored inside the same ``jit``: its
log softmax is the full one plus that shift minus one log-normaliser per cell. The difference is
taken gene by gene on the z-dependent part of the log-likelihood only (its value at ``x = 0``
densely, what each count adds at the non-zero counts only; ``distributions``): the lgamma terms
cancel exactly instead of in rounding.

Per (cell, latent, gene) the sweep costs three fused exp-and-reduce passes (normaliser, likelihood,
L1 change) and one log (NB; ZINB adds its softplus terms). On CPU the latents run one after another
(``lax.map``) on (cells, genes) arrays that stay in cache, which XLA:CPU compiles into fused
reductions; on accelerators they are batched (``vmap``).
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from linear_decoder_jax import anndata_io, model
from linear_decoder_jax.config import LDVAEConfig
from linear_decoder_jax.distributions import (
    count_term,
    log_prob_constant,
    log_prob_constant_at_zero,
    rate_reference,
    rate_term,
    rate_term_change,
)
from linear_decoder_jax.errors import ConfigError
from linear_decoder_jax.params import LDVAEParams

Mode = Literal["drop", "keep"]
LibraryChoice = Literal["model", "observed"]
BaselineSpec = Literal["zero", "mean", "median"] | float | Sequence[float] | np.ndarray

# Budget for the sweep temporaries of one minibatch. On CPU the latents run one after another on
# (batch, n_vars) arrays that should stay in cache (measured at 20k x 2000 x 10 NB: 64-128 cells
# per minibatch fastest, 1024 about 2x slower); accelerators vmap over the latents and want large
# minibatches.
_SWEEP_BYTES = {"cpu": 6 * 2**20}
_SWEEP_BYTES_ACCELERATOR = 1024 * 2**20
_TEMPORARIES = 6
# Widest range of a latent's logit shift over genes taken without a max pass: its largest
# exp(r - c) term is then above exp(-60) times a softmax entry, far from float32 underflow.
_SHIFT_SLACK = 60.0


class MinibatchScores(NamedTuple):
    """Scores of one padded minibatch (rows past ``n_valid`` are padding)."""

    delta_nll: jax.Array  # (batch, n_ablated)
    delta_nll_se: jax.Array  # (batch, n_ablated); zeros unless n_samples > 0
    delta_l1: jax.Array  # (batch, n_ablated)
    nll: jax.Array  # (batch,)
    latent: jax.Array  # (batch, n_latent) decoder input
    lfc_sum: jax.Array  # (n_vars, n_ablated) sum over valid cells of ln rho_ablated - ln rho


def choose_batch_size(n_obs: int, n_vars: int, n_ablated: int, itemsize: int = 4) -> int:
    """Largest power-of-two minibatch whose sweep temporaries fit the memory budget."""
    budget = _SWEEP_BYTES.get(jax.default_backend(), _SWEEP_BYTES_ACCELERATOR)
    per_cell = n_vars * itemsize * _TEMPORARIES
    if jax.default_backend() != "cpu":  # vmapped latents: all of them at once
        per_cell *= max(1, n_ablated)
    size = 2 ** int(np.floor(np.log2(max(1, budget // per_cell))))
    size = int(np.clip(size, 8, 4096))
    return int(min(size, max(8, -(-n_obs // 8) * 8)))


def _score(
    params: LDVAEParams,
    nz_index: jax.Array,
    nz_count: jax.Array,
    z: jax.Array,
    log_library: jax.Array,
    batch: jax.Array,
    label: jax.Array,
    valid: jax.Array,
    baseline: jax.Array,
    latents: jax.Array,
    *,
    config: LDVAEConfig,
    mode: Mode,
):
    """delta_nll, delta_l1, full NLL and the lfc sums for decoder input ``z`` (batch, n_latent).

    The likelihood is split into its value at ``x = 0`` (dense over genes) and what each count
    adds, evaluated at the non-zero counts only (``nz_index``/``nz_count``). Everything the
    latents share (the full model's softmax, its per-gene reference terms, theta) is computed
    once, then each latent's body works on (batch, n_vars) arrays.
    """
    lik = config.gene_likelihood
    theta = model.dispersion(params, batch, label, config=config)
    heads = [model.affine_head(params.decoder.factor, config=config)]
    if lik == "zinb":
        heads.append(model.affine_head(params.decoder.dropout, config=config))

    def logits_of(head: model.AffineDecoder, zz: jax.Array) -> jax.Array:
        return zz @ head.loadings.T + head.offsets[batch] + head.intercept[None, :]

    full = [logits_of(h, z) for h in heads]
    # "keep" ablates from the all-baseline point: every latent but k at its baseline.
    if mode == "drop":
        start = full
    else:
        start = [logits_of(h, jnp.broadcast_to(baseline, z.shape)) for h in heads]

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
        jnp.abs(shift) * (load_hi - load_lo)[latents][:, None] <= _SHIFT_SLACK,
    )

    def one(args):
        d, moved_any, loadings, c, narrow = args  # d, c: (batch,) for latent k
        r = d[:, None] * loadings[0][None, :]
        c = jax.lax.cond(
            jnp.all(narrow),
            lambda: c,
            lambda: (log_rho + d[:, None] * loadings[0][None, :]).max(axis=-1),
        )[:, None]
        # Each pass over the genes below is one fused exp-and-reduce: re-taking the exp per pass
        # runs faster on XLA:CPU than storing it once (measured); the forms differ, so common-
        # subexpression elimination keeps them apart.
        log_z = c + jnp.log(jnp.exp(log_rho + r - c).sum(axis=-1, keepdims=True))
        zi_k = [s + d[:, None] * lk[None, :] for s, lk in zip(start[1:], loadings[1:], strict=True)]
        mu_k = jnp.exp(log_mu + r - log_z)
        gain = rate_term_change(mu_k, theta, reference, *zi_k, likelihood=lik)
        r_nz = d[:, None] * loadings[0][nz_index]
        zi_nz = [
            s + d[:, None] * lk[nz_index] for s, lk in zip(start_zi_nz, loadings[1:], strict=True)
        ]
        gain = gain + (at_counts(jnp.exp(log_mu_nz + r_nz - log_z), zi_nz) - count_full).sum(-1)
        l1 = jnp.abs(jnp.exp(log_rho + r - log_z) - rho).sum(-1)
        delta = jnp.where(moved_any, -gain, 0.0)
        l1 = jnp.where(moved_any, l1, 0.0)
        # ln rho_k - ln rho = r - log_z + (base_lse - lse) + (start - full), over valid cells
        lse_change = (log_z + base_lse - lse)[:, 0]
        if mode == "drop":
            lfc = loadings[0] * jnp.sum(d * valid) - jnp.sum(lse_change * valid)
        else:
            moved = start[0] + r - full[0] - lse_change[:, None]
            lfc = jnp.sum(moved * valid[:, None], axis=0)
        return delta, l1, lfc

    # XLA:CPU compiles the per-latent body as a loop over (batch, n_vars) arrays several times
    # faster than the batched body (measured); accelerators want the batched one.
    if jax.default_backend() == "cpu":
        delta, l1, lfc = jax.lax.map(one, per_latent)
    else:
        delta, l1, lfc = jax.vmap(one)(per_latent)
    return delta.T, l1.T, nll, lfc.T


@functools.partial(jax.jit, static_argnames=("config", "mode", "library", "n_samples"))
def sweep_minibatch(
    params: LDVAEParams,
    x: jax.Array,
    nz_index: jax.Array,
    nz_count: jax.Array,
    batch: jax.Array,
    label: jax.Array,
    valid: jax.Array,
    baseline: jax.Array,
    latents: jax.Array,
    key: jax.Array,
    *,
    config: LDVAEConfig,
    mode: Mode,
    library: LibraryChoice,
    n_samples: int,
) -> MinibatchScores:
    """Score every latent in ``latents`` for one minibatch ``x`` (batch, n_vars); see module doc."""
    post = model.inference(params, x, config=config)
    z = model.z_transformation(post.qz_m, config=config)
    if library == "observed":
        log_library = jnp.log(x.sum(axis=-1, keepdims=True))
    else:
        log_library = model.library(post, x, config=config)
    score = functools.partial(
        _score,
        params,
        nz_index,
        nz_count,
        log_library=log_library,
        batch=batch,
        label=label,
        valid=valid,
        baseline=baseline,
        latents=latents,
        config=config,
        mode=mode,
    )
    delta, l1, nll, lfc = score(z=z)
    se = jnp.zeros_like(delta)
    if n_samples:

        def draw(carry, k):
            eps = jax.random.normal(k, post.qz_m.shape, post.qz_m.dtype)
            zs = model.z_transformation(post.qz_m + jnp.sqrt(post.qz_v) * eps, config=config)
            d = score(z=zs)[0]
            return (carry[0] + d, carry[1] + d * d), None

        zero = jnp.zeros_like(delta)
        (s1, s2), _ = jax.lax.scan(draw, (zero, zero), jax.random.split(key, n_samples))
        delta = s1 / n_samples
        var = jnp.maximum(s2 / n_samples - delta * delta, 0.0) * n_samples / max(n_samples - 1, 1)
        se = jnp.sqrt(var / n_samples)
    return MinibatchScores(delta, se, l1, nll, z, lfc)


def resolve_baseline(
    baseline: BaselineSpec, latent: np.ndarray | None, n_latent: int
) -> tuple[str, np.ndarray]:
    """(name, values of length n_latent) for a baseline spec; stats need the latent matrix."""
    if isinstance(baseline, str):
        if baseline == "zero":
            return "zero", np.zeros(n_latent)
        if baseline in ("mean", "median"):
            if latent is None:  # pragma: no cover - callers pass it for stats
                raise ValueError("latent needed")
            fn = np.mean if baseline == "mean" else np.median
            return baseline, fn(latent.astype(np.float64), axis=0)
        msg = f"Expected baseline 'zero', 'mean', 'median', a number or {n_latent} values, got {baseline!r} instead."
        raise ConfigError(msg)
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


def prefetch(it: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``it`` on a background thread, ``depth`` items ahead (reading overlaps compute)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def worker() -> None:
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as err:  # re-raised in the consumer
            q.put(err)
            return
        q.put(done)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


class Sweep:
    """Iterate ``(start, n_valid, host arrays)`` per minibatch in obs order; afterwards
    ``lfc_sum`` (n_vars, n_ablated) holds the summed log fold changes over all cells.

    Dispatch runs one minibatch ahead of the host copy and reading runs on a thread, so the device
    waits for neither.
    """

    def __init__(
        self,
        params: LDVAEParams,
        data: anndata_io.CellData,
        *,
        config: LDVAEConfig,
        baseline: np.ndarray,
        latents: np.ndarray,
        mode: Mode,
        library: LibraryChoice,
        n_samples: int,
        seed: int,
        batch_size: int,
        dtype: Any,
        devices: Sequence[Any] = (),
    ):
        self.params, self.data, self.config = params, data, config
        self.devices = list(devices)
        self.baseline, self.latents = baseline, latents
        self.mode, self.library, self.n_samples = mode, library, n_samples
        self.seed, self.batch_size, self.dtype = seed, batch_size, dtype
        self.lfc_sum: np.ndarray | None = None

    def _placement(self):
        """(cells, replicated) placement functions: a 1-D mesh over the cell axis when several
        devices are used (parameters replicated), else plain device arrays."""
        if len(self.devices) <= 1:  # jit's own transfer of host arrays is the cheapest
            return (lambda a: a), jax.device_put
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(np.asarray(self.devices), ("cells",))
        cells = NamedSharding(mesh, PartitionSpec("cells"))
        replicated = NamedSharding(mesh, PartitionSpec())
        return (lambda a: jax.device_put(a, cells)), (lambda a: jax.device_put(a, replicated))

    def __iter__(self) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        shard, replicate = self._placement()
        params = jax.tree.map(replicate, self.params)
        base = replicate(np.asarray(self.baseline, dtype=self.dtype))
        lat = replicate(np.asarray(self.latents))
        key = jax.random.key(self.seed)
        lfc = jnp.zeros((self.config.n_input, len(self.latents)), self.dtype)
        pending: list[tuple[int, int, MinibatchScores]] = []

        def collect(start: int, n_valid: int, out: MinibatchScores):
            fields = out._asdict()
            fields.pop("lfc_sum")
            return start, n_valid, {k: np.asarray(v)[:n_valid] for k, v in fields.items()}

        for mb in prefetch(anndata_io.minibatches(self.data, self.batch_size)):
            valid = (np.arange(len(mb.x)) < mb.n_valid).astype(self.dtype)
            if self.n_samples:  # else the key is unused: skip a dispatch per minibatch
                key, sub = jax.random.split(key)
            else:
                sub = key
            out = sweep_minibatch(
                params,
                shard(mb.x.astype(self.dtype, copy=False)),
                shard(mb.nz_index),
                shard(mb.nz_count.astype(self.dtype, copy=False)),
                shard(mb.batch),
                shard(mb.label),
                shard(valid),
                base,
                lat,
                sub,
                config=self.config,
                mode=self.mode,
                library=self.library,
                n_samples=self.n_samples,
            )
            lfc = lfc + out.lfc_sum
            pending.append((mb.start, mb.n_valid, out))
            if len(pending) > 1:
                yield collect(*pending.pop(0))
        for item in pending:
            yield collect(*item)
        self.lfc_sum = np.asarray(lfc)
