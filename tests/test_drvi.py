"""DRVI family: parity with drvi-py 0.2.8 on models trained here, the ported scvi-tools 1.5 layout,
the split-removal convention against a float64 brute force, and hostile checkpoints.

Each configuration trains a tiny model (200 cells x 60 genes, 8 latents, 2 epochs) once per
session; drvi's own torch module at the posterior mean is the reference.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("drvi")
pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from drvi_ref import (  # noqa: E402
    brute_decode,
    brute_log_prob,
    codes_of,
    eval_counts,
    make_adata,
    ours,
    rel_err,
    torch_reference,
    train,
)

import linear_decoder_jax.families.drvi as F  # noqa: E402
from converters import MalformedCheckpointError, UnsafeCheckpointError, UnsupportedModelError  # noqa: E402
from converters.drvi import detect_family, read_drvi_checkpoint  # noqa: E402
from linear_decoder_jax.errors import ConfigError  # noqa: E402
from linear_decoder_jax.family import Family  # noqa: E402

TOL = 1e-5
SMALL = {"n_latent": 8, "encoder_dims": (16, 16), "decoder_dims": (16, 16)}

#: name -> (setup_anndata kwargs, DRVI kwargs): every aggregation, split method, reuse variant,
#: likelihood, covariate strategy, dispersion and norm choice appears at least once.
CONFIGS: dict[str, tuple[dict, dict]] = {
    "default_batch": ({"batch_key": "batch"}, {}),
    "emb_two_covs_nb_sum_nowhere": (
        {"categorical_covariate_keys": ["batch", "donor"]},
        {"covariate_modeling_strategy": "emb", "gene_likelihood": "nb", "split_aggregation": "sum",
         "decoder_reuse_weights": "nowhere", "deeply_inject_covariates": True},
    ),
    "poisson_sumplus_split4_notfirst_bn": (
        {"batch_key": "batch"},
        {"gene_likelihood": "poisson", "split_aggregation": "sum_plus", "split_method": "split",
         "n_split_latent": 4, "decoder_reuse_weights": "not_first", "use_batch_norm": "both",
         "affine_batch_norm": "decoder", "use_layer_norm": "encoder"},
    ),
    "max_diag_last_genebatch": (
        {"batch_key": "batch", "categorical_covariate_keys": ["donor"]},
        {"split_aggregation": "max", "split_method": "split_diag", "decoder_reuse_weights": "last",
         "dispersion": "gene-batch", "mean_activation": "elu", "var_activation": "pow2"},
    ),
    "power_intermediate_nb": (
        {},
        {"split_method": "power@6", "n_split_latent": 4, "decoder_reuse_weights": "intermediate",
         "gene_likelihood": "nb"},
    ),
    "splitmap_at_one_split": ({"batch_key": "batch"}, {"split_method": "split_map@5", "n_split_latent": 1}),
}  # fmt: skip


@pytest.fixture(scope="session")
def drvi_adata():
    return make_adata()


@pytest.fixture(scope="session")
def drvi_models(tmp_path_factory, drvi_adata):
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            setup, kwargs = CONFIGS[name]
            folder = tmp_path_factory.mktemp(f"drvi_{name}")
            m = train(folder, drvi_adata, setup, {**SMALL, **kwargs})
            cache[name] = (m, folder)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_drvi_py(name, drvi_models, drvi_adata):
    m, folder = drvi_models(name)
    x = eval_counts(drvi_adata)
    codes = codes_of(m)
    ref = torch_reference(m, x, codes)
    family, params, ckpt = ours(folder)
    assert isinstance(family, Family)
    assert ckpt.config["source"]["layout"] == "drvi-py"
    enc = family.encode(params, jnp.asarray(x), jnp.asarray(codes), None, library="observed")
    values = family.split_values(params, enc.z, jnp.asarray(codes))
    rates = family.decode(params, enc.z, enc.log_library, jnp.asarray(codes), None)
    nll = -family.log_prob(jnp.asarray(x), rates).sum(-1)
    # drvi-py returns (n_obs, n_vars) without splits; ours keeps a split axis of 1
    ref["split_values"] = ref["split_values"].reshape(values.shape)
    got = {"qz_m": enc.qz_m, "qz_v": enc.qz_v, "split_values": values, "scale": rates.scale,
           "mu": rates.mu, "nll": nll}  # fmt: skip
    errors = {k: rel_err(got[k], ref[k]) for k in got}
    assert max(errors.values()) <= TOL, errors
    assert len(family.unit_latents()) == family.config.n_split
    assert detect_family(folder) == "drvi"


@pytest.mark.parametrize("name", ["default_batch", "emb_two_covs_nb_sum_nowhere",
                                  "poisson_sumplus_split4_notfirst_bn", "max_diag_last_genebatch"])  # fmt: skip
def test_split_removal_and_baseline_against_float64_brute_force(name, drvi_models, drvi_adata):
    """decode with splits removed (divisor K) and with a latent at a baseline equals a float64
    numpy decoder written from drvi-py's code; for logsumexp the divisor cancels (K - 1 gives the
    same scale), for sum it does not."""
    m, folder = drvi_models(name)
    family, params, _ = ours(folder)
    x = eval_counts(drvi_adata)[:50]
    codes = codes_of(m)[:50]
    enc = family.encode(params, jnp.asarray(x), jnp.asarray(codes), None, library="observed")
    z = np.asarray(enc.z)
    lib = x.sum(1)
    s = family.config.n_split
    rng = np.random.default_rng(0)
    mask = (rng.random((50, s)) > 0.4).astype(np.float32)
    mask[:, 0] = 1.0  # keep at least one split per cell
    rates = family.decode(
        params, enc.z, enc.log_library, jnp.asarray(codes), None, split_mask=jnp.asarray(mask)
    )
    brute = brute_decode(m, z, codes, lib, split_mask=mask)
    assert rel_err(rates.scale, brute["scale"]) <= TOL
    assert rel_err(rates.mu, brute["mu"]) <= TOL
    ll = family.log_prob(jnp.asarray(x), rates).sum(-1)
    assert rel_err(ll, brute_log_prob(x, brute, family.config.gene_likelihood).sum(-1)) <= TOL
    kept = brute_decode(m, z, codes, lib, split_mask=mask, divisor="kept")
    same = rel_err(kept["scale"], brute["scale"])
    if family.config.split_aggregation in ("logsumexp", "max"):
        assert same < 1e-12
    else:
        assert same > 1e-3  # the convention matters for sum / sum_plus: ours keeps K
    # one latent at a baseline (0), every split decoded again
    z0 = z.copy()
    z0[:, 1] = 0.0
    rates0 = family.decode(params, jnp.asarray(z0), enc.log_library, jnp.asarray(codes), None)
    assert rel_err(rates0.mu, brute_decode(m, z0, codes, lib)["mu"]) <= TOL
    # a one-split mask as (n_split,) broadcasts over cells
    row = np.ones(s, np.float32)
    row[-1] = 0.0
    r_row = family.decode(
        params, enc.z, enc.log_library, jnp.asarray(codes), None, split_mask=jnp.asarray(row)
    )
    assert rel_err(r_row.scale, brute_decode(m, z, codes, lib, split_mask=row)["scale"]) <= TOL


def test_config_checks_and_round_trip():
    c = F.DRVIConfig(n_input=10, n_latent=8, n_split=4, split_method="split")
    assert F.DRVIConfig.from_dict(c.to_dict()) == c
    assert hash(c) == hash(F.DRVIConfig.from_dict(c.to_dict()))
    fam = F.DRVI(c)
    assert fam.unit_latents() == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert fam.split_names() == ["split_0", "split_1", "split_2", "split_3"]
    assert F.DRVI(F.DRVIConfig(n_input=10, n_latent=3, n_split=3)).split_names() == [
        "Z_0",
        "Z_1",
        "Z_2",
    ]
    bad = [
        ({"split_aggregation": "mean"}, "split_aggregation"),
        ({"n_split": 3}, "divisible"),
        ({"split_method": "split_diag", "n_split": 4}, "n_split == n_latent"),
        ({"gene_likelihood": "zinb"}, "gene_likelihood"),
        ({"covariate_modeling": "emb"}, "embedding dimension"),
        ({"mean_activation": "tanh"}, "mean_activation"),
        ({"n_split": 1, "decoder_reuse_weights": "nowhere"}, "several splits"),
    ]
    for kwargs, text in bad:
        with pytest.raises(ConfigError, match=text):
            F.DRVIConfig(**{"n_input": 10, "n_latent": 8, "n_split": 8, **kwargs})
    with pytest.raises(ConfigError, match="Unknown DRVI configuration keys"):
        F.DRVIConfig.from_dict({"n_input": 3, "zinb": True})


def test_family_jits_with_static_config():
    """The family is hashable: jit takes it as a static argument; params are abstract-shaped."""
    import jax

    config = F.DRVIConfig(
        n_input=7,
        n_latent=4,
        n_split=4,
        encoder_dims=(5,),
        decoder_dims=(6,),
        n_cats_per_cov=(1, 3),
    )
    family = F.DRVI(config)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, jnp.float32),
        F.abstract_params(config),
    )
    x = jnp.asarray(rng.poisson(3.0, size=(5, 7)), jnp.float32)
    codes = jnp.asarray(np.stack([np.zeros(5), rng.integers(0, 3, 5)], 1), jnp.int32)

    @jax.jit
    def nll(params, x, codes, mask):
        enc = family.encode(params, x, codes, None, library="observed")
        rates = family.decode(params, enc.z, enc.log_library, codes, None, split_mask=mask)
        return -family.log_prob(x, rates).sum(-1)

    full = nll(params, x, codes, jnp.ones(4))
    assert full.shape == (5,) and bool(jnp.all(jnp.isfinite(full)))
    assert not np.allclose(nll(params, x, codes, jnp.asarray([1.0, 0, 1, 1])), full)
    # one packed code per cell (batch first, mixed radix) is the same as the code columns
    packed = jnp.asarray(F.pack_covariates(config, np.asarray(codes)))
    np.testing.assert_array_equal(F.covariate_codes(config, packed), codes)
    np.testing.assert_allclose(nll(params, x, packed, jnp.ones(4)), full, rtol=1e-6)
    with pytest.raises(ConfigError, match=r"Expected covariate codes of shape \(n_obs, 2\)"):
        family.decode(params, x[:, :4], x[:, :1], jnp.concatenate([codes, codes], 1), None)


# --------------------------------------------------------------------------------------------
# The scvi-tools 1.5 layout (drvi.utils.port_to_scvi_tools)
# --------------------------------------------------------------------------------------------

PORTED = Path(__file__).parent / "data" / "drvi_ported"


@pytest.mark.parametrize(
    "name", sorted(p.name for p in PORTED.iterdir()) if PORTED.exists() else []
)
def test_ported_fixtures(name):
    """Committed ports (tests/data/make_drvi_ported.py): ours on the 1.5 layout equals drvi-py's
    module on the original drvi-py model."""
    folder = PORTED / name
    family, params, ckpt = ours(folder)
    assert ckpt.config["source"]["layout"] == "scvi-tools-1.5"
    data = np.load(folder / "counts.npz")
    ref = dict(np.load(folder / "expected.npz"))
    x, codes = data["x"], data["codes"]
    enc = family.encode(params, jnp.asarray(x), jnp.asarray(codes), None, library="observed")
    rates = family.decode(params, enc.z, enc.log_library, jnp.asarray(codes), None)
    got = {"qz_m": enc.qz_m, "qz_v": enc.qz_v, "split_values": family.split_values(params, enc.z, jnp.asarray(codes)),
           "scale": rates.scale, "mu": rates.mu, "nll": -family.log_prob(jnp.asarray(x), rates).sum(-1)}  # fmt: skip
    errors = {k: rel_err(got[k], ref[k]) for k in got}
    assert max(errors.values()) <= TOL, errors


def test_port_in_session_matches(drvi_models, tmp_path):
    """port_to_scvi_tools run here on a trained model reads back to the same parameters."""
    from drvi.utils import port_to_scvi_tools

    _, folder = drvi_models("default_batch")
    dest = Path(port_to_scvi_tools(folder, tmp_path / "ported"))
    a, b = read_drvi_checkpoint(folder), read_drvi_checkpoint(dest)
    assert a.params.keys() == b.params.keys()
    for key in a.params:
        np.testing.assert_array_equal(a.params[key], b.params[key], err_msg=key)
    assert detect_family(dest) == "drvi"

    # 1.5 options the port never writes are refused by name
    def zinb(saved):
        saved["attr_dict"]["init_params_"]["non_kwargs"]["gene_likelihood"] = "zinb"

    with pytest.raises(UnsupportedModelError, match="gene_likelihood='zinb' is not supported"):
        read_drvi_checkpoint(_rewrite(dest, tmp_path / "zinb", zinb))

    def encoded_library(saved):
        saved["attr_dict"]["init_params_"]["kwargs"]["kwargs"]["use_observed_lib_size"] = False

    with pytest.raises(UnsupportedModelError, match="use_observed_lib_size=False"):
        read_drvi_checkpoint(_rewrite(dest, tmp_path / "lib", encoded_library))


# --------------------------------------------------------------------------------------------
# Hostile checkpoints
# --------------------------------------------------------------------------------------------


def _rewrite(src: Path, dest: Path, edit) -> Path:
    """Load a model.pt with torch, edit the dict, save it again."""
    import torch

    saved = torch.load(src / "model.pt", weights_only=False)
    edit(saved)
    dest.mkdir()
    torch.save(saved, dest / "model.pt")
    return dest


def test_hostile_checkpoints(drvi_models, tmp_path):
    import torch

    _, folder = drvi_models("default_batch")

    def option(saved):
        saved["attr_dict"]["init_params_"]["kwargs"]["model_kwargs"]["encode_covariates"] = True

    with pytest.raises(
        UnsupportedModelError, match=r"encode_covariates=True is not supported"
    ) as e:
        read_drvi_checkpoint(_rewrite(folder, tmp_path / "a", option))
    assert "\n" not in str(e.value)

    def unknown(saved):
        saved["attr_dict"]["init_params_"]["kwargs"]["model_kwargs"]["fancy_prior_mix"] = 3

    with pytest.raises(UnsupportedModelError, match="fancy_prior_mix=3"):
        read_drvi_checkpoint(_rewrite(folder, tmp_path / "b", unknown))

    def likelihood(saved):
        saved["attr_dict"]["init_params_"]["kwargs"]["model_kwargs"]["gene_likelihood"] = "normal"

    with pytest.raises(UnsupportedModelError, match="gene_likelihood='normal'"):
        read_drvi_checkpoint(_rewrite(folder, tmp_path / "c", likelihood))

    def shape(saved):
        sd = saved["model_state_dict"]
        sd["decoder.params_nets.r"] = torch.zeros(7)

    with pytest.raises(
        MalformedCheckpointError,
        match=r"'decoder.params_nets.r': expected shape \(60,\), got \(7,\)",
    ):
        read_drvi_checkpoint(_rewrite(folder, tmp_path / "d", shape))

    def extra(saved):
        saved["model_state_dict"]["decoder.extra_head.weight"] = torch.zeros(2)

    with pytest.raises(
        MalformedCheckpointError, match="unexpected state-dict key 'decoder.extra_head.weight'"
    ):
        read_drvi_checkpoint(_rewrite(folder, tmp_path / "e", extra))

    def nan(saved):
        saved["model_state_dict"]["decoder.params_nets.r"][0] = float("nan")

    with pytest.raises(MalformedCheckpointError, match="non-finite"):
        read_drvi_checkpoint(_rewrite(folder, tmp_path / "f", nan))

    # a pickle payload: data.pkl asks for posix.system
    payload = tmp_path / "g"
    payload.mkdir()
    with (
        zipfile.ZipFile(folder / "model.pt") as zin,
        zipfile.ZipFile(payload / "model.pt", "w") as zout,
    ):
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("data.pkl"):
                data = b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
            zout.writestr(item, data)
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        read_drvi_checkpoint(payload)
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        detect_family(payload)


# --------------------------------------------------------------------------------------------
# Our own format: config.json version 2 names the family; version 1 stays LinearSCVI
# --------------------------------------------------------------------------------------------


def test_save_load_drvi_and_version_one(drvi_models, tmp_path):
    import json

    from linear_decoder_jax import checkpoint
    from linear_decoder_jax.config import ModelSpec

    _, folder = drvi_models("emb_two_covs_nb_sum_nowhere")
    family, params, ckpt = ours(folder)
    spec = ModelSpec.from_converter(ckpt.config, family="drvi")
    assert spec.family == "drvi" and spec.data.categorical_covariate_keys == ("batch", "donor")
    out = checkpoint.save(tmp_path / "m", params, spec)
    written = json.loads((out / "config.json").read_text())
    assert written["format_version"] == 2 and written["family"] == "drvi"
    params2, spec2 = checkpoint.load(out)
    assert spec2 == spec and type(params2) is type(params)
    for a, b in zip(np.asarray(params.px_r), np.asarray(params2.px_r), strict=True):
        np.testing.assert_array_equal(a, b)
    assert checkpoint.fingerprint(params2, spec2) == checkpoint.fingerprint(params, spec)
    # the covariate categories are checked against the configuration
    bad = dict(written)
    bad["data"] = {**written["data"], "categorical_covariate_categories": [["a"], ["d0", "d1"]]}
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(Exception, match="categories per covariate"):
        checkpoint.read_spec(out)
    # a version-1 directory (no "family") is LinearSCVI
    v1 = {
        "format_version": 1,
        "model": {"n_input": 2, "n_latent": 1},
        "data": {"var_names": ["a", "b"]},
    }
    assert ModelSpec.from_dict(v1).family == "linear_scvi"
    with pytest.raises(ConfigError, match="family"):
        ModelSpec.from_dict({**v1, "format_version": 2, "family": "scvi"})


# --------------------------------------------------------------------------------------------
# DRVI's own interpretability scores (linear_decoder_jax.drvi_scores) against drvi-py's
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default_batch", "emb_two_covs_nb_sum_nowhere"])
def test_interpretability_scores_equal_drvi_py(name, drvi_models, drvi_adata):
    import anndata as ad

    from linear_decoder_jax import drvi_scores as S

    m, folder = drvi_models(name)
    family, params, _ = ours(folder)
    adata = m.adata
    x, codes = np.asarray(adata.X, np.float32), codes_of(m)

    def close(a, b, tol=2e-5):
        assert np.shape(a) == np.shape(b)
        assert rel_err(a, b) <= tol, rel_err(a, b)

    # reconstruction effect: summed, per cell, directional per cell
    close(S.get_reconstruction_effect_of_each_split(family, params, x, codes, batch_size=64),
          m.get_reconstruction_effect_of_each_split(adata))  # fmt: skip
    for directional in (False, True):
        close(
            S.get_reconstruction_effect_of_each_split(
                family, params, x, codes, aggregate_over_cells=False, directional=directional
            ),
            m.get_reconstruction_effect_of_each_split(
                adata, aggregate_over_cells=False, directional=directional
            ),
        )
    # within-distribution effects, both directions and not
    for directional in (True, False):
        ours_ind = S.get_effect_of_splits_within_distribution(
            family, params, x, codes, directional=directional
        )
        ref_ind = m.get_effect_of_splits_within_distribution(adata, directional=directional)
        assert ours_ind.keys() == ref_ind.keys()
        for key in ref_ind:
            close(ours_ind[key], ref_ind[key])
    # latent dimension stats on an embedding AnnData
    latent = m.get_latent_representation(adata)
    e_ref, e_ours = ad.AnnData(latent.copy()), ad.AnnData(latent.copy())
    m.set_latent_dimension_stats(e_ref)
    effect = S.get_reconstruction_effect_of_each_split(family, params, x, codes)
    S.set_latent_dimension_stats(e_ours, effect)
    assert list(e_ours.var.columns) == list(e_ref.var.columns)
    for col in e_ref.var.columns:
        if e_ref.var[col].dtype.kind == "f":
            close(e_ours.var[col].to_numpy(), e_ref.var[col].to_numpy())
        else:
            assert e_ours.var[col].tolist() == e_ref.var[col].tolist(), col
    # out of distribution: the same covariate draws
    np.random.seed(3)
    ood_ref = m.get_effect_of_splits_out_of_distribution(e_ref, n_samples=4)
    np.random.seed(3)
    combos = np.random.permutation(S.all_covariate_combinations(family))[:4]
    ood = S.get_effect_of_splits_out_of_distribution(
        family, params, e_ours.var["min"].values, e_ours.var["max"].values, combinations=combos
    )
    for key in ood_ref:
        close(ood[key], ood_ref[key], tol=1e-4)
    np.random.seed(3)
    ood_ref = m.get_effect_of_splits_out_of_distribution(e_ref, n_samples=4, directional=False)
    ood = S.get_effect_of_splits_out_of_distribution(
        family, params, e_ours.var["min"].values, e_ours.var["max"].values, combinations=combos,
        directional=False,
    )  # fmt: skip
    for key in ood_ref:
        close(ood[key], ood_ref[key], tol=1e-4)
    # interpretability tables (OOD over every combination: nothing drawn when n_samples is large)
    m.calculate_interpretability_scores(e_ref, methods="ALL", n_samples=1000)
    S.calculate_interpretability_scores(family, params, e_ours, x, codes, methods="ALL")
    assert sorted(e_ours.varm.keys()) == sorted(e_ref.varm.keys())
    t_ref = m.get_interpretability_scores(e_ref, adata, key="IND_max")
    t_ours = S.get_interpretability_scores(e_ours, adata.var_names, key="IND_max")
    assert list(t_ours.columns) == list(t_ref.columns) and list(t_ours.index) == list(t_ref.index)
    close(t_ours.to_numpy(), t_ref.to_numpy())


@pytest.mark.parametrize("directional", [True, False])
def test_ood_effects_against_float64(directional):
    """The shifted out-of-distribution formulas against drvi-py's, written as drvi-py does in
    float64: values far apart (a split 60 nats above the rest, genes 40 nats below others),
    where float32 exponentials of drvi-py's log-sum-exps would over- or underflow."""
    from linear_decoder_jax.drvi_scores import _ood_effects

    rng = np.random.default_rng(0)
    v = rng.normal(0, 3, size=(2, 10, 6, 50))
    v[:, :, 2] += 60.0
    v[:, :, :, :10] -= 40.0
    up, down = v.max(axis=1), v.min(axis=1)
    lo, hi = down.min(axis=0), up.max(axis=0)
    dmax = up if directional else hi

    def lse(a, axis=None, keepdims=False):
        top = a.max(axis=axis, keepdims=True)
        out = top + np.log(np.exp(a - top).sum(axis=axis, keepdims=True))
        return out if keepdims else np.squeeze(out, axis=axis)

    log_add = lse(hi) + np.log(1.0 / 1e6)
    row = np.full((1, hi.shape[1]), log_add)
    lse_min = lse(np.concatenate([lo, row]), axis=0, keepdims=True)
    lse_max = lse(np.concatenate([hi, row]), axis=0, keepdims=True)
    # drvi-py's expressions, each exponential shifted by the same per-gene constant (exact)
    top = np.maximum(lse_min, lse_max)
    ex = lambda a: np.exp(a - top)  # noqa: E731
    max_possible = np.log(ex(lse_min) - ex(lo) + ex(dmax)) - np.log(ex(lse_min))
    min_possible = np.log(ex(lse_max) - ex(hi) + ex(dmax)) - np.log(ex(lse_max) - ex(hi) + ex(lo))
    out = _ood_effects(
        jnp.asarray(up, jnp.float32), jnp.asarray(down, jnp.float32),
        add_to_counts=1.0, directional=directional,
    )  # fmt: skip
    for key, ref in [("max_possible", max_possible), ("min_possible", min_possible),
                     ("combined", max_possible * min_possible)]:  # fmt: skip
        got = np.asarray(out[key], np.float64)
        assert got.shape == ref.shape and np.isfinite(got).all()
        assert rel_err(got, ref) <= 1e-5, (key, rel_err(got, ref))


