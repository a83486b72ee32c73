"""``ldj.pl``: scanpy-style figures of an ablation result (matplotlib only).

Every function takes an :class:`~linear_decoder_jax.results.AblationResult` (from ``ldj.ablate``),
an AnnData read from a result h5ad, or a :class:`ResultView` from :func:`view`. Latents are named
(``"Z_3"``) or given as an index into the model's latents (``3``).

Conventions follow scanpy: ``ax=`` draws into an existing Axes, ``save=`` writes the figure to that
path, ``show=True`` calls ``plt.show()``; the Axes is returned in every case. Without ``ax`` a
pyplot figure is created (so notebooks display it); nothing is shown unless ``show=True``. Colour
maps follow the data: a sequential map for values of one sign, a diverging map centred on 0
(``RdBu_r``) for values of both signs.

Examples
--------
>>> import linear_decoder_jax as ldj                              # doctest: +SKIP
>>> result = ldj.ablate(model, adata, groupby="cell_type")        # doctest: +SKIP
>>> ldj.pl.group_heatmap(result, "cell_type")                     # doctest: +SKIP
>>> ldj.pl.latent_genes(result, "Z_3", n_top=15)                  # doctest: +SKIP
>>> ldj.pl.embedding(result, "Z_3", basis="X_umap")               # doctest: +SKIP
>>> ldj.pl.delta_distribution(result, 3, "cell_type", save="z3.png")  # doctest: +SKIP
>>> ldj.pl.traversal(result, "Z_3", n_top=6)  # ablate(..., traverse=True)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.lines import Line2D

from linear_decoder_jax import results, schema
from linear_decoder_jax.errors import ConfigError, IncompatibleDataError

Latent = str | int
ALL_CELLS = schema.ALL_CELLS
DIVERGING = "RdBu_r"
MINOR_SIDE = 0.1  # both signs get a diverging map once the smaller side reaches this fraction
SAVE_DPI = 150
# obsm entries of a result h5ad that are scores, not embeddings
_MAX_DOT = 260.0  # marker area (points^2) of a dot for a fraction of 1 in group_heatmap


class ResultView(NamedTuple):
    """What the figures read from a result, whatever it came from (numpy and pandas only)."""

    delta_nll: np.ndarray  # (n_obs, A)
    latent: np.ndarray  # (n_obs, K) decoder input at the posterior mean
    obs: pd.DataFrame  # indexed by obs_names, the input's obs columns
    embeddings: dict[str, np.ndarray]  # obsm key -> (n_obs, 2)
    mean_lfc: np.ndarray  # (n_vars, A)
    loadings: np.ndarray  # (n_vars, K) effective loadings, BatchNorm folded in
    var_names: list[str]
    latents: np.ndarray  # (A,) model indices of the ablated latents
    latent_names: list[str]  # (A,)
    settings: dict[str, Any]
    gene_delta_nll: np.ndarray | None = None  # (groups + 1, A, n_vars), gene_scores=True
    gene_lfc: np.ndarray | None = None  # (groups + 1, A, n_vars)
    gain: np.ndarray | None = None  # (n_obs,), shapley set
    shapley: np.ndarray | None = None  # (n_obs, K)
    traverse_lfc: np.ndarray | None = None  # (groups + 1, A, steps, n_vars), traverse=True
    traverse_delta_nll: np.ndarray | None = None  # (groups + 1, A, steps)

    @property
    def n_latent(self) -> int:
        return self.loadings.shape[1]

    @property
    def gene_groups(self) -> list[str]:
        """Row names of the gene tables: the groups, then ``all cells``."""
        return [str(g) for g in self.settings.get("gene_groups", [])]


class _Genes(NamedTuple):
    """Decoder side of a model or a result: what :func:`latent_genes` needs."""

    loadings: np.ndarray  # (n_vars, K)
    mean_lfc: np.ndarray | None  # (n_vars, A); None for a model
    var_names: list[str]
    latents: np.ndarray  # (A,)
    latent_names: list[str]  # (A,)
    gene_delta_nll: np.ndarray | None = None  # (groups + 1, A, n_vars)
    gene_lfc: np.ndarray | None = None
    gene_groups: list[str] | None = None


# -- inputs --------------------------------------------------------------------------------------
def view(result: Any, *, data: Any = None) -> ResultView:
    """Read an ablation result into a :class:`ResultView`, optionally completed from the input.

    Parameters
    ----------
    result
        An ``AblationResult``, the path of a result h5ad, an AnnData read from one, or a
        ``ResultView`` (``results.read_result`` reads the others).
    data
        The AnnData that was ablated. Its obs columns and 2-D embeddings (``obsm`` entries with two
        columns) that the result lacks are added, matched by obs_names.

    Returns
    -------
    ResultView
        ResultView with ``delta_nll`` (n_obs, n_ablated), ``latent`` (n_obs, n_latent), ``mean_lfc``
        (n_vars, n_ablated) and ``loadings`` (n_vars, n_latent).
    """
    if isinstance(result, ResultView):
        out = result
    else:
        res = results.read_result(result)
        out = ResultView(
            delta_nll=np.asarray(res.delta_nll),
            latent=np.asarray(res.latent),
            obs=res.obs,
            embeddings=dict(res.embeddings),
            mean_lfc=np.asarray(res.mean_lfc),
            loadings=results.gene_effects(
                res.loadings,
                np.asarray(res.mean_lfc),
                np.asarray(res.settings["latents"]),
                len(res.settings.get("all_latent_names", res.latent_names)),
            ),
            var_names=[str(v) for v in res.var_names],
            latents=np.asarray(res.settings["latents"], dtype=np.int64),
            latent_names=[str(n) for n in res.latent_names],
            settings=dict(res.settings),
            gene_delta_nll=_maybe(res.gene_delta_nll),
            gene_lfc=_maybe(res.gene_lfc),
            gain=_maybe(res.gain_nll),
            shapley=_maybe(res.shapley_nll),
            traverse_lfc=_maybe(res.traverse_lfc),
            traverse_delta_nll=_maybe(res.traverse_delta_nll),
        )
    return out if data is None else _attach(out, data)


def _maybe(value: Any) -> np.ndarray | None:
    return None if value is None else np.asarray(value)


def _is_embedding(value: Any, n_obs: int) -> bool:
    return isinstance(value, np.ndarray) and value.ndim == 2 and value.shape == (n_obs, 2)


def _attach(v: ResultView, data: Any) -> ResultView:
    """Add the obs columns and 2-D embeddings of ``data`` (the ablated input) that ``v`` lacks."""
    names = v.obs.index
    position = pd.Index(data.obs_names).get_indexer(names)
    if (position < 0).any():
        missing = [str(n) for n in names[position < 0][:3]]
        msg = (
            f"{int((position < 0).sum())} cells of the result are not in the data (e.g. "
            f"{', '.join(missing)}); pass the AnnData that was ablated."
        )
        raise IncompatibleDataError(msg)
    obs = v.obs.copy()
    extra = data.obs.iloc[position]
    for column in extra.columns:
        if column not in obs.columns:
            obs[column] = extra[column].to_numpy()
    embeddings = dict(v.embeddings)
    for key, value in data.obsm.items():
        if key not in embeddings and _is_embedding(value, data.n_obs):
            embeddings[key] = np.asarray(value)[position]
    return v._replace(obs=obs, embeddings=embeddings)


def _genes(obj: Any) -> _Genes:
    if hasattr(obj, "get_affine_decoder"):  # a LinearSCVI model: loadings, no ablation
        loadings = np.asarray(obj.get_affine_decoder().scale.loadings)
        return _Genes(loadings, None, list(obj.var_names), np.zeros(0, np.int64), [])
    v = view(obj)
    return _Genes(
        v.loadings,
        v.mean_lfc,
        v.var_names,
        v.latents,
        v.latent_names,
        v.gene_delta_nll,
        v.gene_lfc,
        v.gene_groups,
    )


def _resolve(latent: Latent, *, n_latent: int, latents: np.ndarray, names: list[str]):
    """Model index ``k`` of ``latent`` and its result column (None when it was not ablated)."""
    if isinstance(latent, str):
        if latent in names:
            j = names.index(latent)
            return int(latents[j]), j
        every = schema.latent_names(n_latent)
        if latent not in every:
            shown = ", ".join(every[:6]) + (" ..." if n_latent > 6 else "")
            msg = f"Unknown latent {latent!r}; the model's latents are {shown}."
            raise ConfigError(msg)
        k = every.index(latent)
    elif isinstance(latent, int | np.integer) and not isinstance(latent, bool):
        k = int(latent)
        if not 0 <= k < n_latent:
            msg = f"Expected a latent index in [0, {n_latent}), got {k} instead."
            raise ConfigError(msg)
    else:
        msg = f"Expected a latent name such as 'Z_0' or an integer index, got {latent!r} instead."
        raise ConfigError(msg)
    hits = np.flatnonzero(latents == k)
    return k, (int(hits[0]) if len(hits) else None)


def _column(v: ResultView, latent: Latent) -> int:
    """Result column of an ablated ``latent``; a latent that was not ablated is an error."""
    k, j = _resolve(latent, n_latent=v.n_latent, latents=v.latents, names=v.latent_names)
    if j is None:
        msg = (
            f"Latent Z_{k} was not ablated in this result (ablated: "
            f"{', '.join(v.latent_names)}); re-run ablate with it in `latents`."
        )
        raise ConfigError(msg)
    return j


def _group_values(v: ResultView, groupby: str | None) -> pd.Series:
    """``obs[groupby]`` as a categorical Series without unused categories (None: one group)."""
    if groupby is None:
        return pd.Series(pd.Categorical([ALL_CELLS] * len(v.obs)), index=v.obs.index)
    if groupby not in v.obs.columns:
        msg = (
            f"groupby column {groupby!r} is not in the result's obs (columns: "
            f"{', '.join(map(str, v.obs.columns))}); pass data= (CLI: --data INPUT.h5ad) to take "
            f"obs columns from the ablated input."
        )
        raise IncompatibleDataError(msg)
    values = v.obs[groupby].astype("category").cat.remove_unused_categories()
    return values.cat.rename_categories([str(c) for c in values.cat.categories])


def _pick_groups(values: pd.Series, groups: Sequence[str] | None, groupby: str | None) -> list[str]:
    present = list(values.cat.categories)
    if groups is None:
        return present
    unknown = [g for g in groups if str(g) not in present]
    if unknown:
        msg = (
            f"Groups {unknown} are not in obs[{groupby!r}]; its groups are "
            f"{', '.join(present[:10])}{' ...' if len(present) > 10 else ''}."
        )
        raise IncompatibleDataError(msg)
    return [str(g) for g in groups]


def group_tables(v: ResultView, groupby: str | None) -> dict[str, pd.DataFrame]:
    """Per-group ``mean``, ``median``, ``frac_positive`` (groups x ablated latents), ``n_cells``.

    The same numbers as ``uns["ablation_groups"]``; ``groupby=None`` gives one group of all cells.
    """
    return results.group_tables(v.delta_nll, _group_values(v, groupby), v.latent_names)


# -- drawing helpers ---------------------------------------------------------------------------
def _axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.figure(figsize=figsize, layout="constrained").add_subplot()


def _finish(ax: Axes, *, show: bool, save: str | os.PathLike | None) -> Axes:
    if save is not None:
        Path(save).expanduser().parent.mkdir(parents=True, exist_ok=True)
        ax.figure.savefig(save, dpi=SAVE_DPI, bbox_inches="tight")  # type: ignore[union-attr]
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return ax


class _Colours(NamedTuple):
    cmap: str
    norm: Normalize
    extend: Literal["neither", "min", "max", "both"]  # colorbar arrows for clipped values


def _colour_scale(
    values: np.ndarray,
    *,
    sequential: str,
    cmap: str | None,
    robust: bool = False,
    centred: bool = False,
) -> _Colours:
    """Colour map and limits chosen for diverging or sequential data.

    Values of both signs, the smaller side reaching at least ``MINOR_SIDE`` of the larger (or
    ``centred=True``, for data such as log fold changes): ``RdBu_r`` centred on 0 with symmetric
    limits. Otherwise ``sequential`` from 0 up (``Blues_r`` up to 0 for negative data); the few
    values on the other side of 0 are clipped to the end colour. ``robust`` takes the limits at
    the 1st and 99th percentiles, so that a few extreme cells do not wash out the rest.
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        finite = np.zeros(1)
    lo, hi = np.percentile(finite, [1, 99]) if robust else (finite.min(), finite.max())
    neg, pos = max(-float(lo), 0.0), max(float(hi), 0.0)
    if centred or min(neg, pos) >= MINOR_SIDE * max(neg, pos) > 0:
        m = max(neg, pos, 1e-12)
        name, norm = cmap or DIVERGING, Normalize(-m, m)
    elif pos >= neg:
        name, norm = cmap or sequential, Normalize(0.0, max(pos, 1e-12))
    else:
        name, norm = cmap or "Blues_r", Normalize(-neg, 0.0)
    below, above = finite.min() < norm.vmin, finite.max() > norm.vmax
    extend: dict[tuple[int, int], Literal["neither", "min", "max", "both"]] = {
        (0, 0): "neither",
        (1, 0): "min",
        (0, 1): "max",
        (1, 1): "both",
    }
    return _Colours(name, norm, extend[int(below), int(above)])


