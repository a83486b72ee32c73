"""Hostile checkpoints, bad data and interrupted writes: clear errors, no code run, nothing lost.

What ``tests/test_converters`` already covers (torch-built payloads in every part of a model.pt,
broken archives, size caps, malformed state dicts, SCVI and unsupported options) is not repeated
here. This module adds, without torch:

* payloads spliced into the bytes of the committed real checkpoint (``tests/data/golden``): many
  globals, both GLOBAL and STACK_GLOBAL spellings, in every part of the pickle, through the API
  and the CLI; each must be refused by name with a marker file it would create left absent;
* a NaN and an infinity in every weight, zip methods and flags torch never writes, other model
  classes and ``gene-cell`` dispersion by byte edits, damaged converted-model directories;
* every data error of ``anndata_io`` (in memory, streamed from disk, and through ``ldj ablate``);
* refusal to overwrite and crash/Ctrl-C/kill safety of every writer: ``ldj convert``,
  ``ldj ablate`` (streamed), ``AblationResult.write`` and ``ldj merge``;
* the CLI contract: one line on stderr saying what is wrong and what to do, exit code 1, no
  traceback unless ``--debug``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import anndata
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from helpers import random_adata, random_model

import linear_decoder_jax as ldj
from converters import (
    ConverterError,
    MalformedCheckpointError,
    UnsafeCheckpointError,
    UnsupportedModelError,
    read_scvi_checkpoint,
)
from linear_decoder_jax.cli import main
from linear_decoder_jax.config import ModelSpec
from linear_decoder_jax.demo import demo_files
from linear_decoder_jax.errors import (
    CheckpointFormatError,
    IncompatibleDataError,
    OutputExistsError,
)

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "golden" / "model.pt"
DEMO = demo_files()
DEMO_MODEL = DEMO / "model.pt"
DEMO_DATA = DEMO / "counts.h5ad"

# --------------------------------------------------------------------------------------------
# Byte-level tools for torch zip archives and pickles (no torch needed)
# --------------------------------------------------------------------------------------------


def zip_records(path: Path) -> dict[str, bytes]:
    """The ``{name: bytes}`` records of a zip archive, in archive order."""
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def zip_bytes(records: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in records.items():
            zf.writestr(name, data)
    return buf.getvalue()


def pkl_name(records: dict[str, bytes]) -> str:
    return next(name for name in records if name.endswith("/data.pkl"))


def with_pickle(dst: Path, edit: Callable[[bytes], bytes], src: Path = GOLDEN) -> Path:
    """Write a copy of the torch zip ``src`` whose ``data.pkl`` is ``edit(data.pkl)``."""
    records = zip_records(src)
    name = pkl_name(records)
    records[name] = edit(records[name])
    dst.write_bytes(zip_bytes(records))
    return dst


def ustr(text: str) -> bytes:
    """A pickle BINUNICODE opcode pushing ``text``."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def replace_str(old: str, new: str) -> Callable[[bytes], bytes]:
    """Replace the one pickled string ``old`` by ``new`` (lengths may differ)."""

    def edit(data: bytes) -> bytes:
        assert data.count(ustr(old)) == 1, old
        return data.replace(ustr(old), ustr(new))

    return edit


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def stack_glob(module: str, name: str) -> bytes:
    return ustr(module) + ustr(name) + b"\x93"  # STACK_GLOBAL, the protocol-4 spelling


def call(func: bytes, *args: bytes) -> bytes:
    return func + b"(" + b"".join(args) + b"tR"


