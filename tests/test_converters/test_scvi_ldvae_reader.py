"""read_scvi_checkpoint against real scvi-tools LinearSCVI checkpoints, trained once per module."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _scvi_cases import BASE_CONFIG, BATCHES, CASES, GENES, Trained, expected_params, train

from converters import (
    CheckpointPathError,
    MalformedCheckpointError,
    ScviCheckpoint,
    UnsafeCheckpointError,
    UnsupportedModelError,
    read_scvi_checkpoint,
)

torch = pytest.importorskip("torch")

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    """Every case of ``CASES``, plus a plain ``"scvi"`` model, trained and saved."""
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


def assert_params_equal(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == np.float32, key
        assert got[key].flags.c_contiguous, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def expected_config(name: str, *, layout: str, path: Path) -> dict[str, Any]:
    import scvi

    source = {
        "scvi_version": scvi.__version__,
        "model_name": "LinearSCVI",
        "layout": layout,
        "path": str(path.resolve()),
    }
    return {**BASE_CONFIG, **CASES[name][2], "source": source}


def resave(trained: Trained, dst: Path, edit: Callable[[dict], None]) -> Path:
    """Save a copy of a model.pt after ``edit`` changed the loaded dict in place."""
    saved = torch.load(trained.path / "model.pt", weights_only=False)
    edit(saved)
    dst.mkdir(parents=True, exist_ok=True)
    torch.save(saved, dst / "model.pt")
    return dst


# --------------------------------------------------------------------------------------------
# Every option, the modern layout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_modern_layout(trained: dict[str, Trained], name: str) -> None:
    model, path = trained[name]
    ckpt = read_scvi_checkpoint(path)
    assert isinstance(ckpt, ScviCheckpoint)
    assert_params_equal(ckpt.params, expected_params(model.module.state_dict()))
    assert ckpt.config == expected_config(name, layout="modern", path=path / "model.pt")
    assert list(ckpt.config) == [*BASE_CONFIG, "source"]
    assert json.loads(json.dumps(ckpt.config)) == ckpt.config


def test_decoder_layers_follow_the_state_dict(trained: dict[str, Trained]) -> None:
    params = read_scvi_checkpoint(trained["no_batch_norm"].path).params
    assert not [k for k in params if "/bn/" in k and k.startswith("decoder/")]
    params = read_scvi_checkpoint(trained["bias"].path).params
    assert params["decoder/factor/dense/kernel"].shape == (3 + 3, 40)  # K latent + 3 batch rows
    assert params["decoder/dropout/dense/bias"].shape == (40,)
    params = read_scvi_checkpoint(trained["observed_lib"].path).params
    assert "library_log_means" not in params
    assert read_scvi_checkpoint(trained["batch_gene_batch"].path).params["px_r"].shape == (40, 3)


def test_direct_file_and_prefix(trained: dict[str, Trained], tmp_path: Path) -> None:
    model, path = trained["default"]
    expected = read_scvi_checkpoint(path)
    direct = read_scvi_checkpoint(path / "model.pt")
    assert_params_equal(direct.params, expected.params)
    assert direct.config == expected.config

    model.save(str(tmp_path / "prefixed"), prefix="p_")
    prefixed = read_scvi_checkpoint(tmp_path / "prefixed", prefix="p_")
    assert_params_equal(prefixed.params, expected.params)
    assert prefixed.config["source"]["path"] == str((tmp_path / "prefixed/p_model.pt").resolve())
    found = read_scvi_checkpoint(tmp_path / "prefixed")  # the folder's one model, no prefix
    assert_params_equal(found.params, expected.params)
    with pytest.raises(MalformedCheckpointError, match="expected q_model.pt .* prefix="):
        read_scvi_checkpoint(tmp_path / "prefixed", prefix="q_")
    model.save(str(tmp_path / "prefixed"), prefix="q_", overwrite=True)
    with pytest.raises(CheckpointPathError, match=r"several models \(p_model.pt, q_model.pt\)"):
        read_scvi_checkpoint(tmp_path / "prefixed")
    with pytest.raises(ValueError, match="applies only to a folder"):  # CheckpointPathError
        read_scvi_checkpoint(path / "model.pt", prefix="p_")
    with pytest.raises(FileNotFoundError):
        read_scvi_checkpoint(tmp_path / "nowhere")


def test_runs_without_torch_or_pandas(trained: dict[str, Trained]) -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'pandas', 'scvi', 'anndata'):\n"
        "    sys.modules[name] = None\n"
        "from converters import read_scvi_checkpoint\n"
        f"ckpt = read_scvi_checkpoint({str(trained['batch_gene_batch'].path)!r})\n"
        "assert ckpt.config['n_batch'] == 3, ckpt.config\n"
        "banned = {'torch', 'pandas', 'scvi', 'anndata'}\n"
        "print(sorted(m for m, v in sys.modules.items() if v and m.split('.')[0] in banned))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# Legacy layouts (scvi-tools < 0.15): model_params.pt + attr.pkl + var_names.csv
# --------------------------------------------------------------------------------------------


def write_legacy(dst: Path, state_dict: dict, attr: dict, var_names: list[str]) -> Path:
    dst.mkdir(parents=True)
    torch.save(state_dict, dst / "model_params.pt")
    with open(dst / "attr.pkl", "wb") as fh:
        pickle.dump(attr, fh)  # scvi-tools < 0.15 used pickle's default protocol
    np.savetxt(dst / "var_names.csv", np.array(var_names), fmt="%s", encoding="utf-8")
    return dst


def setup_dict(scvi_version: str = "0.14.6") -> dict:
    """A pre-0.15 ``scvi_setup_dict_``, modelled on scvi-tools' ``data/_compat.py``."""
    return {
        "scvi_version": scvi_version,
        "data_registry": {
            "X": {"attr_name": "layers", "attr_key": "counts"},
            "batch_indices": {"attr_name": "obs", "attr_key": "_scvi_batch"},
            "local_l_mean": {"attr_name": "obs", "attr_key": "_scvi_local_l_mean"},
            "local_l_var": {"attr_name": "obs", "attr_key": "_scvi_local_l_var"},
            "labels": {"attr_name": "obs", "attr_key": "_scvi_labels"},
        },
        "summary_stats": {"n_batch": 3, "n_cells": 150, "n_vars": 40, "n_labels": 1},
        "categorical_mappings": {
            "_scvi_batch": {"original_key": "batch", "mapping": np.array(BATCHES, dtype=object)},
            "_scvi_labels": {"original_key": "_scvi_labels", "mapping": np.array([0])},
        },
        "_scvi_uuid": "00000000-0000-0000-0000-000000000000",
    }


