"""Read PyTorch ``torch.save`` zip files without torch and without running the pickle.

A state dict pickle only needs a handful of globals: the tensor rebuild functions,
the storage types and ``OrderedDict``. Everything else (``os.system``,
``builtins.eval``, arbitrary classes) is refused by name before it could be
called, and the "tensors" that come out are only descriptions (storage, dtype,
shape, stride, offset) whose bytes are read from the zip one tensor at a time.
"""

import io
import math
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx
import numpy as np

from .errors import ConversionError
from .zip_entries import ZipEntries

# torch storage type -> (safetensors dtype, itemsize)
STORAGE_DTYPES = {
    "FloatStorage": ("F32", 4),
    "HalfStorage": ("F16", 2),
    "BFloat16Storage": ("BF16", 2),
    "DoubleStorage": ("F64", 8),
    "LongStorage": ("I64", 8),
    "IntStorage": ("I32", 4),
    "ShortStorage": ("I16", 2),
    "CharStorage": ("I8", 1),
    "ByteStorage": ("U8", 1),
    "BoolStorage": ("BOOL", 1),
}
_MX_DTYPES = {
    "F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "F64": mx.float32,
    "I64": mx.int64, "I32": mx.int32, "I16": mx.int16, "I8": mx.int8, "U8": mx.uint8,
    "BOOL": mx.bool_,
}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
MAX_DIM = 2**31  # MLX array dimensions are 32-bit


class _Refused(Exception):
    """Raised while unpickling; reported with the file's name."""


class _Frozen:
    """Refuses the pickle's BUILD opcode (which calls ``__setstate__``): nothing the
    unpickler hands out may be changed by the pickle itself."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Refused(f"the pickle tries to modify a {type(self).__name__.strip('_')} (BUILD opcode): refused")


@dataclass(frozen=True)
class StorageRef(_Frozen):
    key: str
    dtype: str
    itemsize: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor of a torch zip file, described but not read."""

    archive: "TorchZip"
    storage: StorageRef
    offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.storage.itemsize

    def raw(self) -> np.ndarray:
        """The tensor's bytes as a contiguous little-endian unsigned-int array."""
        return self.archive.read(self)

    def to_mlx(self) -> mx.array:
        raw = self.raw()
        if self.dtype == "F64":  # MLX has no float64 on every backend
            return mx.array(raw.view(np.float64).astype(np.float32))
        return mx.array(raw).view(_MX_DTYPES[self.dtype])


def _rebuild_tensor(storage, offset, size, stride, *args):
    if not isinstance(storage, StorageRef):
        raise _Refused("malformed tensor record in the pickle")
    return _PendingTensor(storage, offset, tuple(size), tuple(stride))  # types checked later


def _rebuild_parameter(data, *args):
    return data


class _PendingTensor(_Frozen):
    """What the unpickler builds; bound to its archive once the pickle is read."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride


class _StorageType(_Frozen):
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


class _Global(_Frozen):
    """An allowed callable, as the pickle sees it: a fresh wrapper per reference."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


# (module, name) -> what the unpickler may call. Nothing else is callable.
_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, f, where: str):
        super().__init__(f)
        self.where = where

    def find_class(self, module, name):
        # New objects on every call: no load can change what another load gets.
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _Global(_ALLOWED[module, name])
        raise ConversionError(
            f"{self.where}: refused to unpickle the global {module}.{name} "
            "(only tensors and plain containers are allowed; nothing was executed)"
        )

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ConversionError(f"{self.where}: unexpected persistent id {pid!r:.60}")
        stype = pid[1]
        if not isinstance(stype, _StorageType):
            raise ConversionError(f"{self.where}: unexpected storage type {stype!r:.60}")
        return StorageRef(str(pid[2]), *STORAGE_DTYPES[stype.name])


def _flatten(obj, prefix: str, out: Dict[str, "_PendingTensor"], seen: set, where: str):
    if isinstance(obj, _PendingTensor):
        if prefix in out:
            raise ConversionError(f"{where}: two tensors are named {prefix}")
        out[prefix] = obj
    elif isinstance(obj, dict):
        if id(obj) in seen:  # a state dict is a tree: a cycle or a shared branch is a trap
            raise ConversionError(f"{where}: a dictionary appears twice in the state dict")
        seen.add(id(obj))
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, seen, where)
    elif obj is None or isinstance(obj, (int, float, str, bool, list, tuple)):
        pass  # training metadata (step counts, args) carries no weights
    else:
        raise ConversionError(f"{where}: unexpected object of type {type(obj).__name__}")


def _state_dict(obj, depth: int = 0):
    """Unwrap training checkpoints of the form {"state_dict": {...}} or {"model": {...}}."""
    for key in ("state_dict", "model", "module"):
        if depth < 8 and isinstance(obj, dict) and isinstance(obj.get(key), dict) and not any(
            isinstance(v, _PendingTensor) for v in obj.values()
        ):
            return _state_dict(obj[key], depth + 1)
    return obj


