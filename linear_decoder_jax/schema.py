"""The result h5ad's schema: one table from which every writer, reader and view derives.

Each :class:`Field` is one array of a result: where it lives in the AnnData (``slot``), its
dimensions, its dtype, when it is present and what it means. The in-memory writer
(``AblationResult.to_anndata``), the streamed writer (``results.H5adStream``), the reader
(``AblationResult.read``), ``ldj merge``, ``ldj.pl`` and ``ldj report`` iterate over :data:`FIELDS`;
the docs' schema table is generated from it (:func:`markdown_table`, checked by
``tests/test_run.py``). A new score is one scorer (``pipeline.Scorer``) plus its rows here.

Dimension names: ``obs`` cells, ``vars`` genes, ``latent`` all K latents, ``ablated`` the A ablated
latents (result column order), ``group`` the ``groupby`` categories then all cells (their names:
``uns["ablation"]["gene_groups"]``), ``step`` the traversal grid's values
(``uns["ablation"]["traverse_values"]``, ablated x step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Slot = Literal["obs", "obsm", "varm", "uns"]
DType = Literal["float", "bool"]
Reduce = Literal["rows", "mean", "group_mean", "sum"]


@dataclass(frozen=True)
class Field:
    """One array of a result.

    ``reduce`` says how parts of a run combine (shards, processes): ``"rows"``, one row per cell,
    concatenated in obs order; ``"mean"``, a mean over cells, combined weighted by cell counts;
    ``"group_mean"``, a mean over each group's cells, weighted by ``gene_n_cells``; ``"sum"``,
    added.
    ``dtype="float"`` is the model's dtype.
    """

    name: str
    slot: Slot
    dims: tuple[str, ...]
    dtype: DType
    when: str
    doc: str
    reduce: Reduce = "rows"

    @property
    def per_cell(self) -> bool:
        return self.reduce == "rows"


ALWAYS = "always"
ALL_CELLS = "all cells"  # name of the last row of the per-group tables

FIELDS: tuple[Field, ...] = (
    Field("nll", "obs", ("obs",), "float", ALWAYS, "full NLL at the posterior mean (nats)"),
    Field(
        "delta_nll",
        "obsm",
        ("obs", "ablated"),
        "float",
        ALWAYS,
        "NLL with the latent replaced minus the full NLL (nats); > 0: the cell needed it",
    ),
    Field(
        "delta_l1",
        "obsm",
        ("obs", "ablated"),
        "float",
        ALWAYS,
        "`sum_g abs(rho_ablated - rho)`: how far the expression profile moves",
    ),
    Field(
        "latent",
        "obsm",
        ("obs", "latent"),
        "float",
        ALWAYS,
        "decoder input z at the posterior mean",
    ),
    Field(
        "delta_nll_se",
        "obsm",
        ("obs", "ablated"),
        "float",
        "n_samples > 0",
        "Monte-Carlo standard error of delta_nll",
    ),
    Field(
        "unique_delta_nll",
        "obsm",
        ("obs", "ablated"),
        "float",
        "refit=True",
        "unique contribution: MAP objective lost when the other latents are re-fitted",
    ),
    Field(
        "refit_grad_norm",
        "obsm",
        ("obs", "ablated"),
        "float",
        "refit=True",
        "largest gradient norm at the end of the full and the constrained fit",
    ),
    Field(
        "refit_converged",
        "obsm",
        ("obs", "ablated"),
        "bool",
        "refit=True",
        "the fits reached `refit_tol` within `refit_steps`",
    ),
    Field(
        "mean_lfc",
        "varm",
        ("vars", "ablated"),
        "float",
        ALWAYS,
        "mean over cells of `ln rho_ablated - ln rho`",
        reduce="mean",
    ),
    Field(
        "gain_nll",
        "obs",
        ("obs",),
        "float",
        "shapley set",
        "NLL with every latent at its baseline minus the full NLL: what the latents explain",
    ),
    Field(
        "shapley_nll",
        "obsm",
        ("obs", "latent"),
        "float",
        "shapley set",
        "Shapley values of gain_nll over all K latents; rows sum to gain_nll",
    ),
    Field(
        "shapley_nll_se",
        "obsm",
        ("obs", "latent"),
        "float",
        'shapley="permutation"',
        "Monte-Carlo standard error of shapley_nll (antithetic permutation pairs)",
    ),
    Field(
        "gene_delta_nll",
        "uns",
        ("group", "ablated", "vars"),
        "float",
        "gene_scores=True",
        "mean over the group's cells of each gene's NLL change (sums over genes to delta_nll); "
        "NaN for an empty group",
        reduce="group_mean",
    ),
    Field(
        "gene_lfc",
        "uns",
        ("group", "ablated", "vars"),
        "float",
        "gene_scores=True",
        "mean over the group's cells of `ln rho_ablated - ln rho` per gene",
        reduce="group_mean",
    ),
    Field(
        "gene_n_cells",
        "uns",
        ("group",),
        "float",
        "gene_scores or traverse",
        "cells per group (the last entry: all cells)",
        reduce="sum",
    ),
    Field(
        "traverse_lfc",
        "uns",
        ("group", "ablated", "step", "vars"),
        "float",
        "traverse=True",
        "mean over the group's cells of `ln rho(z_k = v) - ln rho(z)` per gene, latent k set to "
        "each grid value v",
        reduce="group_mean",
    ),
    Field(
        "traverse_delta_nll",
        "uns",
        ("group", "ablated", "step"),
        "float",
        "traverse=True",
        "mean over the group's cells of `NLL(z_k = v) - NLL(z)` (nats) at each grid value v",
        reduce="group_mean",
    ),
)

BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}

# Written from the model, not from a scorer (varm); uns entries (settings, group tables, top cells)
# are listed in :data:`UNS`.
LOADINGS = Field(
    "loadings", "varm", ("vars", "latent"), "float", ALWAYS, "effective loadings, BatchNorm folded"
)
UNS: tuple[tuple[str, str, str], ...] = (
    (
        "ablation",
        ALWAYS,
        "settings and provenance: family (the model family), unit (latent or split), baseline, "
        "baseline_values (reuse them in another run or shard), mode, latents, latent_names (the "
        "result columns), all_latent_names (the model's), library, n_samples, seed, dtype, "
        "batch_size, n_devices, groupby, shard, rows, n_obs_total, versions, source_model, "
        "source_scvi_version, model_fingerprint, has_loadings (varm['loadings'] is there: a "
        "linear family); gene_scores, and with it gene_groups; shapley, "
        "n_permutations; refit, and with it refit_optimizer, refit_steps, refit_tol, "
        "refit_objective; traverse, and with it traverse_grid (range, quantile or values), "
        "traverse_values (ablated x step: the grid) and gene_groups",
    ),
    (
        "ablation_groups",
        "groupby",
        "DataFrames groups x ablated latents `mean`, `median`, `frac_positive`, and `n_cells`",
    ),
    ("ablation_top_cells", ALWAYS, "the 10 cells with the largest delta_nll per ablated latent"),
    (
        "ablation_explained",
        "shapley and groupby",
        "DataFrame groups (+ `all cells`) x K latents: share of the group's mean gain_nll "
        "explained by each latent",
    ),
)


def latent_name(k: int) -> str:
    """``Z_k``: the one place a latent's name is built (scvi-tools' ``get_loadings`` columns)."""
    return f"Z_{k}"


def latent_names(n_latent: int) -> list[str]:
    """``Z_0 ... Z_{K-1}``."""
    return [latent_name(k) for k in range(n_latent)]


def fields(slot: Slot) -> tuple[Field, ...]:
    """The fields stored in ``slot``."""
    return tuple(f for f in FIELDS if f.slot == slot)


def obsm_keys() -> frozenset[str]:
    """Every ``obsm`` key a scorer may write: never an input embedding carried over."""
    return frozenset(f.name for f in fields("obsm"))


def shape(f: Field, sizes: dict[str, int]) -> tuple[int, ...]:
    """The field's shape for dimension sizes such as ``{"obs": n, "ablated": a, ...}``."""
    return tuple(sizes[d] for d in f.dims)


