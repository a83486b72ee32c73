"""Regenerate ``tests/data/drvi_ported/``: DRVI models in the scvi-tools 1.5 layout, with outputs.

For each configuration a tiny drvi-py 0.2.8 model is trained on ``tests/drvi_ref.make_adata()``
(200 cells x 60 genes, 2 epochs, ``torch.manual_seed(0)``), ported with
``drvi.utils.port_to_scvi_tools`` (the layout scvi-tools 1.5's ``scvi.external.DRVI`` loads), and
drvi's own torch module on the *original* model gives the expected outputs at the posterior mean:

- ``model.pt``: the ported checkpoint (``scvi.external.DRVI`` layout);
- ``counts.npz``: ``x`` (float32 counts of the first 50 cells, cell 0 emptied) and ``codes`` (int64, batch first, then
  the categorical covariates);
- ``expected.npz``: ``qz_m``, ``qz_v``, ``split_values``, ``scale``, ``mu``, ``nll`` (float32).

No scvi-tools 1.5 run checked the ported files (1.5 needs Python >= 3.12): they check that our
reader inverts the port exactly. Run from the repository root with the test environment::

    python tests/data/make_drvi_ported.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from drvi_ref import codes_of, eval_counts, make_adata, torch_reference, train  # noqa: E402

N_CELLS = 50  # cells kept in the fixture (cell 0 is empty)
SMALL = {"n_latent": 6, "encoder_dims": (16, 16), "decoder_dims": (16, 16)}
CONFIGS = {
    # the defaults: split_map, weights reused everywhere, layer norm, logsumexp, pnb; two covariates
    "default_two_covariates": (
        {"batch_key": "batch", "categorical_covariate_keys": ["donor"]},
        {},
    ),
    # "sum" (1.5's "mean"), split_diag (1.5's "split_mask"), gene-batch dispersion, nb
    "mean_splitmask_genebatch_nb": (
        {"batch_key": "batch"},
        {"split_aggregation": "sum", "split_method": "split_diag", "dispersion": "gene-batch",
         "gene_likelihood": "nb", "decoder_reuse_weights": "nowhere"},
    ),
}  # fmt: skip


def main() -> None:
    from drvi.utils import port_to_scvi_tools

    out = HERE / "drvi_ported"
    adata = make_adata()
    x = eval_counts(adata)[:N_CELLS]
    for name, (setup, kwargs) in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            m = train(Path(tmp) / "model", adata, setup, {**SMALL, **kwargs})
            codes = codes_of(m)[:N_CELLS]
            ref = torch_reference(m, x, codes)
            ported = Path(port_to_scvi_tools(Path(tmp) / "model", Path(tmp) / "ported"))
            dest = out / name
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(ported / "model.pt", dest / "model.pt")
        np.savez_compressed(dest / "counts.npz", x=x, codes=codes)
        np.savez_compressed(
            dest / "expected.npz", **{k: v.astype(np.float32) for k, v in ref.items()}
        )
        print(f"wrote {dest}")


if __name__ == "__main__":
    main()
