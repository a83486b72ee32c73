"""The model-family protocol: a second family, defined here and nowhere in the package, runs the
whole pipeline (sweep, gene scores, Shapley, refit, groups, output file) without any change to
pipeline, assemble, api, cli or results, and equals LinearSCVI's fast paths.

``GenericLinear`` is LinearSCVI's decoder written the generic way: it implements ``Family`` but
not ``AffineFamily``, so every scorer decodes through ``decode`` and ``log_prob`` (one decode per
ablated latent, per coalition, per refit step) instead of the rank-one shortcuts.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import pytest
from helpers import random_adata, random_model

import linear_decoder_jax as ldj
from linear_decoder_jax import model as ldvae
from linear_decoder_jax.cli import main
from linear_decoder_jax.config import LDVAEConfig
from linear_decoder_jax.distributions import log_prob
from linear_decoder_jax.errors import ConfigError, IncompatibleDataError
from linear_decoder_jax.families.linear_scvi import LinearSCVIFamily
from linear_decoder_jax.family import AffineFamily, Encoded, Family, Rates
from linear_decoder_jax.results import read_result
from linear_decoder_jax.schema import latent_names


@dataclasses.dataclass(frozen=True)
class GenericLinear:
    """LinearSCVI's maths as any family would give it: no loadings, no affine heads."""

    name: ClassVar[str] = "generic_linear"
    config: LDVAEConfig

    n_latent = property(lambda self: self.config.n_latent)
    n_vars = property(lambda self: self.config.n_input)
    simplex = property(lambda self: self.config.latent_distribution == "ln")
    additive = False

    def latent_names(self):
        return latent_names(self.config.n_latent)

    def unit_latents(self):
        return tuple((k,) for k in range(self.config.n_latent))

    def split_names(self):
        return self.latent_names()

    def encode(self, params, x, batch, label, *, library="model"):
        post = ldvae.inference(params, x, config=self.config)
        z = ldvae.z_transformation(post.qz_m, config=self.config)
        lib = ldvae.library(post, x, config=self.config, choice=library)
        return Encoded(post.qz_m, post.qz_v, z, lib)

    def decoder_input(self, z):
        return ldvae.z_transformation(z, config=self.config)

    def decode(self, params, z, log_library, batch, label, *, split_mask=None):
        if split_mask is not None:
            raise ConfigError("no splits")
        d = ldvae.generative(params, z, log_library, batch, label, config=self.config)
        return Rates(d.scale, d.mu, d.theta, d.zi_logits)

    def log_prob(self, x, rates):
        lik = self.config.gene_likelihood
        return log_prob(x, rates.mu, rates.theta, rates.zi_logits, likelihood=lik)

    def loadings(self, params):
        return None


def _pair(seed: int, **overrides):
    fast = random_model(seed=seed, dtype="float64", **overrides)
    generic = ldj.LinearSCVI(
        fast.host_params, fast.spec, dtype="float64", family=GenericLinear(fast.config)
    )
    return fast, generic


def test_the_protocols():
    fast, generic = _pair(0)
    assert isinstance(fast.family, LinearSCVIFamily) and isinstance(fast.family, AffineFamily)
    assert isinstance(generic.family, Family) and not isinstance(generic.family, AffineFamily)


@pytest.mark.parametrize(
    "overrides",
    [
        {"gene_likelihood": "nb", "dispersion": "gene-batch"},
        {"gene_likelihood": "zinb"},
        {"gene_likelihood": "poisson", "n_batch": 1},
        {"latent_distribution": "ln", "n_latent": 4},
    ],
    ids=lambda o: "-".join(map(str, o.values())),
)
@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_whole_pipeline_on_a_second_family(overrides, mode, tmp_path):
    """Sweep, gene scores by group, exact Shapley, traversal and (drop) refit, written to a file:
    the generic path equals the fast path to float64 rounding (refit: on objective values)."""
    fast, generic = _pair(3, **overrides)
    adata = random_adata(fast, n_obs=40, seed=4)
    base = "mean" if overrides.get("latent_distribution") == "ln" else "zero"
    kw = dict(baseline=base, mode=mode, groupby="group", gene_scores=True, shapley="exact")
    kw.update(traverse=True, traverse_steps=4)
    if mode == "drop":
        kw.update(refit=True, refit_tol=1e-7)
    a = ldj.ablate(fast, adata, **kw)
    b = ldj.ablate(generic, adata, output=tmp_path / "generic.h5ad", **kw)
    assert b.settings["family"] == "generic_linear" and a.settings["family"] == "linear_scvi"
    assert b.loadings is None and a.loadings is not None
    for name in ("nll", "delta_nll", "delta_l1", "gain_nll", "shapley_nll", "mean_lfc"):
        np.testing.assert_allclose(
            b.arrays[name], a.arrays[name], rtol=1e-7, atol=1e-8, err_msg=name
        )
    tables = ("gene_delta_nll", "gene_lfc", "gene_n_cells", "traverse_lfc", "traverse_delta_nll")
    for name in tables:
        np.testing.assert_allclose(
            np.nan_to_num(b.arrays[name]), np.nan_to_num(a.arrays[name]), rtol=1e-7, atol=1e-8
        )
    for table in ("mean", "frac_positive"):
        np.testing.assert_allclose(b.groups[table], a.groups[table], rtol=1e-7, atol=1e-8)
    if mode == "drop":  # optimiser paths differ (two ways of rounding): compare what they reach
        np.testing.assert_allclose(
            b.arrays["unique_delta_nll"], a.arrays["unique_delta_nll"], rtol=1e-4, atol=1e-5
        )


