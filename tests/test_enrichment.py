"""Gene-set enrichment: every test against scipy, the planted set of the demo, GMT files, the CLI."""

from __future__ import annotations

import functools
import json

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

import linear_decoder_jax as ldj
from linear_decoder_jax import genesets
from linear_decoder_jax.cli import main
from linear_decoder_jax.demo import demo_files
from linear_decoder_jax.errors import ConfigError, GeneSetError


@functools.cache
def demo() -> tuple[ldj.LinearSCVI, ldj.AblationResult, dict]:
    model = ldj.load(demo_files() / "model.pt")
    adata = anndata.read_h5ad(demo_files() / "counts.h5ad")
    planted = json.loads((demo_files() / "planted.json").read_text())
    return model, ldj.ablate(model, adata, groupby="group"), planted


def _random_sets(genes: list[str], size: int, n: int, seed: int) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    return {f"random_{i}": list(rng.choice(genes, size, replace=False)) for i in range(n)}


def test_every_test_against_scipy():
    _, result, planted = demo()
    genes = list(result.var_names)
    sets = {"planted": planted["genes"], **_random_sets(genes, 8, 6, seed=1)}
    table = ldj.enrichment(result, sets, min_size=5)
    assert list(table.columns) == [
        "latent", "direction", "gene_set", "n_genes", "statistic", "pval", "padj", "leading_genes"
    ]  # fmt: skip
    assert len(table) == len(sets) * 2 * result.loadings.shape[1]
    assert table["pval"].is_monotonic_increasing
    loadings = np.asarray(result.loadings, dtype=np.float64)
    for r in table.itertuples():
        sign = 1.0 if r.direction == "positive" else -1.0
        score = sign * loadings[:, int(r.latent[2:])]
        inside = np.isin(genes, sets[r.gene_set])
        test = sps.mannwhitneyu(
            score[inside], score[~inside], alternative="greater", method="asymptotic"
        )
        assert r.n_genes == inside.sum()
        assert r.statistic == pytest.approx(test.statistic / (inside.sum() * (~inside).sum()))
        assert r.pval == pytest.approx(test.pvalue, rel=1e-9)
        members = np.flatnonzero(inside)
        best = members[np.argsort(-score[members], kind="stable")][: genesets.N_LEADING]
        assert r.leading_genes == ",".join(genes[i] for i in best)
    np.testing.assert_allclose(table["padj"], sps.false_discovery_control(table["pval"]))


def test_planted_set_is_top_for_planted_latent_among_random_sets():
    _, result, planted = demo()
    genes = list(result.var_names)
    sets = {"planted": planted["genes"], **_random_sets(genes, len(planted["genes"]), 50, 7)}
    table = ldj.enrichment(result, sets)
    direction = "positive" if planted["planted_latent_sign"] > 0 else "negative"
    latent = f"Z_{planted['planted_latent']}"
    mine = table[(table["latent"] == latent) & (table["direction"] == direction)]
    top = mine.iloc[0]
    assert top["gene_set"] == "planted" and top["padj"] < 0.05
    assert mine.iloc[1]["padj"] > 0.05
    # the other direction finds nothing for the planted set
    other = table[(table["latent"] == latent) & (table["gene_set"] == "planted")]
    assert other.set_index("direction").loc[direction, "padj"] < 0.05
    assert other[other["direction"] != direction]["padj"].item() > 0.5


def test_model_and_result_give_the_same_table():
    model, result, planted = demo()
    sets = {"planted": planted["genes"]}
    from_model = ldj.enrichment(model, sets, direction="negative")
    from_result = ldj.enrichment(result, sets, direction="negative")
    assert (from_model["direction"] == "negative").all()
    pd.testing.assert_frame_equal(from_model, from_result, rtol=1e-6)


def test_dropped_genes_duplicates_and_sizes():
    _, result, planted = demo()
    genes = planted["genes"]
    sets = {
        "planted": genes,
        "twice": genes + genes[:5],  # duplicates count once
        "unknown": ["NOT_A_GENE", "ALSO_NOT"],  # empty after dropping: left out
        "partly": genes[:6] + ["NOT_A_GENE"],
    }
    table = ldj.enrichment(result, sets, min_size=5)
    assert set(table["gene_set"]) == {"planted", "twice", "partly"}
    by = table.set_index(["latent", "direction", "gene_set"])
    for latent in set(table["latent"]):
        for d in ("positive", "negative"):
            assert by.loc[(latent, d, "twice"), "pval"] == by.loc[(latent, d, "planted"), "pval"]
    assert (table.loc[table["gene_set"] == "partly", "n_genes"] == 6).all()
    assert set(ldj.enrichment(result, sets, min_size=7)["gene_set"]) == {"planted", "twice"}
    with pytest.raises(GeneSetError, match=r"None of the 1 gene sets has between 1 and 500"):
        ldj.enrichment(result, {"unknown": ["NOT_A_GENE"]}, min_size=1)
    with pytest.raises(ConfigError, match="1 <= min_size <= max_size"):
        ldj.enrichment(result, sets, min_size=0)
    with pytest.raises(ConfigError, match="is a string"):
        ldj.enrichment(result, {"s": "CD2"})
    with pytest.raises(ConfigError, match="direction"):
        ldj.enrichment(result, sets, direction="up")  # type: ignore[arg-type]


