"""``module.create``: the Flax module equals the pure functions, differentiates, and fine-tunes.

On the shipped demo model (real PBMC counts, two batches, NB): module outputs against
``model.inference``/``generative``/``log_likelihood`` and the facade; the gradient of a cell's NLL
with respect to z against central finite differences in float64; a few optax steps on the decoder
lower the NLL of cells it did not train on and leave every other weight bit-identical.
"""

from __future__ import annotations

import dataclasses

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_model

import linear_decoder_jax as ldj
from linear_decoder_jax import model as core
from linear_decoder_jax.demo import demo_files
from linear_decoder_jax.errors import ConfigError
from linear_decoder_jax.module import LDVAE, create, param_labels, to_params
from linear_decoder_jax.params import abstract_params


@pytest.fixture(scope="module")
def demo_model() -> ldj.LinearSCVI:
    return ldj.load(demo_files() / "model.pt")


@pytest.fixture(scope="module")
def demo_cells(demo_model: ldj.LinearSCVI) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts (n_obs, n_vars) in model gene order, batch and label codes (n_obs,)."""
    data = demo_model.prepare(anndata.read_h5ad(demo_files() / "counts.h5ad"))
    return data.rows(0, data.n_obs), data.batch, data.label


def test_outputs_equal_the_pure_functions(demo_model, demo_cells) -> None:
    x, batch, label = (jnp.asarray(a) for a in demo_cells)
    ldvae, variables = create(demo_model.config, demo_model.host_params)
    params = jax.tree.map(jnp.asarray, demo_model.host_params)
    config = demo_model.config

    post = core.inference(params, x, config=config)
    z, lib = core.z_transformation(post.qz_m, config=config), core.library(post, x, config=config)
    decoded = core.generative(params, z, lib, batch, label, config=config)
    nll = -core.log_likelihood(x, decoded, config=config)

    got_post = ldvae.apply(variables, x, method=LDVAE.inference)
    got_decoded = ldvae.apply(variables, z, lib, batch, label, method=LDVAE.generative)
    got_nll = jax.jit(lambda v: ldvae.apply(v, x, batch, label, method=LDVAE.nll))(variables)
    for ours, ref in [*zip(got_post, post, strict=True), *zip(got_decoded, decoded, strict=True)]:
        if ref is not None:
            np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)
    np.testing.assert_allclose(got_nll, nll, rtol=1e-6)
    np.testing.assert_allclose(ldvae.apply(variables, x, batch, label).mu, decoded.mu, rtol=1e-6)
    facade = demo_model.get_reconstruction_error(anndata.read_h5ad(demo_files() / "counts.h5ad"))
    np.testing.assert_allclose(got_nll, facade, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{"gene_likelihood": "zinb"}, {"latent_distribution": "ln"}])
def test_other_configurations_equal_the_pure_functions(overrides: dict) -> None:
    m = random_model(**overrides)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.negative_binomial(2, 0.2, size=(9, m.config.n_input)), jnp.float32)
    batch = label = jnp.zeros(9, jnp.int32)
    ldvae, variables = create(m.config, m.host_params)
    params = jax.tree.map(jnp.asarray, m.host_params)
    post = core.inference(params, x, config=m.config)
    z, lib = core.z_transformation(post.qz_m, config=m.config), post.ql_m
    decoded = core.generative(params, z, lib, batch, label, config=m.config)
    nll = -core.log_likelihood(x, decoded, config=m.config)
    np.testing.assert_allclose(
        ldvae.apply(variables, x, batch, label, method=LDVAE.nll), nll, rtol=1e-6
    )


def test_gradient_with_respect_to_z_matches_finite_differences(demo_model, demo_cells) -> None:
    x, batch, label = (a[:3] for a in demo_cells)
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), demo_model.host_params)
        ldvae, variables = create(demo_model.config, params64)
        x = jnp.asarray(x, jnp.float64)
        z, lib = ldvae.apply(variables, x, method=LDVAE.encode)

        def cell_nll(z_cell: jax.Array) -> jax.Array:  # the first cell's NLL at decoder input z
            nll = ldvae.apply(
                variables, x[:1], batch[:1], label[:1], z=z_cell[None], log_library=lib[:1],
                method=LDVAE.nll,
            )  # fmt: skip
            return nll[0]

        grad = jax.grad(cell_nll)(z[0])
        h = 1e-5
        eye = jnp.eye(z.shape[1], dtype=jnp.float64)
        fd = jnp.stack([(cell_nll(z[0] + h * e) - cell_nll(z[0] - h * e)) / (2 * h) for e in eye])
        assert grad.dtype == jnp.float64
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6)
        assert float(jnp.abs(grad).max()) > 1e-3  # a real signal, not two zeros


def test_fine_tuning_the_decoder_lowers_held_out_nll(demo_model, demo_cells) -> None:
    x, batch, label = (jnp.asarray(a) for a in demo_cells)
    train, held = slice(0, 60), slice(60, None)  # half the cells of each split are planted
    ldvae, variables = create(demo_model.config, demo_model.host_params)
    opt = optax.multi_transform(
        {"trainable": optax.adam(1e-3), "frozen": optax.set_to_zero()}, param_labels(variables)
    )

    def loss(v: dict, rows: slice) -> jax.Array:
        return ldvae.apply(v, x[rows], batch[rows], label[rows], method=LDVAE.nll).mean()

    @jax.jit
    def step(v: dict, state: optax.OptState) -> tuple[dict, optax.OptState]:
        grads = jax.grad(loss)(v, train)
        updates, state = opt.update(grads, state, v)
        return optax.apply_updates(v, updates), state

    tuned, state = variables, opt.init(variables)
    for _ in range(20):
        tuned, state = step(tuned, state)

    assert float(loss(tuned, train)) < float(loss(variables, train))
    assert float(loss(tuned, held)) < float(loss(variables, held))
    for name in ("z_encoder", "l_encoder", "px_r", "library_log_means", "library_log_vars"):
        before, after = (jax.tree.leaves(v["params"][name]) for v in (variables, tuned))
        for a, b in zip(before, after, strict=True):
            np.testing.assert_array_equal(
                np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32)
            )
    before, after = (v["params"]["decoder"].factor.dense.kernel for v in (variables, tuned))
    assert not np.array_equal(before, after)


def test_create_checks_the_parameters(demo_model) -> None:
    params = demo_model.host_params
    bad = params._replace(px_r=params.px_r[:-1])
    with pytest.raises(
        ConfigError, match=r"Parameter \.px_r: expected shape \(230,\), got \(229,\)"
    ):
        create(demo_model.config, bad)
    with pytest.raises(ConfigError, match="Expected parameters with the structure"):
        create(demo_model.config, params._replace(library_log_means=None))
    _, variables = create(demo_model.config, params)
    with pytest.raises(ConfigError, match=r"got \['encoder'\] instead"):
        param_labels(variables, trainable=("encoder",))


def test_init_gives_the_same_tree_as_create(demo_model, demo_cells, key) -> None:
    x, batch, label = (jnp.asarray(a[:2]) for a in demo_cells)
    ldvae, variables = create(demo_model.config, demo_model.host_params)
    fresh = ldvae.init(key, x, batch, label)
    assert jax.tree.structure(fresh) == jax.tree.structure(variables)
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, variables)


def test_create_refuses_a_part_the_config_lacks(demo_model) -> None:
    """A library prior given to a model that uses the observed library: ConfigError, not a
    ValueError from tree_map."""
    cfg = dataclasses.replace(demo_model.config, use_observed_lib_size=True)
    template = abstract_params(cfg)
    assert template.library_log_means is None
    with pytest.raises(ConfigError, match="Expected parameters with the structure"):
        create(cfg, demo_model.host_params)


def test_fine_tuned_variables_come_back_as_a_model_to_save_and_ablate(
    demo_model, demo_cells, tmp_path
) -> None:
    """Fine-tune the decoder, from_flax, save, load, ablate: the sweep equals the NLL changes
    computed directly with the tuned Flax variables (z_k at 0 minus the full NLL)."""
    x, batch, label = (jnp.asarray(a) for a in demo_cells)
    ldvae, variables = demo_model.to_flax()
    opt = optax.multi_transform(
        {"trainable": optax.adam(1e-2), "frozen": optax.set_to_zero()}, param_labels(variables)
    )

    def loss(v: dict) -> jax.Array:
        return ldvae.apply(v, x, batch, label, method=LDVAE.nll).mean()

    @jax.jit
    def step(v: dict, state: optax.OptState) -> tuple[dict, optax.OptState]:
        updates, state = opt.update(jax.grad(loss)(v), state, v)
        return optax.apply_updates(v, updates), state

    tuned, state = variables, opt.init(variables)
    for _ in range(5):
        tuned, state = step(tuned, state)

    params = to_params(demo_model.config, tuned)
    for name, part in tuned["params"].items():
        pairs = zip(jax.tree.leaves(getattr(params, name)), jax.tree.leaves(part), strict=True)
        for ours, theirs in pairs:
            np.testing.assert_array_equal(ours, np.asarray(theirs))
    model = ldj.LinearSCVI.from_flax(tuned, like=demo_model)
    assert model.spec == demo_model.spec and model.dtype == demo_model.dtype
    loaded = ldj.load(model.save(tmp_path / "tuned"))
    assert loaded.fingerprint() == model.fingerprint() != demo_model.fingerprint()
    adata = anndata.read_h5ad(demo_files() / "counts.h5ad")
    result = ldj.ablate(loaded, adata, baseline="zero", batch_size=64)

    z, lib = ldvae.apply(tuned, x, method=LDVAE.encode)

    def nll(zz: jax.Array) -> np.ndarray:
        out = ldvae.apply(tuned, x, batch, label, z=zz, log_library=lib, method=LDVAE.nll)
        return np.asarray(out, np.float64)

    full = nll(z)
    direct = np.stack([nll(z.at[:, k].set(0.0)) - full for k in range(z.shape[1])], 1)
    np.testing.assert_allclose(result.nll, full, rtol=1e-5)
    tol = 5e-6 * np.abs(full).max() + 1e-5 * np.abs(direct).max() + 1e-6
    assert np.abs(result.delta_nll - direct).max() <= tol
    before = ldj.ablate(demo_model, adata, baseline="zero", batch_size=64).delta_nll
    assert np.abs(before - direct).max() > 100 * tol  # the tuned weights were ablated


def test_to_params_checks_the_variables(demo_model) -> None:
    _, variables = demo_model.to_flax()
    parts = dict(variables["params"])
    config = demo_model.config
    with pytest.raises(ConfigError, match=r"missing \['px_r'\], unexpected \['extra'\]"):
        to_params(config, {"params": {**{k: v for k, v in parts.items() if k != "px_r"},
                                      "extra": 1}})  # fmt: skip
    with pytest.raises(ConfigError, match="without a 'params' dict"):
        to_params(config, parts)
    bad = {**parts, "px_r": parts["px_r"][:-1]}
    with pytest.raises(ConfigError, match=r"Parameter \.px_r: expected shape \(230,\)"):
        to_params(config, {"params": bad})
    decoder = parts["decoder"]
    broken = decoder._replace(factor=decoder.factor._replace(bn=None))
    with pytest.raises(ConfigError, match="Part 'decoder': expected the tree"):
        to_params(config, {"params": {**parts, "decoder": broken}})
    nan = {**parts, "px_r": parts["px_r"].at[0].set(jnp.nan)}
    with pytest.raises(ConfigError, match=r"\.px_r holds NaN"):
        to_params(config, {"params": nan})
    with pytest.raises(ConfigError, match="like= a LinearSCVI"):
        ldj.LinearSCVI.from_flax(variables, like=demo_model.config)  # type: ignore[arg-type]
