"""Model families: what the run pipeline needs from a model, and nothing more.

A family is a frozen, hashable object holding one model's static configuration (no arrays), so
jitted functions take it as a static argument. Its methods are pure functions of a parameter
pytree and one minibatch. The scorers (plain sweep, gene scores, Shapley, refit, traversal) talk
to this protocol only: a family that can encode and decode with some latents replaced gets every
score. A family may add a fast path of its own (LinearSCVI's rank-one sweep,
``families.linear_scvi``); the generic path is the reference it is tested against.

Units. A result column ablates a *unit*: by default one latent (``unit_latents`` is
``((0,), (1,), ...)``). A family whose decoder is additive over splits of several latents (DRVI)
may also ablate whole splits (``decode(..., split_mask=...)``); the result then has one column per
split, named by :meth:`Family.split_names`.

Families without loadings. Where a LinearSCVI result uses its loadings (``varm["loadings"]``,
``compare``'s loading correlation, ``enrichment(score="loadings")``, the gene panels), a family
whose :meth:`Family.loadings` is ``None`` uses the sweep's ``mean_lfc`` instead: the mean over
cells of each gene's log-fold change when the latent is set to its baseline, which for LinearSCVI
is the loading times the mean shift, up to the normaliser.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
LibraryChoice = Literal["model", "observed"]
Likelihood = Literal["nb", "zinb", "poisson"]


class Encoded(NamedTuple):
    """A minibatch encoded once, shared by every scorer."""

    qz_m: Array  # (b, n_latent) posterior mean, encoder space
    qz_v: Array  # (b, n_latent) posterior variance
    z: Array  # (b, n_latent) decoder input at the posterior mean
    log_library: Array  # (b, 1) log library per the run's library choice


class Rates(NamedTuple):
    """A decoder's output: what the likelihood needs per cell and gene."""

    scale: Array  # (b, n_vars) normalized expression, rows sum to 1
    mu: Array  # (b, n_vars) mean counts
    theta: Array | None  # (b, n_vars) inverse dispersion; None for Poisson
    zi_logits: Array | None  # (b, n_vars) zero-inflation logits; ZINB only


@runtime_checkable
class Family(Protocol):
    """One model family, configured: static, hashable, no arrays.

    ``name`` is recorded in ``config.json`` and in ``uns["ablation"]["family"]``.
    """

    name: ClassVar[str]

    @property
    def n_latent(self) -> int: ...

    @property
    def simplex(self) -> bool:
        """Whether the decoder input is ``softmax(u)`` of the encoder-space latent (logistic
        normal): the refit then holds ``softmax(u)_k`` at the baseline."""
        ...

    @property
    def n_vars(self) -> int: ...

    @property
    def additive(self) -> bool:
        """Whether the decoder is additive over splits (``decode`` takes a ``split_mask``)."""
        ...

    def latent_names(self) -> list[str]:
        """One name per latent, in column order (``Z_0 ...`` for LinearSCVI)."""
        ...

    def unit_latents(self) -> tuple[tuple[int, ...], ...]:
        """The latents each split holds (``((0,), (1,), ...)`` when every latent is its own)."""
        ...

    def split_names(self) -> list[str]:
        """One name per split (the latent names when every latent is its own split)."""
        ...

    def encode(
        self, params: Any, x: Array, batch: Array, label: Array, *, library: LibraryChoice
    ) -> Encoded:
        """Encode counts ``x`` (b, n_vars) with integer covariates ``batch``/``label`` (b,)."""
        ...

    def decoder_input(self, z: Array) -> Array:
        """Map an encoder-space latent (b, n_latent) to the decoder input (a draw from q(z|x))."""
        ...

    def decode(
        self,
        params: Any,
        z: Array,
        log_library: Array,
        batch: Array,
        label: Array,
        *,
        split_mask: Array | None = None,
    ) -> Rates:
        """Decode decoder input ``z`` (b, n_latent). ``split_mask`` (b, n_splits) or (n_splits,),
        1 keeps a split's term in the decoder's aggregation, 0 removes it (families whose decoder
        is not additive over splits raise ``ConfigError`` when it is given)."""
        ...

    def log_prob(self, x: Array, rates: Rates) -> Array:
        """Per-gene log-likelihood (b, n_vars) of counts ``x`` under ``rates``."""
        ...

    def loadings(self, params: Any) -> Array | None:
        """(n_vars, n_latent) linear loadings when the decoder has them, else ``None``."""
        ...


class AffineDecoder(NamedTuple):
    """A decoder head whose logits are affine in the decoder input (BatchNorm folded in).

    ``logits = z @ loadings.T + offsets[batch] + intercept`` reproduces the head's output exactly.
    """

    loadings: Array  # (n_vars, n_latent)
    offsets: Array  # (n_batch, n_vars); zeros when the model has one batch
    intercept: Array  # (n_vars,)


