"""drvi-py references for the DRVI tests: tiny models trained in the session, drvi's own torch
module run deterministically, and an independent float64 numpy brute force of the decoder.

Test-only: imports torch and drvi (skipped cleanly where drvi-py is not installed).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import gammaln, logsumexp

import linear_decoder_jax.families.drvi as F
from converters.drvi import read_drvi_checkpoint


def make_adata(n_obs: int = 200, n_vars: int = 60, *, seed: int = 0, n_batch: int = 3):
    """Low-rank NB counts with a batch column and one extra covariate."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    usage = rng.gamma(1.0, 1.0, size=(n_obs, 4))
    programmes = rng.gamma(0.6, 1.0, size=(4, n_vars))
    rate = usage @ programmes * 3.0
    x = rng.poisson(rate).astype(np.float32)
    adata = ad.AnnData(x)
    adata.var_names = [f"g{i}" for i in range(n_vars)]
    adata.obs_names = [f"c{i}" for i in range(n_obs)]
    adata.obs["batch"] = rng.choice([f"b{i}" for i in range(n_batch)], n_obs)
    adata.obs["donor"] = rng.choice(["d0", "d1"], n_obs)
    return adata


def train(folder: Path, adata, setup: dict[str, Any], model: dict[str, Any], epochs: int = 2):
    """Train and save a drvi-py model; returns the trained model object."""
    from drvi.model import DRVI
    from helpers import seed_scvi

    # torch, numpy and scvi's train/validation split (drawn from settings.seed: unseeded, every
    # run trained a different model and the tolerances met a new one each time)
    seed_scvi(0)
    adata = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DRVI.setup_anndata(adata, is_count_data=True, **setup)
        m = DRVI(adata, **model)
        m.train(
            max_epochs=epochs,
            accelerator="cpu",
            batch_size=64,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
            enable_checkpointing=False,
        )
        m.save(folder, overwrite=True)
    return m


def eval_counts(adata) -> np.ndarray:
    """The training counts with cell 0 emptied: pnb clips its library to 1, nb/poisson give
    mu = 0 (drvi-py cannot train on an empty cell with poisson: the gradient is NaN)."""
    x = np.array(adata.X, dtype=np.float32)
    x[0] = 0.0
    return x


def codes_of(m) -> np.ndarray:
    """Covariate codes (n_obs, n_cov): the batch first, then categorical_covariate_keys."""
    get = m.adata_manager.get_from_registry
    cols = [np.asarray(get("batch")).astype(np.int64)]
    if "extra_categorical_covs" in m.adata_manager.data_registry:
        cols.append(np.asarray(get("extra_categorical_covs")).astype(np.int64))
    return np.concatenate(cols, axis=1)


def torch_reference(m, x: np.ndarray, codes: np.ndarray) -> dict[str, np.ndarray]:
    """drvi's module at the posterior mean (``fully_deterministic``), eval mode."""
    import torch

    mod = m.module
    mod.eval()
    mod.fully_deterministic = True
    mod.inspect_mode = True
    tensors = {
        "X": torch.tensor(x),
        "batch": torch.tensor(codes[:, :1], dtype=torch.float32),
        "extra_categorical_covs": torch.tensor(codes[:, 1:], dtype=torch.float32)
        if codes.shape[1] > 1
        else None,
        "extra_continuous_covs": None,
    }
    with torch.no_grad():
        inf = mod.inference(**mod._get_inference_input(dict(tensors)))
        gen = mod.generative(**mod._get_generative_input(dict(tensors), inf))
        px = gen["px"]
        nll = -px.log_prob(torch.tensor(x)).sum(-1)
    mod.inspect_mode = False
    return {
        "qz_m": inf["qzm"].numpy(),
        "qz_v": inf["qzv"].numpy(),
        "split_values": gen["px_unaggregated_params"]["mean"].numpy(),
        "scale": px.scale.numpy(),
        "mu": px.mu.numpy(),
        "nll": nll.numpy(),
    }


def ours(folder: Path):
    """Our family and parameters from the converted checkpoint."""
    ckpt = read_drvi_checkpoint(folder)
    config = F.config_from_converter(ckpt.config)
    return F.DRVI(config), F.from_flat(ckpt.params, config), ckpt


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# --------------------------------------------------------------------------------------------
# float64 numpy brute force of drvi-py's decoder, from its torch state dict and init options
# --------------------------------------------------------------------------------------------


