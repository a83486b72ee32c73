"""Hostile and malformed checkpoints: refused by name, no code run (no torch needed).

What ``tests/test_converters`` covers (torch-built payloads, broken archives, size caps) is not
repeated: payloads are spliced into the bytes of the committed real checkpoint
(``tests/data/golden``) in every part of the pickle, through the API and the CLI; NaN/inf weights,
zip features torch never writes, other model classes, damaged converted-model directories.
"""

from __future__ import annotations

import io
import math
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from reliability_tools import (
    GOLDEN,
    SPOTS,
    assert_one_line,
    payloads,
    pkl_name,
    replace_str,
    run_cli,
    splice,
    with_pickle,
    write_converted_copy,
    zip_bytes,
    zip_records,
)

import linear_decoder_jax as ldj
from converters import (
    MalformedCheckpointError,
    UnsafeCheckpointError,
    UnsupportedModelError,
    read_scvi_checkpoint,
)
from linear_decoder_jax.errors import (
    CheckpointFormatError,
)

# --------------------------------------------------------------------------------------------
# Checkpoints that would run code
# --------------------------------------------------------------------------------------------


class _Permissive(pickle.Unpickler):
    """What ``torch.load(..., weights_only=False)`` does, with torch's own globals stubbed."""

    def find_class(self, module: str, name: str) -> object:
        if module.startswith("torch"):
            return lambda *args: None
        return super().find_class(module, name)

    def persistent_load(self, pid: object) -> None:
        return None


def permissive_load(data: bytes) -> object:
    return _Permissive(io.BytesIO(data)).load()


@pytest.mark.parametrize("name", [k for k, v in payloads(Path("m")).items() if v[2]])
def test_spliced_payloads_are_live(tmp_path: Path, name: str) -> None:
    # plain pickle runs them: the refusals below are meaningful
    marker = tmp_path / "marker"
    ops, _, _ = payloads(marker)[name]
    pickle.loads(b"\x80\x02" + ops + b".")
    assert marker.exists()
    marker.unlink()
    # and so does torch.load(weights_only=False) on the spliced checkpoint (torch stubbed out)
    path = with_pickle(tmp_path / "model.pt", splice(ops, SPOTS["state_dict"]))
    permissive_load(zip_records(path)[pkl_name(zip_records(path))])
    assert marker.exists()