def plist(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e"


def pbytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


def payloads(marker: Path) -> dict[str, tuple[bytes, str, bool]]:
    """name -> (pickle ops calling code that creates ``marker``, the global our error names,
    whether plain ``pickle.loads`` of those ops really creates the marker)."""
    touch = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    inner = b"\x80\x02" + call(glob("os", "system"), ustr(touch)) + b"."
    get_system = call(
        glob("builtins", "getattr"),
        call(glob("builtins", "__import__"), ustr("os")),
        ustr("system"),
    )
    return {
        "os.system": (call(glob("os", "system"), ustr(touch)), "os.system", True),
        "posix.system": (call(glob("posix", "system"), ustr(touch)), "posix.system", True),
        "stack_global": (call(stack_glob("os", "system"), ustr(touch)), "os.system", True),
        "eval": (call(glob("builtins", "eval"), ustr(code)), "builtins.eval", True),
        "exec": (call(glob("builtins", "exec"), ustr(code)), "builtins.exec", True),
        "py2_eval": (call(glob("__builtin__", "eval"), ustr(code)), "__builtin__.eval", True),
        "open": (
            call(glob("builtins", "open"), ustr(str(marker)), ustr("w")),
            "builtins.open",
            True,
        ),
        "subprocess": (
            call(glob("subprocess", "check_call"), plist(ustr("touch"), ustr(str(marker)))),
            "subprocess.check_call",
            True,
        ),
        "getattr_chain": (
            call(get_system, ustr(touch)),
            "builtins.getattr",
            True,
        ),
        "nested_pickle": (call(glob("pickle", "loads"), pbytes(inner)), "pickle.loads", True),
        "numpy_runstring": (
            call(glob("numpy.testing._private.utils", "runstring"), ustr(code), b"}"),
            "numpy.testing._private.utils.runstring",
            True,
        ),
        "import_module": (
            call(glob("importlib", "import_module"), ustr("os")),
            "importlib.import_module",
            False,
        ),
        "runpy": (call(glob("runpy", "run_path"), ustr(str(marker))), "runpy.run_path", False),
        "torch_load": (call(glob("torch", "load"), ustr(str(marker))), "torch.load", False),
        "copyreg": (
            call(glob("copyreg", "_reconstructor"), glob("os", "PathLike"), b"N", b"N"),
            "copyreg._reconstructor",
            False,
        ),
        "partial": (
            call(call(glob("functools", "partial"), glob("os", "system"), ustr(touch))),
            "functools.partial",
            True,
        ),
        "near_allowlist": (
            call(glob("torch._utils", "_rebuild_tensor"), b"N"),
            "torch._utils._rebuild_tensor",
            False,
        ),
    }


#: Where payloads are spliced: right after these pickled strings (a state-dict key, the start of
#: the saved attributes, the init parameters, the training history, the gene names), or at the end.
SPOTS = {
    "state_dict": "decoder.factor_regressor.fc_layers.Layer 0.0.weight",
    "attr_dict": "attr_dict",
    "init_params": "init_params_",
    "history": "history_",
    "var_names": "var_names",
    "end": None,
}


def splice(ops: bytes, after: str | None) -> Callable[[bytes], bytes]:
    """Insert ``ops`` (which push one object) and a POP after the pickled string ``after``, or
    before the final STOP: the rest of the pickle is unchanged and still well formed."""

    def edit(data: bytes) -> bytes:
        if after is None:
            assert data.endswith(b".")
            return data[:-1] + ops + b"0."
        at = data.index(ustr(after)) + len(ustr(after))
        return data[:at] + ops + b"0" + data[at:]

    return edit


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model() -> ldj.LinearSCVI:
    return ldj.load(DEMO_MODEL)


@pytest.fixture(scope="module")
def demo_adata() -> anndata.AnnData:
    return anndata.read_h5ad(DEMO_DATA)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoint converted to our format."""
    return ldj.convert(DEMO_MODEL, tmp_path_factory.mktemp("converted") / "model")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, *fragments: str) -> str:
    """The CLI error contract: exit 1, one line ``ldj: error: ...`` on stderr, no traceback."""
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("ldj: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


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


def write_converted_copy(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"[]", "expected a JSON object, got list"),
        (b"null", "expected a JSON object, got NoneType"),
        (b"\xff\xfe garbage", "can't decode"),
        (b'{"format_version": 1', "is not a valid model configuration"),
        (b'{"format_version": 9, "model": {}, "data": {}}', "format_version 1, got 9"),
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


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _set(row: int, col: int, value: float) -> Callable[[anndata.AnnData], anndata.AnnData]:
    def edit(adata: anndata.AnnData) -> anndata.AnnData:
        adata.X[row, col] = value
        return adata

    return edit


def _duplicate_gene(adata: anndata.AnnData) -> anndata.AnnData:
    names = adata.var_names.to_numpy().copy()
    names[7] = names[3]
    adata.var_names = names
    return adata


def _rename_batch(adata: anndata.AnnData) -> anndata.AnnData:
    adata.obs["batch"] = adata.obs["batch"].cat.rename_categories({"b1": "batch-9"})
    return adata


def _drop_batch(adata: anndata.AnnData) -> anndata.AnnData:
    del adata.obs["batch"]
    return adata


def _sparse_nan(adata: anndata.AnnData) -> anndata.AnnData:
    x = sp.csr_matrix(adata.X)
    x.data[x.indptr[40]] = np.nan  # the first stored count of cell 40
    adata.X = x
    return adata


#: name -> (edit of a copy of the demo AnnData, fragments the error must contain). The
#: errors name what is wrong (the gene, the category, the cell) and say what to do.
BAD_DATA: dict[str, tuple[Callable[[anndata.AnnData], anndata.AnnData], tuple[str, ...]]] = {
    "genes_missing": (
        lambda a: a[:, 3:].copy(),
        ("3 of the model's 230 genes are missing", "'MS4A1', 'CD79B', 'CD79A'", "must contain"),
    ),
    "no_genes": (lambda a: a[:, :0].copy(), ("230 of the model's 230 genes are missing",)),
    "genes_duplicated": (_duplicate_gene, ("duplicated gene names: 'HLA-DRA'", "unique")),
    "unknown_batch": (_rename_batch, ("never saw: 'batch-9'", "known: 'b0', 'b1'", "Rename")),
    "missing_batch_column": (_drop_batch, ("batch column 'batch'", "missing", "Add it")),
    "nan_counts": (_set(3, 7, np.nan), ("NaN or infinite values (first in cell 3)", "raw")),
    "inf_counts": (_set(70, 2, np.inf), ("NaN or infinite values (first in cell 70)",)),
    "negative_counts": (_set(5, 0, -1.0), ("negative values (first in cell 5)", "raw counts")),
    "non_integer_counts": (
        _set(6, 1, 0.5),
        ("non-integer values (first in cell 6)", "allow_non_integer=True", "--allow-non-integer"),
    ),
    "sparse_nan": (_sparse_nan, ("NaN or infinite values (first in cell 40)",)),
    "empty": (lambda a: a[:0].copy(), ("no cells",)),
}


@pytest.mark.parametrize("source", ["memory", "disk"])
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_a_clear_error(
    demo_model, demo_adata, tmp_path: Path, case: str, source: str
) -> None:
    edit, fragments = BAD_DATA[case]
    adata = edit(demo_adata.copy())
    if source == "disk":
        adata.write_h5ad(tmp_path / "cells.h5ad")
        adata = str(tmp_path / "cells.h5ad")
    out = tmp_path / "result.h5ad"
    with pytest.raises(IncompatibleDataError) as info:
        ldj.ablate(demo_model, adata, batch_size=16, output=out)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert entries(tmp_path) == (["cells.h5ad"] if source == "disk" else [])


@pytest.mark.parametrize("method", ["latent", "expression", "reconstruction"])
def test_bad_data_in_query_methods(demo_model, demo_adata, method: str) -> None:
    adata = _set(3, 7, np.nan)(demo_adata.copy())
    call_ = {
        "latent": demo_model.get_latent_representation,
        "expression": demo_model.get_normalized_expression,
        "reconstruction": demo_model.get_reconstruction_error,
    }[method]
    with pytest.raises(IncompatibleDataError, match="NaN or infinite values"):
        call_(adata)
    with pytest.raises(IncompatibleDataError, match="never saw: 'batch-9'"):
        call_(_rename_batch(demo_adata.copy()))


def test_allow_non_integer_switch(demo_model, demo_adata) -> None:
    adata = demo_adata.copy()
    adata.X = adata.X * 0.37  # normalised-looking values
    with pytest.raises(IncompatibleDataError, match="non-integer"):
        ldj.ablate(demo_model, adata, batch_size=16)
    result = ldj.ablate(demo_model, adata, allow_non_integer=True, batch_size=16)
    assert np.isfinite(result.delta_nll).all() and np.isfinite(result.nll).all()
    adata.X[0, 0] = np.nan  # the switch allows fractions only
    with pytest.raises(IncompatibleDataError, match="NaN"):
        ldj.ablate(demo_model, adata, allow_non_integer=True, batch_size=16)


def test_labels_unknown_or_missing() -> None:
    model = random_model(dispersion="gene-label")
    adata = random_adata(model)
    adata.obs["label"] = adata.obs["label"].cat.rename_categories({"l1": "l7"})
    with pytest.raises(IncompatibleDataError, match=r"labels column 'label' holds .* 'l7'"):
        ldj.ablate(model, adata)
    del adata.obs["label"]
    with pytest.raises(IncompatibleDataError, match="labels column 'label' in adata.obs"):
        ldj.ablate(model, adata)


def test_layer_the_model_reads_is_missing(demo_model, demo_adata) -> None:
    spec = dataclasses.replace(
        demo_model.spec, data=dataclasses.replace(demo_model.spec.data, layer="counts")
    )
    model = ldj.LinearSCVI(demo_model.host_params, spec)
    adata = demo_adata.copy()
    adata.layers["raw"] = adata.X.copy()
    with pytest.raises(IncompatibleDataError, match=r"lacks layer 'counts' \(layers: 'raw'\)"):
        ldj.ablate(model, adata, batch_size=16, layer="counts")
    with pytest.warns(UserWarning, match="layer 'counts', which this AnnData lacks; reading .* X"):
        assert np.isfinite(ldj.ablate(model, adata, batch_size=16).delta_nll).all()
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X * 0.5  # the model must read the layer, not X
    assert np.isfinite(ldj.ablate(model, adata, batch_size=16).delta_nll).all()


def test_files_that_are_not_h5ad(demo_model, tmp_path: Path) -> None:
    text = tmp_path / "cells.h5ad"
    text.write_text("cell,gene\n")
    other_hdf5 = tmp_path / "other.h5"
    with h5py.File(other_hdf5, "w") as f:
        f["matrix"] = np.zeros((3, 3))
    for path in (text, other_hdf5, DEMO_MODEL, GOLDEN.parent / "counts.npz", tmp_path):
        with pytest.raises(IncompatibleDataError, match="is not a readable h5ad file"):
            ldj.ablate(demo_model, str(path))
    for path in (tmp_path / "missing.h5ad", tmp_path / "missing.zarr"):
        with pytest.raises(IncompatibleDataError, match="no such file"):
            ldj.ablate(demo_model, str(path))


def test_count_matrix_of_the_wrong_shape(demo_model, demo_adata, tmp_path: Path) -> None:
    path = tmp_path / "cells.h5ad"
    demo_adata.write_h5ad(path)
    with h5py.File(path, "a") as f:  # X one gene short of var: a damaged file
        x = f["X"][:, :-1]
        del f["X"]
        f["X"] = x
        f["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    with pytest.raises(IncompatibleDataError, match=r"shape \(80, 229\) but .* 80 cells and 230"):
        ldj.ablate(demo_model, str(path))


def test_damaged_counts_are_a_clear_error(demo_model, demo_adata, tmp_path: Path) -> None:
    path = tmp_path / "cells.h5ad"
    demo_adata.write_h5ad(path, compression="gzip")
    with h5py.File(path, "r") as f:
        offset = f["X"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 8 : offset + 40] = bytes(32)  # inside the first gzip chunk of X
    path.write_bytes(bytes(data))
    out = tmp_path / "result.h5ad"
    with pytest.raises(IncompatibleDataError, match="Cannot read the counts of cells 0 to"):
        ldj.ablate(demo_model, str(path), output=out, batch_size=16)
    assert not out.exists()


@pytest.mark.parametrize("layout", ["dense", "csr", "disk"])
def test_cells_with_zero_counts_give_finite_results(
    demo_model, demo_adata, tmp_path: Path, layout: str
) -> None:
    adata = demo_adata.copy()
    adata.X[[0, 17, 79]] = 0
    if layout == "csr":
        adata.X = sp.csr_matrix(adata.X)
    data = adata
    if layout == "disk":
        adata.write_h5ad(tmp_path / "cells.h5ad")
        data = str(tmp_path / "cells.h5ad")
    for library, n_samples in (("model", 0), ("observed", 2)):
        res = ldj.ablate(
            demo_model, data, library=library, n_samples=n_samples, baseline="mean", batch_size=16
        )
        for key in ("delta_nll", "delta_l1", "latent", "nll", "mean_lfc"):
            assert np.isfinite(np.asarray(getattr(res, key))).all(), (library, key)
        assert n_samples == 0 or np.isfinite(res.delta_nll_se).all()
    assert np.isfinite(demo_model.get_latent_representation(adata)).all()
    assert np.isfinite(demo_model.get_reconstruction_error(adata)).all()
    expr = demo_model.get_normalized_expression(adata, return_numpy=True)
    assert np.isfinite(expr).all()
    mu = demo_model.get_normalized_expression(adata, library_size="latent", return_numpy=True)
    assert np.isfinite(mu).all()


def test_reordered_and_extra_genes_are_handled(demo_model, demo_adata) -> None:
    reference = ldj.ablate(demo_model, demo_adata, batch_size=16)
    order = np.random.default_rng(0).permutation(demo_adata.n_vars)
    shuffled = demo_adata[:, order].copy()
    extra = anndata.AnnData(
        np.hstack([demo_adata.X, np.ones((demo_adata.n_obs, 2), np.float32)]),
        obs=demo_adata.obs.copy(),
    )
    extra.var_names = [*demo_adata.var_names, "EXTRA1", "EXTRA2"]
    with pytest.warns(UserWarning, match="Dropping 2 genes"):
        widened = ldj.ablate(demo_model, extra, batch_size=16)
    for result in (ldj.ablate(demo_model, shuffled, batch_size=16), widened):
        np.testing.assert_allclose(result.delta_nll, reference.delta_nll, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Outputs: no overwrite without asking; atomic writes
# --------------------------------------------------------------------------------------------


def test_convert_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "convert", DEMO_MODEL, dst)
    assert_one_line(code, err, "already exists", "--overwrite")
    with pytest.raises(OutputExistsError):
        ldj.convert(DEMO_MODEL, dst)
    assert tree_bytes(dst) == {"notes.txt": b"keep me"}
    file_dst = tmp_path / "model.txt"
    file_dst.write_text("a file")
    code, _, err = run_cli(capsys, "convert", DEMO_MODEL, file_dst)
    assert_one_line(code, err, "already exists")
    assert file_dst.read_text() == "a file"
    code, _, err = run_cli(capsys, "convert", DEMO_MODEL, tmp_path / "no" / "such" / "dir")
    assert_one_line(code, err, "does not exist")


def test_convert_interrupted_keeps_the_old_output(tmp_path: Path, converted: Path, capsys,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    dst = tmp_path / "model"
    shutil.copytree(converted, dst)
    before = tree_bytes(dst)

    def interrupted(self: ModelSpec) -> dict:  # after the parameters were written
        raise KeyboardInterrupt

    monkeypatch.setattr(ModelSpec, "to_dict", interrupted)
    code, _, err = run_cli(capsys, "convert", DEMO_MODEL, dst, "--overwrite")
    assert code == 130 and err.strip() == "ldj: interrupted; no output was written."
    assert tree_bytes(dst) == before
    code, _, err = run_cli(capsys, "convert", DEMO_MODEL, tmp_path / "fresh")
    assert code == 130
    assert entries(tmp_path) == ["model"]  # no partial new output, no temporary left
    monkeypatch.undo()
    (dst / "notes.txt").write_text("replaced with the model")
    code, _, _ = run_cli(capsys, "convert", DEMO_MODEL, dst, "--overwrite")
    assert code == 0 and not (dst / "notes.txt").exists()
    assert entries(tmp_path) == ["model"]
    assert ldj.load(dst).n_latent == 6


_KILL_SCRIPT = """
import os, signal, sys
from linear_decoder_jax import ablation
from linear_decoder_jax.cli import main

original, calls = ablation.sweep_minibatch, [0]

def sweep(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:  # half-way through the cells
        os.kill(os.getpid(), signal.{signal})
    return original(*args, **kwargs)

ablation.sweep_minibatch = sweep
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_ablate_killed_midway_keeps_the_old_output(tmp_path: Path, converted: Path, sig: str):
    """A real Ctrl-C (SIGINT) or kill -9 half-way through a streamed ``ldj ablate``."""
    out = tmp_path / "result.h5ad"
    out.write_bytes(b"previous result")
    argv = ["ablate", str(converted), str(DEMO_DATA), "-o", str(out), "--overwrite"]
    argv += ["--batch-size", "16"]
    script = textwrap.dedent(_KILL_SCRIPT).format(signal=sig, argv=argv)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.read_bytes() == b"previous result"
    if sig == "SIGINT":
        assert proc.returncode == 130, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == "ldj: interrupted; no output was written."
        assert entries(tmp_path) == ["result.h5ad"]
    else:
        assert proc.returncode == -signal.SIGKILL
        # nothing unwinds after kill -9: a hidden temporary may stay, never a partial result
        assert all(name.startswith(".result.h5ad.tmp-") for name in entries(tmp_path)[:-1])
        assert entries(tmp_path)[-1] == "result.h5ad"


def test_ablate_cli_refuses_to_overwrite_and_missing_folder(tmp_path, converted, capsys):
    out = tmp_path / "result.h5ad"
    out.write_bytes(b"previous result")
    code, _, err = run_cli(capsys, "ablate", converted, DEMO_DATA, "-o", out)
    assert_one_line(code, err, "already exists", "--overwrite")
    assert out.read_bytes() == b"previous result"
    code, _, err = run_cli(capsys, "ablate", converted, DEMO_DATA, "-o", tmp_path / "no" / "r.h5ad")
    assert_one_line(code, err, "does not exist")


def test_result_write_refuses_to_overwrite(demo_model, demo_adata, tmp_path: Path) -> None:
    result = ldj.ablate(demo_model, demo_adata, batch_size=16)
    path = tmp_path / "result.h5ad"
    path.write_bytes(b"previous result")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        result.write(path)
    assert path.read_bytes() == b"previous result"
    result.write(path, overwrite=True)
    np.testing.assert_array_equal(ldj.AblationResult.read(path).delta_nll, result.delta_nll)
    assert entries(tmp_path) == ["result.h5ad"]


def test_merge_refuses_to_overwrite_and_survives_a_crash(
    demo_model, demo_adata, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from linear_decoder_jax import results

    parts = []
    for i in range(2):
        parts.append(tmp_path / f"part{i}.h5ad")
        ldj.ablate(demo_model, demo_adata, shard=(i, 2), output=parts[-1], batch_size=16)
    out = tmp_path / "merged.h5ad"
    out.write_bytes(b"previous result")
    code, _, err = run_cli(capsys, "merge", *parts, "-o", out)
    assert_one_line(code, err, "already exists", "--overwrite")
    assert out.read_bytes() == b"previous result"

    def crash(self, result) -> None:  # the large arrays are written, the rest is not
        raise KeyboardInterrupt

    monkeypatch.setattr(results.H5adStream, "finish", crash)
    code, _, err = run_cli(capsys, "merge", *parts, "-o", out, "--overwrite")
    assert code == 130 and "no output was written" in err
    assert out.read_bytes() == b"previous result"
    assert entries(tmp_path) == ["merged.h5ad", "part0.h5ad", "part1.h5ad"]
    monkeypatch.undo()
    code, _, _ = run_cli(capsys, "merge", *parts, "-o", out, "--overwrite")
    assert code == 0
    merged = ldj.AblationResult.read(out)
    expected = [ldj.AblationResult.read(part).delta_nll for part in parts]
    np.testing.assert_array_equal(merged.delta_nll, np.concatenate(expected))


# --------------------------------------------------------------------------------------------
# The CLI: one line saying what is wrong and what to do, exit 1, no traceback
# --------------------------------------------------------------------------------------------


def _checkpoint_cases(tmp: Path) -> dict[str, tuple[list[object], tuple[str, ...]]]:
    """name -> (argv, fragments of the one error line), for files made under ``tmp``."""
    empty, random_, truncated = tmp / "empty.pt", tmp / "random.pt", tmp / "truncated.pt"
    empty.write_bytes(b"")
    random_.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated.write_bytes(GOLDEN.read_bytes()[:50_000])
    nan = tmp / "nan.pt"
    records = zip_records(GOLDEN)
    records["model/data/3"] = struct.pack("<f", math.nan) + records["model/data/3"][4:]
    nan.write_bytes(zip_bytes(records))
    short = tmp / "short.pt"
    records = zip_records(GOLDEN)
    records["model/data/3"] = records["model/data/3"][:-4]
    short.write_bytes(zip_bytes(records))
    legacy = tmp / "legacy"
    legacy.mkdir()
    shutil.copy(GOLDEN, legacy / "model_params.pt")
    (tmp / "no_model").mkdir()
    scanvi = with_pickle(tmp / "scanvi.pt", replace_str("LinearSCVI", "SCANVI"))
    gene_cell = with_pickle(tmp / "gene_cell.pt", replace_str("gene-batch", "gene-cell"))
    hint = "model.save()"
    return {
        "empty": ([empty], ("file is empty", hint)),
        "random_bytes": ([random_], ("not a torch zip archive", hint)),
        "truncated": ([truncated], ("truncated or corrupt zip archive", hint)),
        "npz_not_torch": ([GOLDEN.parent / "counts.npz"], ("expected one <root>/data.pkl",)),
        "h5ad_not_torch": ([DEMO_DATA], ("not a torch zip archive",)),
        "nan_weight": ([nan], ("holds NaN or infinite values", hint)),
        "short_storage": ([short], ("holds 29436 bytes, expected 29440", hint)),
        "legacy_missing_files": ([legacy], ("layout is missing", "attr.pkl", "var_names.csv")),
        "no_model_file": ([tmp / "no_model"], ("found neither", "pass it with --prefix.")),
        "missing_path": ([tmp / "nowhere"], ("no such file or folder",)),
        "scanvi": ([scanvi], ("this is a SCANVI model, not LinearSCVI", "README: Safety")),
        "gene_cell": ([gene_cell], ("dispersion='gene-cell' cannot be mirrored",)),
    }


CHECKPOINT_CASES = [
    "empty",
    "random_bytes",
    "truncated",
    "npz_not_torch",
    "h5ad_not_torch",
    "nan_weight",
    "short_storage",
    "legacy_missing_files",
    "no_model_file",
    "missing_path",
    "scanvi",
    "gene_cell",
]


@pytest.mark.parametrize("command", ["convert", "info"])
@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_cli_checkpoint_errors(tmp_path: Path, capsys, case: str, command: str) -> None:
    argv, fragments = _checkpoint_cases(tmp_path)[case]
    if command == "convert":
        argv = [*argv, tmp_path / "out"]
    code, _, err = run_cli(capsys, command, *argv)
    assert_one_line(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_cli_damaged_converted_model(tmp_path: Path, converted: Path, capsys) -> None:
    model = tmp_path / "model"
    shutil.copytree(converted, model)
    (model / "config.json").write_text("[]")
    code, _, err = run_cli(capsys, "info", model)
    assert_one_line(code, err, "not a valid model configuration", "ldj convert")


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_cli_data_errors(demo_adata, converted: Path, tmp_path: Path, capsys, case: str) -> None:
    edit, fragments = BAD_DATA[case]
    data = tmp_path / "cells.h5ad"
    edit(demo_adata.copy()).write_h5ad(data)
    out = tmp_path / "result.h5ad"
    code, _, err = run_cli(capsys, "ablate", converted, data, "-o", out, "--batch-size", "16")
    cli_fragments = [f for f in fragments if "=True" not in f]  # the CLI names flags instead
    line = assert_one_line(code, err, *cli_fragments)
    assert ("--allow-non-integer" in line) == (case == "non_integer_counts")
    assert "=True" not in line
    assert not out.exists()
    if case == "non_integer_counts":
        argv = ["ablate", converted, data, "-o", out, "--allow-non-integer"]
        assert run_cli(capsys, *argv)[0] == 0 and out.exists()


def test_cli_layer_and_file_errors(demo_adata, converted: Path, tmp_path: Path, capsys) -> None:
    model = write_converted_copy(
        converted, tmp_path / "model", lambda c: c["data"].update(layer="counts")
    )
    out = tmp_path / "result.h5ad"
    code, _, err = run_cli(capsys, "ablate", model, DEMO_DATA, "-o", out, "--layer", "counts")
    assert_one_line(code, err, "lacks layer 'counts'", "--layer", "--use-raw")
    for data in (GOLDEN, tmp_path / "missing.h5ad"):
        code, _, err = run_cli(capsys, "ablate", converted, data, "-o", out)
        assert_one_line(code, err, str(data))
    assert not out.exists()


def test_cli_debug_shows_the_traceback(tmp_path: Path, converted: Path, capsys) -> None:
    data = tmp_path / "cells.h5ad"
    anndata.AnnData(np.zeros((0, 3), np.float32)).write_h5ad(data)
    argv = ["ablate", converted, data, "-o", tmp_path / "r.h5ad"]
    assert_one_line(*run_cli(capsys, *argv)[::2])
    with pytest.raises(IncompatibleDataError):
        main(["--debug", *map(str, argv)])
    with pytest.raises(ConverterError):
        main(["--debug", "convert", str(GOLDEN.parent / "counts.npz"), str(tmp_path / "o")])


def test_readme_safety_section_matches_the_reader() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Safety") :]
    section = section[: section.index("\n## ", 3)]
    for claim in ("allowlist", "os.system", "SCVI, SCANVI", "gene-cell", "stored or deflate"):
        assert claim in section, claim


def test_cli_merge_of_files_that_are_not_results(tmp_path: Path, capsys) -> None:
    text = tmp_path / "part.h5ad"
    text.write_text("not hdf5")
    for part in (text, DEMO_DATA):
        code, _, err = run_cli(capsys, "merge", part, "-o", tmp_path / "merged.h5ad")
        assert_one_line(code, err, str(part))
    assert not (tmp_path / "merged.h5ad").exists()


def test_overwrite_never_swaps_a_folder_for_a_file(tmp_path: Path) -> None:
    """--overwrite replaces an output of the same kind only, and never the source checkpoint."""
    import linear_decoder_jax as ldj
    from linear_decoder_jax._atomic import atomic_path

    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    with pytest.raises(ldj.OutputExistsError, match="existing folder"):
        with atomic_path(folder, overwrite=True, directory=False):
            pass
    assert (folder / "keep.txt").read_text() == "precious"
    src = tmp_path / "scvi_model"
    src.mkdir()
    (src / "model.pt").write_bytes(GOLDEN.read_bytes())
    with pytest.raises(ldj.ConfigError, match="holds the checkpoint"):
        ldj.convert(src, src, overwrite=True)
    assert (src / "model.pt").read_bytes() == GOLDEN.read_bytes()
