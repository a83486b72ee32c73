"""The latent traversal (``ablate(traverse=True)``) against a float64 numpy brute force on
LinearSCVI (rank-one path), streamed in minibatches, sharded and merged, and its refusals. DRVI's
traversal is checked in tests/test_drvi.py (its models are trained there); the generic path
against the rank-one one in tests/test_family.py."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_adata, random_model
from scipy.special import gammaln

import linear_decoder_jax as ldj
from linear_decoder_jax import merge, options, traversal
from linear_decoder_jax.errors import ConfigError


def _log_prob(x: np.ndarray, mu: np.ndarray, theta: np.ndarray, likelihood: str) -> np.ndarray:
    """Per-gene log-likelihood in float64 numpy (NB as scvi-tools writes it, or Poisson)."""
    if likelihood == "poisson":
        return x * np.log(mu) - mu - gammaln(x + 1.0)
    return (
        gammaln(x + theta)
        - gammaln(theta)
        - gammaln(x + 1.0)
        + theta * (np.log(theta) - np.log(theta + mu))
        + x * (np.log(mu) - np.log(theta + mu))
    )


def brute_traversal(model, adata, z, grid: np.ndarray, latents, groups: np.ndarray):
    """(lfc (rows, A, S, G), delta_nll (rows, A, S)) by decoding every cell (decoder input ``z``)
    at every grid value with the model's whole decoder, in float64, then averaging over each
    group's cells. The observed library (the runs below take ``library="observed"``)."""
    data = model.prepare(adata)
    x = np.asarray(data.rows(0, data.n_obs), np.float64)
    lib = np.log(x.sum(1))
    lik = model.config.gene_likelihood

    def decode(zz):
        d = model.decode(zz, batch_index=data.batch, label_index=data.label, library=lib)
        scale = np.asarray(d.scale, np.float64)
        mu = np.exp(lib)[:, None] * scale
        return np.log(scale), -_log_prob(x, mu, np.asarray(d.theta, np.float64), lik).sum(1)

    log_scale, nll = decode(z)
    names = sorted(set(groups))
    members = [groups == g for g in names] + [np.ones(len(groups), bool)]
    lfc = np.zeros((len(members), len(latents), grid.shape[1], x.shape[1]))
    delta = np.zeros((len(members), len(latents), grid.shape[1]))
    for a, k in enumerate(latents):
        for s, value in enumerate(grid[a]):
            zz = z.copy()
            zz[:, k] = value
            ls, nll_k = decode(zz)
            for r, m in enumerate(members):
                lfc[r, a, s] = (ls - log_scale)[m].mean(0)
                delta[r, a, s] = (nll_k - nll)[m].mean()
    return lfc, delta