@pytest.mark.parametrize("spot", list(SPOTS))
@pytest.mark.parametrize("name", list(payloads(Path("m"))))
def test_spliced_payload_is_refused_by_name(tmp_path: Path, name: str, spot: str) -> None:
    marker = tmp_path / "marker"
    ops, named, _ = payloads(marker)[name]
    path = with_pickle(tmp_path / "model.pt", splice(ops, SPOTS[spot]))
    with pytest.raises(UnsafeCheckpointError, match=f"pickle global '{named}' is not on the") as e:
        read_scvi_checkpoint(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_unsafe_checkpoint_through_load_and_cli(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "marker"
    ops, _, _ = payloads(marker)["eval"]
    folder = tmp_path / "evil"
    folder.mkdir()
    with_pickle(folder / "model.pt", splice(ops, SPOTS["state_dict"]))
    with pytest.raises(UnsafeCheckpointError, match="'builtins.eval'"):
        ldj.load(folder)
    with pytest.raises(UnsafeCheckpointError, match="'builtins.eval'"):
        ldj.convert(folder, tmp_path / "out")
    for argv in (["convert", folder, tmp_path / "out"], ["info", folder]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line(code, err, "'builtins.eval' is not on the allowlist", "Nothing in the file")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_unsafe_checkpoint_cli_subprocess(tmp_path: Path) -> None:
    """The real console process: one line, exit 1, marker absent; ``--debug`` adds a traceback."""
    marker = tmp_path / "marker"
    path = with_pickle(tmp_path / "evil.pt", splice(payloads(marker)["os.system"][0], None))
    cmd = [sys.executable, "-m", "linear_decoder_jax"]
    proc = subprocess.run(
        [*cmd, "convert", str(path), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert_one_line(proc.returncode, proc.stderr, "pickle global 'os.system'")
    proc = subprocess.run(
        [*cmd, "--debug", "convert", str(path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UnsafeCheckpointError" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Malformed and unsupported checkpoints
# --------------------------------------------------------------------------------------------


def test_nan_or_inf_in_any_weight_is_refused(tmp_path: Path) -> None:
    """Every float32 storage of the real checkpoint, poisoned in turn: refused, naming the key.

    Storages no parameter uses (BatchNorm step counters) may load, but then nothing changed.
    """
    records = zip_records(GOLDEN)
    reference = read_scvi_checkpoint(GOLDEN).params
    storages = [name for name in records if "/data/" in name]
    refused = set()
    for bad in (math.nan, math.inf, -math.inf):
        for name in storages:
            edited = dict(records)
            edited[name] = struct.pack("<f", bad) + records[name][4:]
            path = tmp_path / "poisoned.pt"
            path.write_bytes(zip_bytes(edited))
            try:
                params = read_scvi_checkpoint(path).params
            except MalformedCheckpointError as err:
                assert "holds NaN or infinite values" in str(err)
                refused.add(name)
            else:
                assert len(records[name]) == 8  # an int64 counter
                for key, value in reference.items():
                    np.testing.assert_array_equal(params[key], value)
    assert len(refused) == len(reference)  # one storage per parameter, each refused


@pytest.mark.parametrize(
    "model_name", ["SCVI", "SCANVI", "TOTALVI", "PEAKVI", "AUTOZI", "AmortizedLDA"]
)
def test_other_scvi_model_classes_are_refused(tmp_path: Path, model_name: str) -> None:
    path = with_pickle(tmp_path / "model.pt", replace_str("LinearSCVI", model_name))
    msg = f"this is a {model_name} model, not LinearSCVI; only LinearSCVI can be converted"
    with pytest.raises(UnsupportedModelError, match=msg):
        read_scvi_checkpoint(path)


def test_gene_cell_dispersion_is_refused(tmp_path: Path) -> None:
    path = with_pickle(tmp_path / "model.pt", replace_str("gene-batch", "gene-cell"))
    with pytest.raises(UnsupportedModelError, match="dispersion='gene-cell' cannot be mirrored"):
        read_scvi_checkpoint(path)


def test_deflated_archive_loads(tmp_path: Path) -> None:
    # torch writes stored records; deflate (what zip tools use) is accepted too
    path = tmp_path / "deflated.pt"
    path.write_bytes(zip_bytes(zip_records(GOLDEN), zipfile.ZIP_DEFLATED))
    expected = read_scvi_checkpoint(GOLDEN).params
    for key, value in read_scvi_checkpoint(path).params.items():
        np.testing.assert_array_equal(value, expected[key])


def central_directory(data: bytearray) -> list[int]:
    """Offsets of the central-directory headers of a zip archive."""
    offsets, start = [], 0
    while (start := data.find(b"PK\x01\x02", start)) >= 0:
        offsets.append(start)
        start += 4
    return offsets


def set_all(offset: int, fmt: str, value: int) -> Callable[[bytearray], None]:
    def edit(data: bytearray) -> None:
        for start in central_directory(data):
            struct.pack_into(fmt, data, start + offset, value)

    return edit


def corrupt_deflate_stream(data: bytearray) -> None:
    start = central_directory(data)[0]
    local = struct.unpack_from("<I", data, start + 42)[0]
    name_len, extra_len = struct.unpack_from("<HH", data, local + 26)
    body = local + 30 + name_len + extra_len
    data[body : body + 64] = bytes(range(64))


@pytest.mark.parametrize(
    ("compression", "edit", "match"),
    [
        (zipfile.ZIP_BZIP2, None, "uses zip compression method 12; expected stored or deflate"),
        (zipfile.ZIP_LZMA, None, "uses zip compression method 14; expected stored or deflate"),
        (zipfile.ZIP_STORED, set_all(10, "<H", 99), "uses zip compression method 99"),
        (zipfile.ZIP_STORED, set_all(8, "<H", 1), "is encrypted"),
        (zipfile.ZIP_STORED, set_all(6, "<H", 255), "truncated or corrupt zip archive"),
        (zipfile.ZIP_DEFLATED, corrupt_deflate_stream, "corrupt record"),
    ],
    ids=["bzip2", "lzma", "unknown-method", "encrypted", "zip-version", "corrupt-deflate"],
)
def test_zip_features_torch_never_writes(
    tmp_path: Path, compression: int, edit: Callable[[bytearray], None] | None, match: str
) -> None:
    data = bytearray(zip_bytes(zip_records(GOLDEN), compression))
    if edit is not None:
        edit(data)
    path = tmp_path / "model.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(MalformedCheckpointError, match=match):
        read_scvi_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"[]", "expected a JSON object, got list"),
        (b"null", "expected a JSON object, got NoneType"),
        (b"\xff\xfe garbage", "can't decode"),
        (b'{"format_version": 1', "is not a valid model configuration"),
        (b'{"format_version": 9, "model": {}, "data": {}}', "format_version 1 or 2, got 9"),
        (b'{"format_version": 1, "model": {"n_input": 2}, "data": {}}', "is not a valid model"),
    ],
)
def test_damaged_converted_config(tmp_path: Path, converted: Path, content: bytes, match: str):
    model = tmp_path / "model"
    shutil.copytree(converted, model)
    (model / "config.json").write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=match):
        ldj.load(model)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c["data"]["var_names"].pop(), "lists 229 genes but the model has 230"),
        (lambda c: c["data"]["batch_categories"].pop(), "lists 1 batch categories but the model"),
        (lambda c: c["model"].update(n_latent=7), r"expected shape \(32, 7\), got \(32, 6\)"),
    ],
    ids=["genes", "batches", "shapes"],
)
def test_converted_config_disagreeing_with_itself(
    tmp_path: Path, converted: Path, edit: Callable[[dict], None], match: str
) -> None:
    model = write_converted_copy(converted, tmp_path / "model", edit)
    with pytest.raises(CheckpointFormatError, match=match):
        ldj.load(model)


def test_converted_params_missing(tmp_path: Path, converted: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(converted, model)
    shutil.rmtree(model / "params")
    with pytest.raises(CheckpointFormatError, match="Could not restore the parameters"):
        ldj.load(model)
