"""Eval-mode building blocks of scvi-tools' ``FCLayers`` as pure functions.

Source: scvi-tools ``src/scvi/nn/_base_components.py`` (``FCLayers``, ``Encoder``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from linear_decoder_jax.params import BatchNorm, Dense, Encoder, Layer

Array = jax.Array

BN_EPS = 1e-3  # FCLayers: nn.BatchNorm1d(n_out, momentum=0.01, eps=0.001)
VAR_EPS = 1e-4  # Encoder(var_eps=1e-4): q_v = exp(var_encoder(q)) + var_eps


def rows(v: Array, like: Array) -> Array:
    """Broadcast a per-feature vector (n,) against ``like`` (..., n) explicitly."""
    return jnp.reshape(v, (1,) * (like.ndim - 1) + v.shape)


def dense(p: Dense, x: Array) -> Array:
    """``x @ kernel + bias`` for ``x`` (..., n_in)."""
    y = x @ p.kernel
    return y if p.bias is None else y + rows(p.bias, y)


def batch_norm_eval(p: BatchNorm, x: Array) -> Array:
    """torch ``BatchNorm1d`` in eval mode, same operation order."""
    mean, var, scale, bias = (rows(v, x) for v in (p.mean, p.var, p.scale, p.bias))
    return (x - mean) / jnp.sqrt(var + BN_EPS) * scale + bias


def layer(p: Layer, x: Array, *, relu: bool) -> Array:
    """One ``FCLayers`` block: Linear -> BatchNorm (if present) -> ReLU (if ``relu``)."""
    y = dense(p.dense, x)
    if p.bn is not None:
        y = batch_norm_eval(p.bn, y)
    return jax.nn.relu(y) if relu else y


def encoder(p: Encoder, x: Array) -> tuple[Array, Array]:
    """Gaussian posterior ``(q_m, q_v)`` of an scvi-tools ``Encoder`` (no covariates)."""
    h = x
    for block in p.layers:
        h = layer(block, h, relu=True)
    q_m = dense(p.mean, h)
    q_v = jnp.exp(dense(p.var, h)) + VAR_EPS
    return q_m, q_v
