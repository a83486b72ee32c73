"""Parity on committed fixtures: no scvi-tools needed.

``data/golden`` (scvi-tools 1.4.2, ZINB, 2 batches, gene-batch dispersion, real PBMC counts) and
``data/old_release/<version>`` (older scvi-tools releases, whose checkpoints pickle numpy.core
and pandas < 2 classes and lay out ``init_params_`` differently) hold a checkpoint, its exact input
counts and scvi-tools' deterministic outputs; the ``make_*.py`` scripts beside them regenerate them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, rel_err
from pbmc import load_counts_npz

import linear_decoder_jax as ldj

TOL = 1e-5
FIXTURES = [DATA / "golden", *sorted((DATA / "old_release").iterdir())]


def _check(folder: Path) -> dict[str, float]:
    # scvi-tools < 0.15 wrote model_params.pt + attr.pkl + var_names.csv: point at the folder
    model = ldj.load(folder / "model.pt" if (folder / "model.pt").exists() else folder)
    adata = load_counts_npz(folder / "counts.npz")
    ref = dict(np.load(folder / "expected.npz"))
    data = model.prepare(adata)
    z = model.get_latent_representation(adata)
    lib = model.encode(data)["library"]
    dec = model.decode(z, batch_index=data.batch, library=lib[:, 0])
    z0 = z.copy()
    z0[:, 0] = 0.0
    ours = {
        "qz_m": model.get_latent_representation(adata, return_dist=True)[0],
        "z": z,
        "library": lib,
        "scale": dec.scale,
        "mu": dec.mu,
        "theta": dec.theta,
        "nll": model.get_reconstruction_error(adata),
        "scale_zeroed": model.get_normalized_expression(adata, latent=z0, return_numpy=True),
        "nll_zeroed": model.get_reconstruction_error(adata, latent=z0),
        "loadings": model.get_loadings().to_numpy(),
    }
    if dec.zi_logits is not None:
        ours["zi_logits"] = dec.zi_logits
    errors = {k: rel_err(v, ref[k]) for k, v in ours.items()}
    delta = ldj.ablate(model, adata).delta_nll
    ref_delta = ref["delta_nll_zero_drop"]
    tol = 5e-6 * np.abs(ref["nll"]).max() + 1e-5 * np.abs(ref_delta).max()
    assert np.abs(delta - ref_delta).max() <= tol
    return errors


@pytest.mark.parametrize("folder", FIXTURES, ids=lambda p: p.name)
def test_committed_fixture_parity(folder, record_property):
    errors = _check(folder)
    worst = max(errors, key=errors.get)
    record_property("worst_rel_err", f"{worst}={errors[worst]:.2e}")
    print(f"{folder.name}: worst {worst} {errors[worst]:.2e}")
    assert errors[worst] <= TOL, errors


def test_old_releases_cover_pre_1_0_and_1_x():
    versions = sorted(p.name for p in (DATA / "old_release").iterdir())
    assert any(v.startswith("0.14") for v in versions)  # pre-0.15 legacy layout
    assert any(v.startswith("0.") for v in versions) and any(v.startswith("1.") for v in versions)
