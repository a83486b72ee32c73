"""Torch-free smoke test of an installed wheel (a CI stage of ``.ci/run``).

Usage: ``VENV/bin/python .ci/wheel_smoke.py VENV``, from a folder outside the source tree. The
venv holds neither torch nor scvi-tools (``.ci/run`` checks before calling this): every module of
the installed packages imports, convert, load, ablate, write/read and a figure run on the bundled
demo data, and none of the training stack was imported on the way. (Nothing is blocked by an
import hook here: libraries probe for torch with ``importlib.util.find_spec``, and an absent
package must look absent, as it does on a user's machine.)
"""

import importlib
import importlib.metadata
import importlib.util
import pkgutil
import sys
from pathlib import Path

BLOCKED = ("torch", "scvi", "lightning", "pytorch_lightning", "pyro", "torchmetrics")


def main(venv: Path) -> None:
    for name in BLOCKED:
        if importlib.util.find_spec(name) is not None:
            raise SystemExit(
                f"{name} is installed in {venv}: the smoke test needs a torch-free venv"
            )
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
