"""State files: the whole streaming state of a model as one safetensors file."""

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .cache import STATE_NAMES, InfiniCache
from .config import InfiniConfig

STATE_FORMAT = "infini-mlx-state"
STATE_VERSION = 1


class StateFileError(ValueError):
    """A state file that cannot be read, or that belongs to another model."""


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's parameter names, shapes, dtypes and sampled values.

    Two models with different architectures, quantization or weights (gates
    included) get different fingerprints; hashing a strided sample of each
    tensor keeps it fast for multi-GB models.
    """
    h = hashlib.sha256()
    for name, a in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        h.update(f"{name}:{a.shape}:{a.dtype};".encode())
        flat = a.reshape(-1)
        stride = max(1, flat.size // 256)
        sample = flat[::stride]
        if sample.dtype == mx.bfloat16:
            sample = sample.astype(mx.float32)
        h.update(np.array(sample).tobytes())
    return h.hexdigest()[:32]


def _atomic_save(path: Path, arrays: Dict[str, mx.array], metadata: Dict[str, str]):
    # mx.save_safetensors appends ".safetensors" to names without it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _checksum(arrays: Dict[str, mx.array]) -> str:
    """SHA-256 of every array's name, shape, dtype and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        h.update(f"{name}:{a.shape}:{a.dtype};".encode())
        h.update(np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a).tobytes())
    return h.hexdigest()


def _check_arrays(path, arrays: Dict[str, mx.array], model: nn.Module, offset: int):
    """Refuse arrays that do not fit the model: names, shapes, dtypes, finiteness."""
    cfg = model.infini_config
    pos = offset % cfg.segment_len
    need = set()  # what a reading of `offset` tokens has written
    if offset:
        need = {"M", "z"} if cfg.memory == "paper" else {"M"}
        need |= {"conv_q", "conv_k", "conv_v"} if cfg.conv_size else set()
        need |= {"conv_b"} if cfg.write_conv else set()
    if pos:
        need |= {"keys", "values", "dM", "dz"} if cfg.memory == "paper" else {"keys", "values", "dM"}
    rows = set()
    for i, layer in enumerate(model.layers):
        shapes = layer.self_attn.state_shapes
        for name in STATE_NAMES:
            a = arrays.get(f"layers.{i}.{name}")
            if a is None:
                if name in need:
                    raise StateFileError(f"{path}: layer {i} has no {name}")
                continue
            base = "z" if name == "dz" else "M" if name == "dM" else name
            want = shapes.get(base)
            if want is None:
                raise StateFileError(f"{path}: layer {i} has a {name} this model does not use")
            if a.ndim != len(want) + 1 or any(w is not None and w != d for w, d in zip(want, a.shape[1:])):
                raise StateFileError(f"{path}: layer {i} {name} has shape {a.shape}, the model needs (B, {want})")
            if name in ("keys", "values") and a.shape[2] < pos:
                raise StateFileError(f"{path}: layer {i} {name} holds fewer tokens than the offset says")
            if name in ("M", "z", "dM", "dz") and a.dtype != mx.float32:
                raise StateFileError(f"{path}: layer {i} {name} is {a.dtype}, not float32")
            if not mx.issubdtype(a.dtype, mx.floating):
                raise StateFileError(f"{path}: layer {i} {name} is {a.dtype}, not a float array")
            if not mx.all(mx.isfinite(a)).item():
                raise StateFileError(f"{path}: layer {i} {name} holds NaN or infinite values")
            if name in ("z", "dz") and mx.any(a < 0).item():
                raise StateFileError(f"{path}: layer {i} {name} is negative")
            rows.add(a.shape[0])
    if len(rows) > 1:
        raise StateFileError(f"{path}: the layers' states disagree on the batch size")


