"""Hundreds of seeded random mutations of a small torch zip and a small safetensors
checkpoint (byte flips, truncations, pickle, zip directory and header edits): each
converts or is refused with one ConversionError line, never another exception, a
hang or a huge allocation. Run in a subprocess whose address space is capped;
``python tests/test_convert_fuzz.py DIR [CASES]`` runs it directly."""

import io
import json
import os
import pickletools
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
SEED = 10
CASES = 360  # split between the two checkpoints
HANG_S = 20
HEADROOM = 768 << 20  # bytes of address space allowed past the warmed-up process: a 1 GiB tensor fails


def test_fuzzed_checkpoints_convert_or_fail_cleanly(tmp_path):
    r = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "failures: 0" in r.stdout


# --- Mutations -------------------------------------------------------------------


def _flip(rng, data: bytes, lo=0, hi=None) -> bytes:
    out = bytearray(data)
    hi = len(out) if hi is None else hi
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(lo, hi)] ^= rng.randint(1, 255)
    return bytes(out)


EDGES = [0, 1, 2, 3, -1, 7, 255, 65535, 2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**63]


def _edge(rng) -> int:
    return rng.choice(EDGES) if rng.random() < 0.7 else rng.randint(-10, 1 << 20)


def _rezip(data: bytes, edit) -> bytes:
    """The zip with edit(name, bytes) -> bytes applied to its entries, CRCs recomputed."""
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            z.writestr(info.filename, edit(info.filename, src.read(info)))
    return out.getvalue()


def _edit_pickle(rng, pkl: bytes) -> bytes:
    """Change one integer argument (a size, stride, offset or memo index) or one string."""
    ops = [(op, arg, pos) for op, arg, pos in pickletools.genops(pkl)
           if op.name in ("BININT1", "BININT2", "BININT", "BINGET", "BINUNICODE")]
    op, arg, pos = rng.choice(ops)
    end = pos + 1 + {"BININT1": 1, "BININT2": 2, "BININT": 4, "BINGET": 1}.get(op.name, 4 + len(str(arg).encode()))
    if op.name == "BINGET":
        new = b"h" + bytes([rng.randrange(256)])
    elif op.name == "BINUNICODE":
        s = rng.choice(["HalfStorage", "DoubleStorage", "LongStorage", "BoolStorage", "0", "99", "cpu",
                        "model.layers.0.self_attn.gate", "model.embed_tokens.weight", "", "x" * 300])
        new = b"X" + struct.pack("<I", len(s.encode())) + s.encode()
    else:
        new = _int_op(_edge(rng))
    return pkl[:pos] + new + pkl[end:]


def _int_op(v: int) -> bytes:
    return b"J" + struct.pack("<i", v) if -2**31 <= v < 2**31 else b"\x8a\x08" + struct.pack("<q", v % 2**63)


def _edit_view(rng, pkl: bytes) -> bytes:
    """Give one tensor record a big shape over zero or small strides: a memory bomb if unchecked."""
    ops = list(pickletools.genops(pkl))
    i = rng.choice([i for i, (op, _, _) in enumerate(ops) if op.name == "BINPERSID"]) + 1
    new = [lambda: rng.choice([0, 1, 2**20]),  # after the storage: the offset,
           lambda: rng.choice([16384, 2**20, 1]),  # the shape's sizes,
           lambda: rng.choice([0, 0, 1])]  # the strides
    part, out, last = 0, b"", 0
    while part < 3 and i + 1 < len(ops):
        op, _, pos = ops[i]
        if op.name in ("BININT1", "BININT2", "BININT"):
            out, last = out + pkl[last:pos] + _int_op(new[part]()), ops[i + 1][2]
            part = part or 1
        elif part and (op.name.startswith("TUPLE") or op.name in ("EMPTY_TUPLE", "BINGET")):
            part += 1  # a tuple closed (or one seen before, left as it is)
        i += 1
    return out + pkl[last:]


def _edit_directory(rng, data: bytes) -> bytes:
    """Set one field of one central directory or local header record to an edge value."""
    out = bytearray(data)
    sig = rng.choice([b"PK\x01\x02", b"PK\x03\x04"])
    at = [i for i in range(len(out) - 46) if out[i : i + 4] == sig]
    i = rng.choice(at)
    fields = ({10: "H", 16: "I", 20: "I", 24: "I", 28: "H", 30: "H", 42: "I"} if sig == b"PK\x01\x02"
              else {8: "H", 14: "I", 18: "I", 22: "I", 26: "H", 28: "H"})
    off, fmt = rng.choice(sorted(fields.items()))
    struct.pack_into("<" + fmt, out, i + off, _edge(rng) % (256 ** struct.calcsize(fmt)))
    return bytes(out)


