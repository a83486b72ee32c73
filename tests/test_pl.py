"""``ldj.pl`` on the real demo result: the plotted data, ``ax=``/``save=``/``show=``, and refusals."""

from __future__ import annotations

import functools
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import anndata
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.figure import Figure

import linear_decoder_jax as ldj
from linear_decoder_jax import pl
from linear_decoder_jax.demo import demo_files
from linear_decoder_jax.errors import ConfigError, IncompatibleDataError


@functools.cache
def demo_result():
    """Demo model, its counts (with a made-up X_umap) and the ablation grouped by cell type."""
    model = ldj.load(demo_files() / "model.pt")
    adata = anndata.read_h5ad(demo_files() / "counts.h5ad")
    adata.obsm["X_umap"] = np.random.default_rng(0).normal(size=(adata.n_obs, 2))
    return model, adata, ldj.ablate(model, adata, groupby="cell_type")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    model, adata, result = demo_result()
    path = tmp_path_factory.mktemp("pl") / "ablation.h5ad"
    result.write(path)
    return model, adata, result, anndata.read_h5ad(path)


@pytest.fixture(params=["result", "h5ad"])
def res(request, demo):
    """The same result as an AblationResult and as the AnnData read from its h5ad."""
    return demo[2] if request.param == "result" else demo[3]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _subset(result: ldj.AblationResult, latents: list[int]) -> ldj.AblationResult:
    """The result restricted to some ablated latents, as ``ablate(latents=...)`` would give."""
    settings = dict(result.settings)
    settings["latents"] = np.asarray(latents)
    settings["latent_names"] = [f"Z_{k}" for k in latents]
    arrays = dict(result.arrays)
    for key in ("delta_nll", "delta_l1", "mean_lfc"):
        arrays[key] = arrays[key][:, latents]
    return result.replace(arrays=arrays, settings=settings, groups=None)


def _bare_axes() -> plt.Axes:
    return Figure(layout="constrained").add_subplot()


def test_group_heatmap_plots_the_group_tables(res, demo):
    result = demo[2]
    ax = pl.group_heatmap(res, "cell_type")
    assert isinstance(ax, plt.Axes)
    dots = ax.collections[0]
    offsets = dots.get_offsets()
    assert offsets.shape == (3 * 6, 2)
    cols = [t.get_text() for t in ax.get_xticklabels()]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(cols) == result.latent_names and sorted(rows) == ["B", "Monocyte", "T/NK"]
    mean, frac = result.groups["mean"], result.groups["frac_positive"]
    for (x, y), colour, size in zip(offsets, dots.get_array(), dots.get_sizes(), strict=True):
        assert colour == pytest.approx(mean.loc[rows[int(y)], cols[int(x)]], rel=1e-6)
        assert size == pytest.approx(frac.loc[rows[int(y)], cols[int(x)]] * pl._MAX_DOT)
    assert ax.get_title() == "mean delta_nll per group"