def test_interpretability_refusals(drvi_models, drvi_adata):
    from linear_decoder_jax import drvi_scores as S

    m, folder = drvi_models("max_diag_last_genebatch")
    family, params, _ = ours(folder)
    x, codes = np.asarray(drvi_adata.X, np.float32), codes_of(m)
    with pytest.raises(NotImplementedError):
        m.get_effect_of_splits_within_distribution(m.adata)
    with pytest.raises(ConfigError, match="'logsumexp' and 'sum' only"):
        S.get_effect_of_splits_within_distribution(family, params, x, codes)


def test_detect_family_on_linear_scvi_fixtures():
    data = Path(__file__).parent / "data"
    folders = [data / "golden", *sorted((data / "old_release").iterdir())]
    assert {detect_family(f) for f in folders} == {"linear_scvi"}
    assert {detect_family(p) for p in sorted(PORTED.iterdir())} == {"drvi"}
    with pytest.raises(UnsupportedModelError, match="LinearSCVI model, not DRVI"):
        read_drvi_checkpoint(data / "golden")


@pytest.mark.parametrize("name", ["default_batch", "emb_two_covs_nb_sum_nowhere"])
def test_ldj_load_query_and_ablate_against_float64_brute_force(name, drvi_models, drvi_adata):
    """``ldj.load`` names the family and returns the DRVI facade; its query methods, the sweep
    over latents (baseline zero) and over splits (removed from the aggregation, divisor K), exact
    Shapley values and the refit run through the family protocol and equal a float64 numpy
    decoder written from drvi-py's code (to float32 rounding: the converter adds drvi-py's
    dispersion offset in float32, as drvi-py does)."""
    import linear_decoder_jax as ldj

    m, folder = drvi_models(name)
    model = ldj.load(folder, dtype="float64")
    assert isinstance(model, ldj.DRVI) and model.family.name == "drvi"
    assert not hasattr(model, "get_loadings")
    adata = drvi_adata[:40].copy()
    x = np.asarray(adata.X, np.float64)
    codes = codes_of(m)[:40]
    lib = x.sum(1)
    z = model.get_latent_representation(adata)
    full = brute_decode(m, z, codes, lib)
    ll = brute_log_prob(x, full, model.config.gene_likelihood).sum(-1)
    assert rel_err(model.get_reconstruction_error(adata), -ll) <= TOL
    assert rel_err(model.get_normalized_expression(adata, return_numpy=True), full["scale"]) <= TOL

    result = ldj.ablate(model, adata, shapley="exact", refit=True, refit_steps=20)
    assert result.settings["family"] == "drvi" and result.loadings is None
    for k in range(model.n_latent):
        zk = z.copy()
        zk[:, k] = 0.0
        llk = brute_log_prob(x, brute_decode(m, zk, codes, lib), model.config.gene_likelihood)
        assert rel_err(result.delta_nll[:, k], ll - llk.sum(-1)) <= TOL, k
    gain = ll - brute_log_prob(
        x, brute_decode(m, np.zeros_like(z), codes, lib), model.config.gene_likelihood
    ).sum(-1)
    assert rel_err(result.arrays["gain_nll"], gain) <= TOL
    phi_sum = result.arrays["shapley_nll"].sum(1)  # efficiency: the values sum to the gain
    np.testing.assert_allclose(phi_sum, result.arrays["gain_nll"], rtol=1e-9, atol=1e-9)
    # Shapley's formula over every coalition, each decoded by the brute force
    k_all = model.n_latent
    value = np.empty((2**k_all, len(z)))
    for bits in range(2**k_all):
        keep = np.array([(bits >> j) & 1 for j in range(k_all)], bool)
        moved = brute_decode(m, np.where(keep, z, 0.0), codes, lib)
        value[bits] = brute_log_prob(x, moved, model.config.gene_likelihood).sum(-1)
    phi = np.zeros((len(z), k_all))
    for bits in range(2**k_all):
        size = bin(bits).count("1")
        for j in range(k_all):
            if not (bits >> j) & 1:
                w = math.factorial(size) * math.factorial(k_all - size - 1) / math.factorial(k_all)
                phi[:, j] += w * (value[bits | (1 << j)] - value[bits])
    assert rel_err(result.arrays["shapley_nll"], phi) <= TOL
    assert (result.arrays["unique_delta_nll"] >= 0).all()
    assert result.summary().splitlines()[-1].startswith("explained (Shapley")

    splits = ldj.ablate(model, adata, unit="split")
    assert splits.delta_nll.shape[1] == model.config.n_split
    assert splits.latent_names == model.family.split_names()
    for j in range(model.config.n_split):
        keep = np.ones(model.config.n_split)
        keep[j] = 0.0
        llj = brute_log_prob(
            x, brute_decode(m, z, codes, lib, split_mask=keep), model.config.gene_likelihood
        )
        assert rel_err(splits.delta_nll[:, j], ll - llj.sum(-1)) <= TOL, j


