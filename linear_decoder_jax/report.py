"""``ldj report``: one self-contained HTML page of an ablation result, figures embedded as PNG.

The page holds the settings of the sweep, the group heatmap (:func:`~linear_decoder_jax.pl.group_heatmap`),
the top latents per group with their top genes, one panel row per shown latent (embedding, per-group
distribution, top genes) and the cells each shown latent affects most. Figures are base64 PNG
``<img>`` sources, so the file opens offline; ``png_dir`` receives the same PNGs. Figures are drawn
on bare matplotlib ``Figure`` objects (no pyplot, no display needed).

>>> from linear_decoder_jax import report                                   # doctest: +SKIP
>>> report.write_report("ablation.h5ad", "report.html", groupby="cell_type")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from linear_decoder_jax import genesets, pl, results, stats
from linear_decoder_jax._atomic import atomic_path, check_destination
from linear_decoder_jax.errors import ConfigError, LDJError
from linear_decoder_jax.genesets import GeneSets

GENES_IN_TABLE = 5  # per side (positive / negative loading) in the top-latents table
GENES_IN_FIGURE = 12  # per side in each latent's gene panel
STRIP_MAX_CELLS = 5000  # draw every cell over the violins up to this many cells
PNG_DPI = 110
HEATMAP_PNG = "group_heatmap.png"
EXPLAINED_PNG = "explained.png"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1250px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 0.8em 0; } img { max-width: 100%; height: auto; }
figcaption, .note { color: #555; font-size: 0.9em; }
nav a { margin-right: 0.8em; }
tr.sig td { background: #fff3c4; font-weight: 600; }
"""


def _load(result: Any, data: Any) -> pl.ResultView:
    """The result as a ResultView, completed from the ablated input when ``data`` is given."""
    if not isinstance(data, str | os.PathLike):
        return pl.view(result, data=data)
    from linear_decoder_jax import sources

    with sources.StoreSource(data) as adata:  # .h5ad or .zarr: obs and embeddings only
        return pl.view(result, data=adata)


def _png(fig: Figure, *, tight: bool = False) -> bytes:
    """PNG bytes; ``tight`` crops to the drawn content (one more draw, for legends outside axes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI, bbox_inches="tight" if tight else None)
    return buf.getvalue()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _fmt(value: Any) -> str:
    """Settings value as text: arrays and lists comma-joined, dicts as ``key value`` pairs."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, np.ndarray | list | tuple):
        return ", ".join(_fmt(v) for v in np.asarray(value).ravel().tolist())
    if isinstance(value, float | np.floating):
        return f"{float(value):.6g}"
    return str(value)


class _Num:
    """A number shown right-aligned with a fixed format."""

    def __init__(self, value: float, spec: str = ".3f"):
        self.text = format(int(value) if spec == "d" else float(value), spec)