def _label_ticks(ax: Axes, axis: Literal["x", "y"], labels: list[str]) -> None:
    ticks = np.arange(len(labels))
    if axis == "x":
        crowded = len(labels) * max(map(len, labels), default=0) > 40
        ax.set_xticks(ticks, labels, rotation=90 if crowded else 0)
    else:
        ax.set_yticks(ticks, labels)


def _leaf_order(matrix: np.ndarray) -> np.ndarray:
    """Rows in hierarchical-clustering leaf order (average linkage, euclidean)."""
    if len(matrix) < 3:
        return np.arange(len(matrix))
    from scipy.cluster import hierarchy

    tree = hierarchy.linkage(matrix, method="average", optimal_ordering=True)
    return hierarchy.leaves_list(tree)


# -- figures -----------------------------------------------------------------------------------
def group_heatmap(
    result: Any,
    groupby: str | None,
    *,
    groups: Sequence[str] | None = None,
    latents: Sequence[Latent] | None = None,
    cluster: bool = True,
    cmap: str | None = None,
    ax: Axes | None = None,
    show: bool = False,
    save: str | os.PathLike | None = None,
) -> Axes:
    """Dot plot of groups x latents: mean delta_nll as colour, fraction of cells with delta > 0 as size.

    Parameters
    ----------
    result
        An ``AblationResult``, a result AnnData or a :class:`ResultView`.
    groupby
        obs column defining the groups; None treats all cells as one group.
    groups, latents
        Rows and columns to show, in this order (default: all).
    cluster
        Order the rows and columns not given explicitly by hierarchical clustering of the means.
    cmap
        Colour map (default ``Reds`` for non-negative means, ``RdBu_r`` centred on 0 otherwise).
    ax, show, save
        Axes to draw into; call ``plt.show()``; write the figure to this path.

    Returns
    -------
    matplotlib.axes.Axes
        The Axes. Its first collection holds one dot per (group, latent): offsets (latent column,
        group row), colour array the means in row-major order, sizes proportional to the fractions.
    """
    v = view(result)
    tables = group_tables(v, groupby)
    rows = _pick_groups(_group_values(v, groupby), groups, groupby)
    if latents is None:
        cols = list(v.latent_names)
    else:
        cols = [v.latent_names[_column(v, latent)] for latent in latents]
    mean = tables["mean"].loc[rows, cols]
    frac = tables["frac_positive"].loc[rows, cols]
    if cluster and groups is None:
        rows = [rows[i] for i in _leaf_order(mean.to_numpy())]
    if cluster and latents is None:
        cols = [cols[i] for i in _leaf_order(mean.to_numpy().T)]
    mean, frac = mean.loc[rows, cols].to_numpy(), frac.loc[rows, cols].to_numpy()

    ax = _axes(ax, (2.8 + 0.42 * len(cols), max(3.2, 1.4 + 0.42 * len(rows))))
    yy, xx = np.meshgrid(np.arange(len(rows)), np.arange(len(cols)), indexing="ij")
    colours = _colour_scale(mean, sequential="Reds", cmap=cmap)
    dots = ax.scatter(
        xx.ravel(),
        yy.ravel(),
        s=frac.ravel() * _MAX_DOT,
        c=mean.ravel(),
        cmap=colours.cmap,
        norm=colours.norm,
        edgecolors="0.3",
        linewidths=0.4,
    )
    _label_ticks(ax, "x", cols)
    _label_ticks(ax, "y", rows)
    ax.set_xlim(-0.6, len(cols) - 0.4)
    ax.set_ylim(len(rows) - 0.4, -0.6)
    ax.set_xlabel("ablated latent")
    ax.set_ylabel(groupby or "")
    ax.set_title("mean delta_nll per group")
    bar = ax.figure.colorbar(
        dots, ax=ax, shrink=0.5, anchor=(0.0, 1.0), pad=0.03, extend=colours.extend
    )
    bar.ax.set_title("mean delta_nll\n(nats/cell)", fontsize="small", loc="left")
    handles = [
        Line2D([], [], ls="", marker="o", mfc="0.6", mec="0.3", ms=np.sqrt(f * _MAX_DOT))
        for f in (0.25, 0.5, 0.75, 1.0)
    ]
    bar.ax.legend(
        handles,
        ["25%", "50%", "75%", "100%"],
        title="cells with\ndelta > 0",
        loc="upper left",
        bbox_to_anchor=(0.0, -0.06),
        frameon=False,
        labelspacing=1.0,
    )
    return _finish(ax, show=show, save=save)