# --------------------------------------------------------------------------------------------
# Latent traversal: our scorer against the float64 brute force, and drvi-py's own traversal
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default_batch", "emb_two_covs_nb_sum_nowhere"])
def test_traversal_scorer_against_float64_brute_force(name, drvi_models, drvi_adata):
    """``ablate(traverse=True)`` through the family's decode: every cell decoded in float64 numpy
    at every grid value, per group; minibatches of 9 cells equal one pass."""
    import linear_decoder_jax as ldj

    m, folder = drvi_models(name)
    model = ldj.load(folder, dtype="float64")
    adata = drvi_adata[:30].copy()
    adata.obs["half"] = np.where(np.arange(30) < 12, "a", "b")
    x = np.asarray(adata.X, np.float64)
    codes, lib = codes_of(m)[:30], x.sum(1)
    kw = dict(latents=[3, 0], traverse=True, traverse_steps=4, groupby="half")
    result = ldj.ablate(model, adata, **kw)
    small = ldj.ablate(model, adata, batch_size=9, **kw)
    z = model.get_latent_representation(adata)
    grid = np.asarray(result.settings["traverse_values"])
    lik = model.config.gene_likelihood
    full = brute_decode(m, z, codes, lib)
    ll = brute_log_prob(x, full, lik).sum(-1)
    members = [np.arange(30) < 12, np.arange(30) >= 12, np.ones(30, bool)]
    for a, k in enumerate([3, 0]):
        for s, value in enumerate(grid[a]):
            zk = z.copy()
            zk[:, k] = value
            moved = brute_decode(m, zk, codes, lib)
            lfc = np.log(moved["scale"]) - np.log(full["scale"])
            delta = ll - brute_log_prob(x, moved, lik).sum(-1)
            for r, rows in enumerate(members):
                got_lfc = result.arrays["traverse_lfc"][r, a, s]
                assert rel_err(got_lfc, lfc[rows].mean(0)) <= TOL, (k, s, r)
                got = result.arrays["traverse_delta_nll"][r, a, s]
                assert abs(got - delta[rows].mean()) <= TOL * np.abs(ll).mean(), (k, s, r)
    for key in ("traverse_lfc", "traverse_delta_nll"):
        np.testing.assert_allclose(small.arrays[key], result.arrays[key], rtol=1e-9, atol=1e-10)
    with pytest.raises(ConfigError, match="moves latents"):
        ldj.ablate(model, adata, unit="split", traverse=True)


