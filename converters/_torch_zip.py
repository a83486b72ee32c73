"""Read torch zip archives and pickles into numpy without torch and without running pickle code.

A ``torch.save`` file (torch >= 1.6) is a zip archive with one top-level folder ``<root>``:
``<root>/data.pkl`` is a pickle whose tensors refer, through persistent ids
``("storage", storage_type, key, location, numel)``, to raw little- or big-endian buffers stored as
``<root>/data/<key>``; ``<root>/byteorder`` records the byte order (little when absent).

The unpickler is the pure-Python reference implementation with an opcode allowlist:

* every pickle global is looked up in :data:`_ALLOWLIST`, which maps ``(module, name)`` to our own
  constructors; nothing is ever imported by name. Any ``pandas`` global becomes an inert
  placeholder that stores nothing (``history_`` and similar DataFrames are never needed);
* ``REDUCE`` may call only allowlisted constructors, ``NEWOBJ`` may create only pandas
  placeholders and ``BUILD`` may only fill our own placeholders (the attributes ``BUILD`` gives an
  ``OrderedDict``, such as a state dict's ``_metadata``, are dropped);
* opcodes that reach code outside the file (``INST``, ``OBJ``, ``EXT*``, text ``PERSID``,
  out-of-band buffers) are refused.

numpy arrays and dtypes are rebuilt from their pickled state with ``np.frombuffer`` (numeric
dtypes from an explicit list) or from the pickled element list (object dtype). Sizes are capped:
see :data:`MAX_MEMBER_BYTES`, :data:`MAX_TOTAL_BYTES`, :data:`MAX_PICKLE_BYTES` and
:data:`MAX_NESTING`.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import re
import sys
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from ._errors import ConverterError, MalformedCheckpointError, UnsafeCheckpointError

__all__ = [
    "MAX_MEMBER_BYTES",
    "MAX_NESTING",
    "MAX_PICKLE_BYTES",
    "MAX_TOTAL_BYTES",
    "load_pickle",
    "load_torch_zip",
]

#: Largest uncompressed size of one zip member (a tensor storage).
MAX_MEMBER_BYTES = 2 * 1024**3
#: Largest uncompressed size of all zip members together, and of all arrays built from one file.
MAX_TOTAL_BYTES = 4 * 1024**3
#: Largest pickle (``data.pkl`` or a plain pickle file such as ``attr.pkl``).
MAX_PICKLE_BYTES = 256 * 1024**2
#: Deepest nesting of containers accepted in an unpickled object.
MAX_NESTING = 100
#: Most dimensions of one array.
_MAX_NDIM = 32

_PICKLE_MAGIC = b"\x80"
_ZIP_MAGIC = b"PK"
#: Compression methods we decompress: torch writes stored records; deflate is zip's common method.
#: Others (bzip2, lzma, ...) and encrypted records are refused before any decompressor runs.
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
#: What zipfile and its decompressors raise for a damaged archive or record.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    OSError,
    EOFError,
    ValueError,
    NotImplementedError,  # unsupported zip version or compression method
    RuntimeError,  # encrypted record
    zlib.error,
)


# --------------------------------------------------------------------------------------------
# Objects that stand for pickled things until (or instead of) being real numpy values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Constructor:
    """An allowlisted global that ``REDUCE`` may call: our own function, under its pickle name."""

    name: str
    fn: Callable[..., Any]


@dataclass(frozen=True)
class _StorageType:
    """A ``torch.*Storage`` global: only meaningful inside a storage persistent id."""

    name: str
    dtype: np.dtype  # element type on disk, byte order not yet applied
    bfloat16: bool = False


@dataclass(frozen=True)
class _Token:
    """An allowlisted global that is only passed as an argument (``numpy.ndarray``)."""

    name: str


@dataclass(frozen=True)
class _InertGlobal:
    """A pandas global: calling it (``REDUCE`` or ``NEWOBJ``) gives an :class:`_Inert`."""

    name: str


class _Inert:
    """Stand-in for a pandas object: it ignores its arguments and state and stores nothing."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<inert placeholder for {self.name}>"