def _top_gene_table(
    src: _Genes, latent: Latent, n_top: int
) -> tuple[int, int | None, pd.DataFrame]:
    """Model index, result column (None: no fold changes) and the top-gene table of ``latent``."""
    if not isinstance(n_top, int | np.integer) or isinstance(n_top, bool) or n_top < 1:
        raise ConfigError(f"Expected n_top >= 1, got {n_top!r} instead.")
    k, j = _resolve(
        latent, n_latent=src.loadings.shape[1], latents=src.latents, names=src.latent_names
    )
    if src.mean_lfc is None:
        j = None
    w = src.loadings[:, k]
    up = [i for i in np.argsort(-w, kind="stable")[:n_top] if w[i] > 0]
    down = [i for i in np.argsort(w, kind="stable")[:n_top] if w[i] < 0][::-1]
    genes = np.asarray(up + down, dtype=np.int64)
    lfc = (
        np.full(len(genes), np.nan) if j is None or src.mean_lfc is None else src.mean_lfc[genes, j]
    )
    table = pd.DataFrame(
        {"gene": [src.var_names[i] for i in genes], "loading": w[genes], "mean_lfc": lfc},
        index=pd.Index(genes, name="gene_index"),
    )
    return k, j, table


def _group_gene_table(
    src: _Genes, latent: Latent, n_top: int, group: str | None
) -> tuple[int, str, pd.DataFrame] | None:
    """(model index, group row name, the group's top genes by delta_nll) from a result's gene
    scores; None when it has none for ``latent``. ``group`` None: all cells."""
    k, j = _resolve(
        latent, n_latent=src.loadings.shape[1], latents=src.latents, names=src.latent_names
    )
    if src.gene_delta_nll is None or src.gene_lfc is None or j is None:
        if group is not None:
            msg = f"No gene scores for {latent!r} per group: run ablate with gene_scores=True."
            raise ConfigError(msg)
        return None
    rows = list(src.gene_groups or [])
    key = ALL_CELLS if group is None else str(group)
    if key not in rows:
        raise ConfigError(f"Unknown group {group!r}; the gene scores have {rows[:-1]}.")
    r = rows.index(key)
    delta, lfc = src.gene_delta_nll[r, j], src.gene_lfc[r, j]
    genes = np.argsort(-np.nan_to_num(delta, nan=-np.inf), kind="stable")[:n_top]
    table = pd.DataFrame(
        {
            "gene": [src.var_names[i] for i in genes],
            "delta_nll": delta[genes],
            "lfc": lfc[genes],
            "loading": src.loadings[genes, k],
        },
        index=pd.Index(genes, name="gene_index"),
    )
    return k, key, table


