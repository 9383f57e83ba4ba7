"""Shared by the converter tests: the committed fixtures and how to run a converted model."""

import math
import pickle
import shutil
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np

import infini_mlx

FIXTURES = Path(__file__).parent / "fixtures"


def reference(name: str):
    r = np.load(FIXTURES / "refs" / f"{name}.npz")
    return mx.array(r["tokens"]), r["logits"], int(r["segment_len"])


def load_f32(path, **infini):
    """A converted model, computing in float32, with optional semantic overrides."""
    model, _ = infini_mlx.load(path, infini=infini or None)
    model.set_dtype(mx.float32)
    return model


def max_diff(model, tokens, expected) -> float:
    return float(np.abs(np.array(model(tokens)) - expected).max())


def copy_fixture(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def ops(x) -> bytes:
    """x's protocol-2 pickle opcodes, without PROTO and STOP."""
    return pickle.dumps(x, 2)[2:-1]


def tensor_pickle(key, shape, stride, offset=0, numel=None, storage="FloatStorage") -> bytes:
    """The opcodes torch.save writes for one tensor: _rebuild_tensor_v2(storage, offset, shape, stride, ...)."""
    numel = numel if numel is not None else math.prod(shape)
    pid = b"(" + ops("storage") + f"ctorch\n{storage}\n".encode() + ops(key) + ops("cpu") + ops(numel) + b"tQ"
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + ops(offset) + ops(tuple(shape))
        + ops(tuple(stride)) + ops(False) + b"ccollections\nOrderedDict\n)Rt" + b"R"
    )


def state_dict_pickle(tensors, before: bytes = b"") -> bytes:
    """A state-dict pickle: tensors maps names to tensor_pickle() opcodes; before runs first."""
    out = b"\x80\x02" + before + b"ccollections\nOrderedDict\n)R"
    for name, t in tensors.items():
        out += ops(name) + t + b"s"
    return out + b"."


def torch_zip(path: Path, pkl: bytes, storages, byteorder: str = "little") -> Path:
    """A zip-format torch.save file holding the pickle pkl and raw storages (key -> bytes)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", byteorder)
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path