@pytest.mark.parametrize("likelihood", ["nb", "poisson"])
def test_traversal_equals_a_float64_brute_force(likelihood):
    model = random_model(seed=2, dtype="float64", gene_likelihood=likelihood, n_latent=4)
    adata = random_adata(model, n_obs=45, seed=3)
    latents = [2, 0]
    result = ldj.ablate(
        model, adata, latents=latents, traverse=True, groupby="group", library="observed"
    )
    grid = np.asarray(result.settings["traverse_values"])
    assert grid.shape == (2, options.TraversalOptions.traverse_steps)
    z = np.asarray(result.latent, np.float64)  # the run's encoding (tested elsewhere)
    lfc, delta = brute_traversal(model, adata, z, grid, latents, adata.obs["group"].to_numpy())
    # the default grid: evenly spaced from each latent's 1st to 99th percentile
    tail = options.TRAVERSE_TAIL
    lo, hi = np.quantile(z[:, latents], [tail, 1 - tail], axis=0)
    np.testing.assert_allclose(grid, np.linspace(lo, hi, grid.shape[1], axis=1), rtol=1e-12)
    np.testing.assert_allclose(result.arrays["traverse_lfc"], lfc, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(result.arrays["traverse_delta_nll"], delta, rtol=1e-9, atol=1e-9)
    assert result.settings["gene_groups"] == ["A", "B", "C", "all cells"]
    assert result.settings["traverse"] is True and result.settings["traverse_grid"] == "range"
    # the NLL change is 0 at the cell's own value: a one-cell run's grid through its own z
    one = adata[:1].copy()
    own = float(z[0, 1])
    r1 = ldj.ablate(model, one, latents=[1], traverse=True, traverse_grid=[own - 1.0, own])
    assert abs(r1.arrays["traverse_delta_nll"][-1, 0, 1]) < 1e-9
    assert r1.arrays["traverse_delta_nll"][-1, 0, 0] != 0.0


def test_quantile_and_given_grids_streaming_and_shards(tmp_path):
    """Minibatches of 7 cells equal one pass; the quantile grid is the latent's quantiles;
    given values (one list, or one row per latent); two shards merged equal the whole run."""
    model = random_model(seed=4, dtype="float64", n_latent=3)
    adata = random_adata(model, n_obs=40, seed=5)
    whole = ldj.ablate(model, adata, traverse=True, traverse_grid="quantile", traverse_steps=5)
    small = ldj.ablate(
        model, adata, traverse=True, traverse_grid="quantile", traverse_steps=5, batch_size=7
    )
    for name in ("traverse_lfc", "traverse_delta_nll"):
        np.testing.assert_allclose(small.arrays[name], whole.arrays[name], rtol=1e-10, atol=1e-12)
    z = np.asarray(whole.latent, np.float64)
    tail = options.TRAVERSE_TAIL
    probs = np.linspace(tail, 1 - tail, 5)
    np.testing.assert_allclose(
        whole.settings["traverse_values"], np.quantile(z, probs, axis=0).T, rtol=1e-12
    )
    rows = np.array([[-1.0, 0.0, 2.0], [0.5, 0.6, 0.7]])
    given = ldj.ablate(
        model, adata, latents=[1, 2], traverse=True, traverse_grid=rows, library="observed"
    )
    assert given.settings["traverse_grid"] == "values"
    np.testing.assert_array_equal(given.settings["traverse_values"], rows)
    lfc, delta = brute_traversal(model, adata, z, rows, [1, 2], np.zeros(40, int))
    np.testing.assert_allclose(given.arrays["traverse_lfc"][-1], lfc[-1], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(given.arrays["traverse_delta_nll"][-1], delta[-1], atol=1e-8)
    same = ldj.ablate(model, adata, traverse=True, traverse_grid=[-1.0, 1.0])
    assert same.settings["traverse_values"].shape == (3, 2)

    kw = dict(traverse=True, groupby="group", gene_scores=True)
    ref = ldj.ablate(model, adata, **kw)
    parts = [tmp_path / f"p{i}.h5ad" for i in range(2)]
    for i, p in enumerate(parts):
        ldj.ablate(model, adata, shard=(i, 2), output=p, **kw)
    merged = merge.merge_parts(parts, tmp_path / "merged.h5ad")
    for name in ("traverse_lfc", "traverse_delta_nll", "gene_n_cells", "gene_lfc"):
        np.testing.assert_allclose(merged.arrays[name], ref.arrays[name], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(
        merged.settings["traverse_values"], ref.settings["traverse_values"]
    )


def test_refusals_and_cli(tmp_path):
    model = random_model(seed=0, n_latent=3)
    adata = random_adata(model, n_obs=12, seed=1)
    with pytest.raises(ConfigError, match="traverse_steps >= 2"):
        ldj.ablate(model, adata, traverse=True, traverse_steps=1)
    with pytest.raises(ConfigError, match="traverse_grid one of"):
        ldj.ablate(model, adata, traverse=True, traverse_grid="wide")
    with pytest.raises(ConfigError, match="one per traversed latent"):
        ldj.ablate(model, adata, traverse=True, traverse_grid=np.zeros((2, 4)))
    with pytest.raises(ConfigError, match="finite"):
        ldj.ablate(model, adata, traverse=True, traverse_grid=[0.0, np.nan])
    with pytest.raises(ConfigError, match="posterior mean"):
        ldj.ablate(model, adata, traverse=True, n_samples=2)
    with pytest.raises(ConfigError, match="budget"):
        traversal.check_budget(200, 32, 400, 30000)
    plain = ldj.ablate(model, adata)
    assert plain.settings["traverse"] is False and plain.arrays.get("traverse_lfc") is None
    assert options.parse_grid("0,1.5") == [0.0, 1.5]
    np.save(tmp_path / "grid.npy", np.ones((3, 2)))
    assert options.parse_grid(str(tmp_path / "grid.npy")).shape == (3, 2)


def test_cli_flag_writes_the_traversal(tmp_path, capsys):
    from linear_decoder_jax.cli import main

    model = random_model(seed=0, n_latent=3)
    folder = tmp_path / "model"
    model.save(folder)
    adata = random_adata(model, n_obs=20, seed=1)
    adata.write_h5ad(tmp_path / "d.h5ad")
    out = tmp_path / "r.h5ad"
    argv = ["ablate", str(folder), str(tmp_path / "d.h5ad"), "-o", str(out), "--traverse"]
    # a grid starting with a minus sign needs "=" (argparse would take it for a flag)
    assert main([*argv, "--traverse-grid=-1,0,1", "--groupby", "group"]) == 0
    result = ldj.AblationResult.read(out)
    assert result.arrays["traverse_lfc"].shape == (4, 3, 3, 30)
    np.testing.assert_array_equal(result.settings["traverse_values"], [[-1, 0, 1]] * 3)
    capsys.readouterr()
    assert main([*argv, "--traverse-steps", "1", "--overwrite"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "traverse_steps >= 2" in err[0], err
