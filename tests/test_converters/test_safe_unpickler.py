"""The allowlist unpickler and the torch zip reader: values, refusals and size caps."""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters import MalformedCheckpointError, UnsafeCheckpointError, _torch_zip
from converters._torch_zip import load_pickle, load_torch_zip

torch = pytest.importorskip("torch")


def save(obj: Any, path: Path, **kwargs: Any) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def rezip(src: Path, dst: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """Copy a zip archive after ``edit`` changed its ``{name: bytes}`` records."""
    with zipfile.ZipFile(src) as zf:
        records = {name: zf.read(name) for name in zf.namelist()}
    edit(records)
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in records.items():
            zf.writestr(name, data)
    return dst


def drop(suffix: str) -> Callable[[dict[str, bytes]], None]:
    return lambda records: records.pop(next(n for n in records if n.endswith(suffix)))


def shorten(suffix: str) -> Callable[[dict[str, bytes]], None]:
    def edit(records: dict[str, bytes]) -> None:
        name = next(n for n in records if n.endswith(suffix))
        records[name] = records[name][:-4]

    return edit


def declare_size(path: Path, member: str, size: int) -> None:
    """Overwrite the uncompressed size the central directory declares for ``member``."""
    data = bytearray(path.read_bytes())
    start = 0
    while (start := data.find(b"PK\x01\x02", start)) >= 0:
        name_len = struct.unpack_from("<H", data, start + 28)[0]
        if data[start + 46 : start + 46 + name_len].decode() == member:
            struct.pack_into("<I", data, start + 24, size)
            path.write_bytes(bytes(data))
            return
        start += 4
    raise AssertionError(f"no member {member}")


def pickle_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "data.pkl"
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def test_tensor_dtypes(tmp_path: Path) -> None:
    values = torch.tensor([[0.0, 1.5, -2.25], [3.0, 100.0, 0.5]])
    tensors = {name: values.to(dtype) for name, dtype in DTYPES.items()}
    loaded = load_torch_zip(save(tensors, tmp_path / "t.pt"))
    for name, tensor in tensors.items():
        expected = (tensor.float() if name == "bfloat16" else tensor).numpy()
        assert loaded[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(loaded[name], expected, err_msg=name)


def test_strided_and_shared_tensors(tmp_path: Path) -> None:
    base = torch.arange(24.0).reshape(4, 6)
    obj = {"base": base, "t": base.T, "s": base[1:, 2:5], "p": torch.nn.Parameter(base[2])}
    loaded = load_torch_zip(save(obj, tmp_path / "t.pt"))
    for key, tensor in obj.items():
        assert loaded[key].flags.c_contiguous, key
        np.testing.assert_array_equal(loaded[key], tensor.detach().numpy(), err_msg=key)
    loaded["t"][0, 0] = -1  # copies, not views of one storage
    assert loaded["base"][0, 0] == 0


def test_big_endian_archive(tmp_path: Path) -> None:
    obj = {"f": torch.tensor([1.5, -2.0, 3.25]), "i": torch.tensor([1, 2**40, -3])}
    src = save(obj, tmp_path / "t.pt")
    with zipfile.ZipFile(src) as zf:
        root = zf.namelist()[0].split("/")[0]

    def to_big_endian(records: dict[str, bytes]) -> None:
        records[f"{root}/byteorder"] = b"big"
        for name, dtype in (("data/0", "<f4"), ("data/1", "<i8")):
            raw = np.frombuffer(records[f"{root}/{name}"], dtype=dtype)
            records[f"{root}/{name}"] = raw.astype(dtype.replace("<", ">")).tobytes()

    loaded = load_torch_zip(rezip(src, tmp_path / "big.pt", to_big_endian))
    for key, tensor in obj.items():
        assert loaded[key].dtype.isnative
        np.testing.assert_array_equal(loaded[key], tensor.numpy())


def test_missing_byteorder_record_means_little_endian(tmp_path: Path) -> None:
    src = save({"f": torch.tensor([1.5, 2.5])}, tmp_path / "t.pt")
    loaded = load_torch_zip(rezip(src, tmp_path / "n.pt", drop("/byteorder")))
    np.testing.assert_array_equal(loaded["f"], [1.5, 2.5])


# --------------------------------------------------------------------------------------------
# Plain pickles: numpy values, builtins, pandas placeholders
# --------------------------------------------------------------------------------------------


def sample_values() -> dict[str, Any]:
    nested = np.empty(2, dtype=object)
    nested[0], nested[1] = np.arange(3), None
    return {
        "unicode": np.array(["ab", "Gène-α"]),
        "object": np.array(["x", 1, None], dtype=object),
        "nested": nested,
        "big_endian": np.array([1.5, 2.0], dtype=">f8"),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
        "bool": np.array([True, False]),
        "bytes_array": np.array([b"ab", b"c"]),
        "empty": np.zeros((0, 3)),
        "float_scalar": np.float64(2.5),
        "int_scalar": np.int64(-7),
        "ordered": OrderedDict(a=1, b=[2, 3]),
        "set": {1, 2},
        "frozenset": frozenset({3}),
        "bytes": b"\x00\xff",
        "bytearray": bytearray(b"xy"),
        "slice": slice(1, 5, 2),
        "complex": 1 + 2j,
        "tuple": (1, (2.5, "s")),
    }


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_pickle_values(tmp_path: Path, protocol: int) -> None:
    values = sample_values()
    loaded = load_pickle(pickle_file(tmp_path, pickle.dumps(values, protocol=protocol)))
    assert sorted(loaded) == sorted(values)
    for key, value in values.items():
        got = loaded[key]
        if isinstance(value, np.ndarray):
            assert isinstance(got, np.ndarray) and got.dtype.isnative, key
            assert got.shape == value.shape and got.dtype == value.dtype.newbyteorder("=")
            if key == "nested":
                np.testing.assert_array_equal(got[0], value[0])
                assert got[1] is None
            else:
                np.testing.assert_array_equal(got, value, err_msg=key)
        else:
            assert got == value and type(got) is type(value), key


def test_numpy_1_and_old_pandas_names(tmp_path: Path) -> None:
    # files written under numpy < 2 name numpy.core; under pandas < 2, classes that are gone
    data = pickle.dumps({"a": np.arange(3), "s": np.float32(1.5)}, protocol=2)
    data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"numpy.core.multiarray" in data
    loaded = load_pickle(pickle_file(tmp_path, data))
    np.testing.assert_array_equal(loaded["a"], np.arange(3))
    assert loaded["s"] == np.float32(1.5) and type(loaded["s"]) is np.float32
    data = b"\x80\x02cpandas.core.indexes.numeric\nInt64Index\n)\x81}b."
    assert repr(load_pickle(pickle_file(tmp_path, data))) == (
        "<inert placeholder for pandas.core.indexes.numeric.Int64Index>"
    )


def test_defaultdict_becomes_dict_and_pandas_becomes_inert(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"loss": [1.0, 2.0]}, index=pd.Index([0, 1], name="epoch"))
    obj = {"dd": defaultdict(list, {"k": [1]}), "history": {"loss": frame}}
    for protocol in (2, 4, 5):
        loaded = load_pickle(pickle_file(tmp_path, pickle.dumps(obj, protocol=protocol)))
        assert loaded["dd"] == {"k": [1]} and type(loaded["dd"]) is dict
        assert repr(loaded["history"]["loss"]) == (
            "<inert placeholder for pandas.core.frame.DataFrame>"
        )


def test_nesting_is_capped(tmp_path: Path) -> None:
    deep: list = []
    for _ in range(_torch_zip.MAX_NESTING + 5):
        deep = [deep]
    with pytest.raises(MalformedCheckpointError, match="nested deeper than 100 levels"):
        load_pickle(pickle_file(tmp_path, pickle.dumps(deep, protocol=2)))


def test_decoded_size_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # _codecs.encode called 20 times on one memoised 1 MiB text: 20 MiB from a 1 MiB pickle
    text = b"x" * 2**20
    data = b"\x80\x02c_codecs\nencode\nq\x00"  # memo 0: the function
    data += b"X" + struct.pack("<I", len(text)) + text + b"X\x06\x00\x00\x00latin1\x86q\x01"
    data += b"](" + b"h\x00h\x01R" * 20 + b"e."  # a list of 20 calls
    monkeypatch.setattr(_torch_zip, "MAX_TOTAL_BYTES", 10 * 2**20)
    with pytest.raises(MalformedCheckpointError, match="decoded data exceeds 10485760 bytes"):
        load_pickle(pickle_file(tmp_path, data))


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (b"cposix\nsystem\n(Vtouch x\ntR.", UnsafeCheckpointError, "'posix.system'"),
        (b"\x80\x04\x8c\x02os\x8c\x06system\x93.", UnsafeCheckpointError, "'os.system'"),
        (b"cbuiltins\ngetattr\n.", UnsafeCheckpointError, "'builtins.getattr'"),
        (b"cnumpy\nload\n.", UnsafeCheckpointError, "'numpy.load'"),
        (b"ctorch\nload\n.", UnsafeCheckpointError, "'torch.load'"),
        (b"(Vtouch x\niposix\nsystem\n.", UnsafeCheckpointError, "opcode INST"),
        (b"(c__builtin__\nlist\no.", UnsafeCheckpointError, "opcode OBJ"),
        (b"\x80\x02\x82\x01.", UnsafeCheckpointError, "opcode EXT1"),
        (b"Pid\n.", UnsafeCheckpointError, "opcode PERSID"),
        (b"\x80\x02X\x03\x00\x00\x00abc)R.", UnsafeCheckpointError, "REDUCE calls a str"),
        (b"\x80\x02]}b.", UnsafeCheckpointError, "BUILD sets the state of a list"),
        (b"\x80\x02ccollections\nOrderedDict\n)\x81.", UnsafeCheckpointError, "NEWOBJ"),
        (
            b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R.",
            UnsafeCheckpointError,
            "got encoding 'zlib'",
        ),
        (
            b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x7f\x85R.",
            MalformedCheckpointError,
            r"Refusing bytes\(\) of a int",
        ),
        (
            b"\x80\x02c__builtin__\nlist\nX\x03\x00\x00\x00abc\x85R.",
            MalformedCheckpointError,
            r"Refusing list\(\) of a str",
        ),
        (b"\x80\x02]q\x00(K\x01K\x02", MalformedCheckpointError, "corrupt pickle data"),
        (b"\x80\x02\xff.", MalformedCheckpointError, "corrupt pickle data"),
        (b"\x80\x02Q.", MalformedCheckpointError, "corrupt pickle data"),  # BINPERSID
    ],
)
def test_pickle_refusals(tmp_path: Path, data: bytes, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        load_pickle(pickle_file(tmp_path, data))


def test_tensor_outside_its_storage(tmp_path: Path) -> None:
    src = save({"w": torch.ones(4)}, tmp_path / "t.pt")

    def widen(records: dict[str, bytes]) -> None:
        name = next(n for n in records if n.endswith("data.pkl"))
        records[name] = records[name].replace(b"K\x04\x85", b"K\x09\x85")  # size (4,) -> (9,)

    with pytest.raises(MalformedCheckpointError, match=r"size \(9,\).* does not fit in storage"):
        load_torch_zip(rezip(src, tmp_path / "w.pt", widen))


# --------------------------------------------------------------------------------------------
# Broken archives and size caps
# --------------------------------------------------------------------------------------------


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    return save({"w": torch.arange(256.0), "b": torch.ones(3)}, tmp_path / "ok.pt")


def test_broken_files(tmp_path: Path, archive: Path) -> None:
    cases = {
        "empty.pt": (b"", "file is empty"),
        "random.pt": (np.random.default_rng(0).bytes(1000), "not a torch zip archive"),
        "truncated.pt": (archive.read_bytes()[:600], "truncated or corrupt zip archive"),
        "text.pt": (b"hello", "not a torch zip archive"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MalformedCheckpointError, match=match):
            load_torch_zip(tmp_path / name)


def test_legacy_torch_format(tmp_path: Path) -> None:
    path = save({"w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(MalformedCheckpointError, match=r"torch < 1.6 format is not supported"):
        load_torch_zip(path)


def test_zip_without_data_pkl(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "z.pt", "w") as zf:
        zf.writestr("archive/other.txt", "x")
    with pytest.raises(MalformedCheckpointError, match="expected one <root>/data.pkl record"):
        load_torch_zip(tmp_path / "z.pt")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (drop("/data/0"), "missing record .*/data/0"),
        (shorten("/data/1"), "storage record .*/data/1 holds 8 bytes, expected 12"),
        (shorten("/data.pkl"), "corrupt pickle data"),
    ],
)
def test_broken_records(
    tmp_path: Path, archive: Path, edit: Callable[[dict[str, bytes]], None], match: str
) -> None:
    with pytest.raises(MalformedCheckpointError, match=match):
        load_torch_zip(rezip(archive, tmp_path / "broken.pt", edit))


def test_member_declaring_a_huge_size(tmp_path: Path, archive: Path) -> None:
    path = rezip(archive, tmp_path / "bomb.pt", lambda records: None)
    member = next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("/data/0"))
    declare_size(path, member, 0xFFFFFFF0)
    with pytest.raises(MalformedCheckpointError, match="declares 4294967280 bytes, more than"):
        load_torch_zip(path)


def test_members_declaring_a_huge_total(tmp_path: Path, archive: Path) -> None:
    path = rezip(archive, tmp_path / "bomb.pt", lambda records: None)
    names = zipfile.ZipFile(path).namelist()
    for member in [n for n in names if "/data/" in n or n.endswith("data.pkl")]:
        declare_size(path, member, 0x7FFFFFF0)  # each under the per-member cap
    with pytest.raises(MalformedCheckpointError, match="zip members declare .* bytes in total"):
        load_torch_zip(path)


def test_member_lying_about_its_size(tmp_path: Path, archive: Path) -> None:
    # a deflated record that expands past the size it declares is never read past that size
    path = tmp_path / "lying.pt"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name), compress_type=zipfile.ZIP_DEFLATED)
    member = next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("/data/0"))
    declare_size(path, member, 16)
    with pytest.raises(MalformedCheckpointError, match="data/0"):
        load_torch_zip(path)
