"""The torch-free reader: exact tensors, and pickles that would run code are refused."""

import importlib.util
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib

import mlx.core as mx
import numpy as np
import pytest
from convert_helpers import FIXTURES, ops, state_dict_pickle, tensor_pickle, torch_zip
from infini_mlx.converters import ConversionError, TorchZip, convert

READER = FIXTURES / "reader"


@pytest.mark.parametrize("name", ["checkpoint.pt", "checkpoint_big_endian.pt"])
def test_tensors_match_what_torch_saved(name):
    z = TorchZip(READER / name)
    expected = np.load(READER / "expected.npz")
    assert set(z.tensors) == set(expected.files)  # {"state_dict": ...} unwrapped, "step" ignored
    dtypes = {"f16": mx.float16, "bf16": mx.bfloat16, "int64": mx.int64, "bool": mx.bool_}
    for k in expected.files:
        a = z.tensors[k].to_mlx()
        assert a.shape == expected[k].shape, k
        assert a.dtype == dtypes.get(k, mx.float32), k
        assert np.array_equal(np.array(a.astype(mx.float32)), expected[k].astype(np.float32)), k


def _torch_zip(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")


def _call(module: str, name: str, *args) -> bytes:
    """A protocol-2 pickle that calls module.name(*args) when loaded the usual way."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + pickle.dumps(args, 2)[2:-1] + b"R."


EVIL = {
    "posix.system": ("posix", "system", "touch pwned_system"),
    "builtins.open": ("builtins", "open", "pwned_open", "w"),
    "builtins.eval": ("builtins", "eval", "open('pwned_eval', 'w')"),
    "builtins.exec": ("builtins", "exec", "open('pwned_exec', 'w')"),
    "subprocess.Popen": ("subprocess", "Popen", ["touch", "pwned_popen"]),
    "pathlib.Path": ("pathlib", "Path", "pwned_class"),  # any other class
}


@pytest.mark.parametrize("glob", sorted(EVIL))
def test_forbidden_globals_are_refused_by_name(glob, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    _torch_zip(src / "pytorch_model.bin", _call(*EVIL[glob]))
    with pytest.raises(ConversionError, match=glob.replace(".", r"\.")):
        convert(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing created, no dst


def test_the_payloads_are_live(tmp_path, monkeypatch):
    """Unpickled the usual way (here, in a scratch directory), they do create files."""
    monkeypatch.chdir(tmp_path)
    pickle.loads(_call(*EVIL["builtins.open"])).close()
    pickle.loads(_call(*EVIL["posix.system"]))
    assert (tmp_path / "pwned_open").exists() and (tmp_path / "pwned_system").exists()


def test_malicious_torch_save_file_is_refused(tmp_path, monkeypatch):
    """tests/fixtures/malicious was written by torch.save with an os.system payload."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConversionError, match=r"posix\.system"):
        convert(FIXTURES / "malicious", tmp_path / "dst")
    assert not (tmp_path / "infini_pwned_by_pickle").exists()
    assert not (tmp_path / "dst").exists()


def test_legacy_raw_pickle_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "pytorch_model.bin").write_bytes(_call("posix", "system", "touch pwned_raw"))
    with pytest.raises(ConversionError, match="legacy"):
        convert(src, tmp_path / "dst")
    assert not (tmp_path / "pwned_raw").exists()