_DIM_TEXT = {
    "obs": "n_obs",
    "vars": "n_vars",
    "latent": "K",
    "ablated": "A",
    "group": "(n_groups + 1)",
    "step": "S",
}


def markdown_table() -> str:
    """The schema as a Markdown table (docs/result-schema.md embeds this text)."""
    rows = ["| field | shape | present | content |", "| --- | --- | --- | --- |"]
    rows.append("| `obs` | n_obs | always | the input's obs columns, same obs_names and order |")
    for f in (*FIELDS, LOADINGS):
        where = f'{f.slot}["{f.name}"]'
        dims = " x ".join(_DIM_TEXT[d] for d in f.dims)
        kind = " bool" if f.dtype == "bool" else ""
        rows.append(f"| `{where}` | {dims}{kind} | {f.when} | {f.doc} |")
    rows.append(
        '| `obsm["X_umap"]`, ... | n_obs x 2 | input has it | the input\'s 2-D embeddings, carried over |'
    )
    for name, when, doc in UNS:
        rows.append(f'| `uns["{name}"]` | | {when} | {doc} |')
    rows.append(
        "| `X` | n_obs x n_vars | always | empty (sparse, all zeros): no counts are copied |"
    )
    return "\n".join(rows)


BEGIN, END = (
    "<!-- schema table: generated by linear_decoder_jax.schema -->",
    "<!-- end schema table -->",
)


def embed(text: str) -> str:
    """``text`` with the table between the :data:`BEGIN` and :data:`END` markers regenerated."""
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{markdown_table()}\n{END}{tail}"


if __name__ == "__main__":  # python -m linear_decoder_jax.schema FILE...: regenerate the tables
    import sys
    from pathlib import Path

    for name in sys.argv[1:]:
        path = Path(name)
        path.write_text(embed(path.read_text()))
