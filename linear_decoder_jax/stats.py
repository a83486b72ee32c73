"""Statistics on an ablation result: per-group tests with uncertainty, covariate associations, BH.

Everything here is numpy/scipy/pandas on the stored arrays of a result (an ``AblationResult``, or
any object with ``delta_nll``, ``latent``, ``obs``, ``settings`` and ``latent_names``, such as
``ldj.pl.view(...)``); nothing is recomputed from the model.

Assumptions, per statistic
--------------------------
* ``ci_low``/``ci_high``: a t-based 95 % interval of the mean, ``mean +- t(0.975, n-1) s / sqrt(n)``.
  It is exact for normal scores and, by the central limit theorem, approximately right for the
  group sizes of single-cell data; delta_nll is right-skewed, so for groups of a few dozen cells
  or fewer the interval is approximate (too narrow on the upper side). Chosen over a bootstrap
  because it is deterministic and needs one pass over (possibly memory-mapped) scores. NaN for
  groups of one cell.
* ``auroc``: ``U / (n1 n2)`` of the group's cells against all other cells (ties count one half):
  the probability that a random cell of the group scores higher than a random other cell.
  0.5 means no specificity. Cells are treated as independent draws.
* ``pval``: two-sided Mann-Whitney U test, normal approximation with tie correction and continuity
  correction (scipy's ``method="asymptotic"``), valid for moderate group sizes; it tests a shift of
  the distribution, not of the mean. Cells of one sample are not independent, so p-values are best
  read as a ranking of evidence, not as calibrated error rates.
* ``padj``: Benjamini-Hochberg over every finite p-value of the table, which controls the false
  discovery rate under independence or positive dependence of the tests.
* Spearman's rho (numeric covariates) and Kruskal-Wallis H (categorical covariates, with
  ``epsilon2 = H / (n - 1)``, Tomczak & Tomczak 2014) are rank-based: they assume independent
  cells and, for H's chi-square p-value, at least a few cells per level.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

from linear_decoder_jax.errors import ConfigError, IncompatibleDataError
from linear_decoder_jax.schema import latent_names

ALPHA = 0.05  # padj below this is marked significant in summaries and reports
INACTIVE_TOL = 1e-3  # nats: a latent whose |delta| stays below this in every cell is inactive
MAX_LEVELS = 50  # with columns=None, categorical covariates with more levels are skipped

Score = Literal["delta_nll", "unique_delta_nll", "shapley_nll"]
_SCORE_SOURCE = {
    "delta_nll": "every result",
    "unique_delta_nll": "ablate(..., refit=True) (CLI: --refit)",
    "shapley_nll": "ablate(..., shapley='exact') (CLI: --shapley)",
}


# -- shared maths --------------------------------------------------------------------------------
def bh(pvals: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values; NaN entries stay NaN and are not counted as tests.

    ``scipy.stats.false_discovery_control`` over the finite entries; the NaN handling is the only
    addition (scipy propagates a NaN to every adjusted value).

    Parameters
    ----------
    pvals
        p-values of any shape.

    Returns
    -------
    numpy.ndarray
        Adjusted p-values, same shape: ``min_{j >= i} p_(j) m / j``, capped at 1.
    """
    p = np.asarray(pvals, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        out[finite] = sps.false_discovery_control(p[finite], method="bh")
    return out


def _tie_terms(ranked_sorted: np.ndarray) -> np.ndarray:
    """``sum(t^3 - t)`` over the tie runs of each column of a column-sorted array (n, m)."""
    n, m = ranked_sorted.shape
    out = np.zeros(m)
    for j in range(m):
        _, counts = np.unique(ranked_sorted[:, j], return_counts=True)
        counts = counts[counts > 1].astype(np.float64)
        out[j] = float(np.sum(counts**3 - counts))
    return out


class RankSum:
    """Ranks of every column of ``values`` (n, m), kept to test many subsets against the rest.

    The two-sample test of a subset of rows against the other rows is Mann-Whitney's U with the
    normal approximation, tie and continuity corrections (scipy's ``method="asymptotic"``).
    """

    def __init__(self, values: np.ndarray):
        values = np.asarray(values, dtype=np.float64)
        self.n = values.shape[0]
        self.ranks = sps.rankdata(values, axis=0)  # (n, m), average ranks for ties
        self.ties = _tie_terms(np.sort(values, axis=0))  # (m,)

    def u(self, mask: np.ndarray) -> tuple[np.ndarray, int, int]:
        """U of the rows in ``mask`` against the rest, per column, and the two sample sizes."""
        n1 = int(mask.sum())
        n2 = self.n - n1
        return self.ranks[mask].sum(axis=0) - n1 * (n1 + 1) / 2, n1, n2

    def pvalue(
        self, u1: np.ndarray, n1: int, n2: int, alternative: Literal["two-sided", "greater"]
    ) -> np.ndarray:
        """p-value of U1 (``"greater"``: the subset ranks higher); NaN when a sample is empty."""
        if n1 == 0 or n2 == 0:
            return np.full(np.shape(u1), np.nan)
        n = n1 + n2
        mu = n1 * n2 / 2
        var = n1 * n2 / 12 * ((n + 1) - self.ties / (n * (n - 1)))
        u = np.maximum(u1, n1 * n2 - u1) if alternative == "two-sided" else u1
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (u - mu - 0.5) / np.sqrt(var)
        p = sps.norm.sf(z) * (2.0 if alternative == "two-sided" else 1.0)
        return np.clip(np.where(var > 0, p, 1.0), 0.0, 1.0)  # all values tied: no evidence


# -- group statistics ----------------------------------------------------------------------------
def _names_for(result: Any, width: int) -> list[str]:
    names = list(result.latent_names)
    if width == len(names):
        return names
    return latent_names(width)  # a score over every latent of the model


def score_matrix(result: Any, score: str) -> np.ndarray:
    """The (n_obs, m) per-cell score ``score`` of ``result``; an absent score is an error."""
    if score not in _SCORE_SOURCE:
        msg = f"Expected score in {sorted(_SCORE_SOURCE)}, got {score!r} instead."
        raise ConfigError(msg)
    values = getattr(result, score, None)
    if values is None:
        msg = f"This result has no {score!r}; it is computed by {_SCORE_SOURCE[score]}."
        raise ConfigError(msg)
    return np.asarray(values, dtype=np.float64)


def resolve_groupby(result: Any, groupby: str | None) -> str:
    """``groupby``, else the one the result was computed with; it must be an obs column."""
    if groupby is None:
        groupby = str(result.settings.get("groupby") or "") or None
    if groupby is None:
        msg = (
            "This result was computed without groupby; pass groupby= naming an obs column "
            f"(columns: {', '.join(map(str, result.obs.columns)) or 'none'})."
        )
        raise ConfigError(msg)
    if groupby not in result.obs.columns:
        msg = (
            f"groupby column {groupby!r} is not in the result's obs (columns: "
            f"{', '.join(map(str, result.obs.columns)) or 'none'})."
        )
        raise IncompatibleDataError(msg)
    return groupby


def group_stats(
    result: Any,
    groupby: str | None = None,
    *,
    score: Score = "delta_nll",
    inactive_tol: float = INACTIVE_TOL,
) -> pd.DataFrame:
    """Per group and latent: mean with 95 % CI, median, AUROC and Mann-Whitney test vs the rest.

    Parameters
    ----------
    result
        An ``AblationResult`` (or a ``ldj.pl.view`` of one).
    groupby
        obs column defining the groups; default the result's own ``groupby``. Cells with a
        missing label belong to no group but count among the "other cells" of every group.
    score
        Per-cell score: ``"delta_nll"``, ``"unique_delta_nll"`` (refit runs) or ``"shapley_nll"``
        (attribution runs).
    inactive_tol
        A latent whose ``|score|`` is below this (nats) in every cell is flagged ``inactive``.

    Returns
    -------
    pandas.DataFrame
        One row per (group, latent), n_groups * n_latents rows, columns ``group``, ``latent``,
        ``n_cells``, ``mean``, ``ci_low``, ``ci_high``, ``median``, ``frac_positive``, ``auroc``,
        ``pval``, ``padj``, ``inactive``. Assumptions: module docstring.
    """
    values = score_matrix(result, score)
    names = _names_for(result, values.shape[1])
    by = resolve_groupby(result, groupby)
    labels = result.obs[by].astype("category").cat.remove_unused_categories()
    inactive = np.all(np.abs(values) < inactive_tol, axis=0)
    ranks = RankSum(values)
    codes = labels.cat.codes.to_numpy()
    records = []
    for code, group in enumerate(labels.cat.categories):
        mask = codes == code
        block = values[mask]
        n1 = len(block)
        mean = block.mean(axis=0)
        if n1 > 1:
            half = sps.t.ppf(0.975, n1 - 1) * block.std(axis=0, ddof=1) / np.sqrt(n1)
        else:
            half = np.full(len(names), np.nan)
        u1, n1, n2 = ranks.u(mask)
        with np.errstate(invalid="ignore", divide="ignore"):
            auroc = u1 / (n1 * n2) if n2 else np.full(len(names), np.nan)
        pval = ranks.pvalue(u1, n1, n2, "two-sided")
        median = np.median(block, axis=0)
        frac = (block > 0).mean(axis=0)
        for j, name in enumerate(names):
            records.append(
                (str(group), name, n1, mean[j], mean[j] - half[j], mean[j] + half[j], median[j])
                + (frac[j], auroc[j], pval[j], bool(inactive[j]))
            )
    columns = ["group", "latent", "n_cells", "mean", "ci_low", "ci_high", "median"]
    columns += ["frac_positive", "auroc", "pval", "inactive"]
    table = pd.DataFrame.from_records(records, columns=columns)
    table.insert(10, "padj", bh(table["pval"].to_numpy()))
    return table


# -- covariate associations ------------------------------------------------------------------
def _covariates(result: Any, data: Any) -> pd.DataFrame:
    """The result's obs plus the obs columns of ``data`` (AnnData or h5ad path) it lacks."""
    obs = result.obs.copy()
    if data is None:
        return obs
    if isinstance(data, str | os.PathLike):
        from linear_decoder_jax import sources

        if not os.path.exists(data):
            raise IncompatibleDataError(f"{data}: no such file.")
        with sources.StoreSource(data) as source:  # .h5ad or .zarr: the obs table only
            extra = source.obs
    else:
        extra = data.obs
    position = pd.Index(extra.index).get_indexer(obs.index)
    if (position < 0).any():
        missing = ", ".join(map(str, obs.index[position < 0][:3]))
        msg = (
            f"{int((position < 0).sum())} cells of the result are not in the data (e.g. "
            f"{missing}); pass the AnnData that was ablated."
        )
        raise IncompatibleDataError(msg)
    picked = extra.iloc[position]
    for column in picked.columns:
        if column not in obs.columns:
            obs[column] = picked[column].to_numpy()
    return obs


def is_numeric(series: pd.Series) -> bool:
    """Whether a covariate is tested as numeric (Spearman): numbers, not booleans."""
    return bool(pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series))