def save_state(
    path: Union[str, Path],
    cache: List[InfiniCache],
    model: nn.Module,
    metadata: Optional[Dict[str, str]] = None,
    fingerprint: Optional[str] = None,
) -> None:
    """Write a model's streaming state atomically (temporary file, then rename).

    Args:
        path: Destination file (any name; it is a safetensors file).
        cache: The model's list of ``InfiniCache``, one per layer.
        model: The model the state belongs to.
        metadata: Extra string metadata to keep (e.g. what was read).
        fingerprint: A precomputed ``model_fingerprint(model)``.
    """
    arrays = {}
    for i, c in enumerate(cache):
        for name, a in zip(STATE_NAMES, c.state):
            if a is not None:
                arrays[f"layers.{i}.{name}"] = a
    meta = dict(metadata or {})
    meta.update(
        format=STATE_FORMAT,
        format_version=str(STATE_VERSION),
        model_fingerprint=fingerprint or model_fingerprint(model),
        infini=json.dumps(model.infini_config.to_dict(), sort_keys=True),
        num_layers=str(len(cache)),
        offset=str(cache[0].offset),
        tokens_read=str(cache[0].offset),
        checksum=_checksum(arrays),
    )
    _atomic_save(Path(path), arrays, meta)


def read_state(path: Union[str, Path]) -> Tuple[Dict[str, mx.array], Dict[str, str]]:
    """Read a state file's arrays and metadata, checking only its format."""
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"{path}: no such state file")
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception:
        raise StateFileError(f"{path}: not a state file, or corrupt or truncated") from None
    if meta.get("format") != STATE_FORMAT:
        raise StateFileError(f"{path}: not an infini-mlx state file")
    if meta.get("format_version") != str(STATE_VERSION):
        raise StateFileError(
            f"{path}: state format version {meta.get('format_version')} is not supported "
            f"(this infini-mlx reads version {STATE_VERSION})"
        )
    return arrays, meta


def load_state(
    path: Union[str, Path], model: nn.Module, fingerprint: Optional[str] = None
) -> Tuple[List[InfiniCache], Dict[str, str]]:
    """Restore a streaming state saved by ``save_state`` onto ``model``.

    Raises:
        StateFileError: The file is missing, corrupt, or was written by another
            model or with another Infini config.
    """
    arrays, meta = read_state(path)
    cfg = model.infini_config
    try:
        saved_cfg = InfiniConfig.from_dict(json.loads(meta["infini"]))
    except Exception:
        raise StateFileError(f"{path}: unreadable infini config in state file") from None
    # gate_init only seeds new gates and memory_trained (absent from older files)
    # records training; the gates and weights themselves are in the fingerprint.
    ours = cfg.to_dict()
    diff = [
        k
        for k, v in saved_cfg.to_dict().items()
        if k not in ("gate_init", "memory_trained") and ours.get(k) != v
    ]
    if diff:
        raise StateFileError(
            f"{path}: state was written with another infini config ({', '.join(diff)} differ)"
        )
    if meta.get("model_fingerprint") != (fingerprint or model_fingerprint(model)):
        raise StateFileError(f"{path}: state was written by another model")
    try:
        n, offset = int(meta["num_layers"]), int(meta["offset"])
    except (KeyError, ValueError):
        raise StateFileError(f"{path}: the state file's layer count or offset is missing") from None
    if n != len(model.layers):
        raise StateFileError(f"{path}: state has {n} layers, the model {len(model.layers)}")
    if not 0 <= offset < 2**53:
        raise StateFileError(f"{path}: offset {offset} is out of range")
    # Files without a checksum come from before it was written; the checks below still run.
    if "checksum" in meta and meta["checksum"] != _checksum(arrays):
        raise StateFileError(f"{path}: the state's arrays do not match their checksum (corrupt)")
    _check_arrays(path, arrays, model, offset)
    cache = model.make_cache()
    for i, c in enumerate(cache):
        c.state = tuple(arrays.get(f"layers.{i}.{name}") for name in STATE_NAMES)
        c.offset = offset
    return cache, meta