class _WithGeneScores:
    """A stand-in for a result with per-group gene scores (``gene_table`` of the attribution
    engine): per-gene delta_nll = |loading| for group "planted", -|loading| otherwise."""

    def __init__(self, result: ldj.AblationResult):
        self.var_names = result.var_names
        self.latent_names = result.latent_names
        self.loadings = result.loadings

    def gene_table(self, latent: str, group: str | None = None) -> pd.DataFrame:
        k = int(latent[2:])
        score = np.abs(self.loadings[:, k]) * (1.0 if group == "planted" else -1.0)
        frame = pd.DataFrame({"delta_nll": score, "lfc": score}, index=self.var_names)
        return frame.sort_values("delta_nll", ascending=False)


def test_group_gene_scores_rank_the_genes_when_present():
    _, result, planted = demo()
    sets = {"planted": planted["genes"]}
    scored = _WithGeneScores(result)
    table = ldj.enrichment(scored, sets, score="delta_nll", group="planted", direction="positive")
    # ranked by |loading|: the same as the loadings ranking of a result with |loadings|
    unsigned = result.replace(loadings=np.abs(result.loadings))
    expected = ldj.enrichment(unsigned, sets, direction="positive")
    np.testing.assert_allclose(
        table.sort_values("latent")["pval"], expected.sort_values("latent")["pval"]
    )
    with pytest.raises(ConfigError, match="needs a result with per-gene scores"):
        ldj.enrichment(result, sets, score="delta_nll")
    with pytest.raises(ConfigError, match="group= needs per-group gene scores"):
        ldj.enrichment(result, sets, group="planted")


def test_read_gmt(tmp_path):
    path = tmp_path / "sets.gmt"
    path.write_text("A\tdesc\tg1\tg2\t\n\nB\thttp://x\tg3\nC\tempty\n", encoding="utf-8")
    assert ldj.read_gmt(path) == {"A": ["g1", "g2"], "B": ["g3"], "C": []}
    path.write_text("A\tdesc\tg1\nbroken-line-without-tabs\n", encoding="utf-8")
    with pytest.raises(GeneSetError, match=r"line 2: expected 'name<TAB>description<TAB>gene"):
        ldj.read_gmt(path)
    path.write_text("A\td\tg1\nA\td\tg2\n", encoding="utf-8")
    with pytest.raises(GeneSetError, match="line 2: gene set 'A' appears twice"):
        ldj.read_gmt(path)
    path.write_bytes(b"A\td\t\xff\xfe\n")
    with pytest.raises(GeneSetError, match="not a UTF-8 text GMT file"):
        ldj.read_gmt(path)
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(GeneSetError, match="holds no gene sets"):
        ldj.read_gmt(path)


def test_cli_enrich(tmp_path, capsys):
    _, result, planted = demo()
    res = result.write(tmp_path / "ablation.h5ad")
    gmt = tmp_path / "sets.gmt"
    sets = {"planted": planted["genes"], **_random_sets(list(result.var_names), 15, 5, 0)}
    gmt.write_text("".join(f"{k}\tdemo\t" + "\t".join(v) + "\n" for k, v in sets.items()))
    out = tmp_path / "enrich.csv"
    assert main(["enrich", str(res), "--gene-sets", str(gmt), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "planted" in printed.splitlines()[1] and f"wrote {out}" in printed
    table = pd.read_csv(out)
    expected = ldj.enrichment(result, sets)
    np.testing.assert_allclose(table["pval"], expected["pval"], rtol=1e-9)

    def one_line_error(argv: list[str], *needles: str) -> None:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("ldj: error:") and err.count("\n") == 1, err
        for needle in needles:
            assert needle in err

    one_line_error(["enrich", str(res), "--gene-sets", str(gmt), "-o", str(out)], "exists")
    bad = tmp_path / "bad.gmt"
    bad.write_text("only-a-name\n")
    other = str(tmp_path / "x.csv")
    one_line_error(["enrich", str(res), "--gene-sets", str(bad), "-o", other], "line 1")
    one_line_error(
        ["enrich", str(res), "--gene-sets", str(tmp_path / "no.gmt"), "-o", other], "no.gmt"
    )
    one_line_error(
        ["enrich", str(tmp_path / "no.h5ad"), "--gene-sets", str(gmt), "-o", other], "no.h5ad"
    )
    assert not (tmp_path / "x.csv").exists()