def top_genes(
    model_or_result: Any, latent: Latent, n_top: int = 20, *, group: str | None = None
) -> pd.DataFrame:
    """The data behind :func:`latent_genes`.

    Returns
    -------
    pandas.DataFrame
        From a result with gene scores (``gene_scores=True``): the ``n_top`` genes with the largest
        mean NLL change in ``group`` (default all cells), columns ``gene``, ``delta_nll``, ``lfc``
        (the group's means) and ``loading``. Otherwise the genes with the largest positive and
        negative loadings (up to 2 * n_top rows, indexed by gene position) with ``gene``,
        ``loading`` (the effective loading, BatchNorm folded in) and ``mean_lfc`` (mean log fold
        change when the latent is ablated; NaN for a model or a latent the result did not
        ablate), from the largest positive loading to the most negative.
    """
    src = _genes(model_or_result)
    scored = _group_gene_table(src, latent, n_top, group)
    if scored is not None:
        return scored[2]
    return _top_gene_table(src, latent, n_top)[2]


def latent_genes(
    model_or_result: Any,
    latent: Latent,
    n_top: int = 20,
    *,
    group: str | None = None,
    cmap: str | None = None,
    ax: Axes | None = None,
    show: bool = False,
    save: str | os.PathLike | None = None,
) -> Axes:
    """The genes that carry one latent: from a result with gene scores, the group's own.

    With gene scores (``ablate(gene_scores=True)``), bars are the ``n_top`` genes with the largest
    mean NLL change in ``group`` (default all cells) when the latent is ablated, coloured by the
    group's mean log fold change. Otherwise bars are the largest positive and negative loadings of
    the affine decoder (BatchNorm folded in); from a result, each bar is coloured by the gene's
    mean log fold change over all cells (a model, or a latent the result did not ablate, has no
    fold changes: grey bars).

    Parameters
    ----------
    model_or_result
        A ``LinearSCVI`` model, an ``AblationResult``, a result AnnData or a :class:`ResultView`.
    latent
        Name (``"Z_3"``) or index into the model's latents.
    n_top
        Genes on each side: up to ``n_top`` with loading > 0 and up to ``n_top`` with loading < 0;
        with gene scores, the ``n_top`` genes with the largest delta_nll.
    group
        Group of the run's ``groupby`` whose gene scores to show (needs gene scores).
    cmap, ax, show, save
        Colour map of the fold changes; Axes to draw into; ``plt.show()``; path to save to.

    Returns
    -------
    matplotlib.axes.Axes
        The Axes; one bar per gene (``ax.patches``), widths the loadings, from the largest positive
        at the top to the most negative at the bottom; the y tick labels are the gene names.
    """
    src = _genes(model_or_result)
    scored = _group_gene_table(src, latent, n_top, group)
    if scored is not None:
        return _group_gene_bars(scored, cmap=cmap, ax=ax, show=show, save=save)
    k, j, table = _top_gene_table(src, latent, n_top)
    n = len(table)
    ax = _axes(ax, (5.0, 1.2 + 0.22 * n))
    y = np.arange(n)
    width = table["loading"].to_numpy()
    if j is None:
        ax.barh(y, width, color="0.6")
        why = "model: loadings only" if src.mean_lfc is None else "not ablated: no fold change"
        ax.set_title(f"{schema.latent_name(k)}: top genes by loading ({why})", fontsize="medium")
    else:
        label = f"mean log fold change, {schema.latent_name(k)} ablated"
        _lfc_bars(ax, y, width, table["mean_lfc"].to_numpy(), cmap=cmap, label=label)
        ax.set_title(f"{schema.latent_name(k)}: top genes by loading", fontsize="medium")
    _gene_axis(ax, list(table["gene"]), "effective loading")
    return _finish(ax, show=show, save=save)