def _table(
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    cls: str,
    highlight: Sequence[bool] | None = None,
) -> str:
    """HTML table; numbers (int, float) get ``class="num"``, everything else is escaped text;
    rows flagged in ``highlight`` get ``class="sig"``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    flags = highlight if highlight is not None else [False] * len(rows)
    for row, flag in zip(rows, flags, strict=True):
        cells = []
        for cell in row:
            if isinstance(cell, _Num):
                cells.append(f'<td class="num">{cell.text}</td>')
            else:
                cells.append(f"<td>{html.escape(str(cell))}</td>")
        body.append(('<tr class="sig">' if flag else "<tr>") + "".join(cells) + "</tr>")
    return (
        f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>'
        + "\n".join(body)
        + "</tbody></table>"
    )


def _img(png: bytes, alt: str, caption: str) -> str:
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(alt)}" src="{src}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _basis(v: pl.ResultView) -> str | None:
    """``X_umap`` if present, else the first 2-D embedding, else None (PCA fallback)."""
    if "X_umap" in v.embeddings:
        return "X_umap"
    return next(iter(v.embeddings), None)


def write_report(
    result: Any,
    output: str | os.PathLike,
    *,
    groupby: str | None = None,
    top: int = 3,
    data: Any = None,
    png_dir: str | os.PathLike | None = None,
    gene_sets: GeneSets | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the HTML report of an ablation result (and its figures as PNG files).

    Parameters
    ----------
    result
        A result h5ad path, the AnnData read from one, or an ``AblationResult``.
    output
        HTML file to create; written atomically.
    groupby
        obs column for the per-group sections; default the ``groupby`` the result was computed
        with (none: all cells form one group).
    top
        Latents listed per group; the union of these latents gets a panel row and a top-cells table.
    data
        The ablated input (AnnData or h5ad path), for the obs columns and 2-D embeddings a result
        lacks.
    png_dir
        Folder (created if needed) that receives the figures as PNG files.
    gene_sets
        A GMT path or a dict of name -> genes: adds the gene-set enrichment table of every latent
        (:func:`linear_decoder_jax.enrichment`).
    overwrite
        Replace an existing ``output`` and existing PNGs of the same names.

    Returns
    -------
    Path
        The absolute path of the HTML file.
    """
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise ConfigError(f"Expected top >= 1, got {top!r} instead.")
    check_destination(output, overwrite=overwrite)
    if not isinstance(result, pl.ResultView):
        result = results.read_result(result)  # read once: a path, a result AnnData
    v = _load(result, data)
    if groupby is None:
        groupby = str(v.settings.get("groupby") or "") or None
    tables = pl.group_tables(v, groupby)
    mean = tables["mean"]
    shown = _shown_latents(v, mean, top)
    gene_group = _gene_groups(v, groupby, mean, shown)
    figures = _render(v, groupby, len(mean), shown, gene_group)
    extra = _analyses(v, result, groupby, gene_sets, shown, figures)
    if png_dir is not None:
        folder = Path(png_dir)
        if folder.is_dir():
            for name in figures:
                check_destination(folder / name, overwrite=overwrite)
        folder.mkdir(parents=True, exist_ok=True)
        for name, png in figures.items():
            with atomic_path(folder / name, overwrite=overwrite, directory=False) as tmp:
                tmp.write_bytes(png)
    page = _page(v, groupby, tables, shown, figures, top, gene_group, extra)
    with atomic_path(output, overwrite=overwrite, directory=False) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(output).absolute()


def _shown_latents(v: pl.ResultView, mean: pd.DataFrame, top: int) -> list[str]:
    """Union of each group's ``top`` latents, by mean delta_nll over all cells, largest first."""
    picked = {name for _, row in mean.iterrows() for name in _top_of(row, top)}
    overall = v.delta_nll.mean(axis=0)
    order = np.argsort(-overall, kind="stable")
    return [v.latent_names[j] for j in order if v.latent_names[j] in picked]


def _gene_groups(
    v: pl.ResultView, groupby: str | None, mean: pd.DataFrame, shown: list[str]
) -> dict[str, str | None]:
    """Per shown latent, the group whose own gene scores its panel shows (the group where its
    mean delta_nll is highest), when the run computed gene scores for this groupby; else None."""
    same = groupby is not None and groupby == (v.settings.get("groupby") or None)
    if v.gene_delta_nll is None or not same:
        return {name: None for name in shown}
    return {name: str(mean[name].idxmax()) for name in shown}


def _top_of(row: pd.Series, top: int) -> list[str]:
    return list(row.sort_values(ascending=False, kind="stable").index[:top])


def _render(
    v: pl.ResultView,
    groupby: str | None,
    n_groups: int,
    shown: list[str],
    gene_group: dict[str, str | None],
) -> dict[str, bytes]:
    """PNG bytes by file name: the group heatmap, then one panel row per shown latent."""
    fig = Figure(
        figsize=(3.2 + 0.45 * len(v.latent_names), max(3.2, 1.6 + 0.42 * n_groups)),
        layout="constrained",
    )
    pl.group_heatmap(v, groupby, ax=fig.add_subplot())
    out = {HEATMAP_PNG: _png(fig, tight=True)}
    basis = _basis(v)
    strip = len(v.delta_nll) <= STRIP_MAX_CELLS
    for name in shown:
        height = max(4.6, 1.2 + 0.22 * 2 * GENES_IN_FIGURE)
        fig = Figure(figsize=(16.5, height), layout="constrained")
        axes = fig.subplots(1, 3, width_ratios=[1.25, 1.0, 1.0])
        pl.embedding(v, name, basis, ax=axes[0])
        pl.delta_distribution(v, name, groupby, stripplot=strip, ax=axes[1])
        pl.latent_genes(v, name, GENES_IN_FIGURE, group=gene_group[name], ax=axes[2])
        out[f"latent_{_safe(name)}.png"] = _png(fig)
    return out


