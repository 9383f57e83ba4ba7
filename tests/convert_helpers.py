"""Shared by the converter tests: the committed fixtures and how to run a converted model."""

import shutil
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
