"""Training objective and optimizer step against scvi-tools 1.4.2 and torch, same draws.

A freshly built scvi-tools ``LDVAE`` module and ours share parameters (the module's state dict
mapped through the converter's key table), the minibatch and every random draw: the z and library
noise of ``Normal.rsample`` and the dropout masks are patched into torch. The loss, its parts,
every gradient, the BatchNorm running statistics after the pass and the parameters after torch's
Adam steps must agree to float32 precision (scvi-tools casts one-hot codes to float32, so
the module cannot run in float64).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("scvi")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from converters.scvi_ldvae import _expand_rules  # noqa: E402
from linear_decoder_jax.config import LDVAEConfig  # noqa: E402
from linear_decoder_jax.params import from_flat, to_flat  # noqa: E402
from linear_decoder_jax.training import objective, optim  # noqa: E402

# name -> LDVAE kwargs (scvi-tools names) and n_batch / n_labels
CASES = {
    "nb_one_batch": dict(gene_likelihood="nb", n_batch=1, n_labels=1),
    "zinb_gene_batch_ln": dict(
        gene_likelihood="zinb", dispersion="gene-batch", latent_distribution="ln", n_batch=3
    ),
    "poisson_gene_label": dict(
        gene_likelihood="poisson", dispersion="gene-label", n_batch=2, n_labels=3
    ),  # fmt: skip
    "nb_observed_lib_2_layers_bias_no_bn": dict(
        gene_likelihood="nb",
        use_observed_lib_size=True,
        n_layers_encoder=2,
        bias=True,
        use_batch_norm=False,
        n_batch=2,
    ),  # fmt: skip
}

N_OBS, N_VARS, N_LATENT, N_HIDDEN, DROPOUT = 24, 15, 4, 8, 0.1


def _counts(rng, n_obs=N_OBS):
    x = rng.negative_binomial(3, 0.3, size=(n_obs, N_VARS)).astype(np.float32)
    x[:, 0] += 1
    return x


def _build(kwargs, rng):
    from scvi.module import LDVAE

    torch.manual_seed(int(rng.integers(1 << 30)))
    kw = dict(kwargs)
    n_batch, n_labels = kw.pop("n_batch"), kw.pop("n_labels", 1)
    observed = kw.get("use_observed_lib_size", False)
    means = None if observed else rng.normal(5.0, 0.3, (1, n_batch))
    variances = None if observed else rng.uniform(0.2, 0.5, (1, n_batch))
    module = LDVAE(
        n_input=N_VARS, n_batch=n_batch, n_labels=n_labels, n_hidden=N_HIDDEN,
        n_latent=N_LATENT, dropout_rate=DROPOUT, library_log_means=means,
        library_log_vars=variances, **kw,
    )  # fmt: skip
    # non-trivial running statistics and BatchNorm affine parameters
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.1)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
                m.weight.copy_(torch.rand_like(m.weight) + 0.5)
                m.bias.copy_(torch.randn_like(m.bias) * 0.1)
    config = LDVAEConfig(
        n_input=N_VARS, n_latent=N_LATENT, n_hidden=N_HIDDEN,
        n_layers=kw.get("n_layers_encoder", 1), n_batch=n_batch, n_labels=n_labels,
        gene_likelihood=kw.get("gene_likelihood", "nb"), dispersion=kw.get("dispersion", "gene"),
        latent_distribution=kw.get("latent_distribution", "normal"),
        use_observed_lib_size=observed, decoder_batch_norm=kw.get("use_batch_norm", True),
        decoder_bias=kw.get("bias", False),
    )  # fmt: skip
    return module, config


def _ours(module, config):
    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    flat = {}
    for rule in _expand_rules(config.n_layers):
        if rule.torch_key in state:
            flat[rule.key] = state[rule.torch_key].T if rule.transpose else state[rule.torch_key]
    return from_flat(flat, config, dtype=np.float32), flat


def _torch_flat(module, config, *, grads=False):
    """Our flat keys -> torch values (or gradients, None where torch has none)."""
    named = dict(module.named_parameters()) | dict(module.named_buffers())
    out = {}
    for rule in _expand_rules(config.n_layers):
        if rule.torch_key not in named:
            continue
        t = named[rule.torch_key]
        if grads:
            t = t.grad
            if t is None:
                out[rule.key] = None
                continue
        a = t.detach().numpy()
        out[rule.key] = a.T if rule.transpose else a
    return out


class _Mask(torch.nn.Module):
    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * (self.keep * (1.0 / (1.0 - self.p)))


@contextlib.contextmanager
def _torch_draws(module, noise):
    """Patch our draws into torch: Normal.rsample (z first, then the library) and dropout."""
    from torch.distributions import Normal

    queue = [torch.tensor(np.asarray(noise.z)), torch.tensor(np.asarray(noise.library))]
    original = Normal.rsample

    def rsample(self, sample_shape=torch.Size()):  # noqa: B008
        eps = queue.pop(0)
        assert eps.shape == self.loc.shape
        return self.loc + eps * self.scale

    saved = []
    encoders = [(module.z_encoder, noise.z_keep), (module.l_encoder, noise.l_keep)]
    for enc, masks in encoders:
        for i, keep in enumerate(masks):
            seq = enc.encoder.fc_layers[i]
            saved.append((seq, seq[4]))
            seq[4] = _Mask(torch.tensor(np.asarray(keep)), DROPOUT)
    Normal.rsample = rsample
    try:
        yield
    finally:
        Normal.rsample = original
        for seq, dropout in saved:
            seq[4] = dropout


def _tensors(x, batch, label):
    return {
        "X": torch.from_numpy(x),
        "batch": torch.from_numpy(batch[:, None].astype(np.int64)),
        "labels": torch.from_numpy(label[:, None].astype(np.int64)),
    }


def _close(ours, theirs, what, tol=1e-5, floor=0.0):
    """float32 agreement: relative ``tol``, absolute ``tol`` times the array's largest value (or
    ``floor``, for gradients that are float32 noise around 0, such as a Linear bias before a
    train-mode BatchNorm)."""
    theirs = np.asarray(theirs, np.float64)
    scale = float(np.max(np.abs(theirs))) if theirs.size else 1.0
    np.testing.assert_allclose(
        np.asarray(ours, np.float64), theirs, rtol=tol, atol=max(tol * scale, floor, 1e-12),
        err_msg=what,
    )  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_loss_gradients_and_adam_steps_equal_scvi_tools(name):
    rng = np.random.default_rng(list(CASES).index(name))
    module, config = _build(CASES[name], rng)
    params, _ = _ours(module, config)
    x = _counts(rng)
    batch = rng.integers(0, config.n_batch, N_OBS)
    label = rng.integers(0, config.n_labels, N_OBS)
    mask = objective.trainable_mask(config)
    lr, wd = 1e-2, 1e-3  # large enough that weight decay and the step are visible at 1e-7
    torch_opt = torch.optim.Adam(
        [p for p in module.parameters() if p.requires_grad], lr=lr, eps=0.01, weight_decay=wd
    )
    tx = optim.torch_adam(lr, eps=0.01, weight_decay=wd, mask=mask)
    module.train()

    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    for step, kl_weight in enumerate((0.25, 0.7)):
        noise = objective.draw_noise(
            jax.random.key(step), N_OBS, config=config, dropout_rate=DROPOUT,
        )  # fmt: skip

        def loss_fn(p, noise=noise, kl_weight=kl_weight):
            parts, new = objective.train_loss(
                p, jnp.asarray(x), jnp.asarray(batch), jnp.asarray(label), noise, kl_weight,
                config=config, dropout_rate=DROPOUT,
            )  # fmt: skip
            return parts.loss, (parts, new)

        (loss, (parts, new)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
        torch_opt.zero_grad(set_to_none=True)
        with _torch_draws(module, noise):
            _, _, out = module(_tensors(x, batch, label), loss_kwargs={"kl_weight": kl_weight})
        out.loss.backward()
        _close(loss, out.loss.item(), f"{name} step {step}: loss")
        _close(parts.reconstruction_loss, out.reconstruction_loss["reconstruction_loss"]
               .detach().numpy(), "reconstruction")  # fmt: skip
        _close(parts.kl_z, out.kl_local["kl_divergence_z"].detach().numpy(), "kl_z")
        _close(parts.kl_l, out.kl_local["kl_divergence_l"].detach().numpy(), "kl_l")

        theirs_grad = _torch_flat(module, config, grads=True)
        ours_grad = to_flat(grads)
        ours_mask = to_flat(mask)
        floor = 1e-6 * max(float(np.max(np.abs(g))) for g in theirs_grad.values() if g is not None)
        for key, g in theirs_grad.items():
            if key.endswith(("bn/mean", "bn/var")) or key.startswith("library_log"):
                continue
            assert (g is not None) == bool(ours_mask[key]), key
            expected = np.zeros(np.shape(ours_grad[key])) if g is None else g
            _close(ours_grad[key], expected, f"{name} step {step}: grad {key}", floor=floor)
        # running statistics after the forward pass
        theirs_state = _torch_flat(module, config)
        for key, value in to_flat(new).items():
            if key.endswith(("bn/mean", "bn/var")):
                _close(value, theirs_state[key], f"{name} step {step}: running {key}")

        torch_opt.step()
        # the step from torch's own gradients (equal to ours above, up to float32 noise that
        # Adam's normalisation would amplify where a gradient is ~0), so that this checks the
        # optimizer alone: weight decay, moments, bias correction, eps, frozen leaves
        same = {k: (np.zeros(np.shape(v)) if theirs_grad.get(k) is None else theirs_grad[k])
                for k, v in ours_grad.items()}  # fmt: skip
        grads = from_flat(same, config)
        updates, state = tx.update(grads, state, new)
        params = jax.tree.map(lambda p, u: p + u, new, updates)
        theirs_state = _torch_flat(module, config)
        for key, value in to_flat(params).items():
            _close(value, theirs_state[key], f"{name} step {step}: after Adam {key}")
        key = "decoder/factor/dense/kernel"
        moved = np.abs(np.asarray(to_flat(params)[key]) - np.asarray(to_flat(new)[key]))
        assert moved.min() > 0  # the step did something


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_steps_equal_torch_float64(decoupled):
    rng = np.random.default_rng(5)
    p0 = rng.normal(size=(7, 3))
    g = rng.normal(size=(7, 3)) * np.logspace(-4, 0, 3)[None, :]
    with jax.enable_x64(True):
        tx = optim.torch_adam(3e-2, eps=0.01, weight_decay=0.1, decoupled=decoupled)
        params = {"w": jnp.asarray(p0)}
        state = tx.init(params)
        t = torch.nn.Parameter(torch.from_numpy(p0.copy()))
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        opt = cls([t], lr=3e-2, eps=0.01, weight_decay=0.1)
        for k in range(3):
            grad = g * (k + 1)
            updates, state = tx.update({"w": jnp.asarray(grad)}, state, params)
            params = {"w": params["w"] + updates["w"]}
            t.grad = torch.from_numpy(grad.copy())
            opt.step()
            _close(params["w"], t.detach().numpy(), f"step {k}", tol=1e-12)