def test_merge_and_compare_refuse_to_mix_families(tmp_path):
    fast, generic = _pair(5)
    adata = random_adata(fast, n_obs=20, seed=6)
    ldj.ablate(fast, adata, shard=(0, 2), output=tmp_path / "a.h5ad")
    ldj.ablate(generic, adata, shard=(1, 2), output=tmp_path / "b.h5ad")
    from linear_decoder_jax.merge import merge_parts

    with pytest.raises(IncompatibleDataError, match="family"):
        merge_parts([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "m.h5ad")
    with pytest.raises(IncompatibleDataError, match="two model families"):
        ldj.compare(fast, generic, adata)


def test_a_result_without_loadings_uses_the_mean_effect(tmp_path):
    """Where a LinearSCVI result uses its loadings (gene panels, enrichment by "loadings"), a
    family without them uses the sweep's mean log-fold change of each gene."""
    import matplotlib

    matplotlib.use("Agg")
    fast, generic = _pair(8)
    adata = random_adata(fast, n_obs=30, seed=9)
    result = ldj.ablate(generic, adata, latents=[1, 3], output=tmp_path / "g.h5ad")
    assert result.loadings is None
    table = ldj.pl.top_genes(result, "Z_3", n_top=4)
    lfc = np.asarray(result.arrays["mean_lfc"])[:, 1]
    np.testing.assert_allclose(table["loading"], lfc[table.index])  # the effect in the panel
    assert set(table.index[:4]) == set(np.argsort(-lfc)[:4].tolist())  # largest first
    sets = {"up": [f"g{i}" for i in np.argsort(-lfc)[:6]], "rest": [f"g{i}" for i in range(10)]}
    ranked = ldj.enrichment(result, sets, min_size=2)
    assert set(ranked["latent"]) == {"Z_1", "Z_3"}


def test_splits_need_an_additive_decoder():
    fast, _ = _pair(10)
    adata = random_adata(fast, n_obs=10, seed=1)
    with pytest.raises(ConfigError, match="not additive"):
        ldj.ablate(fast, adata, unit="split")


def test_version_1_directories_load_as_linear_scvi(tmp_path):
    import json

    fast = random_model(seed=7)
    path = fast.save(tmp_path / "m")
    spec = json.loads((path / "config.json").read_text())
    assert spec["format_version"] == 2 and spec["family"] == "linear_scvi"
    del spec["family"]
    spec["format_version"] = 1
    (path / "config.json").write_text(json.dumps(spec))
    again = ldj.load(path)
    assert again.family == fast.family and again.fingerprint() == fast.fingerprint()


def test_summary_shows_the_explained_shares():
    """With Shapley values, the CLI summary's last line gives each latent's share of the mean
    gain over every cell (both paths)."""
    fast, generic = _pair(11)
    adata = random_adata(fast, n_obs=20, seed=2)
    for m in (fast, generic):
        result = ldj.ablate(m, adata, shapley="exact")
        share = np.asarray(result.shapley).sum(0) / np.asarray(result.gain).sum()
        k = int(np.argmax(share))
        last = result.summary().splitlines()[-1]
        assert last.startswith("explained (Shapley") and f"Z_{k} {share[k]:.0%}" in last


def test_auto_shapley_is_exact_up_to_twelve_latents_and_permutation_above(tmp_path):
    """``shapley="auto"`` (a bare ``--shapley``): exact for K <= 12, permutations above (DRVI's
    default 32 latents), recorded as the method used; permutation rows still sum to the gain."""
    for k, method in ((4, "exact"), (13, "permutation")):
        fast, generic = _pair(5, n_latent=k)
        adata = random_adata(fast, n_obs=12, seed=3)
        result = ldj.ablate(generic, adata, shapley="auto", n_permutations=4)
        assert result.settings["shapley"] == method
        assert ("shapley_nll_se" in result.arrays) == (method == "permutation")
        np.testing.assert_allclose(
            np.asarray(result.shapley).sum(1), np.asarray(result.gain), rtol=1e-9, atol=1e-9
        )
    fast.save(tmp_path / "m")
    adata.write_h5ad(tmp_path / "a.h5ad")
    out = tmp_path / "r.h5ad"
    cmd = ["ablate", str(tmp_path / "m"), str(tmp_path / "a.h5ad"), "-o", str(out), "--shapley"]
    assert main([*cmd, "--n-permutations", "4"]) == 0
    assert read_result(out).settings["shapley"] == "permutation"