def _settings_rows(v: pl.ResultView, groupby: str | None) -> list[tuple[str, str]]:
    s = v.settings
    basis = _basis(v)
    if basis in v.embeddings:
        where = basis
    else:
        where = "PCA of the latent space (no 2-D embedding; pass --data INPUT.h5ad for one)"
    rows = [
        ("cells", str(len(v.delta_nll))),
        ("genes", str(len(v.var_names))),
        ("latents ablated", f"{len(v.latent_names)} of {v.n_latent}: {', '.join(v.latent_names)}"),
        ("mode", _fmt(s.get("mode", ""))),
        ("baseline", _fmt(s.get("baseline", ""))),
        ("baseline values", _fmt(s.get("baseline_values", ""))),
        ("library", _fmt(s.get("library", ""))),
        ("n_samples", _fmt(s.get("n_samples", ""))),
        ("seed", _fmt(s.get("seed", ""))),
        ("dtype", _fmt(s.get("dtype", ""))),
        ("groups from", f"obs[{groupby!r}]" if groupby else "all cells (no groupby)"),
        ("embedding", where),
        ("model", _fmt(s.get("source_model", ""))),
        ("scvi-tools version of the model", _fmt(s.get("source_scvi_version", ""))),
        ("versions", _fmt(s.get("versions", ""))),
    ]
    return rows


def _page(
    v: pl.ResultView,
    groupby: str | None,
    tables: dict[str, pd.DataFrame],
    shown: list[str],
    figures: dict[str, bytes],
    top: int,
    gene_group: dict[str, str | None],
    extra: list[tuple[str, str, str]],
) -> str:
    mean, median, frac = tables["mean"], tables["median"], tables["frac_positive"]
    n_cells = tables["n_cells"]["n_cells"]
    genes = {name: pl.top_genes(v, name, GENES_IN_TABLE) for name in shown}
    by = groupby or "cell"

    headline = []
    rows = []
    for group, row in mean.iterrows():
        best = _top_of(row, top)
        first = best[0]
        headline.append(
            f"<li><b>{html.escape(str(group))}</b>: {html.escape(first)} "
            f"({row[first]:.2f} nats/cell, {frac.loc[group, first]:.0%} of cells &gt; 0)</li>"
        )
        for rank, name in enumerate(best, start=1):
            g = genes[name]
            rows.append(
                (
                    group,
                    _Num(n_cells[group], "d"),
                    _Num(rank, "d"),
                    name,
                    _Num(mean.loc[group, name]),
                    _Num(median.loc[group, name]),
                    _Num(frac.loc[group, name], ".1%"),
                    ", ".join(g["gene"][g["loading"] > 0]),
                    ", ".join(g["gene"][g["loading"] < 0][::-1]),
                )
            )
    top_table = _table(
        [
            groupby or "group",
            "cells",
            "rank",
            "latent",
            "mean delta_nll",
            "median delta_nll",
            "cells with delta > 0",
            f"top genes, loading > 0 (up to {GENES_IN_TABLE})",
            f"top genes, loading < 0 (up to {GENES_IN_TABLE})",
        ],
        rows,
        "top-latents",
    )

    sections = []
    for name in shown:
        j = v.latent_names.index(name)
        best_group = mean[name].idxmax()
        if v.gene_delta_nll is None:
            genes_text = (
                "the genes with the largest positive and negative effective loadings, coloured "
                f"by their mean log fold change when {name} is ablated"
            )
        else:
            where = gene_group[name] or "all cells"
            genes_text = (
                f"the genes whose NLL rises most, on average over {where}, when {name} is "
                "ablated (its own gene scores), coloured by their mean log fold change there"
            )
        sections.append(
            f'<h3 id="latent-{_safe(name)}">{html.escape(name)}</h3>'
            f'<p class="note">mean delta_nll {v.delta_nll[:, j].mean():.3f} nats/cell over all '
            f"cells; highest in {html.escape(str(best_group))} "
            f"({mean.loc[best_group, name]:.3f}).</p>"
            + _img(
                figures[f"latent_{_safe(name)}.png"],
                f"{name}: embedding, distribution per {by}, top genes",
                f"Left: cells coloured by the delta_nll of {name}. Middle: its distribution per "
                f"{by}. Right: {genes_text}.",
            )
        )

    cells = results.top_cells(v.delta_nll, v.obs.index.to_numpy(), v.latent_names)
    cells = pd.concat([cells[cells["latent"] == name] for name in shown])
    group_of = v.obs[groupby].astype(str) if groupby else None
    cell_rows = [
        (
            r.latent,
            _Num(r.rank, "d"),
            r.cell,
            *([group_of.loc[r.cell]] if group_of is not None else []),
            _Num(r.delta_nll),
        )
        for r in cells.itertuples(index=False)
    ]
    cell_header = ["latent", "rank", "cell", *([groupby] if groupby else []), "delta_nll"]

    nav = " ".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in (
            ("settings", "settings"),
            ("groups", "groups"),
            ("top-latents", "top latents"),
            *((anchor, title) for anchor, title, _ in extra),
            ("latents", "latents"),
            ("cells", "cells"),
        )
    )
    n_obs, n_abl = v.delta_nll.shape
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            "<title>ldj ablation report</title>",
            f"<style>{_STYLE}</style></head><body>",
            "<h1>Latent ablation report</h1>",
            f"<nav>{nav}</nav>",
            f"<p>{n_obs} cells x {n_abl} ablated latents. delta_nll is how much worse (in nats) "
            "the model reconstructs a cell when the latent is removed; positive means the cell "
            "needs the latent.</p>",
            f"<p>Strongest latent per {html.escape(groupby or 'group')}:</p><ul>",
            *headline,
            "</ul>",
            '<h2 id="settings">Settings</h2>',
            _table(["setting", "value"], _settings_rows(v, groupby), "settings"),
            '<h2 id="groups">Which latent matters in which group</h2>',
            _img(
                figures[HEATMAP_PNG],
                "group heatmap",
                "Colour: mean delta_nll per group and latent; dot size: fraction of the group's "
                "cells with delta_nll > 0.",
            ),
            '<h2 id="top-latents">Top latents per group</h2>',
            top_table,
            *(
                f'<h2 id="{anchor}">{html.escape(title)}</h2>\n{body}'
                for anchor, title, body in extra
            ),
            '<h2 id="latents">Latents</h2>',
            *sections,
            '<h2 id="cells">Most affected cells</h2>',
            f"<p>The {results.TOP_CELLS} cells with the largest delta_nll for each latent above.</p>",
            _table(cell_header, cell_rows, "top-cells"),
            "</body></html>",
        ]
    )


