"""delta_nll equals the loop a scvi-tools user writes, on every configuration of the matrix."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MATRIX

import linear_decoder_jax as ldj

pytest.importorskip("scvi")


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_delta_nll_matches_scvi_loop(name, trained_models, record_property):
    from scvi_ref import scvi_ablation_loop, scvi_reference

    t = trained_models(name)
    model = ldj.load(t.saved, prefix=t.prefix)
    max_nll = np.abs(scvi_reference(t.scvi_model, t.adata)["nll"]).max()
    worst = 0.0
    for mode in ("drop", "keep"):
        for baseline in ("zero", "mean"):
            res = ldj.ablate(model, t.adata, baseline=baseline, mode=mode)
            ref = scvi_ablation_loop(
                t.scvi_model, t.adata, baseline=res.settings["baseline_values"], mode=mode
            )
            err = np.abs(res.delta_nll - ref).max()
            tol = 5e-6 * max_nll + 1e-5 * np.abs(ref).max()
            worst = max(worst, err / tol)
            assert err <= tol, (mode, baseline, err, tol)
    record_property("worst_err_over_tol", f"{worst:.3f}")
    print(f"{name}: worst error / tolerance {worst:.3f}")