def test_legacy_layout_with_modern_attributes(trained: dict[str, Trained], tmp_path: Path) -> None:
    # what scvi-tools' own tests write: registry_ and init_params_ inside attr.pkl
    model, path = trained["batch_gene_batch"]
    attr = torch.load(path / "model.pt", weights_only=False)["attr_dict"]
    legacy = write_legacy(tmp_path / "legacy", model.module.state_dict(), attr, GENES)
    ckpt = read_scvi_checkpoint(legacy)
    assert_params_equal(ckpt.params, expected_params(model.module.state_dict()))
    expected = expected_config("batch_gene_batch", layout="legacy", path=legacy / "model_params.pt")
    assert ckpt.config == expected


def test_legacy_layout_with_setup_dict(trained: dict[str, Trained], tmp_path: Path) -> None:
    model, _ = trained["batch_gene_batch"]
    # old releases took the library prior from the data: no library buffers in the module
    state = {k: v for k, v in model.module.state_dict().items() if not k.startswith("library")}
    attr = {
        "scvi_setup_dict_": setup_dict(),
        "init_params_": {  # the flat layout of scvi-tools < 0.14
            "n_hidden": 16,
            "n_latent": 3,
            "n_layers": 1,
            "dropout_rate": 0.1,
            "dispersion": "gene-batch",
            "gene_likelihood": "nb",
            "latent_distribution": "normal",
            "use_cuda": False,
            "model_kwargs": {},
        },
        "is_trained_": True,
        "history_": model.history_,  # pandas DataFrames: skipped as inert placeholders
        "train_indices_": np.arange(100),
    }
    legacy = write_legacy(tmp_path / "legacy", state, attr, GENES)
    ckpt = read_scvi_checkpoint(legacy)
    assert_params_equal(ckpt.params, expected_params(state))
    expected = expected_config("batch_gene_batch", layout="legacy", path=legacy / "model_params.pt")
    expected["source"]["scvi_version"] = "0.14.6"
    assert ckpt.config == expected


