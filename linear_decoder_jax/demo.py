"""``ldj demo``: the core question on real data, end to end, with nothing to download.

The package ships a small scvi-tools 1.4.2 LinearSCVI checkpoint trained on real PBMC counts
(Seurat's ``pbmc_raw``) into which a known factor was planted: a set of genes raised in a known
subset of cells (``tests/data/make_demo_checkpoint.py`` regenerates it). The demo converts the
checkpoint without torch, ablates every latent for every cell, and shows that one latent carries
the planted cells and genes, then writes the HTML report (figures in ``figures/``).
"""

from __future__ import annotations

import json
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

DEMO_DIR = "data/demo"


def demo_files() -> Path:
    """Folder holding ``model.pt``, ``counts.h5ad`` and ``planted.json``."""
    return Path(str(resources.files("linear_decoder_jax") / DEMO_DIR))


def run(out: str | None = None, *, overwrite: bool = False) -> int:
    import anndata

    import linear_decoder_jax as ldj
    from linear_decoder_jax import report

    src = demo_files()
    planted = json.loads((src / "planted.json").read_text())
    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix="ldj-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = ldj.convert(src / "model.pt", folder / "model", overwrite=overwrite)
    model = ldj.load(model_dir)
    adata = anndata.read_h5ad(src / "counts.h5ad")
    result = ldj.ablate(model, adata, groupby="group")
    result_path = result.write(folder / "ablation.h5ad", overwrite=overwrite)

    in_planted = adata.obs["group"].to_numpy() == "planted"
    delta = result.delta_nll
    contrast = delta[in_planted].mean(0) - delta[~in_planted].mean(0)
    k = int(np.argmax(contrast))
    name = result.latent_names[k]
    top_first = float((delta[in_planted].argmax(1) == k).mean())
    genes = np.asarray(result.var_names)
    n_genes = len(planted["genes"])
    # Genes the latent raises in the planted cells: loadings signed by where the cells sit.
    side = np.sign(result.latent[in_planted, k].mean() - result.latent[~in_planted, k].mean())
    raised = genes[np.argsort(-side * result.loadings[:, k])[:n_genes]]
    overlap = len(set(raised) & set(planted["genes"]))

    print(f"ldj demo: {model}")
    print(
        f"  {adata.n_obs} real PBMC cells x {adata.n_vars} genes; planted factor in "
        f"{int(in_planted.sum())} cells on {n_genes} genes"
    )
    print(result.summary())
    print(
        f"  latent most specific to the planted cells: {name} "
        f"(mean delta_nll {delta[in_planted, k].mean():.1f} nats in planted cells vs "
        f"{delta[~in_planted, k].mean():.1f} in the others)"
    )
    print(
        f"  {name} is the top latent for {top_first:.0%} of planted cells; "
        f"{overlap} of the {n_genes} genes it raises most there are planted genes"
    )
    found = k == planted["planted_latent"] and overlap > n_genes // 2
    print(f"  planted factor {'FOUND' if found else 'NOT FOUND'}: {name}")
    print(f"wrote {model_dir} and {result_path}")
    report_path = report.write_report(
        result, folder / "report.html", png_dir=folder / "figures", overwrite=overwrite
    )
    print(f"report: {report_path} (figures in {folder / 'figures'})")
    return 0 if found else 1