class _Storage:
    """A torch storage: a 1-D numpy array in native byte order."""

    __slots__ = ("array", "key")

    def __init__(self, array: np.ndarray, key: str) -> None:
        self.array = array
        self.key = key


class _DtypeBuilder:
    """``numpy.dtype(code, align, copy)``; its pickled state sets the byte order and size."""

    __slots__ = ("code", "value")

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        self.code = code
        self.value = _dtype_from_code(code)

    def build(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            msg = f"Expected a numpy dtype state (version 3 or 4, 8 or 9 items), got {state!r}"
            raise MalformedCheckpointError(msg)
        _, endian, subarray, names, fields, elsize = state[:6]
        if subarray is not None or names is not None or fields is not None:
            msg = f"Structured and sub-array numpy dtypes are not supported (dtype {self.code!r})"
            raise MalformedCheckpointError(msg)
        if endian not in ("<", ">", "|", "="):
            msg = f"Expected a byte order among '<', '>', '|', '=', got {endian!r} instead"
            raise MalformedCheckpointError(msg)
        value = self.value
        if value.kind in "US" and isinstance(elsize, int) and elsize >= 0:
            width = elsize // 4 if value.kind == "U" else elsize
            value = np.dtype(f"{value.kind}{width}")
        if endian in ("<", ">"):
            value = value.newbyteorder(endian)
        self.value = value


class _ArrayBuilder:
    """``numpy._core.multiarray._reconstruct(ndarray, shape, dtype)``, filled by its state."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: np.ndarray | None = None

    def build(self, state: Any) -> np.ndarray:
        if self.value is not None:
            raise MalformedCheckpointError("A numpy array received its state twice")
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # drop the version number
        if not isinstance(state, tuple) or len(state) != 4:
            msg = f"Expected a numpy array state (shape, dtype, is_fortran, data), got {state!r}"
            raise MalformedCheckpointError(msg)
        shape, dtype, is_fortran, data = state
        shape = _shape(shape, "numpy array shape")
        dtype = _dtype_value(dtype)
        order: Literal["C", "F"] = "F" if is_fortran else "C"
        size = math.prod(shape)
        if dtype.hasobject:
            if not isinstance(data, list) or len(data) != size:
                got = len(data) if isinstance(data, list) else type(data).__name__
                msg = f"Expected a list of {size} objects for an object array, got {got} instead"
                raise MalformedCheckpointError(msg)
            flat = np.empty(size, dtype=object)
            for i, item in enumerate(data):
                flat[i] = item
            self.value = flat.reshape(shape, order=order)
        else:
            self.value = _array_from_bytes(data, dtype, shape, order)
        return self.value


# --------------------------------------------------------------------------------------------
# Our constructors for allowlisted globals
# --------------------------------------------------------------------------------------------

_FIXED_DTYPES = frozenset(
    {"?", "b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"}
    | {"O", "O4", "O8"}
)
_FLEXIBLE_DTYPE = re.compile(r"[US][0-9]{0,9}")


def _dtype_from_code(code: Any) -> np.dtype:
    if isinstance(code, str) and (code in _FIXED_DTYPES or _FLEXIBLE_DTYPE.fullmatch(code)):
        return np.dtype(code)
    allowed = ", ".join(sorted(_FIXED_DTYPES))
    msg = f"Expected a numpy dtype code among {allowed}, U<n> or S<n>, got {code!r} instead"
    raise MalformedCheckpointError(msg)


def _dtype_value(dtype: Any) -> np.dtype:
    if not isinstance(dtype, _DtypeBuilder):
        msg = f"Expected a pickled numpy.dtype, got {type(dtype).__name__} instead"
        raise MalformedCheckpointError(msg)
    return dtype.value


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) > _MAX_NDIM
        or not all(type(n) is int and n >= 0 for n in value)
    ):
        msg = f"Expected {what} as a tuple of at most {_MAX_NDIM} non-negative ints, got {value!r}"
        raise MalformedCheckpointError(msg)
    return tuple(value)


def _array_from_bytes(
    data: Any, dtype: np.dtype, shape: tuple[int, ...], order: Literal["C", "F"]
) -> np.ndarray:
    """A C-contiguous native-byte-order copy of ``data`` read as ``dtype`` with ``shape``."""
    if not isinstance(data, (bytes, bytearray)):
        msg = f"Expected raw bytes for a numpy array, got {type(data).__name__} instead"
        raise MalformedCheckpointError(msg)
    size = math.prod(shape)
    if len(data) != size * dtype.itemsize:
        msg = (
            f"Expected {size * dtype.itemsize} bytes for a {dtype} array of shape {shape}, "
            f"got {len(data)} instead"
        )
        raise MalformedCheckpointError(msg)
    flat = np.frombuffer(data, dtype=dtype, count=size)
    return np.array(flat.reshape(shape, order=order), dtype=dtype.newbyteorder("="), order="C")


def _reconstruct(cls: Any, shape: Any, dtype: Any) -> _ArrayBuilder:
    if cls is not _NDARRAY:
        msg = f"Expected numpy.ndarray as the class of a pickled array, got {cls!r} instead"
        raise UnsafeCheckpointError(msg)
    return _ArrayBuilder()


def _scalar(dtype: Any, data: Any) -> Any:
    value = _dtype_value(dtype)
    if value.hasobject:
        return data
    return _array_from_bytes(data, value, (), "C")[()]


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if order not in ("C", "F"):
        raise MalformedCheckpointError(f"Expected array order 'C' or 'F', got {order!r} instead")
    return _array_from_bytes(buffer, _dtype_value(dtype), _shape(shape, "array shape"), order)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    metadata: Any = None,
) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2``: a contiguous copy of a strided view of a storage.

    ``requires_grad``, ``backward_hooks`` and ``metadata`` concern autograd and are ignored.
    """
    if not isinstance(storage, _Storage):
        msg = f"Expected a torch storage as a tensor's data, got {type(storage).__name__} instead"
        raise MalformedCheckpointError(msg)
    shape = _shape(size, "tensor size")
    if (
        not isinstance(stride, (tuple, list))
        or len(stride) != len(shape)
        or not all(type(s) is int and s >= 0 for s in stride)
        or type(storage_offset) is not int
        or storage_offset < 0
    ):
        msg = (
            f"Expected a non-negative offset and {len(shape)} non-negative strides for a tensor "
            f"of size {shape}, got offset {storage_offset!r} and strides {stride!r} instead"
        )
        raise MalformedCheckpointError(msg)
    array = storage.array
    numel = math.prod(shape)
    if numel == 0:
        return np.zeros(shape, dtype=array.dtype)
    extent = storage_offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) + 1
    if extent > array.size or numel > array.size:
        msg = (
            f"Tensor of size {shape}, strides {tuple(stride)} and offset {storage_offset} does not "
            f"fit in storage {storage.key!r} of {array.size} elements"
        )
        raise MalformedCheckpointError(msg)
    view = np.lib.stride_tricks.as_strided(
        array[storage_offset:],
        shape=shape,
        strides=tuple(s * array.itemsize for s in stride),
        writeable=False,
    )
    return np.array(view, order="C")


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        msg = f"Expected a tensor inside a torch Parameter, got {type(data).__name__} instead"
        raise MalformedCheckpointError(msg)
    return data