def _lfc_bars(
    ax: Axes, y: np.ndarray, width: np.ndarray, lfc: np.ndarray, *, cmap: str | None, label: str
) -> None:
    """Horizontal bars coloured by log fold change (centred scale), with their colour bar."""
    colours = _colour_scale(lfc, sequential="Reds", cmap=cmap, centred=True)
    fill = colormaps[colours.cmap](colours.norm(lfc))
    ax.barh(y, width, color=fill, edgecolor="0.3", linewidth=0.3)
    bar = ax.figure.colorbar(
        ScalarMappable(colours.norm, colours.cmap), ax=ax, shrink=0.6, pad=0.02
    )
    bar.set_label(label)


def _gene_axis(ax: Axes, genes: list[str], xlabel: str) -> None:
    """Gene names down the y axis (first on top), a zero line and the x label."""
    n = len(genes)
    ax.set_yticks(np.arange(n), genes, fontsize="small")
    ax.set_ylim(n - 0.5, -0.5)
    ax.axvline(0.0, color="0.2", linewidth=0.6)
    ax.set_xlabel(xlabel)


def _group_gene_bars(
    scored: tuple[int, str, pd.DataFrame],
    *,
    cmap: str | None,
    ax: Axes | None,
    show: bool,
    save: str | os.PathLike | None,
) -> Axes:
    """Bars of a group's top genes by mean delta_nll, coloured by their mean lfc."""
    k, group, table = scored
    n = len(table)
    ax = _axes(ax, (5.0, 1.2 + 0.22 * n))
    y = np.arange(n)
    label = f"mean log fold change in {group}, {schema.latent_name(k)} ablated"
    _lfc_bars(ax, y, table["delta_nll"].to_numpy(), table["lfc"].to_numpy(), cmap=cmap, label=label)
    ax.set_title(f"{schema.latent_name(k)} in {group}: top genes by delta_nll", fontsize="medium")
    _gene_axis(ax, list(table["gene"]), "mean delta_nll of the gene (nats/cell)")
    return _finish(ax, show=show, save=save)


