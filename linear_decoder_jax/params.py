"""Parameter pytrees of LDVAE, mirroring scvi-tools' module tree.

Kernels are stored ``(in, out)`` as in flax (torch ``Linear.weight`` transposed). Optional parts
(a decoder without BatchNorm, a linear layer without bias) are ``None``. The flat key of every leaf
is its attribute path joined by ``/`` (``z_encoder/layers/0/dense/kernel``): the converter and the
checkpoint both use these keys.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
from numpy.typing import DTypeLike

from linear_decoder_jax.config import LDVAEConfig
from linear_decoder_jax.errors import CheckpointFormatError

Array = jax.Array


class Dense(NamedTuple):
    kernel: Array  # (n_in, n_out)
    bias: Array | None  # (n_out,)


class BatchNorm(NamedTuple):
    """Eval-mode BatchNorm1d: ``scale``/``bias`` are gamma/beta, ``mean``/``var`` running stats."""

    scale: Array  # (n,)
    bias: Array  # (n,)
    mean: Array  # (n,)
    var: Array  # (n,)


class Layer(NamedTuple):
    dense: Dense
    bn: BatchNorm | None


class Encoder(NamedTuple):
    layers: tuple[Layer, ...]
    mean: Dense  # (n_hidden, n_output)
    var: Dense  # (n_hidden, n_output)


class LinearDecoder(NamedTuple):
    factor: Layer  # kernel (n_latent + n_batch_onehot, n_input)
    dropout: Layer  # zero-inflation logits head, same shapes


class LDVAEParams(NamedTuple):
    z_encoder: Encoder
    l_encoder: Encoder
    decoder: LinearDecoder
    px_r: Array  # (n_input,) | (n_input, n_batch) | (n_input, n_labels); log theta
    library_log_means: Array | None  # (1, n_batch); library prior, kept for fidelity
    library_log_vars: Array | None  # (1, n_batch)


def abstract_params(config: LDVAEConfig, dtype: DTypeLike = np.float32) -> LDVAEParams:
    """The parameter tree of ``config`` with ``jax.ShapeDtypeStruct`` leaves: a restore template."""

    def leaf(*shape: int) -> Any:  # a jax.ShapeDtypeStruct where the tree holds an Array
        return jax.ShapeDtypeStruct(shape, dtype)

    def dense(n_in: int, n_out: int, bias: bool = True) -> Dense:
        return Dense(leaf(n_in, n_out), leaf(n_out) if bias else None)

    def bn(n: int) -> BatchNorm:
        return BatchNorm(leaf(n), leaf(n), leaf(n), leaf(n))

    def encoder(n_out: int, n_layers: int) -> Encoder:
        g, h = config.n_input, config.n_hidden
        layers = tuple(Layer(dense(g if i == 0 else h, h), bn(h)) for i in range(n_layers))
        return Encoder(layers, dense(h, n_out), dense(h, n_out))

    n_dec_in = config.n_latent + config.n_batch_onehot

    def dec_layer() -> Layer:
        return Layer(
            dense(n_dec_in, config.n_input, bias=config.decoder_bias),
            bn(config.n_input) if config.decoder_batch_norm else None,
        )

    px_r_cols = {"gene": (), "gene-batch": (config.n_batch,), "gene-label": (config.n_labels,)}
    prior = None if config.use_observed_lib_size else leaf(1, config.n_batch)
    return LDVAEParams(
        z_encoder=encoder(config.n_latent, config.n_layers),
        l_encoder=encoder(1, 1),
        decoder=LinearDecoder(dec_layer(), dec_layer()),
        px_r=leaf(config.n_input, *px_r_cols[config.dispersion]),
        library_log_means=prior,
        library_log_vars=prior,
    )


def _key(path: tuple) -> str:
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        else:  # pragma: no cover - NamedTuples and tuples only
            parts.append(str(entry))
    return "/".join(parts)


def to_flat(params: LDVAEParams) -> dict[str, Array]:
    """``{"z_encoder/layers/0/dense/kernel": array, ...}``: the leaves by flat key."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return {_key(path): leaf for path, leaf in leaves}


def from_flat(flat: dict[str, np.ndarray], config: LDVAEConfig, *, dtype=np.float32) -> LDVAEParams:
    """Build ``LDVAEParams`` from flat keys, checking every key and shape against ``config``."""
    return fill(abstract_params(config, dtype), flat, dtype=dtype, what="the configuration")


def fill(template: Any, flat: dict[str, Any], *, dtype: DTypeLike, what: str) -> Any:
    """The parameter tree of ``template`` (``ShapeDtypeStruct`` leaves) with the values of
    ``flat``, every key, shape and value checked (any family's ``from_flat``)."""
    expected = to_flat(template)
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        msg = f"Parameters do not match {what}: missing {missing[:5]}, unexpected {extra[:5]}."
        raise CheckpointFormatError(msg)

    def pick(path: tuple, spec: jax.ShapeDtypeStruct) -> np.ndarray:
        key = _key(path)
        value = np.asarray(flat[key])
        if value.shape != spec.shape:
            msg = f"Parameter {key!r}: expected shape {spec.shape}, got {value.shape} instead."
            raise CheckpointFormatError(msg)
        if not np.all(np.isfinite(value)):
            msg = f"Parameter {key!r} holds NaN or infinite values."
            raise CheckpointFormatError(msg)
        return value.astype(dtype)

    return jax.tree_util.tree_map_with_path(pick, template)
