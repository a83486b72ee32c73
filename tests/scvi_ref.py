"""Deterministic reference outputs from a live scvi-tools LinearSCVI model.

scvi-tools samples z and the library in ``inference``; we decode posterior means instead, so the
reference follows REFERENCE.md: ``qz.loc`` through ``z_transformation`` (softmax for "ln"), the
library posterior mean ``ql.loc`` (or the observed log library), then ``module.generative``.

This module imports torch and scvi-tools: it is used only by tests and fixture scripts, and it
must keep working with older scvi-tools releases (>= 1.0), which share this module API.
"""

from __future__ import annotations

import numpy as np


def _to_numpy(t):
    return t.detach().cpu().numpy()


def iterate_tensors(model, adata, batch_size: int = 128):
    """Yield (x, batch_index, labels) torch tensors over ``adata`` in obs order."""
    dl = model._make_data_loader(adata=adata, batch_size=batch_size, shuffle=False)
    for tensors in dl:
        yield tensors["X"].float(), tensors["batch"].long(), tensors["labels"].long()


def decoder_input(module, x, batch_index):
    """Posterior-mean decoder input z and library for one minibatch."""
    inf = module.inference(x, batch_index)
    qz = inf["qz"]
    z = module.z_encoder.z_transformation(qz.loc)
    if module.use_observed_lib_size:
        lib = inf["library"]
    else:
        lib = inf["ql"].loc
    return qz, z, lib


def scvi_reference(model, adata, *, zero_latent: int = 0, batch_size: int = 128) -> dict:
    """Arrays scvi-tools computes deterministically for ``adata`` (float32, obs order).

    Keys: qz_m, qz_v, z (decoder input), library, scale, mu, theta (not Poisson), zi_logits
    (ZINB only),
    nll (per cell), scale_zeroed (scale after setting decoder-input column ``zero_latent`` to 0),
    nll_zeroed, loadings (scvi-tools' own ``get_loadings``).
    """
    import torch

    module = model.module
    module.eval()
    out: dict[str, list] = {}

    def add(key, value):
        out.setdefault(key, []).append(_to_numpy(value))

    with torch.no_grad():
        for x, b, y in iterate_tensors(model, adata, batch_size):
            qz, z, lib = decoder_input(module, x, b)
            add("qz_m", qz.loc)
            add("qz_v", qz.scale**2)
            add("z", z)
            add("library", lib)
            px = module.generative(z, lib, b, y=y)["px"]
            add("scale", px.scale)
            mu = px.rate if isinstance(px, torch.distributions.Poisson) else px.mu
            add("mu", mu)
            if getattr(px, "theta", None) is not None:
                add("theta", px.theta.expand_as(mu))
            if getattr(px, "zi_logits", None) is not None:
                add("zi_logits", px.zi_logits)
            add("nll", -px.log_prob(x).sum(-1))
            z0 = z.clone()
            z0[:, zero_latent] = 0.0
            px0 = module.generative(z0, lib, b, y=y)["px"]
            add("scale_zeroed", px0.scale)
            add("nll_zeroed", -px0.log_prob(x).sum(-1))
    ref = {k: np.concatenate(v, axis=0) for k, v in out.items()}
    ref["loadings"] = np.asarray(model.get_loadings())
    return ref


def scvi_ablation_loop(
    model, adata, *, baseline: np.ndarray, mode: str = "drop", batch_size: int = 1024
) -> np.ndarray:
    """The loop a scvi-tools user writes: delta_nll[c, k] = NLL(ablated) - NLL(full).

    ``baseline`` has one value per latent, in decoder-input space. ``mode="drop"`` sets latent k
    to its baseline; ``mode="keep"`` sets every latent except k.
    """
    import torch

    module = model.module
    module.eval()
    base = torch.as_tensor(np.asarray(baseline, dtype=np.float32))
    rows = []
    with torch.no_grad():
        for x, b, y in iterate_tensors(model, adata, batch_size):
            _, z, lib = decoder_input(module, x, b)
            full = -module.generative(z, lib, b, y=y)["px"].log_prob(x).sum(-1)
            cols = []
            for k in range(z.shape[1]):
                za = z.clone()
                if mode == "drop":
                    za[:, k] = base[k]
                else:
                    keep = za[:, k].clone()
                    za[:] = base
                    za[:, k] = keep
                nll = -module.generative(za, lib, b, y=y)["px"].log_prob(x).sum(-1)
                cols.append(nll - full)
            rows.append(_to_numpy(torch.stack(cols, dim=1)))
    return np.concatenate(rows, axis=0)
