"""The core's jaxtyping annotations are enforced under the test suite (tests/conftest.py)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from helpers import random_model
from jaxtyping import TypeCheckError

from linear_decoder_jax import distributions, model


def test_wrong_shapes_and_dtypes_are_refused():
    m = random_model(seed=0)
    params, cfg = m.params, m.config
    x = jnp.ones((4, cfg.n_input))
    model.inference(params, x, config=cfg)  # the right shapes pass
    z = jnp.zeros((4, cfg.n_latent))
    lib = jnp.zeros((4, 1))
    codes = jnp.zeros(4, jnp.int32)
    model.generative(params, z, lib, codes, codes, config=cfg)
    with pytest.raises(TypeCheckError):  # library (n_obs,) instead of (n_obs, 1)
        model.generative(params, z, jnp.zeros(4), codes, codes, config=cfg)
    with pytest.raises(TypeCheckError):  # 3 cells of z against 4 of the library
        model.generative(params, z[:3], lib, codes, codes, config=cfg)
    with pytest.raises(TypeCheckError):  # float batch codes
        model.dispersion(params, codes.astype(jnp.float32), codes, config=cfg)
    with pytest.raises(TypeCheckError):  # mu of other genes than x
        distributions.log_prob(x, x[:, :3], x, None, likelihood="nb")
