"""The runtime never needs torch or scvi-tools: convert, load, decode and ablate with them blocked."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap

import pytest

import converters
import linear_decoder_jax

# An import hook, not ``sys.modules[name] = None``: libraries that look torch up in sys.modules
# (scipy's array-API helpers) would find None there and fail.
BLOCK = (
    "import sys\n"
    "class _Blocked:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'scvi', 'lightning', 'pytorch_lightning'):\n"
    "            raise ImportError(f'{name} is blocked in this test')\n"
    "sys.meta_path.insert(0, _Blocked())\n"
)


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_module_imports_without_torch():
    names = [
        m.name
        for pkg in (linear_decoder_jax, converters)
        for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
    ]
    assert "linear_decoder_jax.ablation" in names and "converters.scvi_ldvae" in names
    out = _run(
        "import importlib\n"
        f"for n in {names!r}:\n"
        "    importlib.import_module(n)\n"
        "print('torch' in sys.modules and sys.modules['torch'] is not None)\n"
    )
    assert out.strip() == "False"


def test_convert_load_decode_ablate_without_torch(trained_models, tmp_path):
    pytest.importorskip("scvi")
    t = trained_models("zinb")
    data = tmp_path / "cells.h5ad"
    t.adata.write_h5ad(data)
    out = _run(f"""
        import anndata, numpy as np
        import linear_decoder_jax as ldj
        dst = ldj.convert({str(t.saved)!r}, {str(tmp_path / "m")!r})
        model = ldj.load(dst)
        adata = anndata.read_h5ad({str(data)!r})
        z = model.get_latent_representation(adata)
        rho = model.get_normalized_expression(adata, return_numpy=True)
        res = ldj.ablate(model, adata)
        np.save({str(tmp_path / "rho.npy")!r}, rho)
        np.save({str(tmp_path / "delta.npy")!r}, res.delta_nll)
        print('torch' in sys.modules and sys.modules['torch'] is not None)
    """)
    assert out.strip().endswith("False")
    import numpy as np

    import linear_decoder_jax as ldj

    model = ldj.load(t.saved)
    np.testing.assert_array_equal(
        np.load(tmp_path / "rho.npy"), model.get_normalized_expression(t.adata, return_numpy=True)
    )
    np.testing.assert_array_equal(
        np.load(tmp_path / "delta.npy"), ldj.ablate(model, t.adata).delta_nll
    )