@pytest.mark.parametrize("name", ["default_batch", "emb_two_covs_nb_sum_nowhere"])
def test_traverse_latent_and_differential_vars_equal_drvi_py(name, drvi_models):
    """drvi-py's ``traverse_latent`` + ``calculate_differential_vars`` against ours, on the same
    random draws (numpy's global state seeded alike): AnnData layout, values, uns/varm keys."""
    import warnings

    import anndata as ad
    from drvi.utils import tl

    from linear_decoder_jax import drvi_scores as S

    m, folder = drvi_models(name)
    family, params, _ = ours(folder)
    latent = m.get_latent_representation(m.adata)
    embed = ad.AnnData(latent.copy())
    m.set_latent_dimension_stats(embed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.random.seed(7)
        ref = tl.traverse_latent(m, embed, n_steps=6, n_samples=5)
        tl.calculate_differential_vars(ref)
    np.random.seed(7)
    got = S.traverse_latent(family, params, embed, m.adata.var, n_steps=6, n_samples=5)
    S.calculate_differential_vars(got)

    assert got.shape == ref.shape and list(got.obs_names) == list(ref.obs_names)
    assert list(got.obs.columns) == list(ref.obs.columns)
    assert list(got.var.columns) == list(ref.var.columns)
    assert list(got.var_names) == list(ref.var_names)
    for col in ref.obs.columns:
        if ref.obs[col].dtype.kind == "f":
            np.testing.assert_allclose(got.obs[col], ref.obs[col], rtol=1e-6)
        else:
            assert got.obs[col].tolist() == ref.obs[col].tolist(), col
    assert sorted(got.layers.keys()) == sorted(ref.layers.keys())
    assert sorted(got.obsm.keys()) == sorted(ref.obsm.keys())
    for key in ref.obsm.keys():
        np.testing.assert_allclose(got.obsm[key], ref.obsm[key], rtol=1e-6, atol=1e-7)
    scale = np.abs(ref.layers["effect"]).max()
    for key in ("control", "effect"):
        assert np.abs(got.layers[key] - ref.layers[key]).max() <= 2e-5 * scale, key
    assert np.abs(got.X - ref.X).max() <= 2e-5 * scale
    assert sorted(got.uns.keys()) == sorted(ref.uns.keys())
    assert sorted(got.varm.keys()) == sorted(ref.varm.keys())
    for key in ref.uns:
        if key.endswith("_dim_ids"):
            assert got.uns[key].tolist() == ref.uns[key].tolist(), key
        else:
            assert got.uns[key].shape == ref.uns[key].shape, key
            assert rel_err(got.uns[key], ref.uns[key]) <= 1e-4, key
    for key in ref.varm:
        assert list(got.varm[key].columns) == list(ref.varm[key].columns), key
        assert list(got.varm[key].index) == list(ref.varm[key].index), key
        assert rel_err(got.varm[key].to_numpy(), ref.varm[key].to_numpy()) <= 1e-4, key
    # effects amplified to a largest log-fold change of 4, so that the combined score keeps some
    # genes and drops others (a 2-epoch model's stay below its threshold of 1): still equal
    gain = 4.0 / np.abs(ref.X).max()
    for adata in (ref, got):
        adata.layers["effect"] = adata.layers["control"] + gain * adata.X
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl.calculate_differential_vars(ref)
    S.calculate_differential_vars(got)
    combined = got.uns["combined_score_traverse_effect_stepwise"]
    assert (combined > 0).any() and (combined == 0).any()
    for key in ref.uns:
        if not key.endswith("_dim_ids"):
            assert rel_err(got.uns[key], ref.uns[key]) <= 1e-4, key


# The sweep's per-split fast path (ablation._split_terms) against the generic path
# --------------------------------------------------------------------------------------------

#: random-weight configurations: every aggregation and split method, one latent per split and
#: several (split, split_map@d), covariates one-hot, embedded and gene-batch dispersion
FAST_CONFIGS: dict[str, dict] = {
    "lse_map_two_covs": {"n_split": 6, "n_cats_per_cov": (3, 2)},
    "sum_emb_nowhere_nb": {"n_split": 6, "split_aggregation": "sum", "covariate_modeling": "emb",
                           "covariate_dims": (2, 3), "n_cats_per_cov": (3, 2), "gene_likelihood": "nb",
                           "decoder_reuse_weights": "nowhere", "deeply_inject_covariates": True},
    "sumplus_split3x2_poisson": {"n_split": 3, "split_method": "split", "split_aggregation": "sum_plus",
                                 "decoder_reuse_weights": "not_first", "gene_likelihood": "poisson",
                                 "use_batch_norm": "both", "n_cats_per_cov": (3,)},
    "max_diag_genebatch": {"n_split": 6, "split_method": "split_diag", "split_aggregation": "max",
                           "decoder_reuse_weights": "last", "dispersion": "gene-batch",
                           "n_cats_per_cov": (3, 2)},
    "lse_map2_at4": {"n_split": 3, "split_method": "split_map", "split_dim": 4, "n_cats_per_cov": (2,)},
}  # fmt: skip


def _random_drvi(seed: int = 0, **kw):
    import jax

    config = F.DRVIConfig(n_input=30, n_latent=6, encoder_dims=(8,), decoder_dims=(8, 8), **kw)
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        a = rng.normal(size=spec.shape) * 0.5
        if jax.tree_util.keystr(path).endswith(".var"):
            a = np.abs(a) + 0.5
        return jnp.asarray(a, jnp.float32)

    return F.DRVI(config), jax.tree_util.tree_map_with_path(leaf, F.abstract_params(config))


def _encoded_batch(family, params, n: int = 24, seed: int = 1):
    from linear_decoder_jax.pipeline import Batch

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.poisson(2.0, size=(n, family.n_vars)), jnp.float32)
    cols = [rng.integers(0, k, n) for k in family.config.n_cats_per_cov]
    codes = jnp.asarray(np.stack(cols, 1), jnp.int32)
    enc = family.encode(params, x, codes, None, library="observed")
    none = jnp.zeros((n, 1), jnp.int32)
    return Batch(
        x=x, nz_index=none, nz_count=none.astype(x.dtype), batch=codes,
        label=jnp.zeros(n, jnp.int32), valid=jnp.ones(n).at[-3:].set(0.0),
        group=jnp.asarray(np.arange(n) % 3, jnp.int32), qz_m=enc.qz_m, qz_v=enc.qz_v, z=enc.z,
        log_library=enc.log_library,
    )  # fmt: skip


