"""LDVAE's training objective in train mode, as pure functions: scvi-tools 1.4.2 exactly.

Mirrors ``VAE._regular_inference``, ``VAE.generative`` and ``VAE.loss`` of scvi-tools
``src/scvi/module/_vae.py`` for ``LDVAE``, with the train-mode blocks of ``FCLayers``
(``src/scvi/nn/_base_components.py``): Linear -> BatchNorm1d (batch statistics; running statistics
updated with momentum 0.01 and the unbiased variance; eps 1e-3) -> ReLU -> Dropout. All randomness
comes in as :class:`TrainNoise` (standard-normal draws for z and the library, dropout keep masks),
so a test can hand scvi-tools and us the same draws; :func:`draw_noise` makes them from a key.

What scvi-tools does that is easy to miss, and is mirrored here:

* the zero-inflation head (``px_dropout_decoder``) runs in every forward pass, so its BatchNorm
  running statistics move even for NB and Poisson models, although its weights get no gradient
  (torch then leaves them alone: no weight decay either; see :func:`trainable_mask`);
* ``kl_weight`` scales KL(q(z|x) || N(0, 1)) only; KL(q(l|x) || p(l | batch)) has weight 1;
* for ``latent_distribution="ln"`` the KL is taken in encoder space, and the decoder sees
  ``softmax(z)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from linear_decoder_jax import layers, model
from linear_decoder_jax.config import LDVAEConfig
from linear_decoder_jax.params import BatchNorm, Encoder, Layer, LDVAEParams, LinearDecoder

Array = jax.Array

BN_MOMENTUM = 0.01  # FCLayers: nn.BatchNorm1d(n_out, momentum=0.01, eps=0.001)


class TrainNoise(NamedTuple):
    """The random draws of one train-mode forward pass over a minibatch of ``n_obs`` cells."""

    z: Array  # (n_obs, n_latent) standard normal: z = qz_m + sqrt(qz_v) * noise
    library: Array  # (n_obs, 1) standard normal: library = ql_m + sqrt(ql_v) * noise
    z_keep: tuple[Array, ...]  # per z-encoder layer (n_obs, n_hidden), 1 = kept, 0 = dropped
    l_keep: tuple[Array, ...]  # l-encoder layer (n_obs, n_hidden)


class LossParts(NamedTuple):
    """``VAE.loss`` of one minibatch: the scalar loss and its per-cell parts."""

    loss: Array  # () mean over cells of reconstruction + kl_weight * kl_z + kl_l
    reconstruction_loss: Array  # (n_obs,) -log p(x | z, l), summed over genes
    kl_z: Array  # (n_obs,) KL(q(z|x) || N(0, I)), summed over latents
    kl_l: Array  # (n_obs,) KL(q(l|x) || p(l | batch)); zeros with use_observed_lib_size


def draw_noise(
    key: Array, n_obs: int, *, config: LDVAEConfig, dropout_rate: float, dtype=jnp.float32
) -> TrainNoise:
    """Fresh :class:`TrainNoise` for ``n_obs`` cells (Bernoulli(1 - dropout_rate) keep masks).

    One normal draw for z and the library and one uniform draw for every mask: each random
    primitive costs seconds of XLA compilation on the CPU."""
    kn, kd = jax.random.split(key)
    n_masks = config.n_layers + 1
    normal = jax.random.normal(kn, (n_obs, config.n_latent + 1), dtype)
    uniform = jax.random.uniform(kd, (n_masks, n_obs, config.n_hidden), dtype)
    keep = tuple((uniform[i] < 1.0 - dropout_rate).astype(dtype) for i in range(n_masks))
    return TrainNoise(
        z=normal[:, : config.n_latent],
        library=normal[:, config.n_latent :],
        z_keep=keep[: config.n_layers],
        l_keep=keep[config.n_layers :],
    )


def batch_norm_train(p: BatchNorm, x: Array, valid: Array | None = None) -> tuple[Array, BatchNorm]:
    """torch ``BatchNorm1d`` in train mode on ``x`` (n_obs, n): output and updated running stats.

    Normalises with the batch mean and the biased batch variance; the running variance is updated
    with the unbiased one (``n / (n - 1)``), as torch does. ``valid`` (n_obs,) 0/1: the statistics
    are those of the rows at 1 alone (a padded minibatch).
    """
    if valid is None:
        n: Array | int = x.shape[0]
        mean = x.mean(axis=0)
        var = jnp.square(x - mean[None, :]).mean(axis=0)
    else:
        n = valid.sum()
        mean = (x * valid[:, None]).sum(axis=0) / n
        var = (jnp.square(x - mean[None, :]) * valid[:, None]).sum(axis=0) / n
    y = (x - mean[None, :]) / jnp.sqrt(var[None, :] + layers.BN_EPS) * p.scale[None, :]
    y = y + p.bias[None, :]
    stats = jax.lax.stop_gradient((mean, var * (n / (n - 1))))
    new = p._replace(
        mean=(1.0 - BN_MOMENTUM) * p.mean + BN_MOMENTUM * stats[0],
        var=(1.0 - BN_MOMENTUM) * p.var + BN_MOMENTUM * stats[1],
    )
    return y, new


def layer_train(
    p: Layer,
    x: Array,
    keep: Array | None,
    *,
    relu: bool,
    dropout_rate: float,
    bn_train: bool = True,
    valid: Array | None = None,
) -> tuple[Array, Layer]:
    """One ``FCLayers`` block in train mode: Linear -> BatchNorm -> ReLU -> Dropout(keep mask).
    ``bn_train=False``: a frozen BatchNorm (running statistics, not updated)."""
    y = layers.dense(p.dense, x)
    bn = p.bn
    if p.bn is not None:
        if bn_train:
            y, bn = batch_norm_train(p.bn, y, valid)
        else:
            y = layers.batch_norm_eval(p.bn, y)
    if relu:
        y = jax.nn.relu(y)
    if keep is not None and dropout_rate > 0:
        y = y * (keep * (1.0 / (1.0 - dropout_rate)))  # torch: input * bernoulli(1-p) / (1-p)
    return y, p._replace(bn=bn)


def encoder_train(
    p: Encoder,
    x: Array,
    keep: tuple[Array, ...],
    *,
    dropout_rate: float,
    bn_train: bool = True,
    valid: Array | None = None,
) -> tuple[Array, Array, Encoder]:
    """``Encoder`` in train mode: ``(q_m, q_v)`` and the encoder with updated running stats."""
    h = x
    blocks = []
    for block, mask in zip(p.layers, keep, strict=True):
        h, block = layer_train(
            block, h, mask, relu=True, dropout_rate=dropout_rate, bn_train=bn_train, valid=valid
        )
        blocks.append(block)
    q_m = layers.dense(p.mean, h)
    q_v = jnp.exp(layers.dense(p.var, h)) + layers.VAR_EPS
    return q_m, q_v, p._replace(layers=tuple(blocks))


def kl_normal(m1: Array, v1: Array, m2: Array, v2: Array) -> Array:
    """torch's ``kl_divergence(Normal(m1, sqrt(v1)), Normal(m2, sqrt(v2)))``, element-wise."""
    var_ratio = jnp.square(jnp.sqrt(v1) / jnp.sqrt(v2))
    t1 = jnp.square((m1 - m2) / jnp.sqrt(v2))
    return 0.5 * (var_ratio + t1 - 1.0 - jnp.log(var_ratio))