def test_legacy_scvi_model_is_refused(trained: dict[str, Trained], tmp_path: Path) -> None:
    model, _ = trained["scvi"]
    attr = {"scvi_setup_dict_": setup_dict(), "init_params_": {"n_latent": 3, "use_cuda": False}}
    legacy = write_legacy(tmp_path / "legacy", model.module.state_dict(), attr, GENES)
    with pytest.raises(UnsupportedModelError, match=r"not LinearSCVI \(looks like SCVI\)"):
        read_scvi_checkpoint(legacy)


def test_legacy_layout_missing_file(trained: dict[str, Trained], tmp_path: Path) -> None:
    model, path = trained["default"]
    attr = torch.load(path / "model.pt", weights_only=False)["attr_dict"]
    legacy = write_legacy(tmp_path / "legacy", model.module.state_dict(), attr, GENES)
    (legacy / "var_names.csv").unlink()
    with pytest.raises(MalformedCheckpointError, match="missing .*var_names.csv"):
        read_scvi_checkpoint(legacy)


def test_bare_state_dict_file_is_explained(trained: dict[str, Trained], tmp_path: Path) -> None:
    torch.save(trained["default"].model.module.state_dict(), tmp_path / "model.pt")
    with pytest.raises(MalformedCheckpointError, match="legacy model_params.pt"):
        read_scvi_checkpoint(tmp_path / "model.pt")


# --------------------------------------------------------------------------------------------
# Models we refuse
# --------------------------------------------------------------------------------------------


def test_scvi_model_is_refused(trained: dict[str, Trained]) -> None:
    with pytest.raises(UnsupportedModelError, match="this is a SCVI model, not LinearSCVI"):
        read_scvi_checkpoint(trained["scvi"].path)


def set_init(name: str, value: Any) -> Callable[[dict], None]:
    def edit(saved: dict) -> None:
        init = saved["attr_dict"]["init_params_"]
        if name in init["non_kwargs"]:
            init["non_kwargs"][name] = value
        else:
            init["kwargs"]["model_kwargs"][name] = value

    return edit


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("dispersion", "gene-cell", "dispersion='gene-cell' cannot be mirrored"),
        ("gene_likelihood", "normal", "gene_likelihood='normal' cannot be mirrored"),
        ("batch_representation", "embedding", "batch_representation='embedding'"),
        ("encode_covariates", True, "encode_covariates=True"),
        ("n_continuous_cov", 2, "n_continuous_cov=2"),
    ],
)
def test_unsupported_options(
    trained: dict[str, Trained], tmp_path: Path, name: str, value: Any, match: str
) -> None:
    path = resave(trained["default"], tmp_path, set_init(name, value))
    with pytest.raises(UnsupportedModelError, match=match):
        read_scvi_checkpoint(path)


# --------------------------------------------------------------------------------------------
# Malformed content
# --------------------------------------------------------------------------------------------


def set_weight(key: str, value: float) -> Callable[[dict], None]:
    def edit(saved: dict) -> None:
        saved["model_state_dict"][key][0, 0] = value

    return edit


def drop_state_key(key: str) -> Callable[[dict], None]:
    return lambda saved: saved["model_state_dict"].pop(key)


def add_state_key(key: str) -> Callable[[dict], None]:
    return lambda saved: saved["model_state_dict"].__setitem__(key, torch.zeros(2))