def mutate_torch(rng, data: bytes) -> bytes:
    kind = rng.choice(["flip", "flip pickle", "truncate", "pickle", "pickle", "view", "directory", "directory"])
    if kind == "flip":
        return _flip(rng, data)
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind == "directory":
        return _edit_directory(rng, data)

    def edit(name, b):
        if not name.endswith("data.pkl"):
            return b
        if kind == "flip pickle":
            return _flip(rng, b)
        if kind == "view":
            return _edit_view(rng, b)
        for _ in range(rng.randint(1, 3)):
            b = _edit_pickle(rng, b)
        return b

    return _rezip(data, edit)


def mutate_safetensors(rng, data: bytes) -> bytes:
    kind = rng.choice(["flip", "flip header", "truncate", "length", "header", "header", "header"])
    (n,) = struct.unpack("<Q", data[:8])
    if kind == "flip":
        return _flip(rng, data)
    if kind == "flip header":
        return _flip(rng, data, 8, 8 + n)
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind == "length":
        return struct.pack("<Q", _edge(rng) % 2**64) + data[8:]
    header = json.loads(data[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    name, other = rng.choice(names), rng.choice(names)
    e = header[name]
    what = rng.choice(["offsets", "alias", "shape", "dim", "dtype", "type", "drop", "list", "metadata"])
    if what == "offsets":
        e["data_offsets"][rng.randrange(2)] += rng.choice([-4096, -8, -1, 1, 8, 4096, 2**40])
    elif what == "alias":
        e["data_offsets"], e["shape"], e["dtype"] = header[other]["data_offsets"], header[other]["shape"], header[other]["dtype"]
    elif what == "shape":
        e["shape"] = rng.choice([[], [0], [2**31], [2**16, 2**16], e["shape"][::-1], e["shape"] + [1]])
    elif what == "dim" and e["shape"]:
        e["shape"][rng.randrange(len(e["shape"]))] = _edge(rng)
    elif what == "dtype":
        e["dtype"] = rng.choice(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "", 4])
    elif what == "type":
        key = rng.choice(["data_offsets", "shape", "dtype"])
        e[key] = rng.choice([None, 1.5, "0", [1.0, 2.0], {"a": 1}, [[0]], True])
    elif what == "drop":
        del e[rng.choice(["data_offsets", "shape", "dtype"])]
    elif what == "list":
        header = list(header.values())
    else:
        header["__metadata__"] = rng.choice([{"format": 1}, ["pt"], {"format": "mlx"}, None, "pt"])
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


# --- The run (in its own process) ------------------------------------------------


class Hang(Exception):
    pass


def _hang(*_):
    raise Hang(f"no result after {HANG_S} s")


def _vm_size() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) << 10
    raise RuntimeError("no VmSize")


def main(root: Path, cases: int) -> int:
    from infini_mlx.converters import ConversionError, convert

    checkpoints = [("beomi_llama", "pytorch_model.bin", mutate_torch),
                   ("beomi_gemma", "model.safetensors", mutate_safetensors)]
    for fixture, _, _ in checkpoints:  # warm up: every import and first-use allocation done
        convert(FIXTURES / fixture, root / "warm" / fixture, infini={"segment_len": 8})
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + HEADROOM, resource.RLIM_INFINITY))
    signal.signal(signal.SIGALRM, _hang)
    failures, outcomes = [], {"converted": 0, "refused": 0}
    for i in range(cases):
        fixture, name, mutate = checkpoints[i % 2]
        rng = random.Random(f"{SEED}-{i}")
        src = root / f"case{i}"
        shutil.copytree(FIXTURES / fixture, src)
        (src / name).write_bytes(mutate(rng, (FIXTURES / fixture / name).read_bytes()))
        print(f"case {i}", flush=True)  # the last words of a crash (MLX aborts when out of memory)
        signal.alarm(HANG_S)
        try:
            convert(src, root / f"out{i}", infini={"segment_len": 8})
            outcomes["converted"] += 1
        except ConversionError as e:
            outcomes["refused"] += 1
            if "\n" in str(e):
                failures.append(f"case {i} ({fixture}): a message of several lines: {e!r:.300}")
        except BaseException as e:  # noqa: B036 - MemoryError, Hang, anything but ConversionError
            failures.append(f"case {i} ({fixture}): {type(e).__name__}: {str(e)[:300]}")
        finally:
            signal.alarm(0)
        shutil.rmtree(src)
        shutil.rmtree(root / f"out{i}", ignore_errors=True)
    print("\n".join(["", *failures]))
    print(f"{cases} cases: {outcomes['converted']} converted, {outcomes['refused']} refused, "
          f"failures: {len(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else CASES))
