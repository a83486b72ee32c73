"""DRVI as a model family: configuration, parameter pytree and pure eval-mode functions.

DRVI (Moinfar & Theis) encodes ``log1p(x)`` with an MLP and decodes additively over *splits* of
the latent: each split goes through its own (by default weight-shared) MLP to per-gene values, the
splits are aggregated (``logsumexp`` minus ``log K`` by default), and a softmax over genes times the
observed library gives the mean counts. Everything here was read from drvi-py 0.2.8:
``scvi_tools_based/module/_drvi.py`` (``DRVIModule``), ``scvi_tools_based/nn/_base_components.py``
(``FCLayers``, ``Encoder``, ``DecoderDRVI``), ``nn_modules/noise_model.py``,
``nn_modules/embedding.py`` and ``nn_modules/layer/linear_layer.py``.

Conventions (each cited where it is used):

* the library is the observed ``x.sum(1)``; drvi-py never encodes it (``_get_library_size``), so
  both library choices of the family protocol give the observed one;
* ``px_r`` is log theta: drvi-py's dispersion parameter plus its offset 1 (theta = exp(1 + r),
  ``NegativeBinomialNoiseModel.dist``), added once by the converter in float32 as drvi-py adds it
  at run time (the scvi-tools 1.5 layout stores it folded already);
* covariates are integer codes, one column per categorical covariate in drvi-py's order
  (``[batch] + categorical_covariate_keys``; the batch column is all zeros without a batch key);
* removing a split (``split_mask`` 0) takes its term out of the aggregation and keeps the divisor
  K (``sum``/``sum_plus`` stay "sum of the kept terms over K"; ``logsumexp`` subtracts ``log K``,
  which cancels in the softmax over genes, so the choice does not matter there, and ``max`` has
  no divisor). This is what drvi-py's own within-distribution effect does for ``logsumexp``
  (``-log(1 - softmax)`` over splits is ``log sum_all - log sum_without``) and for ``sum`` (the
  removed term's size, ``|x_k|``, undivided by K - 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import DTypeLike

from linear_decoder_jax import distributions
from linear_decoder_jax.errors import ConfigError
from linear_decoder_jax.families.drvi_config import DRVIConfig as DRVIConfig  # re-exported
from linear_decoder_jax.families.drvi_config import (
    config_from_converter as config_from_converter,  # re-exported
)
from linear_decoder_jax.families.drvi_config import in_part
from linear_decoder_jax.family import Encoded, LibraryChoice, Rates
from linear_decoder_jax.params import fill
from linear_decoder_jax.schema import latent_names

Array = jax.Array

FORMAT_NAME = "drvi"
BN_EPS = 1e-3  # FCLayers: FreezableBatchNorm1d(n_out, momentum=0.01, eps=0.001)
LN_EPS = 1e-5  # FreezableLayerNorm(n_out, elementwise_affine=False): torch's default eps
VAR_EPS = 1e-4  # Encoder(var_eps=1e-4)
EMB_MAX_NORM = 1.0  # MultiEmbedding(..., max_norm=1.0): torch renormalises rows at lookup
EMB_RENORM_EPS = 1e-7  # ATen embedding_renorm_: scale = max_norm / (norm + 1e-7)
PNB_EPS = 1e-8  # LogNegativeBinomial(eps=1e-8)


class Dense(NamedTuple):
    kernel: Array  # (n_in, n_out), or (n_split, n_in, n_out) for per-split weights
    bias: Array | None  # (n_out,) or (n_split, n_out)


class BatchNorm(NamedTuple):
    """Eval-mode BatchNorm1d; ``scale``/``bias`` are ``None`` without affine. Over n_split * n_out
    features when the decoder is split (drvi-py flattens the split axis into the features)."""

    scale: Array | None
    bias: Array | None
    mean: Array
    var: Array


class FCLayer(NamedTuple):
    """One ``FCLayers`` block: embeddings (``emb`` covariates, injected layers only), Linear,
    BatchNorm; LayerNorm without affine has no parameters."""

    embeddings: tuple[Array, ...] | None  # one (n_cat, dim) table per covariate
    dense: Dense
    bn: BatchNorm | None


class DRVIParams(NamedTuple):
    encoder: tuple[FCLayer, ...]
    qz_mean: Dense  # (n_hidden, n_latent)
    qz_var: Dense  # (n_hidden, n_latent)
    split_transform: Dense | None  # split_map: (n_split, split_size, d), no bias; power: (K, s*d)
    decoder: tuple[FCLayer, ...]
    px_mean: FCLayer  # kernel (n_hidden, n_input) or (n_split, n_hidden, n_input)
    px_r: (
        Array | None
    )  # (n_input,) "gene" or (n_input, n_batch) "gene-batch"; log theta; None: poisson


def abstract_params(config: DRVIConfig, dtype: DTypeLike = np.float32) -> DRVIParams:
    """The parameter tree of ``config`` with ``jax.ShapeDtypeStruct`` leaves: a restore template."""

    def leaf(*shape: int) -> Any:
        return jax.ShapeDtypeStruct(shape, dtype)

    s = config.n_split

    def fc(
        n_in: int,
        n_out: int,
        *,
        stacked: bool,
        injected: bool,
        bn: bool,
        affine: bool,
        split: bool = True,
    ) -> FCLayer:
        emb = None
        if injected and config.covariate_modeling == "emb":
            emb = tuple(
                leaf(n, d)
                for n, d in zip(config.n_cats_per_cov, config.covariate_dims, strict=True)
            )
        if injected:
            n_in += sum(config.cov_widths)
        if stacked:
            dense = Dense(leaf(s, n_in, n_out), leaf(s, n_out))
        else:
            dense = Dense(leaf(n_in, n_out), leaf(n_out))
        norm = None
        if bn:
            width = n_out * s if (s > 1 and split) else n_out
            norm = BatchNorm(
                leaf(width) if affine else None,
                leaf(width) if affine else None,
                leaf(width),
                leaf(width),
            )
        return FCLayer(emb, dense, norm)

    g, k = config.n_input, config.n_latent
    enc_dims = (g, *config.encoder_dims)
    enc_bn, enc_affine = (
        in_part(config.use_batch_norm, "encoder"),
        in_part(config.affine_batch_norm, "encoder"),
    )
    encoder = tuple(
        fc(a, b, stacked=False, injected=False, bn=enc_bn, affine=enc_affine, split=False)
        for a, b in zip(enc_dims[:-1], enc_dims[1:], strict=True)
    )
    h_enc = enc_dims[-1]
    split_transform = None
    d = config.effective_dim
    if s > 1 and config.split_method == "split_map":
        split_transform = Dense(leaf(s, config.split_size, d), None)
    elif s > 1 and config.split_method == "power":
        split_transform = Dense(leaf(k, d * s), leaf(d * s))
    dec_dims = (d, *config.decoder_dims)
    dec_bn, dec_affine = (
        in_part(config.use_batch_norm, "decoder"),
        in_part(config.affine_batch_norm, "decoder"),
    )
    decoder = tuple(
        fc(
            a,
            b,
            stacked=config.hidden_stacked(i),
            injected=config.hidden_injected(i),
            bn=dec_bn,
            affine=dec_affine,
        )
        for i, (a, b) in enumerate(zip(dec_dims[:-1], dec_dims[1:], strict=True))
    )
    px_mean = fc(
        dec_dims[-1],
        g,
        stacked=config.head_stacked,
        injected=config.head_injected,
        bn=False,
        affine=False,
    )
    px_r = leaf(g) if config.dispersion == "gene" else leaf(g, config.n_cats_per_cov[0])
    if config.gene_likelihood == "poisson":
        px_r = None
    return DRVIParams(
        encoder=encoder,
        qz_mean=Dense(leaf(h_enc, k), leaf(k)),
        qz_var=Dense(leaf(h_enc, k), leaf(k)),
        split_transform=split_transform,
        decoder=decoder,
        px_mean=px_mean,
        px_r=px_r,
    )


def from_flat(flat: dict[str, np.ndarray], config: DRVIConfig, *, dtype=np.float32) -> DRVIParams:
    """Build ``DRVIParams`` from flat keys, checking every key and shape against ``config``."""
    return fill(abstract_params(config, dtype), flat, dtype=dtype, what="the DRVI configuration")


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _lead(v: Array, like: Array) -> Array:
    """Broadcast ``v`` (trailing axes of ``like``) against ``like`` explicitly."""
    return jnp.reshape(v, (1,) * (like.ndim - v.ndim) + v.shape)


def _dense(p: Dense, x: Array) -> Array:
    y = x @ p.kernel
    return y if p.bias is None else y + _lead(p.bias, y)


def _activation(name: str, x: Array) -> Array:
    if name == "elu":
        return jax.nn.elu(x)
    return jax.nn.relu(x)


def _mean_activation(name: str, x: Array) -> Array:
    """``Encoder.mean_activation`` of drvi-py (identity, relu, gelu, leaky_relu_s, elu_a, celu_a)."""
    if name == "identity":
        return x
    if name == "relu":
        return jax.nn.relu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)  # torch nn.GELU() is the exact erf form
    if name.startswith("leaky_relu"):
        arg = name.removeprefix("leaky_relu").lstrip("_")
        return jax.nn.leaky_relu(x, float(arg) if arg else 0.01)
    base, _, arg = name.partition("_")
    alpha = float(arg) if arg else 1.0
    return jax.nn.elu(x, alpha) if base == "elu" else jax.nn.celu(x, alpha)


def _var_activation(name: str, x: Array) -> Array:
    if name == "exp":
        return jnp.exp(x)
    if name == "pow2":
        return x * x
    return 2.0 * jax.nn.sigmoid(x)


def embed(table: Array, codes: Array) -> Array:
    """``nn.Embedding(max_norm=1)`` lookup: rows with norm > 1 are scaled by ``1 / (norm + 1e-7)``
    (ATen's ``embedding_renorm_``, applied at lookup)."""
    rows = table[codes]
    norm = jnp.sqrt(jnp.sum(rows * rows, axis=-1, keepdims=True))
    scale = jnp.where(norm > EMB_MAX_NORM, EMB_MAX_NORM / (norm + EMB_RENORM_EPS), 1.0)
    return rows * scale


def pack_covariates(config: DRVIConfig, codes: np.ndarray) -> np.ndarray:
    """(n_obs,) int32 codes of the (n_obs, n_cov) covariate codes (see :func:`covariate_codes`)."""
    strides = np.cumprod((1, *config.n_cats_per_cov[:-1]))
    if int(np.prod(config.n_cats_per_cov)) >= 2**31:
        msg = f"Too many covariate combinations to pack ({config.n_cats_per_cov})."
        raise ConfigError(msg)
    return (np.asarray(codes, np.int64) @ strides).astype(np.int32)


def covariate_codes(config: DRVIConfig, batch: Array) -> Array:
    """Covariate codes as (b, n_cov) integers. ``batch`` may also be (b,): every covariate's code
    packed in one integer, batch first, in mixed radix (``sum_i c_i prod_{j<i} n_j``, as
    :func:`pack_covariates` and ``anndata_io.prepare`` make them), so that the run pipeline
    carries one covariate column whatever the model."""
    n_cov = len(config.n_cats_per_cov)
    codes = jnp.asarray(batch)
    if codes.ndim == 1:
        strides = np.cumprod((1, *config.n_cats_per_cov[:-1]))
        n_cats = np.asarray(config.n_cats_per_cov)
        codes = (codes[:, None] // jnp.asarray(strides)[None, :]) % jnp.asarray(n_cats)[None, :]
    if codes.ndim != 2 or codes.shape[1] != n_cov:
        msg = f"Expected covariate codes of shape (n_obs, {n_cov}), got {codes.shape} instead."
        raise ConfigError(msg)
    return codes.astype(jnp.int32)


def _covariate_input(config: DRVIConfig, layer: FCLayer, codes: Array) -> Array | None:
    """What an injected layer concatenates to its input (b, width), or None when nothing."""
    parts = []
    if config.covariate_modeling == "emb":
        assert layer.embeddings is not None
        parts = [embed(t, codes[:, i]) for i, t in enumerate(layer.embeddings)]
    else:
        parts = [
            jax.nn.one_hot(codes[:, i], n, dtype=jnp.float32)
            for i, n in enumerate(config.n_cats_per_cov)
            if n > 1
        ]
    return jnp.concatenate(parts, axis=-1) if parts else None


def _fc(
    config: DRVIConfig,
    layer: FCLayer,
    x: Array,
    codes: Array,
    *,
    injected: bool,
    bn: bool,
    ln: bool,
    activation: bool,
) -> Array:
    """One ``FCLayers`` block in eval mode on ``x`` (b, n_in) or (b, n_split, n_in):
    [covariates concatenated] -> Linear (shared or per split) -> BatchNorm -> LayerNorm -> act."""
    if injected:
        cov = _covariate_input(config, layer, codes)
        if cov is not None:
            if x.ndim == 3:
                cov = jnp.broadcast_to(cov[:, None, :], (*x.shape[:2], cov.shape[-1]))
            x = jnp.concatenate([x, cov.astype(x.dtype)], axis=-1)
    kernel, bias = layer.dense
    if kernel.ndim == 3:  # StackedLinearLayer: (b, s, i) x (s, i, o)
        y = jnp.einsum("bsi,sio->bso", x, kernel)
    else:
        y = x @ kernel
    if bias is not None:
        y = y + _lead(bias, y)
    if bn and layer.bn is not None:
        p = layer.bn
        shape = y.shape[1:]  # drvi-py flattens (s, o) into s * o BatchNorm features
        mean, var = (_lead(v.reshape(shape), y) for v in (p.mean, p.var))
        y = (y - mean) / jnp.sqrt(var + BN_EPS)
        if p.scale is not None and p.bias is not None:
            y = y * _lead(p.scale.reshape(shape), y) + _lead(p.bias.reshape(shape), y)
    if ln:
        mu = jnp.mean(y, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(y - mu), axis=-1, keepdims=True)
        y = (y - mu) / jnp.sqrt(var + LN_EPS)
    if activation:
        y = _activation(config.activation, y)
    return y


# --------------------------------------------------------------------------------------------
# Encoder, decoder, likelihood
# --------------------------------------------------------------------------------------------


def posterior(params: DRVIParams, x: Array, *, config: DRVIConfig) -> tuple[Array, Array]:
    """``(qz_m, qz_v)`` (b, n_latent) of counts ``x`` (b, n_input): ``Encoder.forward`` on
    ``log1p(x)`` (``preprocess_count_data`` with ``library_normalization="none"``)."""
    h = jnp.log1p(x)
    bn, ln = in_part(config.use_batch_norm, "encoder"), in_part(config.use_layer_norm, "encoder")
    for layer in params.encoder:
        h = _fc(
            config,
            layer,
            h,
            jnp.zeros((0,), jnp.int32),
            injected=False,
            bn=bn,
            ln=ln,
            activation=True,
        )
    qz_m = _mean_activation(config.mean_activation, _dense(params.qz_mean, h))
    qz_v = _var_activation(config.var_activation, _dense(params.qz_var, h)) + VAR_EPS
    return qz_m, qz_v


def split_inputs(params: DRVIParams, z: Array, *, config: DRVIConfig) -> Array:
    """Each split's decoder input (b, n_split, effective_dim), or (b, n_latent) without splits
    (``DecoderDRVI._apply_split_transformation``)."""
    s = config.n_split
    if s == 1:
        return z
    b = z.shape[0]
    if config.split_method == "split":
        return z.reshape(b, s, -1)
    if config.split_method == "split_diag":
        return z[:, :, None] * _lead(jnp.eye(s, dtype=z.dtype), z[:, :, None])
    assert params.split_transform is not None
    if config.split_method == "split_map":
        return jnp.einsum("bsd,sdn->bsn", z.reshape(b, s, -1), params.split_transform.kernel)
    kernel, bias = params.split_transform  # power: Linear(n_latent, d * s) + ReLU
    assert bias is not None
    y = z @ kernel
    return jax.nn.relu(y + _lead(bias, y)).reshape(b, s, -1)


def split_values(
    params: DRVIParams, z: Array, codes: Array, *, config: DRVIConfig, with_head_bias: bool = True
) -> Array:
    """Per-split, per-gene values before aggregation (b, n_split, n_input): drvi-py's
    ``px_unaggregated_params["mean"]`` (b, 1, n_input without splits). ``with_head_bias=False``
    leaves out the last layer's bias (:func:`head_bias`), for a caller that takes a max or min
    over rows first: adding a constant commutes with it exactly (rounding is monotonic)."""
    h = split_inputs(params, z, config=config)
    bn, ln = in_part(config.use_batch_norm, "decoder"), in_part(config.use_layer_norm, "decoder")
    for i, layer in enumerate(params.decoder):
        h = _fc(
            config,
            layer,
            h,
            codes,
            injected=config.hidden_injected(i),
            bn=bn,
            ln=ln,
            activation=True,
        )
    head = params.px_mean
    if not with_head_bias:
        head = head._replace(dense=head.dense._replace(bias=None))
    out = _fc(
        config, head, h, codes, injected=config.head_injected, bn=False, ln=False, activation=False
    )
    return out[:, None, :] if config.n_split == 1 else out


def head_bias(params: DRVIParams) -> Array | None:
    """The last layer's bias as (n_split or 1, n_input), or None: what :func:`split_values` adds
    last."""
    bias = params.px_mean.dense.bias
    return None if bias is None else bias.reshape(-1, bias.shape[-1])


def _finish(acc: Array, n_split: int, agg: str) -> Array:
    """The aggregation's divisor, applied to the accumulated terms: ``sum``/``sum_plus`` divide
    by K, ``logsumexp`` subtracts ``log K``, ``max`` has none (K = n_split, also when splits are
    removed)."""
    if agg in ("sum", "sum_plus"):
        return acc / float(n_split)
    if agg == "logsumexp":
        return acc - math.log(n_split)
    return acc


def aggregate(values: Array, split_mask: Array | None, *, config: DRVIConfig) -> Array:
    """``DecoderDRVI._aggregate_split`` over axis 1 of ``values`` (b, n_split, n_input), with the
    splits where ``split_mask`` (b, n_split) is 0 left out and the divisor kept at n_split."""
    if config.n_split == 1:
        if split_mask is not None:
            raise ConfigError("This DRVI model has one split: there is no split to remove.")
        return values[:, 0, :]
    k = values.shape[1]
    agg = config.split_aggregation
    if split_mask is None:
        if agg == "sum":
            acc = values.sum(axis=1)
        elif agg == "sum_plus":
            acc = jax.nn.softplus(values).sum(axis=1)
        elif agg == "logsumexp":
            acc = jax.scipy.special.logsumexp(values, axis=1)
        else:
            acc = values.max(axis=1)
        return _finish(acc, k, agg)
    m = jnp.broadcast_to(
        jnp.asarray(split_mask, values.dtype).reshape(-1, values.shape[1]), values.shape[:2]
    )[:, :, None]
    m = jnp.broadcast_to(m, values.shape)
    if agg == "sum":
        acc = (values * m).sum(axis=1)
    elif agg == "sum_plus":
        acc = (jax.nn.softplus(values) * m).sum(axis=1)
    elif agg == "logsumexp":
        acc = jax.scipy.special.logsumexp(values, axis=1, b=m)
    else:
        acc = jnp.where(m > 0, values, -jnp.inf).max(axis=1)
    return _finish(acc, k, agg)


def _exclusive(values: Array, op: Any, identity: float) -> tuple[Array, Array]:
    """``op`` over every split but j, for each j (axis 1): an exclusive prefix and suffix scan
    combined, so no term is ever subtracted out again (no cancellation)."""
    pad = jnp.full_like(values[:, :1], identity)
    before = jnp.concatenate([pad, op(values, axis=1)[:, :-1]], axis=1)
    after = jnp.concatenate([op(values, axis=1, reverse=True)[:, 1:], pad], axis=1)
    return before, after


def leave_one_out(values: Array, *, config: DRVIConfig) -> Array:
    """For each split j, the aggregation's accumulated terms over every split but j (b, n_split,
    n_input), before the divisor: the sum of the values (``sum``) or of their softplus
    (``sum_plus``), their max, or their logsumexp. :func:`aggregate_with` adds one term back.

    ``logsumexp``: with ``m`` the largest value of a cell and gene, every split but the largest
    keeps the largest's ``exp(0) = 1`` in its sum, so ``sum - exp(v_j - m) >= 1`` loses no
    precision; a split that alone holds the largest value has its complement summed again around
    the second largest value."""
    agg = config.split_aggregation
    if agg in ("sum", "sum_plus"):
        terms = jax.nn.softplus(values) if agg == "sum_plus" else values
        before, after = _exclusive(terms, jax.lax.cumsum, 0.0)
        return before + after
    if agg == "max":
        before, after = _exclusive(values, jax.lax.cummax, -jnp.inf)
        return jnp.maximum(before, after)
    m1 = jax.lax.stop_gradient(values.max(axis=1, keepdims=True))
    is_top = values == m1
    # a largest value shared by several splits stays in each one's complement
    only_top = is_top & (is_top.sum(axis=1, keepdims=True) == 1)
    m2 = jax.lax.stop_gradient(jnp.where(only_top, -jnp.inf, values).max(axis=1, keepdims=True))
    e1 = jnp.exp(values - m1)
    others = m1 + jnp.log(e1.sum(axis=1, keepdims=True) - e1)
    e2 = jnp.where(only_top, 0.0, jnp.exp(jnp.minimum(values - m2, 0.0)))
    without_top = m2 + jnp.log(e2.sum(axis=1, keepdims=True))
    return jnp.where(only_top, without_top, others)


def aggregate_with(
    rest: Array | None, term: Array | None, *, n_split: int, config: DRVIConfig
) -> Array:
    """:func:`aggregate` of the splits accumulated in ``rest`` (one split of
    :func:`leave_one_out`, (b, n_input); ``None``: no other split) plus one split's ``term``
    (b, n_input; ``None``: that split removed), with the divisor ``n_split``."""
    agg = config.split_aggregation
    if term is None:
        assert rest is not None
        acc = rest
    else:
        t = jax.nn.softplus(term) if agg == "sum_plus" else term
        if rest is None:
            acc = t
        elif agg == "logsumexp":
            acc = jnp.logaddexp(rest, t)
        elif agg == "max":
            acc = jnp.maximum(rest, t)
        else:
            acc = rest + t
    return _finish(acc, n_split, agg)


def log_theta(params: DRVIParams, codes: Array, *, config: DRVIConfig) -> Array | None:
    """Per-cell log theta (b, n_input): ``px_r`` per gene, or the batch's column ("gene-batch":
    drvi-py's ``Linear(n_batch, n_input)`` on the batch one-hot, plus 1)."""
    b = codes.shape[0]
    if params.px_r is None:
        return None
    if config.dispersion == "gene":
        return jnp.broadcast_to(params.px_r[None, :], (b, params.px_r.shape[0]))
    return params.px_r.T[codes[:, 0]]


def softmax_parts(mean: Array) -> tuple[Array, Array]:
    """(log softmax, softmax) over genes of ``mean`` (b, n_input), one exp per entry."""
    shifted = mean - jax.lax.stop_gradient(mean.max(axis=-1, keepdims=True))
    e = jnp.exp(shifted)
    total = e.sum(axis=-1, keepdims=True)
    return shifted - jnp.log(total), e * (1.0 / total)


def mean_counts(
    log_scale: Array, scale: Array, log_library: Array, *, config: DRVIConfig
) -> tuple[Array, Array]:
    """(mu, log mu): the normalized expression times the library (``pnb``:
    ``log(library.clip(1))`` added in log space, ``LogNegativeBinomialNoiseModel``)."""
    if config.gene_likelihood == "pnb":
        log_mu = jnp.maximum(log_library, 0.0) + log_scale
        return jnp.exp(log_mu), log_mu
    mu = jnp.exp(log_library) * scale
    return mu, jnp.log(mu)


def rates_from_mean(
    mean: Array, log_r: Array | None, log_library: Array, *, config: DRVIConfig
) -> Rates:
    """Likelihood parameters from the aggregated values ``mean`` (b, n_input): softmax over genes
    times the library (:func:`mean_counts`)."""
    log_scale, scale = softmax_parts(mean)
    mu, _ = mean_counts(log_scale, scale, log_library, config=config)
    theta = None if log_r is None else jnp.exp(log_r)
    return Rates(scale=scale, mu=mu, theta=theta, zi_logits=None)


def pnb_varying(x: Array, log_m: Array, log_r: Array) -> Array:
    """The terms of ``LogNegativeBinomial.negative_binomial_log_ver`` that depend on the mean,
    ``-x softplus(-a + eps) - r softplus(a + eps)`` with ``a = log_m - log_r`` and eps 1e-8.

    Both softplus share ``log1p(exp(-|a|))``; the eps enters to first order,
    ``softplus(y + eps) = softplus(y) + eps sigmoid(y)`` (the next term is below 1e-16)."""
    a = log_m - log_r
    u = jnp.exp(-jnp.abs(a))
    shared = jnp.log1p(u)
    up = 1.0 / (1.0 + u)  # sigmoid(|a|); sigmoid(-|a|) = u * up
    pos, neg = jnp.where(a >= 0, up, u * up), jnp.where(a >= 0, u * up, up)  # sigmoid(a), (-a)
    soft_a = jnp.maximum(a, 0.0) + shared + PNB_EPS * pos
    soft_neg_a = jnp.maximum(-a, 0.0) + shared + PNB_EPS * neg
    return -x * soft_neg_a - jnp.exp(log_r) * soft_a


def pnb_log_prob(x: Array, log_m: Array, log_r: Array) -> Array:
    """``LogNegativeBinomial.negative_binomial_log_ver`` (eps 1e-8 inside lgamma and softplus)."""
    r = jnp.exp(log_r)
    eps = PNB_EPS
    lgamma = distributions.lgamma
    choice = lgamma(x + r + eps) - lgamma(x + 1.0 + eps) - lgamma(r + eps)
    return choice + pnb_varying(x, log_m, log_r)


def log_prob_varying(
    x: Array, mu: Array, log_mu: Array, log_r: Array | None, *, config: DRVIConfig
) -> Array:
    """The terms of the per-gene log-likelihood that depend on the mean ``mu`` (its log
    ``log_mu``): :func:`log_prob` less terms of ``x`` and theta alone, which cancel exactly in a
    change of the likelihood."""
    if config.gene_likelihood == "poisson":
        return distributions.count_term(x, mu, mu, likelihood="poisson") - mu
    assert log_r is not None
    if config.gene_likelihood == "pnb":
        return pnb_varying(x, log_mu, log_r)
    return distributions.log_prob_varying(x, mu, jnp.exp(log_r), None, likelihood="nb")


def log_prob(x: Array, rates: Rates, *, config: DRVIConfig) -> Array:
    """Per-gene log-likelihood (b, n_input) of counts ``x`` under ``rates``."""
    if config.gene_likelihood == "poisson":
        return distributions.count_term(x, rates.mu, rates.mu, likelihood="poisson") + (
            distributions.log_prob_constant(x, rates.mu, likelihood="poisson") - rates.mu
        )
    assert rates.theta is not None
    if config.gene_likelihood == "pnb":
        return pnb_log_prob(x, jnp.log(rates.mu), jnp.log(rates.theta))
    return distributions.log_prob_varying(
        x, rates.mu, rates.theta, None, likelihood="nb"
    ) + distributions.log_prob_constant(x, rates.theta, likelihood="nb")


# --------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DRVI:
    """The DRVI model family (:class:`linear_decoder_jax.family.Family`), configured.

    ``batch`` in :meth:`encode` / :meth:`decode` holds the categorical covariate codes, (b,) or
    (b, n_cov) integers with the batch first (drvi-py's ``[batch] + categorical_covariate_keys``);
    ``label`` is unused. Units: one split per column when ablating splits; by default one latent.
    """

    config: DRVIConfig
    name: ClassVar[str] = "drvi"

    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    @property
    def n_vars(self) -> int:
        return self.config.n_input

    @property
    def simplex(self) -> bool:
        return False

    @property
    def additive(self) -> bool:
        return True

    @property
    def splits_own_latents(self) -> bool:
        """Whether each split depends on its own latents only (not with ``split_method="power"``,
        where replacing one latent re-decodes every split)."""
        return self.config.n_split == 1 or self.config.split_method != "power"

    def latent_names(self) -> list[str]:
        return latent_names(self.config.n_latent)

    def unit_latents(self) -> tuple[tuple[int, ...], ...]:
        c = self.config
        if c.n_split == 1 or c.split_method == "power":
            return tuple(tuple(range(c.n_latent)) for _ in range(c.n_split))
        m = c.split_size
        return tuple(tuple(range(i * m, (i + 1) * m)) for i in range(c.n_split))

    def split_names(self) -> list[str]:
        units = self.unit_latents()
        if all(len(u) == 1 for u in units):
            names = self.latent_names()
            return [names[u[0]] for u in units]
        return [f"split_{i}" for i in range(self.config.n_split)]

    def encode(
        self, params: DRVIParams, x: Array, batch: Array, label: Array, *, library: LibraryChoice
    ) -> Encoded:
        """Posterior and observed log library (drvi-py never encodes the library, so ``library``
        "model" and "observed" are the same)."""
        qz_m, qz_v = posterior(params, x, config=self.config)
        log_library = jnp.log(x.sum(axis=-1, keepdims=True))
        return Encoded(qz_m=qz_m, qz_v=qz_v, z=qz_m, log_library=log_library)

    def decoder_input(self, z: Array) -> Array:
        return z

    def split_values(self, params: DRVIParams, z: Array, batch: Array) -> Array:
        """Per-split values before aggregation (b, n_split, n_vars)."""
        return split_values(params, z, covariate_codes(self.config, batch), config=self.config)

    def constant_split_values(self, params: DRVIParams, z_row: Array, batch: Array) -> Array:
        """:meth:`split_values` of every cell at the same decoder input ``z_row`` (n_latent,):
        each row depends on its covariates only, so it is decoded once per covariate combination
        and gathered, when there are fewer combinations than cells."""
        c = self.config
        codes = covariate_codes(c, batch)
        b, n_comb = codes.shape[0], math.prod(c.n_cats_per_cov)
        if n_comb >= b:
            z = jnp.broadcast_to(z_row[None, :], (b, c.n_latent))
            return split_values(params, z, codes, config=c)
        every = covariate_codes(c, jnp.arange(n_comb, dtype=jnp.int32))  # mixed radix order
        z = jnp.broadcast_to(z_row[None, :], (n_comb, c.n_latent))
        table = split_values(params, z, every, config=c)
        strides = np.cumprod((1, *c.n_cats_per_cov[:-1]))
        return table[codes @ jnp.asarray(strides, jnp.int32)]

    def aggregate(self, values: Array, split_mask: Array | None = None) -> Array:
        """The splits' aggregation (b, n_vars) of ``values`` (:func:`aggregate`)."""
        return aggregate(values, split_mask, config=self.config)

    def leave_one_out(self, values: Array) -> Array:
        """Each split's complement in the aggregation (:func:`leave_one_out`)."""
        return leave_one_out(values, config=self.config)

    def aggregate_with(self, rest: Array | None, term: Array | None) -> Array:
        """The aggregation of ``rest`` (one split of :meth:`leave_one_out`) plus ``term``
        (:func:`aggregate_with`)."""
        return aggregate_with(rest, term, n_split=self.config.n_split, config=self.config)

    def rates_from_aggregate(
        self, params: DRVIParams, mean: Array, log_library: Array, batch: Array
    ) -> Rates:
        """Likelihood parameters of the aggregated values ``mean`` (b, n_vars)."""
        codes = covariate_codes(self.config, batch)
        log_r = log_theta(params, codes, config=self.config)
        return rates_from_mean(mean, log_r, log_library, config=self.config)

    def aggregate_log_prob(
        self, params: DRVIParams, x: Array, mean: Array, log_library: Array, batch: Array
    ) -> tuple[Array, Array, Array]:
        """(normalized expression, its log, the per-gene log-likelihood's terms that depend on
        the mean, :func:`log_prob_varying`) of the aggregated values ``mean`` (b, n_vars)."""
        c = self.config
        log_scale, scale = softmax_parts(mean)
        mu, log_mu = mean_counts(log_scale, scale, log_library, config=c)
        log_r = log_theta(params, covariate_codes(c, batch), config=c)
        return scale, log_scale, log_prob_varying(x, mu, log_mu, log_r, config=c)

    def decode(
        self,
        params: DRVIParams,
        z: Array,
        log_library: Array,
        batch: Array,
        label: Array,
        *,
        split_mask: Array | None = None,
    ) -> Rates:
        mean = self.aggregate(self.split_values(params, z, batch), split_mask)
        return self.rates_from_aggregate(params, mean, log_library, batch)

    def log_prob(self, x: Array, rates: Rates) -> Array:
        return log_prob(x, rates, config=self.config)

    def loadings(self, params: DRVIParams) -> Array | None:
        return None