def _defaultdict(default_factory: Any = None, *args: Any) -> dict:
    """``collections.defaultdict``: a plain dict (the default factory is dropped)."""
    return _guarded(dict, _CONTAINERS)(*args)


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: ``latin-1`` text only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        msg = f"Expected _codecs.encode(str, 'latin1'), got encoding {encoding!r} instead"
        raise UnsafeCheckpointError(msg)
    return text.encode("latin-1")


def _guarded(kind: type, accepted: tuple[type, ...]) -> Callable[..., Any]:
    """``kind(*args)`` only for a first argument of an ``accepted`` type.

    This refuses ``bytes(n)`` (``n`` zero bytes) and copying an array, text or bytes into a list
    of Python objects, which take far more memory than the pickle that asks for them.
    """

    def build(*args: Any) -> Any:
        if args and not isinstance(args[0], accepted):
            msg = f"Refusing {kind.__name__}() of a {type(args[0]).__name__} from a pickle"
            raise MalformedCheckpointError(msg)
        return kind(*args)

    return build


_CONTAINERS = (list, tuple, set, frozenset, dict)
_BYTES_SOURCES = (str, bytes, bytearray, list, tuple)

_NDARRAY = _Token("numpy.ndarray")

#: torch storage class -> element type on disk; BFloat16 is read as uint16 and widened.
_STORAGE_TYPES = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "b1",
}