@pytest.mark.parametrize("name", list(FAST_CONFIGS))
def test_split_fast_path_equals_generic_path(name, monkeypatch):
    """Every unit (latents, splits), mode, gene score and both loop styles: the per-split path
    (each split decoded at z and at the baseline, one term re-aggregated per unit) equals the
    generic path (every split decoded again per unit) to float32 rounding."""
    import jax

    from linear_decoder_jax import ablation

    family, params = _random_drvi(**FAST_CONFIGS[name])
    assert ablation.split_local(family)
    batch = _encoded_batch(family, params)
    baseline = jnp.asarray(np.random.default_rng(2).normal(size=6) * 0.3, jnp.float32)
    sweep = ablation.sweep_minibatch.__wrapped__  # unjitted: split_local is read at trace time

    def run(units, mode, vectorize, n_samples=0):
        n = family.n_latent if units is None else len(units)
        out = sweep(
            family, params, batch, baseline, jnp.arange(n)[::-1], jax.random.PRNGKey(0),
            mode=mode, n_samples=n_samples, vectorize=vectorize,
            n_groups=None if n_samples else 3, units=units,
        )  # fmt: skip
        fields = ["delta_nll", "delta_nll_se", "delta_l1", "nll", "lfc_sum"]
        got = {f: np.asarray(getattr(out, f)) for f in fields}
        if out.genes is not None:
            got.update(gene_delta=np.asarray(out.genes.delta_nll), gene_lfc=out.genes.lfc)
        return got

    cases = [(u, mode, False) for u in (None, family.unit_latents()) for mode in ("drop", "keep")]
    cases.append((None, "drop", True))
    for units, mode, vectorize in cases:
        fast = run(units, mode, vectorize)
        with monkeypatch.context() as mp:
            mp.setattr(ablation, "split_local", lambda family: False)
            generic = run(units, mode, vectorize)
        errors = {k: rel_err(fast[k], generic[k]) for k in fast if np.any(generic[k])}
        assert max(errors.values()) <= TOL, (units is None, mode, vectorize, errors)
        assert np.abs(fast["delta_nll"]).max() > 1e-3  # the units move the likelihood
    fast = run(None, "drop", False, n_samples=2)  # draws from q(z|x): decoded per draw
    with monkeypatch.context() as mp:
        mp.setattr(ablation, "split_local", lambda family: False)
        generic = run(None, "drop", False, n_samples=2)
    assert rel_err(fast["delta_nll"], generic["delta_nll"]) <= TOL