def test_group_heatmap_given_order_into_given_axes(demo):
    result = demo[2]
    ax = _bare_axes()
    out = pl.group_heatmap(result, "cell_type", groups=["T/NK", "B"], latents=["Z_3", 0], ax=ax)
    assert out is ax
    assert [t.get_text() for t in ax.get_yticklabels()] == ["T/NK", "B"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Z_3", "Z_0"]
    expected = result.groups["mean"].loc[["T/NK", "B"], ["Z_3", "Z_0"]].to_numpy().ravel()
    np.testing.assert_allclose(ax.collections[0].get_array(), expected, rtol=1e-6)
    one = pl.group_heatmap(result, None, cluster=False, ax=_bare_axes())
    np.testing.assert_allclose(one.collections[0].get_array(), result.delta_nll.mean(0), rtol=1e-6)


def test_group_heatmap_refuses_unknown_groups_and_latents(res):
    with pytest.raises(IncompatibleDataError, match="groupby column 'tissue' is not in"):
        pl.group_heatmap(res, "tissue")
    with pytest.raises(
        IncompatibleDataError, match=r"Groups \['NK'\] are not in obs\['cell_type'\]"
    ):
        pl.group_heatmap(res, "cell_type", groups=["NK"])
    with pytest.raises(ConfigError, match="Unknown latent 'Z_9'; the model's latents are Z_0"):
        pl.group_heatmap(res, "cell_type", latents=["Z_9"])
    with pytest.raises(ConfigError, match=r"Expected a latent index in \[0, 6\), got 6 instead"):
        pl.group_heatmap(res, "cell_type", latents=[6])


def test_latent_genes_from_result_and_model(res, demo):
    model, _, result, _ = demo
    loadings = model.get_loadings()
    ax = pl.latent_genes(res, "Z_3", n_top=5)
    w = loadings["Z_3"]
    up = list(w.sort_values(ascending=False).index[:5])
    down = list(w.sort_values().index[:5])[::-1]
    assert [t.get_text() for t in ax.get_yticklabels()] == up + down
    widths = [p.get_width() for p in ax.patches]
    np.testing.assert_allclose(widths, w[up + down].to_numpy(), rtol=1e-5)
    table = pl.top_genes(res, 3, n_top=5)
    idx = [model.var_names.index(g) for g in up + down]
    np.testing.assert_allclose(table["mean_lfc"], result.mean_lfc[idx, 3], rtol=1e-6)
    assert len({tuple(p.get_facecolor()) for p in ax.patches}) > 1  # coloured by fold change

    mine = _bare_axes()
    from_model = pl.latent_genes(model, 3, n_top=4, ax=mine)
    assert from_model is mine and len(mine.patches) == 8
    assert "model: loadings only" in mine.get_title()
    assert pl.top_genes(model, "Z_3", 4)["mean_lfc"].isna().all()


def test_latent_genes_refusals_and_unablated_latent(demo):
    model, _, result, _ = demo
    sub = _subset(result, [3])
    ax = pl.latent_genes(sub, "Z_1", n_top=3)
    assert "not ablated: no fold change" in ax.get_title()
    with pytest.raises(ConfigError, match="Unknown latent 'Z_6'"):
        pl.latent_genes(model, "Z_6")
    with pytest.raises(ConfigError, match="got -1 instead"):
        pl.latent_genes(result, -1)
    with pytest.raises(ConfigError, match="Expected n_top >= 1, got 0 instead"):
        pl.latent_genes(result, 0, n_top=0)
    with pytest.raises(ConfigError, match="Expected a latent name such as 'Z_0'"):
        pl.latent_genes(result, 1.0)


def test_embedding_plots_every_cell_on_the_basis(res, demo):
    _, adata, result, _ = demo
    ax = pl.embedding(res, "Z_3")
    points = ax.collections[0]
    offsets = np.asarray(points.get_offsets())
    assert offsets.shape == (adata.n_obs, 2)
    order = np.lexsort(offsets.T[::-1])
    umap = adata.obsm["X_umap"]
    np.testing.assert_allclose(offsets[order], umap[np.lexsort(umap.T[::-1])])
    np.testing.assert_allclose(np.sort(points.get_array()), np.sort(result.delta_nll[:, 3]))
    assert ax.get_title() == "Z_3 delta_nll on X_umap"
    same = pl.embedding(res, 3, basis="umap", ax=_bare_axes())
    np.testing.assert_allclose(same.collections[0].get_offsets(), offsets)


def test_embedding_falls_back_to_pca_and_takes_data(demo):
    _, adata, result, h5ad = demo
    bare = h5ad.copy()
    del bare.obsm["X_umap"]
    with pytest.raises(IncompatibleDataError, match=r"basis one of .*none\), got 'X_pca'"):
        pl.embedding(bare, "Z_3", basis="X_pca")  # a named basis is never replaced silently
    ax = pl.embedding(bare, "Z_0", ax=_bare_axes())  # basis=None: PCA, said in the title
    assert "no X_umap: PCA of the latent space" in ax.get_title()
    z = result.latent.astype(np.float64)
    u, s, _ = np.linalg.svd(z - z.mean(0), full_matrices=False)
    offsets = np.asarray(ax.collections[0].get_offsets())
    pcs = (u[:, :2] * s[:2])[np.argsort(np.abs(result.delta_nll[:, 0]), kind="stable")]
    np.testing.assert_allclose(offsets, pcs, atol=1e-9)
    completed = pl.view(bare, data=adata)
    ax = pl.embedding(completed, "Z_0", ax=_bare_axes())
    assert ax.get_title() == "Z_0 delta_nll on X_umap"


def test_embedding_refuses_a_latent_that_was_not_ablated(demo):
    sub = _subset(demo[2], [3, 0])
    ax = pl.embedding(sub, 0)  # index into the model's latents, not into the columns
    np.testing.assert_allclose(np.sort(ax.collections[0].get_array()), np.sort(sub.delta_nll[:, 1]))
    with pytest.raises(
        ConfigError, match=r"Latent Z_2 was not ablated in this result \(ablated: Z_3, Z_0\)"
    ):
        pl.embedding(sub, "Z_2")


def test_delta_distribution_violins_and_boxes(res, demo):
    _, adata, result, _ = demo
    ax = pl.delta_distribution(res, "Z_3", "cell_type")
    bodies = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bodies) == 3
    groups = [t.get_text() for t in ax.get_xticklabels()]
    assert groups == ["B", "Monocyte", "T/NK"]
    cell_type = adata.obs["cell_type"].to_numpy()
    for body, group in zip(bodies, groups, strict=True):
        values = result.delta_nll[cell_type == group, 3]
        ys = body.get_paths()[0].vertices[:, 1]
        assert ys.min() == pytest.approx(values.min(), rel=1e-5, abs=1e-5)
        assert ys.max() == pytest.approx(values.max(), rel=1e-5, abs=1e-5)
    strip = [c for c in ax.collections if type(c) is PathCollection][-1]
    assert len(strip.get_offsets()) == adata.n_obs
    np.testing.assert_allclose(np.sort(strip.get_offsets()[:, 1]), np.sort(result.delta_nll[:, 3]))

    box = pl.delta_distribution(
        res, 3, "cell_type", kind="box", groups=["T/NK", "B"], ax=_bare_axes()
    )
    assert len(box.patches) == 2
    assert [t.get_text() for t in box.get_xticklabels()] == ["T/NK", "B"]
    strip = box.collections[-1]
    assert len(strip.get_offsets()) == int(np.isin(cell_type, ["T/NK", "B"]).sum())


