"""Write ``torch.save``'s zip format with the stdlib and numpy alone (no torch).

Layout written (torch >= 1.6, ``_use_new_zipfile_serialization``), under one folder ``<root>``:

* ``<root>/data.pkl``: a protocol-2 pickle; each tensor is
  ``torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())`` whose
  storage is a persistent id ``("storage", torch.<Type>Storage, "<key>", "cpu", numel)``;
* ``<root>/data/<key>``: the storage's raw little-endian bytes, each record's data aligned to 64
  bytes as torch aligns them;
* ``<root>/byteorder`` ("little"), ``<root>/.format_version`` ("1"), ``<root>/.storage_alignment``
  ("64") and ``<root>/version`` ("3").

Objects other than tensors are pickled as Python's own pickler does (dicts, lists, strings, numpy
arrays, ``OrderedDict``, ``defaultdict``); torch's globals are written by name (the pure-Python
pickler with a dispatch entry for :class:`Global`), never imported.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Global", "Tensor", "write_torch_zip"]

_ALIGNMENT = 64
_STORAGE = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class Global:
    """A global written as ``GLOBAL module name`` (never imported)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # pickle's save_reduce asks for a callable
        raise TypeError(f"{self.module}.{self.name} is a name to write, not to call.")


class Tensor:
    """A numpy array to be written as a torch tensor (C order, its own storage)."""

    def __init__(self, array: Any) -> None:
        array = np.array(array, order="C")  # ascontiguousarray would make a 0-d array 1-d
        if array.dtype not in _STORAGE:
            raise TypeError(f"Expected one of {sorted(map(str, _STORAGE))}, got {array.dtype}.")
        self.array = array.astype(array.dtype.newbyteorder("<"), copy=False)


class _Storage:
    def __init__(self, key: str, array: np.ndarray) -> None:
        self.key, self.array = key, array


_PurePickler: Any = pickle._Pickler  # the pure-Python pickler (C one has no dispatch table)


class _Pickler(_PurePickler):
    dispatch: dict[type, Any] = _PurePickler.dispatch.copy()

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=2)
        self.storages: list[_Storage] = []

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            kind = Global("torch", _STORAGE[obj.array.dtype.newbyteorder("=")])
            return ("storage", kind, obj.key, "cpu", int(obj.array.size))
        return None

    def save_global_ref(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    def save_tensor(self, obj: Tensor) -> None:
        storage = _Storage(str(len(self.storages)), obj.array)
        self.storages.append(storage)
        shape = tuple(int(n) for n in obj.array.shape)
        stride = tuple(int(s) // obj.array.itemsize for s in obj.array.strides)
        rebuild = Global("torch._utils", "_rebuild_tensor_v2")
        self.save_reduce(rebuild, (storage, 0, shape, stride, False, OrderedDict()), obj=obj)

    dispatch[Global] = save_global_ref
    dispatch[Tensor] = save_tensor


def _aligned_info(name: str, offset: int) -> zipfile.ZipInfo:
    """A stored record whose data starts at a multiple of 64 bytes (padding in the extra field)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header = 30 + len(name.encode())
    pad = (-(offset + header + 4)) % _ALIGNMENT
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # torch's "FB" padding field
    return info


def write_torch_zip(obj: Any, path: str | os.PathLike, *, root: str = "archive") -> Path:
    """Write ``obj`` (with :class:`Tensor` leaves) as ``torch.save`` would, to ``path``."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    pickler.dump(obj)
    records: list[tuple[str, bytes]] = [(f"{root}/data.pkl", buffer.getvalue())]
    records += [(f"{root}/.format_version", b"1"), (f"{root}/.storage_alignment", b"64"),
                (f"{root}/byteorder", b"little")]  # fmt: skip
    records += [(f"{root}/data/{s.key}", s.array.tobytes()) for s in pickler.storages]
    records.append((f"{root}/version", b"3\n"))
    path = Path(path)
    with open(path, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            zf.writestr(_aligned_info(name, fh.tell()), data)
    return path