_BUILTINS: dict[str, Callable[..., Any]] = {
    "slice": slice,
    "int": int,
    "float": float,
    "complex": complex,
    "str": str,
    **{kind.__name__: _guarded(kind, _CONTAINERS) for kind in _CONTAINERS},
    "bytes": _guarded(bytes, _BYTES_SOURCES),
    "bytearray": _guarded(bytearray, _BYTES_SOURCES),
}


def _allowlist() -> dict[tuple[str, str], object]:
    table: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): _Constructor(
            "collections.OrderedDict", _guarded(OrderedDict, _CONTAINERS)
        ),
        ("collections", "defaultdict"): _Constructor("collections.defaultdict", _defaultdict),
        ("torch._utils", "_rebuild_tensor_v2"): _Constructor(
            "torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2
        ),
        ("torch._utils", "_rebuild_parameter"): _Constructor(
            "torch._utils._rebuild_parameter", _rebuild_parameter
        ),
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _Constructor("numpy.dtype", _DtypeBuilder),
        ("_codecs", "encode"): _Constructor("_codecs.encode", _encode),
    }
    for name, code in _STORAGE_TYPES.items():
        table["torch", name] = _StorageType(name, np.dtype(code), bfloat16=name.startswith("BF"))
    for core in ("numpy.core", "numpy._core"):  # numpy < 2 and numpy >= 2
        for module, name, fn in (
            ("multiarray", "_reconstruct", _reconstruct),
            ("multiarray", "scalar", _scalar),
            ("numeric", "_frombuffer", _frombuffer),
        ):
            table[f"{core}.{module}", name] = _Constructor(f"{core}.{module}.{name}", fn)
    for module in ("builtins", "__builtin__"):  # protocol-2 pickles name builtins __builtin__
        for name, fn in _BUILTINS.items():
            table[module, name] = _Constructor(f"{module}.{name}", fn)
    return table


#: ``(module, name)`` of every pickle global we accept, mapped to our own stand-in.
_ALLOWLIST = _allowlist()


# --------------------------------------------------------------------------------------------
# The unpickler
# --------------------------------------------------------------------------------------------

#: Opcodes that reach outside the pickle: class instantiation by name, the copyreg extension
#: registry, text persistent ids and out-of-band buffers.
_FORBIDDEN_OPCODES = frozenset(
    {"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID", "NEXT_BUFFER", "READONLY_BUFFER"}
)
_OPCODE_BYTE = {op.name: op.code.encode("latin-1")[0] for op in pickletools.opcodes}


def _describe(obj: Any) -> str:
    if isinstance(obj, (_Constructor, _StorageType, _Token, _InertGlobal, _Inert)):
        return obj.name
    return f"a {type(obj).__name__} object"