def test_delta_distribution_refusals(res):
    with pytest.raises(IncompatibleDataError, match=r"Groups \['NK'\] are not in"):
        pl.delta_distribution(res, "Z_3", "cell_type", groups=["NK"])
    with pytest.raises(IncompatibleDataError, match="groupby column 'nope'"):
        pl.delta_distribution(res, "Z_3", "nope")
    with pytest.raises(ConfigError, match="Expected kind 'violin' or 'box', got 'bar' instead"):
        pl.delta_distribution(res, "Z_3", "cell_type", kind="bar")
    with pytest.raises(ConfigError, match="Unknown latent 'Z3'"):
        pl.delta_distribution(res, "Z3", "cell_type")


def test_save_and_show(demo, tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(1))
    result = demo[2]
    path = tmp_path / "violin.png"
    ax = pl.delta_distribution(result, "Z_3", None, save=path)
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 1
    assert matplotlib.image.imread(path).ndim == 3
    assert shown == []
    pl.group_heatmap(result, "cell_type", show=True)
    assert shown == [1]


def test_inputs_that_are_not_results(demo):
    _, adata, result, h5ad = demo
    with pytest.raises(IncompatibleDataError, match=r"without uns\['ablation'\]"):
        pl.embedding(adata, "Z_0")
    other = adata[:5].copy()
    other.obs_names = [f"x{i}" for i in range(5)]
    with pytest.raises(IncompatibleDataError, match="80 cells of the result are not in the data"):
        pl.view(h5ad, data=other)