class TorchZip:
    """The tensors of one zip-format ``torch.save`` file, read lazily and safely.

    Args:
        path: A ``.bin``/``.pt``/``.pth`` file written by ``torch.save``.

    Raises:
        ConversionError: for a truncated or non-zip file, a legacy (pre-1.6)
            file, a forbidden pickle global, or a malformed record.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise ConversionError(_not_a_zip(self.path)) from None
        except OSError as e:
            raise ConversionError(f"{self.path}: {e.strerror or e}") from None
        except Exception as e:  # zipfile's other complaints about a damaged directory
            raise ConversionError(f"{self.path}: corrupt zip file ({type(e).__name__})") from None
        self.entries = ZipEntries(self.zip, self.path)
        names = self.zip.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ConversionError(f"{self.path}: a zip file but not a torch.save checkpoint")
        self.prefix = pkl[0][: -len("data.pkl")]
        order = self._text("byteorder") or "little"
        if order not in ("little", "big"):
            raise ConversionError(f"{self.path}: unknown byte order {order!r}")
        self.big_endian = order == "big"
        try:
            data = io.BytesIO(self.entries.read(self.zip.getinfo(pkl[0])))
            obj = _SafeUnpickler(data, str(self.path)).load()
        except ConversionError:
            raise
        except _Refused as e:
            raise ConversionError(f"{self.path}: {e}") from None
        except Exception as e:  # a damaged pickle: report it, never run it
            raise ConversionError(f"{self.path}: unreadable pickle ({type(e).__name__}: {e})") from None
        pending: Dict[str, _PendingTensor] = {}
        try:
            _flatten(_state_dict(obj), "", pending, set(), str(self.path))
        except (RecursionError, ValueError) as e:  # nested past Python's stack, an int key too long to print
            raise ConversionError(f"{self.path}: malformed state dict ({type(e).__name__})") from None
        self.tensors: Dict[str, TensorRef] = {
            name: TensorRef(self, p.storage, p.offset, p.shape, p.stride)
            for name, p in pending.items()
        }
        for name, t in self.tensors.items():
            self._check(name, t)

    def _text(self, name: str):
        info = self.entries.info(self.prefix + name)
        try:
            return None if info is None else self.entries.read(info).decode().strip()
        except UnicodeDecodeError:
            raise ConversionError(f"{self.path}: corrupt zip entry {info.filename}") from None

    def _record(self, key: str) -> zipfile.ZipInfo:
        info = self.entries.info(f"{self.prefix}data/{key}")
        if info is None:
            raise ConversionError(f"{self.path}: storage {key} is missing (truncated file?)")
        return info

    def _check(self, name: str, t: TensorRef):
        ints = all(type(x) is int for x in (*t.shape, *t.stride, t.offset))
        if (
            not ints
            or (t.storage.dtype, t.storage.itemsize) not in STORAGE_DTYPES.values()
            or len(t.shape) != len(t.stride)
            or any(not 0 <= d < MAX_DIM for d in t.shape)
            or any(s < 0 for s in t.stride)
            or t.offset < 0
        ):
            raise ConversionError(f"{self.path}: malformed tensor record for {name}")
        if 0 in t.shape:
            return
        # Each element its own storage slot: a zero or overlapping stride would let a
        # few stored bytes stand for a tensor of any size.
        reach = 1
        for s, d in sorted((s, d) for d, s in zip(t.shape, t.stride) if d > 1):
            if s < reach:
                raise ConversionError(
                    f"{self.path}: {name} has aliasing strides {list(t.stride)} for shape {list(t.shape)} "
                    "(expanded or overlapping views are not supported)"
                )
            reach += (d - 1) * s
        if (t.offset + reach) * t.storage.itemsize > self._record(t.storage.key).file_size:
            raise ConversionError(f"{self.path}: {name} reaches past its storage (truncated file?)")

    def read(self, t: TensorRef) -> np.ndarray:
        """Read one tensor: only the bytes it spans, strided and byte-swapped as needed."""
        n = t.storage.itemsize
        uint = np.dtype(_UINT[n]).newbyteorder(">" if self.big_endian else "<")
        if 0 in t.shape:
            return np.zeros(t.shape, _UINT[n])
        span = sum((d - 1) * s for d, s in zip(t.shape, t.stride)) + 1
        buf = self.entries.read(self._record(t.storage.key), t.offset * n, span * n)
        flat = np.frombuffer(buf, uint)
        a = np.lib.stride_tricks.as_strided(
            flat, t.shape, tuple(s * n for s in t.stride), writeable=False
        )
        return a.astype(_UINT[n], order="C")  # a copy: native order, contiguous, 0-d kept


def _not_a_zip(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        return (
            f"{path}: a legacy (pre-1.6) torch.save file, which is not supported; "
            "re-save it with a recent torch or as safetensors"
        )
    if head[:2] == b"PK":
        return f"{path}: truncated or corrupt zip file (no central directory)"
    return f"{path}: not a zip-format torch.save file"