def _refuse_opcode(opcode: str) -> Callable[[_RestrictedUnpickler], None]:
    def refuse(self: _RestrictedUnpickler) -> None:
        msg = f"{self.source}: pickle opcode {opcode} is not allowed (it can run code)"
        raise UnsafeCheckpointError(msg)

    return refuse


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler, to vet each opcode
    """Unpickle with allowlisted globals and opcodes only; see the module docstring."""

    # Set by pickle._Unpickler.load (typeshed does not declare them).
    stack: list[Any]
    append: Callable[[Any], None]

    def __init__(self, data: bytes, *, source: str) -> None:
        super().__init__(io.BytesIO(data))
        self.source = source
        self.decoded_bytes = 0

    def charge(self, nbytes: int) -> None:
        """Count ``nbytes`` of decoded data against :data:`MAX_TOTAL_BYTES`."""
        self.decoded_bytes += nbytes
        if self.decoded_bytes > MAX_TOTAL_BYTES:
            msg = (
                f"{self.source}: decoded data exceeds {MAX_TOTAL_BYTES} bytes; "
                "refusing to read further"
            )
            raise MalformedCheckpointError(msg)

    def find_class(self, module: str, name: str) -> object:
        target = _ALLOWLIST.get((module, name))
        if target is not None:
            return target
        if module == "pandas" or module.startswith("pandas."):
            return _InertGlobal(f"{module}.{name}")
        msg = (
            f"{self.source}: pickle global '{module}.{name}' is not on the allowlist; "
            "refusing to load (torch.load(..., weights_only=False) would import and call it)"
        )
        raise UnsafeCheckpointError(msg)

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not isinstance(args, tuple):
            msg = f"Expected an argument tuple for {_describe(func)}, got {_describe(args)}"
            raise MalformedCheckpointError(msg)
        if isinstance(func, _InertGlobal):
            self.stack[-1] = _Inert(func.name)
            return
        if not isinstance(func, _Constructor):
            msg = (
                f"{self.source}: pickle REDUCE calls {_describe(func)}, which is not an "
                "allowlisted callable"
            )
            raise UnsafeCheckpointError(msg)
        result = func.fn(*args)
        self.charge(sys.getsizeof(result))
        self.stack[-1] = result

    def _new_inert(self, cls: Any) -> None:
        if not isinstance(cls, _InertGlobal):
            msg = (
                f"{self.source}: pickle NEWOBJ instantiates {_describe(cls)}; only pandas "
                "placeholders may be created this way"
            )
            raise UnsafeCheckpointError(msg)
        self.append(_Inert(cls.name))

    def _load_newobj(self) -> None:
        self.stack.pop()  # args
        self._new_inert(self.stack.pop())

    def _load_newobj_ex(self) -> None:
        self.stack.pop()  # kwargs
        self.stack.pop()  # args
        self._new_inert(self.stack.pop())

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, _ArrayBuilder):
            self.charge(inst.build(state).nbytes)
        elif isinstance(inst, _DtypeBuilder):
            inst.build(state)
        elif not isinstance(inst, (_Inert, OrderedDict)):  # a state dict's _metadata: dropped
            msg = (
                f"{self.source}: pickle BUILD sets the state of {_describe(inst)}; only numpy "
                "arrays, numpy dtypes, OrderedDicts and pandas placeholders accept state"
            )
            raise UnsafeCheckpointError(msg)

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    dispatch.update({_OPCODE_BYTE[name]: _refuse_opcode(name) for name in _FORBIDDEN_OPCODES})
    dispatch[_OPCODE_BYTE["REDUCE"]] = _load_reduce
    dispatch[_OPCODE_BYTE["NEWOBJ"]] = _load_newobj
    dispatch[_OPCODE_BYTE["NEWOBJ_EX"]] = _load_newobj_ex
    dispatch[_OPCODE_BYTE["BUILD"]] = _load_build


class _TorchUnpickler(_RestrictedUnpickler):
    """Adds torch storage persistent ids, read lazily from the zip archive."""

    def __init__(self, data: bytes, *, source: str, archive: _Archive) -> None:
        super().__init__(data, source=source)
        self.archive = archive
        self.storages: dict[str, tuple[_StorageType, _Storage]] = {}

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            msg = f"{self.source}: expected a ('storage', type, key, location, numel) record"
            raise MalformedCheckpointError(f"{msg}, got {pid!r} instead")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            msg = f"{self.source}: expected a torch storage type and a str key, got {pid!r}"
            raise MalformedCheckpointError(msg)
        if key in self.storages:
            known_type, storage = self.storages[key]
            if known_type != storage_type:
                msg = f"{self.source}: storage {key!r} is read as both {known_type.name} and "
                raise MalformedCheckpointError(f"{msg}{storage_type.name}")
            return storage
        if type(numel) is not int or numel < 0:
            msg = f"{self.source}: expected a non-negative element count for storage {key!r}"
            raise MalformedCheckpointError(f"{msg}, got {numel!r} instead")
        raw = self.archive.read_storage(key, numel * storage_type.dtype.itemsize)
        self.charge(len(raw))
        array = np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder(self.archive.byteorder))
        if storage_type.bfloat16:  # the upper half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        elif not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        storage = _Storage(array, key)
        self.storages[key] = (storage_type, storage)
        return storage


