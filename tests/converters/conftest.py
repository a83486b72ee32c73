"""Fixtures for the converter tests: tiny scvi-tools models trained once per session."""

from __future__ import annotations

import pytest
from _scvi_cases import CASES, Trained, train


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    """Every case of :data:`CASES`, plus a plain ``"scvi"`` model, trained and saved."""
    scvi = pytest.importorskip("scvi")
    scvi.settings.seed = 0
    scvi.settings.verbosity = 40
    root = tmp_path_factory.mktemp("scvi_models")
    out = {}
    for name, (setup, kwargs, _) in CASES.items():
        out[name] = Trained(train(scvi.model.LinearSCVI, setup, kwargs), root / name)
    out["scvi"] = Trained(train(scvi.model.SCVI, {"batch_key": "batch"}, {}), root / "scvi")
    for model, path in out.values():
        model.save(str(path))
    return out