# -- statistics, enrichment, associations, attribution -----------------------------------------
ENRICHMENT_ROWS = 25  # enrichment rows shown when fewer are significant
GENES_PER_GROUP = 10  # per-group gene tables (results with per-gene scores)


def _p(value: float) -> _Num | str:
    return "" if not np.isfinite(value) else _Num(value, ".2e")


def _stats_section(v: pl.ResultView, groupby: str | None) -> str:
    if groupby is None:
        return '<p class="note">Group statistics need groups: pass --groupby.</p>'
    table = stats.group_stats(v, groupby)
    marks = stats.significant_marks(table)
    rows = [
        (
            r.group,
            r.latent + marks[r.group, r.latent],
            _Num(r.n_cells, "d"),
            _Num(r.mean),
            "" if np.isnan(r.ci_low) else f"{r.ci_low:.3f} to {r.ci_high:.3f}",
            _Num(r.median),
            _Num(r.auroc) if np.isfinite(r.auroc) else "",
            _p(r.pval),
            _p(r.padj),
            "yes" if r.inactive else "",
        )
        for r in table.itertuples(index=False)
    ]
    header = [groupby, "latent", "cells", "mean delta_nll", "95% CI of the mean", "median"]
    header += ["AUROC vs other cells", "p (Mann-Whitney)", "padj (BH)", "inactive"]
    note = (
        f'<p class="note">Highlighted (*): padj &lt; {stats.ALPHA} and AUROC &gt; 0.5, the '
        "latent's delta_nll is higher in the group than in the other cells. CI: t-based; p: "
        "two-sided Mann-Whitney U, normal approximation; padj: Benjamini-Hochberg over the "
        "table.</p>"
    )
    return note + _table(header, rows, "group-stats", [m == "*" for m in marks.values()])


def _enrichment_section(v: pl.ResultView, gene_sets: GeneSets) -> str:
    table = genesets.enrichment(v, gene_sets)
    hit = table["padj"] < stats.ALPHA
    shown = table[hit] if hit.sum() >= ENRICHMENT_ROWS else table.head(ENRICHMENT_ROWS)
    rows = [
        (
            r.latent,
            r.direction,
            r.gene_set,
            _Num(r.n_genes, "d"),
            _Num(r.statistic),
            _p(r.pval),
            _p(r.padj),
            r.leading_genes,
        )
        for r in shown.itertuples(index=False)
    ]
    header = ["latent", "direction", "gene set", "genes", "AUC", "p", "padj (BH)"]
    note = (
        f'<p class="note">{len(table)} tests (latents x directions x sets), the '
        f"{len(shown)} with the smallest p shown; highlighted: padj &lt; {stats.ALPHA}. One-sided "
        "rank-sum test of the set's genes against the other genes, ranked by signed effective "
        "loading.</p>"
    )
    highlight = list(shown["padj"] < stats.ALPHA)
    return note + _table([*header, "leading genes"], rows, "enrichment", highlight)