def _unpickle(unpickler: _RestrictedUnpickler) -> Any:
    """Run ``unpickler`` and resolve placeholders; any failure becomes a converter error."""
    try:
        return _resolve(unpickler.load(), MAX_NESTING, {})
    except ConverterError as err:
        if unpickler.source in str(err):
            raise
        raise type(err)(f"{unpickler.source}: {err}") from err
    except Exception as err:  # the data is malformed, whatever broke
        msg = f"{unpickler.source}: corrupt pickle data ({type(err).__name__}: {err})"
        raise MalformedCheckpointError(msg) from err


def _resolve(obj: Any, depth: int, seen: dict[int, Any]) -> Any:
    """Replace array and dtype placeholders by their numpy values, in place where possible."""
    if isinstance(obj, _ArrayBuilder):
        if obj.value is None:
            raise MalformedCheckpointError("A numpy array never received its state")
        obj = obj.value
    elif isinstance(obj, _DtypeBuilder):
        return obj.value
    if isinstance(obj, np.ndarray):
        if not obj.dtype.hasobject:
            return obj
    elif not isinstance(obj, (dict, list, tuple)):
        return obj
    if id(obj) in seen:
        return seen[id(obj)]
    if depth == 0:
        raise MalformedCheckpointError(f"Objects are nested deeper than {MAX_NESTING} levels")
    if isinstance(obj, tuple):
        seen[id(obj)] = result = tuple(_resolve(item, depth - 1, seen) for item in obj)
        return result
    seen[id(obj)] = obj
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _resolve(value, depth - 1, seen)
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            obj[i] = _resolve(item, depth - 1, seen)
    else:  # an object array
        for i, item in enumerate(obj.flat):
            obj.flat[i] = _resolve(item, depth - 1, seen)
    return obj


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


class _Archive:
    """The records of one torch zip archive, read with size caps."""

    def __init__(self, zf: zipfile.ZipFile, source: str) -> None:
        self.zf = zf
        self.source = source
        self.root = _archive_root(zf, source)
        # torch reads files without a byteorder record as little-endian
        self.byteorder: Literal["<", ">"] = "<"
        if f"{self.root}/byteorder" in zf.namelist():
            recorded = self.read("byteorder", 16)
            if recorded not in (b"little", b"big"):
                msg = f"{source}: expected byteorder 'little' or 'big', got {recorded!r} instead"
                raise MalformedCheckpointError(msg)
            self.byteorder = "<" if recorded == b"little" else ">"

    def read(self, name: str, cap: int) -> bytes:
        """The bytes of record ``<root>/<name>``, which must exist and be at most ``cap`` long."""
        try:
            info = self.zf.getinfo(f"{self.root}/{name}")
        except KeyError:
            msg = f"{self.source}: missing record {self.root}/{name} in the torch zip archive"
            raise MalformedCheckpointError(msg) from None
        if info.file_size > cap:
            msg = f"{self.source}: record {info.filename} declares {info.file_size} bytes"
            raise MalformedCheckpointError(f"{msg}, more than the cap of {cap}")
        if info.flag_bits & 0x1:
            raise MalformedCheckpointError(f"{self.source}: record {info.filename} is encrypted")
        if info.compress_type not in _ZIP_METHODS:
            msg = f"{self.source}: record {info.filename} uses zip compression method "
            methods = " or ".join(_ZIP_METHODS.values())
            raise MalformedCheckpointError(f"{msg}{info.compress_type}; expected {methods}")
        try:
            with self.zf.open(info) as fh:
                data = fh.read(info.file_size + 1)
        except _ZIP_ERRORS as err:
            msg = f"{self.source}: corrupt record {info.filename} ({err})"
            raise MalformedCheckpointError(msg) from err
        if len(data) != info.file_size:
            msg = f"{self.source}: record {info.filename} declares {info.file_size} bytes"
            raise MalformedCheckpointError(f"{msg}, holds {len(data)}")
        return data

    def read_storage(self, key: str, nbytes: int) -> bytes:
        """The raw bytes of storage ``key``, which must hold exactly ``nbytes``."""
        if not re.fullmatch(r"[A-Za-z0-9_]+", key):
            raise MalformedCheckpointError(f"{self.source}: invalid storage key {key!r}")
        data = self.read(f"data/{key}", MAX_MEMBER_BYTES)
        if len(data) != nbytes:
            msg = f"{self.source}: storage record {self.root}/data/{key} holds {len(data)} bytes"
            raise MalformedCheckpointError(f"{msg}, expected {nbytes} (numel x element size)")
        return data


