"""Parity with scvi-tools 1.4.2 across the configuration matrix (<= 1e-5 relative, float32).

Each model is trained in this session by scvi-tools, saved as a user saves it, converted by
``ldj.convert`` (no torch involved), loaded, and compared with scvi-tools' deterministic outputs
(``scvi_ref.scvi_reference``): latent, library, rho, mu, theta, zero-inflation logits, per-cell
NLL, and rho after zeroing one latent.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MATRIX, rel_err

import linear_decoder_jax as ldj

pytest.importorskip("scvi")

TOL = 1e-5


def _ours(model: ldj.LinearSCVI, adata, ref: dict) -> dict[str, np.ndarray]:
    data = model.prepare(adata)
    z = model.get_latent_representation(adata)
    qz_m, qz_v = model.get_latent_representation(adata, return_dist=True)
    enc = model.encode(data)
    decoded = model.decode(
        z, batch_index=data.batch, label_index=data.label, library=enc["library"][:, 0]
    )
    z0 = z.copy()
    z0[:, 0] = 0.0
    out = {
        "qz_m": qz_m,
        "qz_v": qz_v,
        "z": z,
        "library": enc["library"],
        "scale": model.get_normalized_expression(adata, return_numpy=True),
        "mu": model.get_normalized_expression(adata, library_size="latent", return_numpy=True),
        "nll": model.get_reconstruction_error(adata),
        "scale_zeroed": model.get_normalized_expression(adata, latent=z0, return_numpy=True),
        "nll_zeroed": model.get_reconstruction_error(adata, latent=z0),
    }
    if "theta" in ref:
        out["theta"] = decoded.theta
    if "zi_logits" in ref:
        out["zi_logits"] = decoded.zi_logits
    return out


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_parity_with_scvi_tools(name, trained_models, tmp_path, record_property):
    from scvi_ref import scvi_reference

    t = trained_models(name)
    dst = ldj.convert(t.saved, tmp_path / "converted", prefix=t.prefix)
    model = ldj.load(dst)
    ref = scvi_reference(t.scvi_model, t.adata)
    ours = _ours(model, t.adata, ref)
    errors = {k: rel_err(v, ref[k]) for k, v in ours.items()}
    worst = max(errors, key=errors.get)
    record_property("worst_rel_err", f"{worst}={errors[worst]:.2e}")
    print(f"{name}: worst {worst} {errors[worst]:.2e}")
    assert errors[worst] <= TOL, errors


@pytest.mark.parametrize("name", ["nb_gene", "batch3_gene_batch", "no_batch_norm"])
def test_loadings_match_scvi_where_scvi_is_right(name, trained_models):
    t = trained_models(name)
    model = ldj.load(t.saved, prefix=t.prefix)
    ours = model.get_loadings()
    theirs = t.scvi_model.get_loadings()
    assert list(ours.columns) == list(theirs.columns)
    assert list(ours.index) == list(theirs.index)
    assert rel_err(ours.to_numpy(), theirs.to_numpy()) <= TOL


def test_loadings_fold_batch_norm_that_scvi_omits(trained_models):
    """use_batch_norm="encoder" keeps decoder BatchNorm; scvi-tools' loadings skip its scaling."""
    t = trained_models("batch_norm_encoder")
    model = ldj.load(t.saved)
    assert model.config.decoder_batch_norm
    theirs = t.scvi_model.get_loadings().to_numpy()
    raw = np.asarray(t.scvi_model.module.decoder.factor_regressor.fc_layers[0][0].weight.detach())
    np.testing.assert_allclose(theirs, raw)  # scvi-tools: no BatchNorm scaling
    assert rel_err(model.get_loadings().to_numpy(), theirs) > 1e-3


@pytest.mark.parametrize("name", ["batch3_gene_batch", "zinb", "bias", "ln"])
def test_affine_decoder_reproduces_rho(name, trained_models):
    from scvi_ref import scvi_reference

    t = trained_models(name)
    model = ldj.load(t.saved)
    ref = scvi_reference(t.scvi_model, t.adata)
    aff = model.get_affine_decoder()
    batch = model.prepare(t.adata).batch
    z = model.get_latent_representation(t.adata)
    logits = z @ aff.scale.loadings.T + aff.scale.offsets[batch] + aff.scale.intercept
    rho = np.exp(logits - logits.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    assert rel_err(rho, ref["scale"]) <= TOL
    if model.config.gene_likelihood == "zinb":
        zi = z @ aff.zi_logits.loadings.T + aff.zi_logits.offsets[batch] + aff.zi_logits.intercept
        assert rel_err(zi, ref["zi_logits"]) <= TOL
    else:
        assert aff.zi_logits is None


def test_naive_reconstruction_does_not_match(trained_models):
    """The motivating bug: softmax(latent @ get_loadings().T) is not scvi-tools' rho."""
    from scvi_ref import scvi_reference

    t = trained_models("batch3_gene_batch")
    ref = scvi_reference(t.scvi_model, t.adata)
    naive = ref["z"] @ t.scvi_model.get_loadings().to_numpy().T
    naive = np.exp(naive - naive.max(1, keepdims=True))
    naive /= naive.sum(1, keepdims=True)
    assert rel_err(naive, ref["scale"]) > 1e-2