def test_conversion_never_imports_torch(tmp_path):
    """Even where torch is installed: importing it would fail in this process."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['safetensors.torch'] = None\n"
        "from infini_mlx.converters import convert\n"
        f"convert({str(FIXTURES / 'jlamprou_qwen2_moe')!r}, {str(tmp_path / 'out')!r}, infini={{'segment_len': 8}})\n"
    )
    # cwd outside the checkout: the installed package, not the source tree, is imported.
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "infini.safetensors").exists()


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed here")
def test_fixture_generator_says_it_needs_torch():
    r = subprocess.run([sys.executable, str(FIXTURES / "make_fixtures.py")], capture_output=True, text=True)
    assert r.returncode != 0 and "needs torch" in r.stderr


def _one_tensor(path, shape, stride, data: bytes, **kw):
    return torch_zip(path, state_dict_pickle({"w": tensor_pickle("0", shape, stride, **kw)}), {"0": data})


@pytest.mark.parametrize("stride", [(0, 0), (0, 1), (1, 1), (2, 1)])
def test_aliasing_strides_are_refused(stride, tmp_path):
    """Four stored bytes must not stand for a 16384 x 16384 tensor (1 GiB once read)."""
    f = _one_tensor(tmp_path / "bomb.pt", (16384, 16384), stride, b"\0" * 4)
    with pytest.raises(ConversionError, match="aliasing strides"):
        TorchZip(f)


def test_strided_views_that_do_not_alias_are_read(tmp_path):
    data = np.arange(12, dtype=np.float32)
    f = torch_zip(tmp_path / "views.pt", state_dict_pickle({
        "t": tensor_pickle("0", (3, 4), (1, 3)),  # a transpose
        "s": tensor_pickle("0", (2, 2), (6, 2), offset=1),  # a strided slice
        "b": tensor_pickle("0", (1, 3), (0, 1)),  # any stride on a dimension of one
    }), {"0": data.tobytes()})
    z = TorchZip(f)
    assert np.array_equal(np.array(z.tensors["t"].to_mlx()), data.reshape(4, 3).T)
    assert np.array_equal(np.array(z.tensors["s"].to_mlx()), [[1, 3], [7, 9]])
    assert np.array_equal(np.array(z.tensors["b"].to_mlx()), data[None, :3])


# BUILD ("b") sets the state of the object below it on the stack.
_HALF = b"}" + ops("name") + ops("HalfStorage") + b"sb"
POISON = {
    "storage type": b"ctorch\nFloatStorage\n" + _HALF + b"0",
    "rebuild function": b"ctorch._utils\n_rebuild_tensor_v2\n}" + ops("__defaults__") + ops((1,)) + b"sb0",
    "tensor": tensor_pickle("0", (2, 3), (3, 1)) + b"}" + ops("storage") + ops(None) + b"sb0",
}


@pytest.mark.parametrize("what", sorted(POISON))
def test_pickle_cannot_modify_what_it_is_given(what, tmp_path):
    """A BUILD on the shared FloatStorage once turned every later float32 tensor,
    of this file and of the next files read in the process, into float16 garbage."""
    data = np.arange(6, dtype=np.float32)
    pkl = state_dict_pickle({"w": tensor_pickle("0", (2, 3), (3, 1))}, before=POISON[what])
    with pytest.raises(ConversionError, match="BUILD opcode"):
        TorchZip(torch_zip(tmp_path / "poison.pt", pkl, {"0": data.tobytes()}))
    clean = TorchZip(_one_tensor(tmp_path / "clean.pt", (2, 3), (3, 1), data.tobytes())).tensors["w"]
    assert clean.dtype == "F32"
    assert np.array_equal(np.array(clean.to_mlx()), data.reshape(2, 3))
    test_tensors_match_what_torch_saved("checkpoint.pt")


def test_state_dict_metadata_is_still_accepted(tmp_path):
    """torch.save gives the state dict (an OrderedDict of this load) a _metadata attribute by BUILD."""
    meta = b"}" + ops("_metadata") + ops({"": {"version": 1}}) + b"sb"
    pkl = state_dict_pickle({"w": tensor_pickle("0", (2,), (1,))})
    pkl = pkl[:-1] + meta + b"."
    z = TorchZip(torch_zip(tmp_path / "meta.pt", pkl, {"0": np.ones(2, np.float32).tobytes()}))
    assert list(z.tensors) == ["w"]


def _patch_central(path, name: str, **fields):
    """Rewrite fields (crc, size: both sizes) of an entry's central directory record."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02")
    while data[at + 46 : at + 46 + len(name)] != name.encode():
        at = data.index(b"PK\x01\x02", at + 1)
    if "crc" in fields:
        struct.pack_into("<I", data, at + 16, fields["crc"])
    if "size" in fields:
        struct.pack_into("<II", data, at + 20, fields["size"], fields["size"])
    path.write_bytes(bytes(data))


