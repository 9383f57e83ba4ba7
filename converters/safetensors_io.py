"""Safetensors: a checked lazy reader and a writer that holds one tensor at a time."""

import json
import math
import struct
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .errors import ConversionError

ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
_CODES = {
    mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.int64: "I64",
    mx.int32: "I32", mx.int16: "I16", mx.int8: "I8", mx.uint64: "U64",
    mx.uint32: "U32", mx.uint16: "U16", mx.uint8: "U8", mx.bool_: "BOOL",
}
_UINT = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}
MX_DTYPES = {**{code: dtype for dtype, code in _CODES.items()}, "F64": mx.float32}
_MAX_HEADER = 100 << 20
MAX_DIM = 2**31  # MLX array dimensions are 32-bit


def read_header(path: Path) -> Tuple[Dict[str, dict], Dict[str, str]]:
    """The tensor entries and the metadata of a safetensors file, checked as the format demands:
    a JSON object of entries with whole-number shapes and offsets, packed one after another
    from the start of the data to its end, with no overlap, gap or alias.

    Raises:
        ConversionError: if the file is truncated or its header is malformed.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise ConversionError(f"{path}: truncated or corrupt safetensors header")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_unique)
        except (ValueError, RecursionError) as e:
            raise ConversionError(f"{path}: corrupt safetensors header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(type(v) is str for v in meta.values()):
        raise ConversionError(f"{path}: corrupt safetensors metadata (not a map of strings)")
    spans = sorted((_span(path, name, e), name) for name, e in header.items())
    at, room = 0, size - 8 - n
    for (begin, end), name in spans:
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else "leaves a gap before it"
            raise ConversionError(f"{path}: {name} {what} (data_offsets [{begin}, {end}])")
        if end > room:
            raise ConversionError(f"{path}: truncated safetensors file ({name} ends past the end)")
        at = end
    if at != room:
        raise ConversionError(f"{path}: {room - at} bytes after the last tensor (corrupt file)")
    return header, meta


def _unique(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("a name appears twice")
    return d


def _span(path: Path, name: str, e) -> Tuple[int, int]:
    """An entry's data_offsets, checked against its dtype and shape."""
    dtype = e.get("dtype") if isinstance(e, dict) else None
    ok = type(dtype) is str and dtype in ITEMSIZE and _ints(e.get("shape"), MAX_DIM)
    offsets = e.get("data_offsets") if ok else None
    if not (_ints(offsets, None) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise ConversionError(f"{path}: malformed entry for {name}")
    begin, end = offsets
    want = math.prod(e["shape"]) * ITEMSIZE[dtype]
    if end - begin != want:
        raise ConversionError(f"{path}: {name} has {end - begin} bytes for shape {e['shape']}")
    return begin, end


def _ints(xs, below) -> bool:
    """xs is a list of whole numbers (not floats, strings or booleans), each >= 0 (and < below)."""
    return isinstance(xs, list) and all(
        type(x) is int and x >= 0 and (below is None or x < below) for x in xs
    )


def load(path: Path) -> Tuple[Dict[str, mx.array], Dict[str, str]]:
    """Checked, then loaded lazily by MLX: no tensor is read until it is evaluated."""
    read_header(path)
    return mx.load(str(path), return_metadata=True)


# A tensor to write: its safetensors dtype, its shape and a function giving its bytes.
Item = Tuple[str, Tuple[int, ...], Callable[[], np.ndarray]]


def mlx_item(a: mx.array) -> Item:
    def data():
        return np.array(a.reshape(-1).view(_UINT[a.itemsize]))

    if a.dtype not in _CODES:
        raise ConversionError(f"cannot write arrays of type {a.dtype}")
    return _CODES[a.dtype], tuple(a.shape), data


def write(path: Path, items: List[Tuple[str, Item]], metadata: Optional[Dict[str, str]] = None):
    """Write a safetensors file, producing and dropping one tensor at a time.

    The header needs only shapes and dtypes, so it is written first; each
    tensor's bytes are then made, written and released before the next. The
    list is emptied as it goes: the caller must keep no other reference to it.
    """
    header, offset = {}, 0
    for name, (dtype, shape, _) in items:
        n = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i in range(len(items)):
            name, (_, _, data) = items[i]
            items[i] = None
            buf = data()
            del data
            want = header[name]["data_offsets"]
            if buf.nbytes != want[1] - want[0]:
                raise ConversionError(f"{name}: produced {buf.nbytes} bytes, expected {want[1] - want[0]}")
            f.write(memoryview(np.ascontiguousarray(buf)).cast("B"))
            del buf