def _head_train(
    head: Layer,
    z: Array,
    batch: Array,
    *,
    config: LDVAEConfig,
    bn_train: bool,
    valid: Array | None,
    output: bool = True,
) -> tuple[Array | None, Layer]:
    """A decoder head (Linear -> BatchNorm, no ReLU, no dropout) in train mode.

    The head is linear in its few inputs ``u = [z, one-hot batch]``, so its train-mode BatchNorm
    statistics come from those of ``u``: mean ``mean(u) W + b`` and variance ``diag(W' C W)``
    with ``C`` the (biased) covariance of ``u``, the same numbers as torch's over the
    (n_obs, n_vars) output without its reductions. ``output=False`` (the zero-inflation head of
    an NB or Poisson model, whose output is unused but whose statistics move) skips the output.
    """
    if config.n_batch_onehot:
        z = jnp.concatenate([z, jax.nn.one_hot(batch, config.n_batch, dtype=z.dtype)], axis=-1)
    if head.bn is None or not bn_train:
        return layer_train(head, z, None, relu=False, dropout_rate=0.0, bn_train=bn_train)
    kernel, bias = head.dense.kernel, head.dense.bias
    if valid is None:
        n: Array | int = z.shape[0]
        z_mean = z.mean(axis=0)
        centred = z - z_mean[None, :]
        cov = centred.T @ centred / n
    else:
        n = valid.sum()
        z_mean = (z * valid[:, None]).sum(axis=0) / n
        centred = z - z_mean[None, :]
        cov = (centred * valid[:, None]).T @ centred / n
    mean = z_mean @ kernel if bias is None else z_mean @ kernel + bias
    var = jnp.maximum(((cov @ kernel) * kernel).sum(axis=0), 0.0)
    y: Array | None = None
    if output:
        factor = head.bn.scale / jnp.sqrt(var + layers.BN_EPS)
        y = (centred @ kernel) * factor[None, :] + head.bn.bias[None, :]
    stats = jax.lax.stop_gradient((mean, var * (n / (n - 1))))
    bn = head.bn._replace(
        mean=(1.0 - BN_MOMENTUM) * head.bn.mean + BN_MOMENTUM * stats[0],
        var=(1.0 - BN_MOMENTUM) * head.bn.var + BN_MOMENTUM * stats[1],
    )
    return y, head._replace(bn=bn)