@pytest.mark.parametrize("name", list(FAST_CONFIGS))
@pytest.mark.parametrize("vectorize", [False, True])
def test_split_traversal_equals_generic_path(name, vectorize, monkeypatch):
    """The traversal's per-split path (one latent per split: the moved split decoded once per
    covariate combination, re-aggregated with its complement) equals decoding every split again
    per (latent, value); splits of several latents keep the generic path."""
    from linear_decoder_jax import traversal

    family, params = _random_drvi(**FAST_CONFIGS[name])
    one_each = all(len(u) == 1 for u in family.unit_latents())
    assert traversal.one_latent_per_split(family) == one_each
    if not one_each:
        return
    batch = _encoded_batch(family, params)
    grid = jnp.asarray(np.random.default_rng(3).normal(size=(4, 3)), jnp.float32)
    latents = jnp.asarray([5, 0, 2, 3], jnp.int32)
    step = traversal.traverse_minibatch.__wrapped__  # unjitted: the path is chosen at trace time

    def run():
        zeros = traversal.TraversalSums(
            lfc=jnp.zeros((4, 4, 3, family.n_vars)), delta_nll=jnp.zeros((4, 4, 3)),
            n_cells=jnp.zeros(4),
        )  # fmt: skip
        out = step(family, params, batch, grid, latents, zeros, n_groups=3, vectorize=vectorize)
        return {f: np.asarray(getattr(out, f)) for f in ("lfc", "delta_nll", "n_cells")}

    fast = run()
    with monkeypatch.context() as mp:
        mp.setattr(traversal, "one_latent_per_split", lambda family: False)
        generic = run()
    for key in fast:
        assert rel_err(fast[key], generic[key]) <= TOL, key
    assert np.abs(fast["delta_nll"]).max() > 1e-3  # the values move the likelihood


