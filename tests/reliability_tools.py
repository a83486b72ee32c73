"""Shared tools of the reliability tests: byte-level edits of torch zip archives and pickles
(no torch needed), module fixtures and CLI assertions. Imported by test_hostile_checkpoints,
test_bad_data, test_output_safety and test_cli_messages."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

from linear_decoder_jax.cli import main
from linear_decoder_jax.demo import demo_files

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


def write_converted_copy(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# Bad data cases shared by test_bad_data and test_cli_messages
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
