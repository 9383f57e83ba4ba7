"""Safetensors headers are checked as strictly as the format is defined: every
malformed one is refused with one line, whatever MLX would make of it."""

import json
import struct

import numpy as np
import pytest
from convert_helpers import copy_fixture
from infini_mlx.converters import ConversionError, convert
from infini_mlx.converters.safetensors_io import read_header


def _file(path, header, data: bytes):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(begin, end, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


DATA = np.arange(4, dtype=np.float32).tobytes()
BAD = {
    "overlapping": ({"a": _entry(0, 8), "b": _entry(4, 12, (2,))}, DATA[:12] + DATA[:4],
                    "b overlaps the tensor before it"),
    "aliased": ({"a": _entry(0, 8), "b": _entry(0, 8)}, DATA[:8], "b overlaps the tensor before it"),
    "gap": ({"a": _entry(0, 8), "b": _entry(12, 16, (1,))}, DATA, "b leaves a gap before it"),
    "trailing": ({"a": _entry(0, 8)}, DATA, "8 bytes after the last tensor"),
    "float offsets": ({"a": _entry(0.0, 8.0), "b": _entry(8, 16)}, DATA, "malformed entry for a"),
    "string offsets": ({"a": _entry("0", "8"), "b": _entry(8, 16)}, DATA, "malformed entry for a"),
    "boolean shape": ({"a": _entry(0, 4, (True,)), "b": _entry(4, 16, (3,))}, DATA, "malformed entry for a"),
    "negative offsets": ({"a": _entry(-8, 0), "b": _entry(0, 16, (4,))}, DATA, "malformed entry for a"),
    "three offsets": ({"a": {**_entry(0, 16, (4,)), "data_offsets": [0, 8, 16]}}, DATA, "malformed entry for a"),
    "huge dimension": ({"a": _entry(0, 0, (0, 2**31))}, b"", "malformed entry for a"),
    "unknown dtype": ({"a": _entry(0, 16, (4,), dtype="F4")}, DATA, "malformed entry for a"),
    "list dtype": ({"a": _entry(0, 16, (4,), dtype=["F32"])}, DATA, "malformed entry for a"),
    "entry not an object": ({"a": [0, 16]}, DATA, "malformed entry for a"),
    "wrong size": ({"a": _entry(0, 16, (3,))}, DATA, r"a has 16 bytes for shape \[3\]"),
    "header a list": ([_entry(0, 16, (4,))], DATA, "a JSON list, not an object"),
    "header a number": (b"16", DATA, "a JSON int, not an object"),
    "duplicate name": (b'{"a": ' + json.dumps(_entry(0, 8)).encode() + b', "a": '
                       + json.dumps(_entry(8, 16)).encode() + b"}", DATA, "corrupt safetensors header"),
    "deep nesting": (b"[" * 100000 + b"]" * 100000, b"", "corrupt safetensors header"),
    "metadata not strings": ({"__metadata__": {"format": 1}, "a": _entry(0, 16, (4,))}, DATA, "metadata"),
    "metadata a list": ({"__metadata__": ["pt"], "a": _entry(0, 16, (4,))}, DATA, "metadata"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_headers_are_refused(case, tmp_path):
    header, data, match = BAD[case]
    with pytest.raises(ConversionError, match=match) as e:
        read_header(_file(tmp_path / "x.safetensors", header, data))
    assert "\n" not in str(e.value)


def test_well_formed_headers_are_accepted(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "b": _entry(8, 16), "a": _entry(0, 8), "e": _entry(16, 16, (0, 3))}
    entries, meta = read_header(_file(tmp_path / "x.safetensors", header, DATA))
    assert sorted(entries) == ["a", "b", "e"] and meta == {"format": "pt"}


def test_conversion_refuses_aliased_tensors(tmp_path):
    """Two tensors over the same bytes: refused before anything is read or written."""
    src = copy_fixture("beomi_gemma", tmp_path)
    f = src / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    a, b = next((a, b) for a, b in zip(order, order[1:]) if header[a]["shape"] == header[b]["shape"])
    header[b]["data_offsets"] = header[a]["data_offsets"][:]  # b's own bytes are left unused
    _file(f, header, raw[8 + n :])
    with pytest.raises(ConversionError, match="overlaps the tensor before it"):
        convert(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beomi_gemma"]