def _kind(series: pd.Series) -> Literal["numeric", "categorical"]:
    return "numeric" if is_numeric(series) else "categorical"


def _auto_columns(obs: pd.DataFrame) -> list[str]:
    """Numeric columns, and categorical ones with 2 to MAX_LEVELS levels."""
    picked = []
    for column in obs.columns:
        s = obs[column]
        if _kind(s) == "numeric" or 2 <= s.nunique(dropna=True) <= MAX_LEVELS:
            picked.append(str(column))
    return picked


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan, np.nan
    rho, p = sps.spearmanr(x, y)
    return float(rho), float(p)


def _kruskal(labels: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """H, p and epsilon-squared of ``y`` across the levels in ``labels``."""
    levels = [y[labels == level] for level in np.unique(labels)]
    if len(levels) < 2 or np.ptp(y) == 0:
        return np.nan, np.nan, np.nan
    h, p = sps.kruskal(*levels)
    return float(h), float(p), float(h) / (len(y) - 1)


def associations(
    result: Any, data: Any = None, columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """Association of each latent (decoder input and delta_nll) with each obs covariate.

    Parameters
    ----------
    result
        An ``AblationResult`` (or a ``ldj.pl.view`` of one).
    data
        The ablated AnnData (or its h5ad path); its obs columns that the result lacks are added,
        matched by obs_names.
    columns
        Covariates to test; default every numeric column and every categorical column with 2 to
        ``MAX_LEVELS`` levels.

    Returns
    -------
    pandas.DataFrame
        One row per (covariate, latent, score), columns ``covariate``, ``kind`` (numeric or
        categorical), ``test`` (spearman or kruskal), ``latent``, ``score`` (``latent``: the
        decoder input; ``delta_nll``), ``n_cells`` (used), ``n_dropped`` (missing covariate),
        ``statistic`` (rho or H), ``effect_size`` (rho or epsilon-squared), ``pval``, ``padj``
        (Benjamini-Hochberg over every finite p-value of the table). Untestable pairs (fewer than
        3 cells, a constant covariate or score, fewer than 2 levels) have NaN statistics.
    """
    obs = _covariates(result, data)
    if columns is None:
        columns = _auto_columns(obs)
    unknown = [c for c in columns if c not in obs.columns]
    if unknown:
        msg = (
            f"Covariates {unknown} are not obs columns of the result (columns: "
            f"{', '.join(map(str, obs.columns)) or 'none'}); pass data= for the input's columns."
        )
        raise IncompatibleDataError(msg)
    names = list(result.latent_names)
    latents = np.asarray(result.settings["latents"], dtype=np.int64)
    scores = {
        "latent": np.asarray(result.latent, dtype=np.float64)[:, latents],
        "delta_nll": np.asarray(result.delta_nll, dtype=np.float64),
    }
    records = []
    for column in columns:
        series = obs[column]
        kind = _kind(series)
        keep = series.notna().to_numpy()
        if kind == "numeric":
            x = series.to_numpy(dtype=np.float64)
            keep &= np.isfinite(x)
        for score, matrix in scores.items():
            for j, name in enumerate(names):
                y = matrix[keep, j]
                if kind == "numeric":
                    rho, p = _spearman(x[keep], y)
                    stat, effect = rho, rho
                else:
                    stat, p, effect = _kruskal(series.to_numpy()[keep].astype(str), y)
                test = "spearman" if kind == "numeric" else "kruskal"
                n_used = int(keep.sum())
                records.append(
                    (str(column), kind, test, name, score, n_used, len(keep) - n_used)
                    + (stat, effect, p)
                )
    header = ["covariate", "kind", "test", "latent", "score", "n_cells", "n_dropped"]
    table = pd.DataFrame.from_records(
        records, columns=[*header, "statistic", "effect_size", "pval"]
    )
    table["padj"] = bh(table["pval"].to_numpy(dtype=np.float64))
    return table


def significant_marks(table: pd.DataFrame, alpha: float = ALPHA) -> dict[tuple[str, str], str]:
    """``"*"`` per (group, latent) of a group_stats table with ``padj < alpha`` and AUROC above
    0.5 (the latent scores higher in the group than in the other cells), else ``""``."""
    hit = (table["padj"] < alpha) & (table["auroc"] > 0.5)
    keys = zip(table["group"], table["latent"], strict=True)
    return {key: "*" if h else "" for key, h in zip(keys, hit, strict=True)}