def affine_logits(head: AffineDecoder, z: Array, batch: Array) -> Array:
    """Logits of a folded head (:func:`affine_head`) for decoder input ``z`` (n_obs, n_latent)."""
    return z @ head.loadings.T + head.offsets[batch] + head.intercept[None, :]


@runtime_checkable
class AffineFamily(Family, Protocol):
    """A family whose decoder is a softmax over genes of logits affine in ``z`` (LinearSCVI).

    Replacing latents then moves the logits by a low-rank term, which the scorers' fast paths use
    (the rank-one sweep, coalition decodes without the encoder's layers, the refit's heads). Every
    fast path equals the generic path within float32 rounding (tests/test_family.py).
    """

    likelihood: Likelihood  # "zinb" adds the zero-inflation head

    def affine_heads(self, params: Any) -> list[AffineDecoder]:
        """The scale head, then (ZINB) the zero-inflation head."""
        ...

    def dispersion(self, params: Any, batch: Array, label: Array) -> Array:
        """theta per cell and gene (b, n_vars)."""
        ...


@runtime_checkable
class SplitFamily(Family, Protocol):
    """A family whose decoder aggregates per-split values (DRVI): ``decode`` is
    ``rates_from_aggregate(aggregate(split_values(z)))``.

    Where each split sees only its own latents (``splits_own_latents``), replacing latent k
    changes only the term of the split that holds it, so the sweep decodes every split once at
    the full ``z`` and once per position within a split at the baseline, then re-aggregates one
    replaced term per latent (``leave_one_out`` + ``aggregate_with``); removing a split needs no
    decode at all. Equal to the generic path within float32 rounding (tests/test_drvi.py).
    """

    @property
    def splits_own_latents(self) -> bool:
        """Whether each split depends on its own latents only (``unit_latents``)."""
        ...

    def split_values(self, params: Any, z: Array, batch: Array) -> Array:
        """Per-split values before aggregation (b, n_splits, n_vars)."""
        ...

    def constant_split_values(self, params: Any, z_row: Array, batch: Array) -> Array:
        """:meth:`split_values` with every cell at the decoder input ``z_row`` (n_latent,)."""
        ...

    def aggregate(self, values: Array, split_mask: Array | None = None) -> Array:
        """The aggregated values (b, n_vars), without the splits where ``split_mask`` is 0."""
        ...

    def leave_one_out(self, values: Array) -> Array:
        """For each split j, the aggregation's state over every split but j (b, n_splits,
        n_vars)."""
        ...

    def aggregate_with(self, rest: Array | None, term: Array | None) -> Array:
        """The aggregated values (b, n_vars) of one split's ``rest`` (``None``: no other split)
        plus a term for that split (``None``: the split removed)."""
        ...

    def rates_from_aggregate(
        self, params: Any, mean: Array, log_library: Array, batch: Array
    ) -> Rates:
        """The decoder's output from the aggregated values ``mean`` (b, n_vars)."""
        ...

    def aggregate_log_prob(
        self, params: Any, x: Array, mean: Array, log_library: Array, batch: Array
    ) -> tuple[Array, Array, Array]:
        """(normalized expression, its log, per-gene log-likelihood less the terms that do not
        depend on ``mean``) of counts ``x`` under the aggregated values ``mean`` (b, n_vars)."""
        ...


def split_local(family: Family) -> bool:
    """Whether a split family has several splits, each seeing its own latents only (not DRVI's
    "power" method, whose every split depends on every latent: replacing one latent there
    re-decodes every split). The sweep then takes its per-split path (``ablation``)."""
    return (
        isinstance(family, SplitFamily)
        and family.splits_own_latents
        and len(family.unit_latents()) > 1
    )


def one_latent_per_split(family: Family) -> bool:
    """:func:`split_local` with exactly one latent in each split (DRVI's default): a latent at a
    value then gives its split a term that depends on the value and the covariates only, so the
    traversal and the Shapley values swap split terms instead of decoding again."""
    return split_local(family) and all(len(u) == 1 for u in family.unit_latents())


def split_layout(family: SplitFamily) -> tuple[np.ndarray, np.ndarray]:
    """(split, position within the split) of each latent, (n_latent,) int32 each, from
    ``unit_latents``: where the per-split paths find a latent's term."""
    split_of = np.zeros(family.n_latent, np.int32)
    position = np.zeros(family.n_latent, np.int32)
    for s, members in enumerate(family.unit_latents()):
        split_of[list(members)], position[list(members)] = s, np.arange(len(members))
    return split_of, position


def sample_gaussian(mean: Array, var: Array, *, key: Array) -> Array:
    """One reparameterised draw from N(mean, var), e.g. z ~ q(z|x) in encoder space."""
    return mean + jnp.sqrt(var) * jax.random.normal(key, mean.shape, mean.dtype)
