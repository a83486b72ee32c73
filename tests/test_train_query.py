"""Query mapping: a held-out batch with a known per-gene effect is mapped onto a reference and
its effect recovered; the reference's outputs on its own cells do not change."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import linear_decoder_jax as ldj
from linear_decoder_jax.errors import ConfigError, IncompatibleDataError


def _data(seed=0, n_obs=1500, n_vars=60):
    import anndata

    rng = np.random.default_rng(seed)
    usage = rng.gamma(1.0, 1.0, (n_obs, 3))
    programmes = rng.gamma(0.6, 1.0, (3, n_vars))
    effect = rng.normal(0.0, 0.7, (3, n_vars))
    effect[0] = 0.0
    batch = rng.integers(0, 3, n_obs)
    rate = (usage @ programmes) * np.exp(effect[batch])
    rate = rate / rate.sum(1, keepdims=True) * rng.lognormal(np.log(400), 0.3, (n_obs, 1))
    counts = rng.poisson(rate).astype(np.float32)
    counts[:, 0] += 1
    obs = pd.DataFrame({"batch": pd.Categorical(np.array(["b0", "b1", "b2"])[batch])},
                       index=[f"c{i}" for i in range(n_obs)])  # fmt: skip
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_vars)])
    return anndata.AnnData(counts, obs=obs, var=var), effect


@pytest.fixture(scope="module")
def mapped():
    adata, effect = _data()
    held_out = (adata.obs["batch"] == "b2").to_numpy()
    ref_data = adata[~held_out].copy()
    ref_data.obs["batch"] = ref_data.obs["batch"].cat.remove_unused_categories()
    query_data = adata[held_out].copy()
    # as many latents as programmes, the KL at full weight early and lr 1e-2: the batch effect
    # is then not absorbed by a spare latent (the reference recovers its own b1 effect at r > 0.99)
    opts = dict(n_latent=3, n_hidden=32, progress_bar=False, n_epochs_kl_warmup=5, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = ldj.train(ref_data, batch_key="batch", max_epochs=100, **opts)
        query = ldj.train(query_data, reference=reference, max_epochs=100, **opts)
    return reference, query, ref_data, query_data, effect


def test_mapping_recovers_the_held_out_batch_effect(mapped):
    reference, query, ref_data, query_data, effect = mapped
    assert query.spec.data.batch_categories == ("b0", "b1", "b2")
    offsets = query.get_affine_decoder().scale.offsets  # (n_batch, n_vars), BatchNorm folded
    learned = offsets[2] - offsets[0]
    true = effect[2] - effect[0]
    expressed = np.asarray(query_data.X).mean(0) >= 1
    assert expressed.sum() >= 20
    r = np.corrcoef(learned[expressed], true[expressed])[0, 1]
    assert r >= 0.9, r


def test_reference_frozen_outputs_unchanged(mapped):
    reference, query, ref_data, _, _ = mapped
    from linear_decoder_jax.params import to_flat

    ref_flat, q_flat = to_flat(reference.host_params), to_flat(query.host_params)
    k = reference.n_latent + reference.config.n_batch
    for key, value in ref_flat.items():
        if key.startswith("decoder/") and key.endswith("dense/kernel"):
            np.testing.assert_array_equal(q_flat[key][:k], value, err_msg=key)
        elif key.startswith("library_log"):
            np.testing.assert_array_equal(q_flat[key][:, :2], value, err_msg=key)
        else:
            np.testing.assert_array_equal(q_flat[key], value, err_msg=key)
    np.testing.assert_array_equal(
        query.get_latent_representation(ref_data), reference.get_latent_representation(ref_data)
    )
    np.testing.assert_allclose(
        query.get_normalized_expression(ref_data, return_numpy=True),
        reference.get_normalized_expression(ref_data, return_numpy=True),
        rtol=1e-6, atol=0,
    )  # fmt: skip


def test_query_bad_inputs(mapped):
    reference, _, ref_data, query_data, _ = mapped
    with pytest.raises(ConfigError, match="nothing to map"):
        ldj.train(ref_data, reference=reference, max_epochs=1, progress_bar=False)
    other = query_data[:, 5:].copy()
    with pytest.raises(IncompatibleDataError, match="genes are missing"):
        ldj.train(other, reference=reference, max_epochs=1, progress_bar=False)