def test_zip_entry_claiming_more_bytes_than_it_holds(tmp_path):
    """A stored storage of 8 bytes whose directory says 40 (and gives the CRC of those
    40): read as it claims, its weights were the next entry's local header."""
    f = _one_tensor(tmp_path / "lie.pt", (10,), (1,), np.ones(2, np.float32).tobytes())
    with zipfile.ZipFile(f) as z:
        start = z.getinfo("archive/data/0").header_offset + 30 + len("archive/data/0")
    overread = f.read_bytes()[start : start + 40]
    assert b"PK\x03\x04" in overread
    _patch_central(f, "archive/data/0", size=40, crc=zlib.crc32(overread))
    z = TorchZip(f)  # the shape fits the claimed size
    with pytest.raises(ConversionError, match="claims 40 bytes but holds at most 8"):
        z.tensors["w"].raw()


def test_zip_entry_failing_its_crc(tmp_path):
    data = np.arange(4, dtype=np.float32)
    f = _one_tensor(tmp_path / "flip.pt", (2, 2), (2, 1), data.tobytes())
    raw = bytearray(f.read_bytes())
    raw[raw.index(data.tobytes()) + 5] ^= 0x40  # a weight changed after the CRC was written
    f.write_bytes(bytes(raw))
    z = TorchZip(f)
    with pytest.raises(ConversionError, match="archive/data/0 fails its CRC check"):
        z.tensors["w"].raw()
    # A tensor reading part of its storage checks the whole storage once.
    f = torch_zip(tmp_path / "part.pt", state_dict_pickle({"w": tensor_pickle("0", (2,), (1,))}),
                  {"0": data.tobytes()})
    raw = bytearray(f.read_bytes())
    raw[raw.index(data.tobytes()) + 13] ^= 0x40
    f.write_bytes(bytes(raw))
    with pytest.raises(ConversionError, match="fails its CRC check"):
        TorchZip(f).tensors["w"].raw()


def test_pickle_entry_claiming_more_bytes_than_it_holds(tmp_path):
    f = _one_tensor(tmp_path / "lie.pt", (2,), (1,), np.ones(2, np.float32).tobytes())
    with zipfile.ZipFile(f) as z:
        size = z.getinfo("archive/data.pkl").file_size
    _patch_central(f, "archive/data.pkl", size=size + 64)
    with pytest.raises(ConversionError, match=f"data.pkl claims {size + 64} bytes"):
        TorchZip(f)


NESTED = {
    # {"a": {"a": ... 100000 deep}}: past Python's stack
    "deep": b"\x80\x02" + (b"}" + ops("a")) * 100000 + b"}" + b"s" * 100000 + b".",
    # d = {}; d["a"] = d; d["b"] = d: endless, or 2**depth paths
    "cycle": b"\x80\x02}q\x05" + ops("a") + b"h\x05s" + ops("b") + b"h\x05s.",
    # {"a": t, "a.b"...}: two tensors flattened to one name
    "same name": state_dict_pickle({"a.b": tensor_pickle("0", (1,), (1,))})[:-1]
    + ops("a") + b"}" + ops("b") + tensor_pickle("0", (1,), (1,)) + b"ss.",
    "huge key": b"\x80\x02}" + b"\x8b" + struct.pack("<I", 4000) + b"\x01" * 4000 + ops(1) + b"s.",
}


@pytest.mark.parametrize("case", sorted(NESTED))
def test_malformed_state_dicts_are_refused(case, tmp_path):
    f = torch_zip(tmp_path / "x.pt", NESTED[case], {"0": np.ones(1, np.float32).tobytes()})
    with pytest.raises(ConversionError, match="malformed state dict|appears twice|two tensors are named"):
        TorchZip(f)
