"""The report's statistics sections: group tests, enrichment (``--gene-sets``), associations, and
the attribution sections when a result carries Shapley and per-gene scores."""

from __future__ import annotations

import json
import re

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from test_pl import demo_result
from test_report import Page, _records

import linear_decoder_jax as ldj
from linear_decoder_jax import report, stats
from linear_decoder_jax.cli import main
from linear_decoder_jax.demo import demo_files, gene_sets


def _highlighted(text: str, cls: str) -> list[str]:
    """First cell of every highlighted row of the table of class ``cls``."""
    table = re.search(rf'<table class="{cls}">.*?</table>', text, re.S).group(0)
    return re.findall(r'<tr class="sig"><td[^>]*>([^<]*)</td>', table)


@pytest.fixture(scope="module")
def planted():
    return json.loads((demo_files() / "planted.json").read_text())


def test_report_statistics_enrichment_and_associations(tmp_path, planted):
    _, adata, result = demo_result()
    grouped = result.replace(settings={**result.settings, "groupby": "group"})
    data = adata.copy()
    data.obs["depth"] = np.log(np.asarray(adata.X.sum(1)).ravel())
    sets = gene_sets(list(result.var_names), planted["genes"])
    out = report.write_report(grouped, tmp_path / "r.html", data=data, gene_sets=sets)
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    assert {"#statistics", "#enrichment", "#associations"} <= set(page.links)

    rows = _records(page, "group-stats")
    table = grouped.group_stats()
    assert len(rows) == len(table)
    marks = stats.significant_marks(table)
    for row, want in zip(rows, table.itertuples(), strict=True):
        assert row["latent"] == want.latent + marks[want.group, want.latent]
        assert float(row["AUROC vs other cells"]) == pytest.approx(want.auroc, abs=6e-4)
        assert float(row["padj (BH)"]) == pytest.approx(want.padj, rel=5e-3)
    assert _highlighted(text, "group-stats") == ["planted"]

    first = _records(page, "enrichment")[0]
    assert (first["latent"], first["direction"], first["gene set"]) == (
        "Z_3",
        "negative",
        "planted",
    )
    assert _highlighted(text, "enrichment") == ["Z_3"]

    assoc = _records(page, "associations")
    assert {r["covariate"] for r in assoc} == {"depth"}
    expected = stats.associations(grouped, data, ["depth"])
    assert [float(r["Spearman rho"]) for r in assoc] == pytest.approx(
        expected["statistic"].tolist(), abs=5e-4
    )


def test_report_without_groups_or_numeric_columns_says_so(tmp_path):
    _, _, result = demo_result()
    bare = result.replace(obs=result.obs[["batch"]], settings={**result.settings, "groupby": ""})
    text = report.write_report(bare, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "Group statistics need groups: pass --groupby." in text
    assert "The result has no numeric obs columns" in text
    assert "enrichment" not in Page(text).tables


def test_cli_report_gene_sets(tmp_path, capsys, planted):
    _, _, result = demo_result()
    path = result.write(tmp_path / "ablation.h5ad")
    gmt = tmp_path / "planted.gmt"
    gmt.write_text("planted\tdemo\t" + "\t".join(planted["genes"]) + "\n", encoding="utf-8")
    html_path = tmp_path / "r.html"
    argv = ["report", str(path), "-o", str(html_path), "--gene-sets", str(gmt)]
    assert main(argv) == 0
    rows = _records(Page(html_path.read_text(encoding="utf-8")), "enrichment")
    assert rows[0]["gene set"] == "planted" and rows[0]["latent"] == "Z_3"
    bad = tmp_path / "bad.gmt"
    bad.write_text("x\n", encoding="utf-8")
    assert main([*argv[:3], str(tmp_path / "r2.html"), "--gene-sets", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ldj: error:") and "bad.gmt, line 1" in err and err.count("\n") == 1


def test_report_shows_attribution_sections_when_present(tmp_path):
    model, adata, _ = demo_result()
    attributed = ldj.ablate(
        model, adata, groupby="cell_type", gene_scores=True, shapley="exact", batch_size=64
    )
    text = report.write_report(attributed, tmp_path / "r.html").read_text(encoding="utf-8")
    page = Page(text)
    assert {"#explained", "#group-genes"} <= set(page.links)
    shares = _records(page, "explained")
    want = attributed.explained("cell_type")
    assert [r["cell_type"] for r in shares] == [str(g) for g in want.index]
    section = text[text.index('id="group-genes"') :]
    first = re.search(r"<h3>(Z_\d+)</h3>", section).group(1)
    groups = list(adata.obs["cell_type"].astype("category").cat.categories)
    genes = attributed.gene_table(first, group=groups[0], n_top=report.GENES_PER_GROUP).index
    assert page.tables["gg"][1] == [groups[0], ", ".join(genes)]