def explained(
    result: Any,
    groupby: str | None = None,
    *,
    cmap: str = "Reds",
    ax: Axes | None = None,
    show: bool = False,
    save: str | os.PathLike | None = None,
) -> Axes:
    """Heatmap of groups x latents: the share of each group's mean likelihood gain explained by
    each latent (Shapley values, ``ablate(shapley=...)``), the LDVAE analogue of MOFA+'s
    variance-explained plot.

    Parameters
    ----------
    result
        An ``AblationResult``, a result AnnData or a :class:`ResultView` with Shapley values.
    groupby
        obs column (default: the run's ``groupby``; None there: all cells only).
    cmap, ax, show, save
        Colour map; Axes to draw into; ``plt.show()``; path to save to.

    Returns
    -------
    matplotlib.axes.Axes
        The Axes; its first image holds the shares (groups, then ``all cells``, x latents).
    """
    v = view(result)
    if v.gain is None or v.shapley is None:
        raise ConfigError("No Shapley values: run ablate with shapley='exact' or 'permutation'.")
    groupby = groupby or str(v.settings.get("groupby") or "") or None
    labels = _group_values(v, groupby) if groupby else pd.Series(np.full(len(v.gain), ALL_CELLS))
    table = results.explained_shares(
        v.gain, v.shapley, labels, schema.latent_names(v.shapley.shape[1])
    )
    if groupby is None:
        table = table.iloc[[-1]]
    share = table.to_numpy()
    ax = _axes(ax, (2.6 + 0.5 * share.shape[1], 1.4 + 0.4 * share.shape[0]))
    colours = _colour_scale(share, sequential=cmap, cmap=None)
    image = ax.imshow(share, cmap=colours.cmap, norm=colours.norm, aspect="auto")
    for (i, j), value in np.ndenumerate(share):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize="x-small")
    _label_ticks(ax, "x", list(table.columns))
    _label_ticks(ax, "y", [str(g) for g in table.index])
    ax.set_xlabel("latent")
    ax.set_ylabel(groupby or "")
    ax.set_title("share of the mean likelihood gain explained")
    ax.figure.colorbar(image, ax=ax, shrink=0.6, pad=0.03, label="Shapley share of gain_nll")
    return _finish(ax, show=show, save=save)


def _pca2(x: np.ndarray) -> np.ndarray:
    """First two principal components of ``x`` (n_obs, K), zero-padded when K < 2."""
    centred = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    pcs = u[:, :2] * s[:2]
    return np.pad(pcs, ((0, 0), (0, 2 - pcs.shape[1])))


def _basis_key(v: ResultView, basis: str | None) -> str | None:
    """The obsm key of ``basis`` (None: ``X_umap`` if present, else None for the PCA fallback)."""
    if basis is None:
        return "X_umap" if "X_umap" in v.embeddings else None
    key = basis if basis in v.embeddings or basis.startswith("X_") else f"X_{basis}"
    if key not in v.embeddings:
        present = ", ".join(repr(k) for k in v.embeddings) or "none"
        msg = (
            f"Expected basis one of the embeddings present ({present}), got {basis!r} instead; "
            "pass data= with the ablated input to take its embeddings, or basis=None for a PCA "
            "of the latent space."
        )
        raise IncompatibleDataError(msg)
    return key


def embedding(
    result: Any,
    latent: Latent,
    basis: str | None = None,
    *,
    cmap: str | None = None,
    size: float | None = None,
    ax: Axes | None = None,
    show: bool = False,
    save: str | os.PathLike | None = None,
) -> Axes:
    """Cells on a 2-D embedding, coloured by the delta_nll of one latent.

    Parameters
    ----------
    result
        An ``AblationResult``, a result AnnData or a :class:`ResultView` (use :func:`view` with
        ``data=`` to take the embedding from the ablated input).
    latent
        Name (``"Z_3"``) or index into the model's latents; it must have been ablated.
    basis
        obsm key of the embedding (``"umap"`` means ``"X_umap"``); one that is absent is an error
        listing those present. None: ``X_umap`` when present, else the first two principal
        components of the latent space (the title says so).
    cmap
        Colour map (default ``viridis`` for one-signed scores, ``RdBu_r`` centred on 0 otherwise;
        limits at the 1st/99th percentile).
    size
        Marker area; default ``min(40, 120000 / n_obs)`` as in scanpy.
    ax, show, save
        Axes to draw into; call ``plt.show()``; write the figure to this path.

    Returns
    -------
    matplotlib.axes.Axes
        The Axes; its first collection holds one point per cell (the largest scores drawn last).
    """
    v = view(result)
    j = _column(v, latent)
    delta = v.delta_nll[:, j]
    key = _basis_key(v, basis)
    if key is not None:
        xy = np.asarray(v.embeddings[key], dtype=np.float64)[:, :2]
        label = key.removeprefix("X_").upper()
        axis_names = (f"{label}1", f"{label}2")
        title = f"{v.latent_names[j]} delta_nll on {key}"
    else:
        xy = _pca2(np.asarray(v.latent, dtype=np.float64))
        axis_names = ("PC1 of latent", "PC2 of latent")
        title = f"{v.latent_names[j]} delta_nll (no X_umap: PCA of the latent space)"
    order = np.argsort(np.abs(delta), kind="stable")
    colours = _colour_scale(delta, sequential="viridis", cmap=cmap, robust=True)
    ax = _axes(ax, (5.2, 4.2))
    points = ax.scatter(
        xy[order, 0],
        xy[order, 1],
        c=delta[order],
        cmap=colours.cmap,
        norm=colours.norm,
        s=size if size is not None else min(40.0, 120000.0 / max(len(delta), 1)),
        linewidths=0,
        plotnonfinite=True,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title, fontsize="medium")
    bar = ax.figure.colorbar(points, ax=ax, shrink=0.7, pad=0.02, extend=colours.extend)
    bar.set_label("delta_nll (nats)")
    return _finish(ax, show=show, save=save)