def _associations_section(v: pl.ResultView) -> str:
    numeric = [c for c in v.obs.columns if stats.is_numeric(v.obs[c])]
    if not numeric:
        return (
            '<p class="note">The result has no numeric obs columns (pass --data INPUT.h5ad for '
            "the input's).</p>"
        )
    table = stats.associations(v, columns=numeric)
    rows = [
        (
            r.covariate,
            r.latent,
            "decoder input" if r.score == "latent" else "delta_nll",
            _Num(r.n_cells, "d"),
            _Num(r.n_dropped, "d"),
            _Num(r.statistic) if np.isfinite(r.statistic) else "",
            _p(r.pval),
            _p(r.padj),
        )
        for r in table.itertuples(index=False)
    ]
    header = ["covariate", "latent", "score", "cells", "missing", "Spearman rho", "p", "padj"]
    note = (
        f'<p class="note">Highlighted: padj &lt; {stats.ALPHA} (Benjamini-Hochberg over the '
        "table). Cells with a missing covariate are left out of that test.</p>"
    )
    return note + _table(header, rows, "associations", list(table["padj"] < stats.ALPHA))


def _attribution(result: Any) -> Any:
    """The result object when it carries Shapley or per-gene scores, else None."""
    if not isinstance(result, results.AblationResult):
        return None
    if getattr(result, "shapley_nll", None) is None and not callable(
        getattr(result, "gene_table", None)
    ):
        return None
    return result


def _explained_section(src: Any, groupby: str | None, figures: dict[str, bytes]) -> str | None:
    if getattr(src, "shapley_nll", None) is None or groupby is None:
        return None
    share = src.explained(groupby)  # groups x latents
    draw = getattr(pl, "explained", None)
    out = ""
    if draw is not None:
        fig = Figure(figsize=(3.2 + 0.45 * share.shape[1], max(3.2, 1.6 + 0.42 * len(share))))
        draw(src, groupby, ax=fig.add_subplot())
        figures[EXPLAINED_PNG] = _png(fig, tight=True)
        out = _img(figures[EXPLAINED_PNG], "explained share", "Share of the mean gain per group.")
    rows = [(str(g), *(_Num(x, ".1%") for x in row)) for g, row in share.iterrows()]
    return out + _table([groupby, *map(str, share.columns)], rows, "explained")


def _group_genes_section(src: Any, groupby: str | None, shown: list[str]) -> str | None:
    if groupby is None or not callable(getattr(src, "gene_table", None)):
        return None
    parts = []
    for name in shown:
        rows = []
        for group in src.obs[groupby].astype("category").cat.categories:
            try:
                genes = src.gene_table(name, group=str(group), n_top=GENES_PER_GROUP)
            except LDJError:  # the method exists but this result has no per-gene scores
                return None
            rows.append((str(group), ", ".join(map(str, genes.index))))
        parts.append(f"<h3>{html.escape(name)}</h3>" + _table([groupby, "top genes"], rows, "gg"))
    return "".join(parts)


def _analyses(
    v: pl.ResultView,
    result: Any,
    groupby: str | None,
    gene_sets: GeneSets | None,
    shown: list[str],
    figures: dict[str, bytes],
) -> list[tuple[str, str, str]]:
    """(anchor, title, HTML) of the statistics sections; adds their figures to ``figures``."""
    out = [("statistics", "Group statistics", _stats_section(v, groupby))]
    if gene_sets is not None:
        out.append(("enrichment", "Gene-set enrichment", _enrichment_section(v, gene_sets)))
    out.append(("associations", "Covariate associations", _associations_section(v)))
    src = _attribution(result)
    if src is not None:
        src = src.replace(obs=v.obs)  # with the obs columns taken from data=
        explained = _explained_section(src, groupby, figures)
        if explained is not None:
            out.append(("explained", "Likelihood explained per group", explained))
        genes = _group_genes_section(src, groupby, shown)
        if genes is not None:
            out.append(("group-genes", "Top genes per group", genes))
    return out