def set_entry(*keys: str, value: Any) -> Callable[[dict], None]:
    def edit(saved: dict) -> None:
        target = saved
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (
            set_weight("decoder.factor_regressor.fc_layers.Layer 0.0.weight", float("nan")),
            MalformedCheckpointError,
            "'decoder.factor_regressor.fc_layers.Layer 0.0.weight' holds NaN or infinite",
        ),
        (
            set_weight("z_encoder.mean_encoder.weight", float("inf")),
            MalformedCheckpointError,
            "'z_encoder.mean_encoder.weight' holds NaN or infinite",
        ),
        (
            drop_state_key("z_encoder.var_encoder.bias"),
            MalformedCheckpointError,
            r"missing state-dict keys \['z_encoder.var_encoder.bias'\]",
        ),
        (
            drop_state_key("decoder.px_dropout_decoder.fc_layers.Layer 0.1.running_var"),
            MalformedCheckpointError,
            "missing state-dict keys .*px_dropout_decoder.fc_layers.Layer 0.1.running_var",
        ),
        (
            add_state_key("decoder.extra.weight"),
            UnsupportedModelError,
            r"unexpected state-dict keys \['decoder.extra.weight'\]",
        ),
        (
            set_entry("model_state_dict", "px_r", value=torch.zeros(39)),
            MalformedCheckpointError,
            r"expected 'px_r' to have shape \(40,\) .* got \(39,\) instead",
        ),
        (
            set_entry("var_names", value=np.array(GENES[:-1], dtype=object)),
            MalformedCheckpointError,
            "expected 40 gene names, got 39 instead",
        ),
        (
            set_init("n_latent", 5),
            MalformedCheckpointError,
            "init_params_ give n_latent=5 but the state dict has 3",
        ),
        (
            set_entry(
                "attr_dict",
                "registry_",
                "field_registries",
                "batch",
                "state_registry",
                "categorical_mapping",
                value=np.array(["a", "b"], dtype=object),
            ),
            MalformedCheckpointError,
            "registry lists 2 batch categories but the decoder has 3 batch columns",
        ),
    ],
)
def test_malformed_content(
    trained: dict[str, Trained],
    tmp_path: Path,
    edit: Callable[[dict], None],
    error: type[Exception],
    match: str,
) -> None:
    path = resave(trained["bias"], tmp_path, edit)  # bias: 3 batches, decoder bias and BN
    with pytest.raises(error, match=match):
        read_scvi_checkpoint(path)


def test_directory_without_model(tmp_path: Path) -> None:
    with pytest.raises(MalformedCheckpointError, match="found neither"):
        read_scvi_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------
# Checkpoints that would run code under torch.load(..., weights_only=False)
# --------------------------------------------------------------------------------------------


class Payload:
    """Pickles as the call ``func(*args)``: what a malicious checkpoint contains."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __call__(self) -> None:  # pickle only saves callables as the function of a reduce
        raise NotImplementedError

    def __reduce__(self) -> tuple[Any, tuple]:
        return self.func, self.args


def payloads(marker: Path) -> dict[str, tuple[Payload, str]]:
    """Name -> (payload creating ``marker`` when unpickled, the global our error names)."""
    get_system = Payload(getattr, Payload(__import__, "os"), "system")
    return {
        "os.system": (Payload(os.system, f"touch {marker}"), "posix.system"),
        "eval": (Payload(eval, f"open({str(marker)!r}, 'w').close()"), "__builtin__.eval"),
        # protocol 2 writes Python 2 names: subprocess.Popen becomes commands.Popen
        "subprocess": (Payload(subprocess.Popen, ["touch", str(marker)]), "commands.Popen"),
        "getattr": (Payload(get_system, f"touch {marker}"), "__builtin__.getattr"),
    }


@pytest.mark.parametrize("payload", ["os.system", "eval", "subprocess", "getattr"])
def test_payloads_are_live(tmp_path: Path, payload: str) -> None:
    # the same bytes do run code under plain pickle: the refusals below are meaningful
    marker = tmp_path / "marker"
    result = pickle.loads(pickle.dumps(payloads(marker)[payload][0], protocol=2))
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert marker.exists()


@pytest.mark.parametrize("payload", ["os.system", "eval", "subprocess", "getattr"])
@pytest.mark.parametrize(
    "where",
    [
        ("model_state_dict",),
        ("attr_dict",),
        ("attr_dict", "init_params_"),
        ("attr_dict", "history_"),
    ],
)
def test_payload_is_refused(
    trained: dict[str, Trained], tmp_path: Path, payload: str, where: tuple[str, ...]
) -> None:
    marker = tmp_path / "marker"
    evil, name = payloads(marker)[payload]
    path = resave(trained["default"], tmp_path / "model", set_entry(*where, "evil", value=evil))
    with pytest.raises(UnsafeCheckpointError, match=f"pickle global '{name}' is not on the"):
        read_scvi_checkpoint(path)
    assert not marker.exists()


def test_payload_in_legacy_attr_pkl_is_refused(trained: dict[str, Trained], tmp_path: Path) -> None:
    model, path = trained["default"]
    marker = tmp_path / "marker"
    attr = torch.load(path / "model.pt", weights_only=False)["attr_dict"]
    attr["history_"]["evil"] = payloads(marker)["os.system"][0]
    legacy = write_legacy(tmp_path / "legacy", model.module.state_dict(), attr, GENES)
    with pytest.raises(UnsafeCheckpointError, match="'posix.system'") as info:
        read_scvi_checkpoint(legacy)
    assert "attr.pkl" in str(info.value)
    assert not marker.exists()