def delta_distribution(
    result: Any,
    latent: Latent,
    groupby: str | None,
    *,
    kind: Literal["violin", "box"] = "violin",
    groups: Sequence[str] | None = None,
    stripplot: bool = True,
    ax: Axes | None = None,
    show: bool = False,
    save: str | os.PathLike | None = None,
) -> Axes:
    """Per-group distribution of one latent's delta_nll, as violins or boxes.

    Parameters
    ----------
    result
        An ``AblationResult``, a result AnnData or a :class:`ResultView`.
    latent
        Name (``"Z_3"``) or index into the model's latents; it must have been ablated.
    groupby
        obs column defining the groups; None treats all cells as one group.
    kind
        ``"violin"`` (a group with fewer than two distinct values gets no violin body, only its
        points) or ``"box"``.
    groups
        Groups to show, in this order (default: all, in category order).
    stripplot
        Overlay each cell as a jittered point (as scanpy's ``sc.pl.violin``).
    ax, show, save
        Axes to draw into; call ``plt.show()``; write the figure to this path.

    Returns
    -------
    matplotlib.axes.Axes
        The Axes: one violin body (``PolyCollection``) or box (patch) per group at x = 0, 1, ...;
        with ``stripplot`` the last collection holds one point per cell of the shown groups.
    """
    if kind not in ("violin", "box"):
        raise ConfigError(f"Expected kind 'violin' or 'box', got {kind!r} instead.")
    v = view(result)
    j = _column(v, latent)
    values = _group_values(v, groupby)
    shown = _pick_groups(values, groups, groupby)
    codes = values.cat.codes.to_numpy()
    cats = list(values.cat.categories)
    delta = v.delta_nll[:, j]
    blocks = [delta[codes == cats.index(g)] for g in shown]
    ax = _axes(ax, (1.6 + 0.7 * len(shown), 3.8))
    pos = np.arange(len(shown), dtype=np.float64)
    if kind == "violin":
        fit = [i for i, b in enumerate(blocks) if np.unique(b).size > 1]
        if fit:
            parts = ax.violinplot(
                [blocks[i] for i in fit],
                positions=pos[fit],
                widths=0.8,
                showextrema=False,
                showmedians=True,
            )
            parts["cmedians"].set_color("0.1")
            for body in parts["bodies"]:  # type: ignore[attr-defined]  # a list of PolyCollections
                body.set_facecolor("#8fb3d9")
                body.set_edgecolor("0.3")
                body.set_alpha(0.8)
    else:
        ax.boxplot(
            blocks,
            positions=pos,
            widths=0.6,
            patch_artist=True,
            showfliers=not stripplot,
            boxprops={"facecolor": "#8fb3d9"},
            medianprops={"color": "0.1"},
        )
    if stripplot:
        rng = np.random.default_rng(0)
        x = np.concatenate([np.full(len(b), p) for b, p in zip(blocks, pos, strict=True)])
        x = x + rng.uniform(-0.18, 0.18, size=len(x))
        n = len(x)
        ax.scatter(x, np.concatenate(blocks), s=min(8.0, 4000.0 / max(n, 1)), c="0.15", lw=0)
    ax.axhline(0.0, color="0.4", linewidth=0.6, linestyle="--")
    _label_ticks(ax, "x", shown)
    ax.set_xlim(-0.6, len(shown) - 0.4)
    ax.set_xlabel(groupby or "")
    ax.set_ylabel(f"delta_nll of {v.latent_names[j]} (nats)")
    ax.set_title(f"{v.latent_names[j]} delta_nll per {groupby or 'cell'}", fontsize="medium")
    return _finish(ax, show=show, save=save)