@pytest.mark.parametrize("name", ["lse_map_two_covs", "sum_emb_nowhere_nb", "max_diag_genebatch"])
def test_split_shapley_equals_generic_path(name, monkeypatch):
    """Shapley values with one latent per split (each coalition re-aggregates the splits' terms
    at z and at the baseline, decoded once) equal decoding every coalition: exact and
    permutation values, gains and standard errors. In float64: the values are small differences
    of per-cell log-likelihoods, which float32 rounds differently on the two paths (~1e-6 nats)."""
    import jax

    from linear_decoder_jax import attribution

    family, params = _random_drvi(**FAST_CONFIGS[name])
    assert attribution.one_latent_per_split(family)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        batch = _encoded_batch(family, params)
        batch = batch._replace(**{
            f: getattr(batch, f).astype(jnp.float64)
            for f in ("x", "nz_count", "valid", "qz_m", "qz_v", "z", "log_library")
        })  # fmt: skip
        baseline = jnp.asarray(np.random.default_rng(2).normal(size=6) * 0.3, jnp.float64)

        def run():
            exact = attribution.shapley_exact.__wrapped__(family, params, batch, baseline)
            perm = attribution.shapley_permutation.__wrapped__(
                family, params, batch, baseline, jax.random.PRNGKey(4), n_permutations=6
            )
            return [np.asarray(a) for a in (*exact, *perm)]

        fast = run()
        with monkeypatch.context() as mp:
            mp.setattr(attribution, "one_latent_per_split", lambda family: False)
            generic = run()
    for got, ref in zip(fast, generic, strict=True):
        assert got.dtype == np.float64 and rel_err(got, ref) <= 1e-10
    assert np.abs(fast[1]).max() > 1e-3  # the latents move the likelihood


