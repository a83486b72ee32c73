"""Gene-set enrichment of latents: a one-sided rank-sum test of each set's genes against the rest.

For each latent, genes are ranked by a per-gene score: the signed effective loading (default), or,
for a result with per-gene scores (``gene_table``, from ``ablate(..., gene_scores=True)``), a
group's mean per-gene delta_nll or log fold change. For each direction, the set's genes are tested
against every other gene of the model with a one-sided Mann-Whitney U test (``"positive"``: the set
ranks high; ``"negative"``: it ranks low); this is the rank-based form of PCGSE / a competitive
gene-set test. Normal approximation with tie and continuity corrections. Benjamini-Hochberg over
every test of the returned table.

Assumptions: genes are treated as exchangeable and independent under the null (a competitive
test; correlated genes inside a set make p-values too small, as for every competitive test), and
the scores of the model's genes are the universe. No gene-set database is bundled: pass a GMT file
or a dict.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from linear_decoder_jax.errors import ConfigError, GeneSetError
from linear_decoder_jax.schema import latent_names
from linear_decoder_jax.stats import RankSum, bh

N_LEADING = 10  # genes listed in ``leading_genes``
Direction = Literal["positive", "negative", "both"]
GeneScore = Literal["loadings", "delta_nll", "lfc"]
GeneSets = str | os.PathLike | Mapping[str, Iterable[str]]


def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a GMT file: one set per line, ``name<TAB>description<TAB>gene<TAB>gene...``.

    Parameters
    ----------
    path
        GMT file (UTF-8). Blank lines are skipped.

    Returns
    -------
    dict of str to list of str
        Set name -> its genes, in file order.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such gene-set file.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise GeneSetError(f"{path} is not a UTF-8 text GMT file ({err}).") from err
    sets: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) < 2 or not fields[0].strip():
            msg = (
                f"{path}, line {number}: expected 'name<TAB>description<TAB>gene...', got "
                f"{len(fields)} tab-separated field(s) instead."
            )
            raise GeneSetError(msg)
        name = fields[0].strip()
        if name in sets:
            raise GeneSetError(f"{path}, line {number}: gene set {name!r} appears twice.")
        sets[name] = [g.strip() for g in fields[2:] if g.strip()]
    if not sets:
        raise GeneSetError(f"{path} holds no gene sets.")
    return sets


def _gene_sets(gene_sets: GeneSets) -> dict[str, list[str]]:
    if isinstance(gene_sets, str | os.PathLike):
        return read_gmt(gene_sets)
    if not isinstance(gene_sets, Mapping):
        msg = f"Expected a GMT path or a dict of name -> genes, got {type(gene_sets).__name__}."
        raise ConfigError(msg)
    out = {}
    for name, genes in gene_sets.items():
        if isinstance(genes, str):
            msg = f"Gene set {name!r} is a string; give its genes as a list, e.g. [{genes!r}]."
            raise ConfigError(msg)
        out[str(name)] = [str(g) for g in genes]
    return out


def _scores(
    source: Any, score: GeneScore, group: str | None
) -> tuple[np.ndarray, list[str], list[str]]:
    """Per-gene scores (n_vars, m), the gene names and the m latent names."""
    if score == "loadings":
        if group is not None:
            msg = (
                "group= needs per-group gene scores (score='delta_nll' or 'lfc'); the loadings "
                "are the same for every group."
            )
            raise ConfigError(msg)
        if hasattr(source, "get_loadings"):  # a LinearSCVI model
            frame = source.get_loadings()
            return frame.to_numpy(np.float64), list(frame.index), list(frame.columns)
        if source.loadings is None:  # a family without loadings: the mean per-gene effect
            lfc = np.asarray(source.arrays["mean_lfc"], dtype=np.float64)
            return lfc, list(source.var_names), list(source.latent_names)
        loadings = np.asarray(source.loadings, dtype=np.float64)
        return loadings, list(source.var_names), latent_names(loadings.shape[1])
    if score not in ("delta_nll", "lfc"):
        msg = f"Expected score 'loadings', 'delta_nll' or 'lfc', got {score!r} instead."
        raise ConfigError(msg)
    table = getattr(source, "gene_table", None)
    # an AblationResult always has gene_table; it has scores only from gene_scores=True runs
    if table is None or getattr(source, "gene_delta_nll", True) is None:
        msg = (
            f"score={score!r} needs a result with per-gene scores: run ablate with "
            "gene_scores=True (CLI: --gene-scores)."
        )
        raise ConfigError(msg)
    genes = list(source.var_names)
    names = list(source.latent_names)
    columns = [
        table(name, group=group)[score].reindex(genes).to_numpy(np.float64) for name in names
    ]
    return np.stack(columns, axis=1), genes, names


def enrichment(
    result_or_model: Any,
    gene_sets: GeneSets,
    *,
    score: GeneScore = "loadings",
    group: str | None = None,
    direction: Direction = "both",
    min_size: int = 5,
    max_size: int = 500,
) -> pd.DataFrame:
    """Gene-set enrichment of every latent (one-sided rank-sum test, BH-adjusted).

    Parameters
    ----------
    result_or_model
        An ``AblationResult`` or a ``LinearSCVI`` model.
    gene_sets
        A GMT file path, or a dict of set name -> genes. Genes the model lacks are dropped and
        duplicates counted once; sizes are counted after that.
    score
        How genes are ranked per latent: ``"loadings"`` (signed effective loading), or a result's
        per-gene ``"delta_nll"`` / ``"lfc"`` of ``group`` (needs ``gene_scores=True``).
    group
        Group whose per-gene scores are used (None: all cells); only with per-gene scores.
    direction
        ``"positive"`` (the set ranks high), ``"negative"`` (it ranks low), or ``"both"``.
    min_size, max_size
        Sets with fewer or more genes in the model are left out.

    Returns
    -------
    pandas.DataFrame
        One row per (latent, direction, gene set), sorted by p-value, columns ``latent``,
        ``direction``, ``gene_set``, ``n_genes``, ``statistic`` (``U / (n_set n_rest)`` in the
        direction's order: the probability that a set gene outranks another gene, 0.5 = none),
        ``pval``, ``padj`` (Benjamini-Hochberg over the table), ``leading_genes`` (the set's
        ``N_LEADING`` best-ranked genes, comma-joined).
    """
    if direction not in ("positive", "negative", "both"):
        msg = f"Expected direction 'positive', 'negative' or 'both', got {direction!r} instead."
        raise ConfigError(msg)
    if not 1 <= min_size <= max_size:
        msg = f"Expected 1 <= min_size <= max_size, got {min_size} and {max_size} instead."
        raise ConfigError(msg)
    sets = _gene_sets(gene_sets)
    values, genes, names = _scores(result_or_model, score, group)
    position = {g: i for i, g in enumerate(genes)}
    kept = {}
    for name, members in sets.items():
        index = np.asarray(sorted({position[g] for g in members if g in position}), np.int64)
        if min_size <= len(index) <= min(max_size, len(genes) - 1):
            kept[name] = index
    if not kept:
        msg = (
            f"None of the {len(sets)} gene sets has between {min_size} and {max_size} of the "
            f"model's {len(genes)} genes (e.g. {genes[:3]}); check the gene naming or min_size."
        )
        raise GeneSetError(msg)
    directions = ["positive", "negative"] if direction == "both" else [direction]
    records = []
    for sign_name in directions:
        sign = 1.0 if sign_name == "positive" else -1.0
        signed = sign * values
        ranks = RankSum(signed)
        for set_name, index in kept.items():
            mask = np.zeros(len(genes), dtype=bool)
            mask[index] = True
            u1, n1, n2 = ranks.u(mask)
            pval = ranks.pvalue(u1, n1, n2, "greater")
            for j, latent in enumerate(names):
                best = index[np.argsort(-signed[index, j], kind="stable")[:N_LEADING]]
                leading = ",".join(genes[i] for i in best)
                records.append(
                    (latent, sign_name, set_name, n1, u1[j] / (n1 * n2), pval[j], leading)
                )
    columns = ["latent", "direction", "gene_set", "n_genes", "statistic", "pval", "leading_genes"]
    table = pd.DataFrame.from_records(records, columns=columns)
    table.insert(6, "padj", bh(table["pval"].to_numpy(np.float64)))
    return table.sort_values("pval", kind="stable", ignore_index=True)