def test_pl_is_imported_lazily():
    code = (
        "import sys, linear_decoder_jax as ldj\n"
        "assert 'matplotlib' not in sys.modules\n"
        "assert callable(ldj.pl.group_heatmap)\n"
        "assert 'matplotlib' in sys.modules and 'jax' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_reader_for_files_anndata_and_results(demo, tmp_path):
    """``results.read_result`` reads a result h5ad, the AnnData read from it and the
    AblationResult alike; ``pl.view`` (and so ``ldj report``) goes through it."""
    from linear_decoder_jax import results

    _, adata, result, h5ad = demo
    path = tmp_path / "ablation.h5ad"
    result.write(path)
    assert results.read_result(result) is result
    for got in (
        results.read_result(path),
        results.read_result(h5ad),
        ldj.AblationResult.read(path),
    ):
        assert sorted(got.arrays) == sorted(result.arrays)
        for name, value in result.arrays.items():
            np.testing.assert_array_equal(np.asarray(got.arrays[name]), np.asarray(value), name)
        np.testing.assert_array_equal(got.loadings, result.loadings)
        assert got.var_names == list(result.var_names) and got.latent_names == result.latent_names
        assert list(got.obs.columns) == list(result.obs.columns)
        assert list(got.obs.index) == list(result.obs.index)
        assert sorted(got.embeddings) == sorted(result.embeddings) == ["X_umap"]
        assert sorted(got.groups) == sorted(result.groups)
    np.testing.assert_array_equal(pl.view(path).delta_nll, pl.view(result).delta_nll)
    with pytest.raises(IncompatibleDataError, match=r"got AnnData without uns\['ablation'\]"):
        results.read_result(adata)
    text = tmp_path / "page.h5ad"
    text.write_text("not hdf5")
    with pytest.raises(IncompatibleDataError, match="page.h5ad is not a readable h5ad file"):
        results.read_result(text)
    with pytest.raises(IncompatibleDataError, match=r"lacks the result fields \['latent'\]"):
        bare = h5ad.copy()
        del bare.obsm["latent"]
        results.read_result(bare)


@functools.cache
def traversal_result():
    """The demo traversed over two latents, per cell type."""
    model, adata, _ = demo_result()
    kw = dict(groupby="cell_type", latents=[2, 0], traverse=True, traverse_steps=5)
    return ldj.ablate(model, adata, **kw)


def test_traversal_plots_the_top_genes_and_the_nll(tmp_path):
    result = traversal_result()
    grid = result.settings["traverse_values"][0]
    lfc = result.arrays["traverse_lfc"][-1, 0]  # all cells, Z_2: (steps, genes)
    axes = pl.traversal(result, "Z_2", n_top=4)
    top = np.argsort(-np.abs(lfc).max(0))[:4]
    assert [line.get_label() for line in axes[0].lines[:4]] == [result.var_names[i] for i in top]
    for line, i in zip(axes[0].lines, top, strict=False):
        np.testing.assert_allclose(line.get_xdata(), grid)
        np.testing.assert_allclose(line.get_ydata(), lfc[:, i], rtol=1e-6)
    np.testing.assert_allclose(
        axes[1].lines[0].get_ydata(), result.arrays["traverse_delta_nll"][-1, 0], rtol=1e-6
    )
    # a group's own means, chosen genes, from the h5ad, into given Axes, saved
    path = tmp_path / "t.h5ad"
    result.write(path)
    group = result.settings["gene_groups"][1]
    genes = [result.var_names[3], result.var_names[0]]
    given = [_bare_axes(), _bare_axes()]
    out = pl.traversal(str(path), 0, group=group, genes=genes, ax=given, save=tmp_path / "t.png")
    assert out == given and (tmp_path / "t.png").is_file()
    r = result.settings["gene_groups"].index(group)
    np.testing.assert_allclose(
        out[0].lines[0].get_ydata(), result.arrays["traverse_lfc"][r, 1][:, 3], rtol=1e-6
    )
    cells = result.obs["cell_type"].astype(str) == group
    centre = float(np.mean(result.latent[cells.to_numpy(), 0]))
    assert any(np.allclose(line.get_xdata(), centre) for line in out[1].lines[1:])


def test_traversal_refusals(res):
    result = traversal_result()
    with pytest.raises(IncompatibleDataError, match="traverse=True"):
        pl.traversal(res, "Z_0")
    with pytest.raises(ConfigError, match="was not ablated"):
        pl.traversal(result, "Z_1")
    with pytest.raises(ConfigError, match="Unknown group"):
        pl.traversal(result, "Z_0", group="nope")
    with pytest.raises(ConfigError, match="not in the result's genes"):
        pl.traversal(result, "Z_0", genes=["nope"])
    with pytest.raises(ConfigError, match="two Axes"):
        pl.traversal(result, "Z_0", ax=[_bare_axes()])