@pytest.mark.parametrize("name", list(FAST_CONFIGS))
def test_split_values_without_head_bias(name):
    """``split_values(with_head_bias=False)`` plus ``head_bias`` is ``split_values`` (shared and
    per-split last layers), as the out-of-distribution effect adds it after its min and max."""
    family, params = _random_drvi(**FAST_CONFIGS[name])
    batch = _encoded_batch(family, params)
    codes = F.covariate_codes(family.config, batch.batch)
    full = F.split_values(params, batch.z, codes, config=family.config)
    bare = F.split_values(params, batch.z, codes, config=family.config, with_head_bias=False)
    bias = F.head_bias(params)
    assert bias is not None and bias.shape[-1] == family.n_vars
    np.testing.assert_array_equal(np.asarray(bare + bias[None]), np.asarray(full))


def test_power_and_one_split_keep_the_generic_path():
    """ "power" feeds every latent to every split, and one split holds every latent: replacing
    a latent there re-decodes every split (the generic path)."""
    from linear_decoder_jax import ablation

    power, _ = _random_drvi(n_split=3, split_method="power", split_dim=4)
    single, _ = _random_drvi(n_split=1)
    assert not power.splits_own_latents and not ablation.split_local(power)
    assert not ablation.split_local(single)


@pytest.mark.parametrize("aggregation", ["logsumexp", "sum", "sum_plus", "max"])
def test_leave_one_out_against_float64(aggregation):
    """Each split's complement, re-aggregated with a replaced term or none, equals the float64
    aggregation of the stacked values with that split replaced or removed; the logsumexp
    complement stays exact where one split exceeds the others by far more than float32's exp
    range (no cancellation, no underflow) and where several splits share the largest value."""
    from scipy.special import logsumexp as lse
    from scipy.special import softplus

    rng = np.random.default_rng(0)
    v = rng.normal(size=(4, 5, 7)) * 3.0
    v[0, 2, :] += 300.0  # one split far above the rest
    v[1, 3, :] = v[1, 1, :] = v[1].max(axis=0) + 1.0  # a tie for the largest value
    v = v.astype(np.float32)
    t = rng.normal(size=(4, 7)).astype(np.float32) * 3.0
    config = F.DRVIConfig(n_input=7, n_latent=5, n_split=5, split_aggregation=aggregation)
    family = F.DRVI(config)
    rest = family.leave_one_out(jnp.asarray(v))

    def brute(values):  # (b, k, G) float64, divisor 5 whatever the number of terms
        w = values.astype(np.float64)
        if aggregation == "sum":
            return w.sum(1) / 5
        if aggregation == "sum_plus":
            return softplus(w).sum(1) / 5
        if aggregation == "logsumexp":
            return lse(w, axis=1) - np.log(5)
        return w.max(1)

    for j in range(5):
        others = np.delete(v, j, axis=1)
        replaced = np.concatenate([others, t[:, None, :]], axis=1)
        got = family.aggregate_with(rest[:, j], jnp.asarray(t))
        np.testing.assert_allclose(got, brute(replaced), rtol=2e-6, atol=2e-5)
        np.testing.assert_allclose(
            family.aggregate_with(rest[:, j], None), brute(others), rtol=2e-6, atol=2e-5
        )
        np.testing.assert_allclose(
            family.aggregate_with(None, jnp.asarray(v[:, j])),
            brute(v[:, j : j + 1]),
            rtol=2e-6,
            atol=2e-5,
        )
    np.testing.assert_allclose(family.aggregate(jnp.asarray(v)), brute(v), rtol=2e-6, atol=2e-5)


def test_constant_split_values_by_covariate_combination():
    """Every cell at one decoder input: decoded per covariate combination and gathered (fewer
    combinations than cells) equals decoding every cell."""
    family, params = _random_drvi(n_split=6, n_cats_per_cov=(3, 2))
    rng = np.random.default_rng(3)
    codes = jnp.asarray(np.stack([rng.integers(0, 3, 20), rng.integers(0, 2, 20)], 1), jnp.int32)
    z_row = jnp.asarray(rng.normal(size=6), jnp.float32)
    every = family.split_values(params, jnp.broadcast_to(z_row, (20, 6)), codes)
    assert rel_err(family.constant_split_values(params, z_row, codes), every) <= TOL
    assert rel_err(family.constant_split_values(params, z_row, codes[:4]), every[:4]) <= TOL


@pytest.mark.parametrize("name", ["poisson_sumplus_split4_notfirst_bn", "max_diag_last_genebatch"])
def test_fast_sweep_on_trained_models_against_float64_brute_force(name, drvi_models, drvi_adata):
    """``ldj.ablate`` in float32 (the per-split path) on trained models, a split of two latents
    and split_diag with two covariates: each latent at baseline zero, dropped and kept, and each
    split removed, equal a float64 numpy decoder written from drvi-py's code."""
    import linear_decoder_jax as ldj

    m, folder = drvi_models(name)
    model = ldj.load(folder)
    adata = drvi_adata[:40].copy()
    x = np.asarray(adata.X, np.float64)
    codes = codes_of(m)[:40]
    lib = x.sum(1)
    z = model.get_latent_representation(adata).astype(np.float64)
    lik = model.config.gene_likelihood

    def ll(zz, **kw):
        return brute_log_prob(x, brute_decode(m, zz, codes, lib, **kw), lik).sum(-1)

    full = ll(z)
    drop = ldj.ablate(model, adata)
    keep = ldj.ablate(model, adata, mode="keep")
    splits = ldj.ablate(model, adata, unit="split")
    # float32 rounding of the NLLs themselves: the changes are small differences of them
    scale = 1e-6 * np.abs(full).max()

    def close(got, want, what):
        assert np.abs(got - want).max() <= scale, what
        assert np.abs(want).max() > 100 * scale, what  # the unit moves the likelihood

    for k in range(model.n_latent):
        zk = z.copy()
        zk[:, k] = 0.0
        close(drop.delta_nll[:, k], full - ll(zk), ("drop", k))
        only = np.zeros_like(z)
        only[:, k] = z[:, k]
        close(keep.delta_nll[:, k], full - ll(only), ("keep", k))
    for j in range(model.config.n_split):
        mask = np.ones(model.config.n_split)
        mask[j] = 0.0
        close(splits.delta_nll[:, j], full - ll(z, split_mask=mask), ("split", j))
