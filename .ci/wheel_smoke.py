"""Torch-free smoke test of an installed wheel (a CI stage of ``.ci/run``).

Usage: ``VENV/bin/python .ci/wheel_smoke.py VENV``, from a folder outside the source tree. With
torch, scvi-tools and their training stack blocked, every module of the installed packages
imports, and convert, load, ablate, write/read and a figure run on the bundled demo data.
"""

import importlib
import importlib.metadata
import pkgutil
import sys
from pathlib import Path

BLOCKED = ("torch", "scvi", "lightning", "pytorch_lightning", "pyro", "torchmetrics")


class _Blocked:
    """Import hook refusing BLOCKED (``sys.modules[name] = None`` breaks scipy's torch lookups)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in the smoke test")


def main(venv: Path) -> None:
    sys.meta_path.insert(0, _Blocked())

    import anndata
    import numpy as np

    import converters
    import linear_decoder_jax as ldj
    from linear_decoder_jax.demo import demo_files

    for pkg in (ldj, converters):
        where = Path(pkg.__file__).resolve()
        assert venv in where.parents, f"{pkg.__name__} imported from {where}, not from the wheel"
        for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(m.name)
    assert importlib.metadata.version("linear-decoder-jax") == ldj.__version__

    src = demo_files()
    model = ldj.load(ldj.convert(src / "model.pt", "model_ldj"))
    adata = anndata.read_h5ad(src / "counts.h5ad")
    result = ldj.ablate(model, adata, groupby="group", output="ablation.h5ad")
    planted = (adata.obs["group"] == "planted").to_numpy()
    k = int(np.argmax(result.delta_nll[planted].mean(0) - result.delta_nll[~planted].mean(0)))
    assert result.latent_names[k] == "Z_3", result.summary()
    z = model.get_latent_representation(adata)
    z[:, k] = 0.0
    lost = model.get_reconstruction_error(adata, latent=z) - model.get_reconstruction_error(adata)
    np.testing.assert_allclose(result.delta_nll[:, k], lost, atol=1e-3)
    again = ldj.AblationResult.read("ablation.h5ad")
    np.testing.assert_array_equal(again.delta_nll, result.delta_nll)
    ldj.pl.group_heatmap(result, "cell_type", save="heatmap.png")
    assert not any(sys.modules.get(n) for n in BLOCKED), "torch or scvi-tools was imported"
    print(f"wheel smoke test passed: {ldj.__version__}, {len(result.delta_nll)} cells, Z_3 found")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