def latent_correlation(
    comparison: pd.DataFrame,
    *,
    on: Literal["cells", "loadings"] = "cells",
    cmap: str = DIVERGING,
    ax: Axes | None = None,
    show: bool = False,
    save: str | os.PathLike | None = None,
) -> Axes:
    """Heatmap of the correlations between two models' latents, in matched order.

    Parameters
    ----------
    comparison
        The table returned by ``ldj.compare`` (its ``attrs`` hold the correlation matrices).
    on
        ``"cells"`` (posterior means over the cells) or ``"loadings"`` (effective loadings).
    cmap
        Diverging colour map, limits fixed at -1 and 1.
    ax, show, save
        Axes to draw into; call ``plt.show()``; write the figure to this path.

    Returns
    -------
    matplotlib.axes.Axes
        The Axes; its image holds the matrix with rows model A's latents and columns model B's,
        matched pairs on the diagonal (unmatched latents last).
    """
    key = f"corr_{on}"
    if on not in ("cells", "loadings"):
        raise ConfigError(f"Expected on 'cells' or 'loadings', got {on!r} instead.")
    if key not in comparison.attrs:
        msg = f"Expected the table returned by ldj.compare (with attrs[{key!r}]); got another."
        raise ConfigError(msg)
    matrix = comparison.attrs[key]
    pairs = comparison.dropna(subset=["latent_a", "latent_b"])
    rows = [*pairs["latent_a"], *(n for n in matrix.index if n not in set(pairs["latent_a"]))]
    cols = [*pairs["latent_b"], *(n for n in matrix.columns if n not in set(pairs["latent_b"]))]
    values = matrix.loc[rows, cols].to_numpy()
    ax = _axes(ax, (2.6 + 0.5 * len(cols), 2.0 + 0.45 * len(rows)))
    image = ax.imshow(values, cmap=cmap, vmin=-1.0, vmax=1.0, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            colour = "white" if abs(value) > 0.6 else "black"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    _label_ticks(ax, "x", cols)
    _label_ticks(ax, "y", rows)
    ax.set_xlabel("model B latent")
    ax.set_ylabel("model A latent")
    ax.set_title(f"correlation on {on}, matched order")
    bar = ax.figure.colorbar(image, ax=ax, shrink=0.6)
    bar.ax.set_title("Pearson r", fontsize="small", loc="left")
    return _finish(ax, show=show, save=save)


def traversal(
    result: Any,
    latent: Latent,
    n_top: int = 8,
    *,
    group: str | None = None,
    genes: Sequence[str] | None = None,
    ax: Sequence[Axes] | None = None,
    show: bool = False,
    save: str | os.PathLike | None = None,
) -> list[Axes]:
    """A latent's traversal (``ablate(traverse=True)``): the top genes' mean log fold change
    along the grid, and the mean NLL change, in ``group`` (default all cells).

    Parameters
    ----------
    result
        An ``AblationResult``, a result AnnData or a :class:`ResultView` with a traversal.
    latent
        Name (``"Z_3"``) or index into the model's latents; it must have been traversed.
    n_top
        Genes drawn: the ``n_top`` with the largest absolute log fold change anywhere on the grid.
    group
        Group of the run's ``groupby`` whose means to show.
    genes
        These genes instead of the top ones.
    ax, show, save
        Two Axes to draw into (fold changes, NLL); call ``plt.show()``; write the figure here.

    Returns
    -------
    list of matplotlib.axes.Axes
        The two Axes: one line per gene (``ax.lines``, x the grid values, y the fold changes,
        labelled by gene, largest first), then the NLL change line; a dotted vertical line marks
        the group's mean value of the latent on both.
    """
    v = view(result)
    if v.traverse_lfc is None or v.traverse_delta_nll is None:
        msg = "The result has no traversal: run ablate with traverse=True (CLI: --traverse)."
        raise IncompatibleDataError(msg)
    j = _column(v, latent)
    k, name = int(v.latents[j]), v.latent_names[j]
    rows = v.gene_groups
    key = ALL_CELLS if group is None else str(group)
    if key not in rows:
        raise ConfigError(f"Unknown group {group!r}; the traversal has {rows[:-1]}.")
    r = rows.index(key)
    grid = np.asarray(v.settings["traverse_values"], np.float64)[j]
    lfc = np.asarray(v.traverse_lfc[r, j], np.float64)  # (steps, n_vars)
    if genes is None:
        size = np.nan_to_num(np.abs(lfc), nan=-np.inf).max(axis=0)
        picked = np.argsort(-size, kind="stable")[:n_top]
    else:
        unknown = [g for g in genes if g not in v.var_names]
        if unknown:
            raise ConfigError(f"Genes {unknown} are not in the result's genes.")
        picked = np.asarray([v.var_names.index(g) for g in genes])
    if ax is None:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(9.0, 3.6), layout="constrained")
        axes = list(fig.subplots(1, 2))
    else:
        axes = list(ax)
        if len(axes) != 2:
            raise ConfigError(f"Expected two Axes (fold changes, NLL), got {len(axes)}.")
    cells = np.ones(len(v.obs), bool)
    if group is not None:
        cells = v.obs[v.settings["groupby"]].astype(str).to_numpy() == key
    centre = float(np.mean(v.latent[cells, k])) if cells.any() else None
    where = "all cells" if group is None else key
    for i in picked:
        axes[0].plot(grid, lfc[:, i], marker="o", markersize=3, label=v.var_names[i])
    axes[0].set_ylabel(f"mean log fold change ({where})")
    axes[0].legend(fontsize="small", frameon=False, loc="best")
    axes[1].plot(grid, v.traverse_delta_nll[r, j], marker="o", markersize=3, color="0.2")
    axes[1].set_ylabel(f"mean NLL change, nats/cell ({where})")
    for a in axes:
        a.axhline(0.0, color="0.6", linewidth=0.6)
        if centre is not None:
            a.axvline(centre, color="0.4", linestyle=":", linewidth=0.8)
        a.set_xlabel(f"{name} (decoder input)")
    axes[0].set_title(f"{name}: top genes along the traversal", fontsize="medium")
    axes[1].set_title(f"{name}: reconstruction along the traversal", fontsize="medium")
    _finish(axes[0], show=show, save=save)
    return axes
