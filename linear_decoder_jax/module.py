"""The Flax (linen) module: LDVAE's structure as a Flax model, methods over the pure functions.

We use linen rather than nnx because a linen module is stateless: its parameters are an explicit
pytree passed to ``apply``, the same ``LDVAEParams`` tree the pure functions, ``jit``, ``vmap`` and
orbax work on. nnx would hold them as mutable object state that we would split back out for every
jitted call. All maths lives in ``model.py``; this module only binds a config to it.

Examples
--------
>>> module = LDVAE(config)                                   # doctest: +SKIP
>>> variables = {"params": {"ldvae": params}}                # doctest: +SKIP
>>> module.apply(variables, x, method=LDVAE.inference).qz_m.shape  # doctest: +SKIP
(n_obs, n_latent)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from linear_decoder_jax import model
from linear_decoder_jax.config import LDVAEConfig
from linear_decoder_jax.params import LDVAEParams, abstract_params


class LDVAE(nn.Module):
    """Eval-mode scvi-tools LDVAE (LinearSCVI's module) holding one ``LDVAEParams`` tree."""

    config: LDVAEConfig

    def setup(self) -> None:
        template = abstract_params(self.config)
        self.ldvae: LDVAEParams = self.param(
            "ldvae", lambda _key: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), template)
        )

    def inference(self, x: jax.Array) -> model.Posterior:
        return model.inference(self.ldvae, x, config=self.config)

    def generative(
        self, z: jax.Array, log_library: jax.Array, batch: jax.Array, label: jax.Array
    ) -> model.Decoded:
        return model.generative(self.ldvae, z, log_library, batch, label, config=self.config)

    def __call__(self, x: jax.Array, batch: jax.Array, label: jax.Array) -> model.Decoded:
        """Posterior-mean reconstruction of ``x`` (what scvi-tools samples around)."""
        post = self.inference(x)
        z = model.z_transformation(post.qz_m, config=self.config)
        lib = model.library(post, x, config=self.config)
        return self.generative(z, lib, batch, label)
