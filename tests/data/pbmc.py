"""Small real single-cell counts for tests and scripts (numpy, anndata and gzip only).

``pbmc_raw.tsv.gz`` is Seurat's ``extdata/pbmc_raw.txt`` (80 PBMC cells x 230 genes of raw UMI
counts, a subset of 10x Genomics' PBMC 3k data set); see README.md in this folder. The file is genes
x cells: a header line of 80 cell barcodes, then one line per gene, ``GENE<TAB>count...``.

Usage from a test or a script::

    import sys, pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).parent / "data"))   # adjust to tests/data
    from pbmc import load_pbmc, load_counts_npz
    adata = load_pbmc()                     # 80 x 230, float32 counts in .X
    adata = load_counts_npz("tests/data/golden/counts.npz")

Fixtures that trained a model (``golden/``, ``old_release/*/``) store their exact input as
``counts.npz`` (keys ``X`` float32 cells x genes, ``batch`` str, ``obs_names``, ``var_names``);
``load_counts_npz`` turns it back into the AnnData the model was set up with (batch key "batch").
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent
PBMC_PATH = DATA_DIR / "pbmc_raw.tsv.gz"
PBMC_META_PATH = DATA_DIR / "pbmc_small_meta.tsv"

N_CELLS = 80
N_GENES = 230


def read_pbmc_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X cells x genes float32, obs_names, var_names) from pbmc_raw.tsv.gz."""
    with gzip.open(PBMC_PATH, "rt", encoding="ascii") as fh:
        lines = fh.read().splitlines()
    cells = lines[0].split("\t")
    genes, rows = [], []
    for line in lines[1:]:
        if not line:
            continue
        parts = line.split("\t")
        genes.append(parts[0])
        rows.append(np.asarray(parts[1:], dtype=np.float32))
    x = np.ascontiguousarray(np.stack(rows, axis=0).T)  # genes x cells -> cells x genes
    if x.shape != (len(cells), len(genes)):
        raise ValueError(f"malformed {PBMC_PATH.name}: {x.shape} vs {len(cells)} x {len(genes)}")
    return x, np.asarray(cells, dtype=object), np.asarray(genes, dtype=object)


def _read_meta() -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    if not PBMC_META_PATH.exists():
        return out
    lines = PBMC_META_PATH.read_text().splitlines()
    header = lines[0].split("\t")
    for line in lines[1:]:
        parts = line.split("\t")
        out[parts[0]] = dict(zip(header[1:], parts[1:], strict=True))
    return out


def pbmc_batches(n_cells: int = N_CELLS) -> np.ndarray:
    """The deterministic two-batch assignment every fixture here uses: cell i -> "b{i % 2}"."""
    return np.asarray([f"b{i % 2}" for i in range(n_cells)], dtype=object)


def load_pbmc():
    """Seurat's 80-cell PBMC counts as an AnnData (cells x genes, float32 counts in ``.X``).

    obs columns: ``batch`` ("b0"/"b1", alternating by cell order; see ``pbmc_batches``),
    ``seurat_clusters`` ("0"/"1"/"2", Seurat's pbmc_small ``RNA_snn_res.1`` clusters) and
    ``groups`` ("g1"/"g2", pbmc_small's random example groups), when pbmc_small_meta.tsv is there.
    """
    import anndata as ad
    import pandas as pd

    x, cells, genes = read_pbmc_arrays()
    obs = pd.DataFrame(index=pd.Index(cells.astype(str), name=None))
    obs["batch"] = pd.Categorical(pbmc_batches(len(cells)).astype(str))
    meta = _read_meta()
    if meta:
        for col in ("seurat_clusters", "groups"):
            obs[col] = pd.Categorical([meta[c][col] for c in obs.index])
    var = pd.DataFrame(index=pd.Index(genes.astype(str), name=None))
    return ad.AnnData(X=x, obs=obs, var=var)


def load_counts_npz(path):
    """AnnData from a fixture's ``counts.npz`` (X, batch, obs_names, var_names)."""
    import anndata as ad
    import pandas as pd

    with np.load(path, allow_pickle=False) as z:
        x = np.asarray(z["X"], dtype=np.float32)
        batch = z["batch"].astype(str)
        obs_names = z["obs_names"].astype(str)
        var_names = z["var_names"].astype(str)
    obs = pd.DataFrame({"batch": pd.Categorical(batch)}, index=pd.Index(obs_names))
    var = pd.DataFrame(index=pd.Index(var_names))
    return ad.AnnData(X=x, obs=obs, var=var)


def save_counts_npz(path, adata, batch_key: str = "batch") -> None:
    """Write the inputs a fixture model was trained on (no pickle: fixed-width unicode arrays)."""
    x = np.asarray(adata.X, dtype=np.float32)
    np.savez_compressed(
        path,
        X=x,
        batch=np.asarray(adata.obs[batch_key].astype(str).to_numpy(), dtype=str),
        obs_names=np.asarray(adata.obs_names.to_numpy(), dtype=str),
        var_names=np.asarray(adata.var_names.to_numpy(), dtype=str),
    )