def brute_decode(
    m,
    z: np.ndarray,
    codes: np.ndarray,
    library: np.ndarray,
    *,
    split_mask: np.ndarray | None = None,
    divisor: str = "K",
) -> dict[str, np.ndarray]:
    """drvi-py's ``DecoderDRVI.forward`` + noise model in float64, written from its code:
    split transform, FCLayers (one-hot or max_norm=1 embeddings, stacked weights, LayerNorm,
    BatchNorm eval, ELU), aggregation with the removed splits' terms left out and divisor K
    (or K - 1 per removed split with ``divisor="kept"``), softmax, library."""
    import torch

    dec = m.module.decoder
    sd = {k: v.detach().double().numpy() for k, v in m.module.state_dict().items()}
    s = dec.n_split
    z = z.astype(np.float64)
    b = z.shape[0]
    if s > 1:
        if dec.split_method == "split":
            h = z.reshape(b, s, -1)
        elif dec.split_method == "split_diag":
            h = np.einsum("bi,ij->bij", z, np.eye(s))
        elif dec.split_method.startswith("power"):
            h = np.maximum(
                z @ sd["decoder.split_transformation.0.weight"].T
                + sd["decoder.split_transformation.0.bias"],
                0,
            ).reshape(b, s, -1)
        else:
            h = np.einsum(
                "bsd,sdn->bsn", z.reshape(b, s, -1), sd["decoder.split_transformation_weight"]
            )
    else:
        h = z

    def fc_layers(prefix: str, fcl, h: np.ndarray, *, last: bool) -> np.ndarray:
        for i, layers in enumerate(fcl.fc_layers):
            cov = None
            for j, layer in enumerate(layers):
                name = type(layer).__name__
                p = f"{prefix}.fc_layers.Layer {i}.{j}"
                if name == "MultiEmbedding":
                    parts = []
                    for c in range(codes.shape[1]):
                        row = sd[f"{p}.emb_list.{c}.weight"][codes[:, c]]
                        norm = np.linalg.norm(row, axis=1, keepdims=True)
                        parts.append(np.where(norm > 1.0, row / (norm + 1e-7), row))
                    cov = np.concatenate(parts, axis=1)
                elif name in ("LinearLayer", "StackedLinearLayer"):
                    if layer in fcl.injectable_layers:
                        if cov is None and fcl.covariate_vector_modeling == "one_hot":
                            eye = [
                                np.eye(n)[codes[:, c]]
                                for c, n in enumerate(fcl.n_cat_list)
                                if n > 1
                            ]
                            cov = np.concatenate(eye, axis=1) if eye else None
                        if cov is not None:
                            c3 = cov if h.ndim == 2 else np.repeat(cov[:, None, :], h.shape[1], 1)
                            h = np.concatenate([h, c3], axis=-1)
                    w, bias = sd[f"{p}.weight"], sd[f"{p}.bias"]
                    if w.ndim == 3:
                        h = np.einsum("bci,cio->bco", h, w) + bias[None]
                    else:
                        h = h @ w.T + bias
                elif isinstance(layer, torch.nn.BatchNorm1d):
                    shape = h.shape
                    flat = h.reshape(b, -1)
                    flat = (flat - sd[f"{p}.running_mean"]) / np.sqrt(sd[f"{p}.running_var"] + 1e-3)
                    if layer.affine:
                        flat = flat * sd[f"{p}.weight"] + sd[f"{p}.bias"]
                    h = flat.reshape(shape)
                elif isinstance(layer, torch.nn.LayerNorm):
                    mu = h.mean(-1, keepdims=True)
                    h = (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
                elif name == "ELU":
                    h = np.where(h > 0, h, np.expm1(np.minimum(h, 0)))
                elif name == "Dropout":
                    pass
                else:  # pragma: no cover - a layer this brute force does not know
                    raise AssertionError(name)
        return h

    if dec.px_shared_decoder is not None:
        h = fc_layers("decoder.px_shared_decoder", dec.px_shared_decoder, h, last=False)
    vals = fc_layers("decoder.params_nets.mean", dec.params_nets["mean"], h, last=True)
    if s == 1:
        mean = vals
    else:
        keep = (
            np.ones((b, s))
            if split_mask is None
            else np.broadcast_to(split_mask, (b, s)).astype(np.float64)
        )
        k = np.full((b, 1), float(s)) if divisor == "K" else keep.sum(1, keepdims=True)
        agg = dec.split_aggregation
        if agg == "sum":
            mean = (vals * keep[:, :, None]).sum(1) / k
        elif agg == "sum_plus":
            mean = (np.logaddexp(0, vals) * keep[:, :, None]).sum(1) / k
        elif agg == "logsumexp":
            mean = logsumexp(vals, axis=1, b=keep[:, :, None]) - np.log(k)
        else:
            mean = np.where(keep[:, :, None] > 0, vals, -np.inf).max(1)
    log_scale = mean - logsumexp(mean, axis=1, keepdims=True)
    scale = np.exp(log_scale)
    lib = library.astype(np.float64)[:, None]
    gl = m.module.gene_likelihood
    if "decoder.params_nets.r" in sd:
        r = np.broadcast_to(sd["decoder.params_nets.r"], scale.shape)
    elif "decoder.params_nets.r.weight" in sd:
        r = sd["decoder.params_nets.r.weight"].T[codes[:, 0]] + sd["decoder.params_nets.r.bias"]
    else:
        r = None
    out: dict[str, Any] = {"values": vals, "scale": scale}
    if gl == "pnb":
        log_m = np.log(np.maximum(lib, 1.0)) + log_scale
        out["mu"] = np.exp(log_m)
        out["log_m"], out["log_r"] = log_m, 1.0 + r
    else:
        out["mu"] = lib * scale
        out["log_r"] = None if r is None else 1.0 + r
    return out


def brute_log_prob(x: np.ndarray, dec: dict[str, np.ndarray], likelihood: str) -> np.ndarray:
    """Per-gene log-likelihood in float64: drvi's LogNegativeBinomial (eps 1e-8 inside lgamma and
    softplus), scvi's log_nb_positive (eps 1e-8), torch's Poisson."""
    x = x.astype(np.float64)
    if likelihood == "pnb":
        lm, lr = dec["log_m"], dec["log_r"]
        r = np.exp(lr)
        eps = 1e-8
        return (
            gammaln(x + r + eps)
            - gammaln(x + 1 + eps)
            - gammaln(r + eps)
            - x * np.logaddexp(0, lr - lm + eps)
            - r * np.logaddexp(0, lm - lr + eps)
        )
    mu = dec["mu"]
    if likelihood == "poisson":
        return np.where(x > 0, x * np.log(np.where(mu > 0, mu, 1.0)), 0.0) - mu - gammaln(x + 1)
    theta = np.exp(dec["log_r"])
    eps = 1e-8
    lt = np.log(theta + mu + eps)
    return (
        theta * (np.log(theta + eps) - lt)
        + x * (np.log(mu + eps) - lt)
        + gammaln(x + theta)
        - gammaln(theta)
        - gammaln(x + 1)
    )