def _dispersion(params: LDVAEParams, batch: Array, label: Array, *, config: LDVAEConfig) -> Array:
    """``model.dispersion``, a per-gene theta kept (1, n_vars): the likelihood broadcasts it, and
    its lgamma and digamma terms run once per gene instead of once per cell and gene."""
    if config.dispersion == "gene":
        return jnp.exp(params.px_r)[None, :]
    return model.dispersion(params, batch, label, config=config)


def library_prior(params: LDVAEParams, batch: Array) -> tuple[Array, Array]:
    """``_compute_local_library_params``: prior mean and variance of the log library (n_obs, 1)."""
    assert params.library_log_means is not None and params.library_log_vars is not None
    return params.library_log_means[0][batch][:, None], params.library_log_vars[0][batch][:, None]


def train_loss(
    params: LDVAEParams,
    x: Array,
    batch: Array,
    label: Array,
    noise: TrainNoise,
    kl_weight: Array | float,
    *,
    config: LDVAEConfig,
    dropout_rate: float,
    bn_train: tuple[bool, bool] = (True, True),
    valid: Array | None = None,
) -> tuple[LossParts, LDVAEParams]:
    """Train-mode forward pass and ``VAE.loss`` of one minibatch.

    Parameters
    ----------
    params
        The model's parameters (running statistics are read only to be updated).
    x
        Counts (n_obs, n_vars).
    batch, label
        Integer codes (n_obs,).
    noise
        The draws of this pass (:func:`draw_noise`).
    kl_weight
        Warm-up weight of KL(z) (``TrainingPlan.kl_weight``).
    bn_train
        Whether the encoders' and the decoder's BatchNorm layers run in train mode; False
        freezes them (running statistics used, not updated), as query mapping does.
    valid
        (n_obs,) 0/1: a minibatch padded to a fixed size (one compiled step serves an epoch's
        last, smaller minibatch); the loss and every BatchNorm statistic are those of the cells
        at 1 alone. None: every cell.

    Returns
    -------
    LossParts, LDVAEParams
        The loss and its per-cell parts, and ``params`` with every BatchNorm's running statistics
        updated as torch updates them in this pass.
    """
    h = model.encoder_input(x, config=config)
    enc_bn, dec_bn = bn_train
    qz_m, qz_v, z_encoder = encoder_train(
        params.z_encoder, h, noise.z_keep, dropout_rate=dropout_rate, bn_train=enc_bn, valid=valid
    )
    z = model.z_transformation(qz_m + jnp.sqrt(qz_v) * noise.z, config=config)
    l_encoder = params.l_encoder
    if config.use_observed_lib_size:
        log_library = model.observed_log_library(x)
        kl_l = jnp.zeros(x.shape[0], x.dtype)
    else:
        ql_m, ql_v, l_encoder = encoder_train(
            params.l_encoder, h, noise.l_keep, dropout_rate=dropout_rate, bn_train=enc_bn,
            valid=valid,
        )  # fmt: skip
        log_library = ql_m + jnp.sqrt(ql_v) * noise.library
        prior_m, prior_v = library_prior(params, batch)
        kl_l = kl_normal(ql_m, ql_v, prior_m, prior_v).sum(axis=1)
    logits, factor = _head_train(
        params.decoder.factor, z, batch, config=config, bn_train=dec_bn, valid=valid
    )
    zinb = config.gene_likelihood == "zinb"
    zi_logits, dropout_head = _head_train(
        params.decoder.dropout, z, batch, config=config, bn_train=dec_bn, valid=valid, output=zinb
    )
    assert logits is not None
    scale = jax.nn.softmax(logits, axis=-1)
    decoded = model.Decoded(
        scale=scale,
        mu=jnp.exp(log_library) * scale,
        theta=_dispersion(params, batch, label, config=config),
        zi_logits=zi_logits if zinb else None,
    )
    reconstruction = -model.log_likelihood(x, decoded, config=config)
    kl_z = kl_normal(qz_m, qz_v, jnp.zeros_like(qz_m), jnp.ones_like(qz_v)).sum(axis=-1)
    per_cell = reconstruction + (kl_weight * kl_z + kl_l)
    loss = jnp.mean(per_cell) if valid is None else (per_cell * valid).sum() / valid.sum()
    new = params._replace(
        z_encoder=z_encoder,
        l_encoder=l_encoder,
        decoder=LinearDecoder(factor=factor, dropout=dropout_head),
    )
    return LossParts(loss, reconstruction, kl_z, kl_l), new


