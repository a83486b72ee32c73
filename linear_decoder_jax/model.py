"""LDVAE's eval-mode inference and generative paths as pure functions.

Mirrors scvi-tools ``src/scvi/module/_vae.py`` (``VAE._regular_inference``, ``VAE.generative``,
``LDVAE``) and ``LinearDecoderSCVI``, evaluated at posterior means: deterministic where scvi-tools
samples. All functions take one minibatch; ``batch`` and ``label`` are int arrays (n_obs,).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from linear_decoder_jax import layers
from linear_decoder_jax._typing import Codes, Counts, Latent, LogLibrary, PerCell, PerGene
from linear_decoder_jax.config import LDVAEConfig
from linear_decoder_jax.distributions import log_prob
from linear_decoder_jax.family import AffineDecoder
from linear_decoder_jax.params import Layer, LDVAEParams

Array = jax.Array


class Posterior(NamedTuple):
    """Gaussian posteriors of the z encoder and the library encoder."""

    qz_m: Array  # (n_obs, n_latent)
    qz_v: Array  # (n_obs, n_latent)
    ql_m: Array  # (n_obs, 1) log library
    ql_v: Array  # (n_obs, 1)


class Decoded(NamedTuple):
    """Decoder output, named as scvi-tools' distribution attributes (scvi's ``px_r`` is log theta)."""

    scale: Array  # (n_obs, n_vars) rho, rows sum to 1
    mu: Array  # (n_obs, n_vars) exp(library) * scale
    theta: Array  # (n_obs, n_vars) inverse dispersion
    zi_logits: Array | None  # (n_obs, n_vars), ZINB only


def encoder_input(x: Counts, *, config: LDVAEConfig) -> PerGene:
    return jnp.log1p(x) if config.log_variational else x


def inference(params: LDVAEParams, x: Counts, *, config: LDVAEConfig) -> Posterior:
    """Posteriors q(z|x) and q(l|x) for counts ``x`` (n_obs, n_vars); encoders ignore batch."""
    h = encoder_input(x, config=config)
    qz_m, qz_v = layers.encoder(params.z_encoder, h)
    ql_m, ql_v = layers.encoder(params.l_encoder, h)
    return Posterior(qz_m, qz_v, ql_m, ql_v)


def z_transformation(z: Latent, *, config: LDVAEConfig) -> Latent:
    """Map an encoder-space z to the decoder input: identity, or softmax for "ln" models."""
    return jax.nn.softmax(z, axis=-1) if config.latent_distribution == "ln" else z


def observed_log_library(x: Counts) -> LogLibrary:
    """Log total counts per cell (n_obs, 1)."""
    return jnp.log(x.sum(axis=-1, keepdims=True))


def library(
    posterior: Posterior,
    x: Counts,
    *,
    config: LDVAEConfig,
    choice: Literal["model", "observed"] = "model",
) -> LogLibrary:
    """Log library (n_obs, 1). ``choice="model"``: the model's own (observed log total counts when
    it was trained with ``use_observed_lib_size``, else the q(l|x) mean, LinearSCVI's default);
    ``"observed"``: log total counts whatever the model does."""
    if choice == "observed" or config.use_observed_lib_size:
        return observed_log_library(x)
    return posterior.ql_m


def affine_head(head: Layer, *, config: LDVAEConfig) -> AffineDecoder:
    """Fold a decoder head's Linear + eval BatchNorm into loadings, batch offsets and intercept."""
    kernel = head.dense.kernel  # (n_latent + n_batch_onehot, n_vars)
    k = config.n_latent
    w_z, w_b = kernel[:k], kernel[k:]
    intercept = (
        jnp.zeros(kernel.shape[1], kernel.dtype) if head.dense.bias is None else head.dense.bias
    )
    if head.bn is not None:
        s = head.bn.scale / jnp.sqrt(head.bn.var + layers.BN_EPS)
        w_z, w_b = w_z * s[None, :], w_b * s[None, :]
        intercept = (intercept - head.bn.mean) * s + head.bn.bias
    if w_b.shape[0] == 0:  # one batch: no one-hot columns, offset 0
        w_b = jnp.zeros((1, kernel.shape[1]), kernel.dtype)
    return AffineDecoder(loadings=w_z.T, offsets=w_b, intercept=intercept)


def head_logits(head: Layer, z: Latent, batch: Codes, *, config: LDVAEConfig) -> PerGene:
    """A decoder head on concat(z, one_hot(batch)), as ``FCLayers`` computes it."""
    if config.n_batch_onehot:
        z = jnp.concatenate([z, jax.nn.one_hot(batch, config.n_batch, dtype=z.dtype)], axis=-1)
    return layers.layer(head, z, relu=False)


def dispersion(params: LDVAEParams, batch: Codes, label: Codes, *, config: LDVAEConfig) -> PerGene:
    """theta = exp(px_r) per cell and gene (n_obs, n_vars)."""
    px_r = params.px_r
    if config.dispersion == "gene":
        return jnp.broadcast_to(jnp.exp(px_r), (batch.shape[0], px_r.shape[0]))
    index = batch if config.dispersion == "gene-batch" else label
    return jnp.exp(px_r.T[index])


def generative(
    params: LDVAEParams,
    z: Latent,
    log_library: LogLibrary,
    batch: Codes,
    label: Codes,
    *,
    config: LDVAEConfig,
) -> Decoded:
    """Decode decoder-input ``z`` (n_obs, n_latent) with log library (n_obs, 1)."""
    logits = head_logits(params.decoder.factor, z, batch, config=config)
    scale = jax.nn.softmax(logits, axis=-1)
    mu = jnp.exp(log_library) * scale
    theta = dispersion(params, batch, label, config=config)
    zi = None
    if config.gene_likelihood == "zinb":
        zi = head_logits(params.decoder.dropout, z, batch, config=config)
    return Decoded(scale=scale, mu=mu, theta=theta, zi_logits=zi)


def log_likelihood(x: Counts, decoded: Decoded, *, config: LDVAEConfig) -> PerCell:
    """Per-cell log p(x | decoded), summed over genes (n_obs,)."""
    per_gene = log_prob(
        x, decoded.mu, decoded.theta, decoded.zi_logits, likelihood=config.gene_likelihood
    )
    return per_gene.sum(axis=-1)