def _open_zip(path: str) -> zipfile.ZipFile:
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise MalformedCheckpointError(f"{path}: file is empty; expected a torch zip archive")
    try:
        return zipfile.ZipFile(path)
    except _ZIP_ERRORS as err:
        if head.startswith(_ZIP_MAGIC):
            msg = f"{path}: truncated or corrupt zip archive ({err})"
        elif head.startswith(_PICKLE_MAGIC):
            msg = f"{path}: not a torch zip archive (torch < 1.6 format is not supported)"
        else:
            msg = f"{path}: not a torch zip archive"
        raise MalformedCheckpointError(msg) from err


def _archive_root(zf: zipfile.ZipFile, path: str) -> str:
    infos = zf.infolist()
    for info in infos:
        if info.file_size > MAX_MEMBER_BYTES:
            msg = f"{path}: zip member {info.filename} declares {info.file_size} bytes"
            raise MalformedCheckpointError(f"{msg}, more than {MAX_MEMBER_BYTES}")
    total = sum(info.file_size for info in infos)
    if total > MAX_TOTAL_BYTES:
        msg = f"{path}: zip members declare {total} bytes in total, more than {MAX_TOTAL_BYTES}"
        raise MalformedCheckpointError(msg)
    roots = sorted(
        name[: -len("/data.pkl")]
        for name in zf.namelist()
        if name.endswith("/data.pkl") and name.count("/") == 1
    )
    if len(roots) != 1:
        msg = f"{path}: expected one <root>/data.pkl record in the torch zip archive"
        raise MalformedCheckpointError(f"{msg}, got {len(roots)} instead")
    return roots[0]


def load_torch_zip(path: str | os.PathLike[str]) -> Any:
    """Read the object saved by ``torch.save`` at ``path``, with tensors as numpy arrays.

    Parameters
    ----------
    path
        A torch zip archive (torch >= 1.6).

    Returns
    -------
    object
        The unpickled object: tensors become C-contiguous numpy arrays in native byte order
        (``bfloat16`` widened to ``float32``), pickled numpy arrays become numpy arrays and pandas
        objects become inert placeholders.

    Raises
    ------
    MalformedCheckpointError
        Empty, truncated or non-zip file, missing records, or a size cap exceeded.
    UnsafeCheckpointError
        A pickle global off the allowlist or a forbidden opcode.
    """
    source = os.fspath(path)
    with _open_zip(source) as zf:
        archive = _Archive(zf, source)
        data = archive.read("data.pkl", MAX_PICKLE_BYTES)
        return _unpickle(_TorchUnpickler(data, source=source, archive=archive))


def load_pickle(path: str | os.PathLike[str]) -> Any:
    """Read a plain pickle file (such as a legacy ``attr.pkl``) with the allowlist unpickler.

    Parameters
    ----------
    path
        A pickle file of at most :data:`MAX_PICKLE_BYTES`.

    Returns
    -------
    object
        The unpickled object, as for :func:`load_torch_zip`; tensor storages are not allowed.

    Raises
    ------
    MalformedCheckpointError
        Empty, oversized or corrupt pickle.
    UnsafeCheckpointError
        A pickle global off the allowlist or a forbidden opcode.
    """
    source = os.fspath(path)
    size = os.path.getsize(source)
    if size == 0:
        raise MalformedCheckpointError(f"{source}: file is empty; expected a pickle")
    if size > MAX_PICKLE_BYTES:
        msg = f"{source}: pickle of {size} bytes exceeds the cap of {MAX_PICKLE_BYTES}"
        raise MalformedCheckpointError(msg)
    with open(source, "rb") as fh:
        data = fh.read()
    return _unpickle(_RestrictedUnpickler(data, source=source))