def eval_loss(
    params: LDVAEParams,
    x: Array,
    batch: Array,
    label: Array,
    z_noise: Array,
    library_noise: Array,
    kl_weight: Array | float,
    *,
    config: LDVAEConfig,
) -> LossParts:
    """``VAE.loss`` in eval mode (running statistics, no dropout; z and library still drawn), as
    scvi-tools' ``validation_step`` computes it."""
    post = model.inference(params, x, config=config)
    z = model.z_transformation(post.qz_m + jnp.sqrt(post.qz_v) * z_noise, config=config)
    if config.use_observed_lib_size:
        log_library = model.observed_log_library(x)
        kl_l = jnp.zeros(x.shape[0], x.dtype)
    else:
        log_library = post.ql_m + jnp.sqrt(post.ql_v) * library_noise
        prior_m, prior_v = library_prior(params, batch)
        kl_l = kl_normal(post.ql_m, post.ql_v, prior_m, prior_v).sum(axis=1)
    decoded = model.generative(params, z, log_library, batch, label, config=config)
    reconstruction = -model.log_likelihood(x, decoded, config=config)
    kl_z = kl_normal(post.qz_m, post.qz_v, jnp.zeros_like(post.qz_m), jnp.ones_like(post.qz_v))
    kl_z = kl_z.sum(axis=-1)
    loss = jnp.mean(reconstruction + (kl_weight * kl_z + kl_l))
    return LossParts(loss, reconstruction, kl_z, kl_l)


def trainable_mask(config: LDVAEConfig) -> LDVAEParams:
    """Which leaves torch's optimizer moves (True) for this configuration.

    Running statistics and the library prior are buffers, never trained. The zero-inflation head
    gets no gradient unless the likelihood is ZINB, ``px_r`` none for Poisson and the library
    encoder none with ``use_observed_lib_size``: torch's Adam skips parameters whose gradient is None, so they get
    no weight decay either.
    """
    from linear_decoder_jax.params import abstract_params

    template = abstract_params(config)

    def bn_mask(bn: BatchNorm | None, on: bool) -> BatchNorm | None:
        return None if bn is None else BatchNorm(on, on, False, False)  # type: ignore[arg-type]

    def layer_mask(lay: Layer, on: bool) -> Layer:
        dense = lay.dense._replace(
            kernel=on,  # type: ignore[arg-type]
            bias=None if lay.dense.bias is None else on,  # type: ignore[arg-type]
        )
        return Layer(dense, bn_mask(lay.bn, on))

    def encoder_mask(enc: Encoder, on: bool) -> Encoder:
        return Encoder(
            tuple(layer_mask(b, on) for b in enc.layers),
            enc.mean._replace(kernel=on, bias=on),  # type: ignore[arg-type]
            enc.var._replace(kernel=on, bias=on),  # type: ignore[arg-type]
        )

    zinb = config.gene_likelihood == "zinb"
    prior = None if template.library_log_means is None else False
    return LDVAEParams(
        z_encoder=encoder_mask(template.z_encoder, True),
        l_encoder=encoder_mask(template.l_encoder, not config.use_observed_lib_size),
        decoder=LinearDecoder(
            layer_mask(template.decoder.factor, True), layer_mask(template.decoder.dropout, zinb)
        ),
        px_r=config.gene_likelihood != "poisson",  # type: ignore[arg-type]
        library_log_means=prior,  # type: ignore[arg-type]
        library_log_vars=prior,  # type: ignore[arg-type]
    )
