"""The weight files of a Hugging Face-style checkpoint directory, sharded or not."""

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from . import safetensors_io
from .errors import ConversionError
from .paths import file_in
from .torch_zip import TorchZip

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# Pickles a trainer leaves beside the weights: never weights, often arbitrary objects.
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")


def _weight_files(src: Path) -> Tuple[List[Path], Optional[Path], Optional[Dict[str, str]]]:
    """The weight files, and the index (with its weight_map) when there is one."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if file_in(src, index):
            return _from_index(src, index)
    indexes = sorted(src.glob("*.index.json"))
    if len(indexes) == 1:
        return _from_index(src, indexes[0].name)
    sft = sorted(p for p in src.glob("*.safetensors") if p.name != "infini.safetensors")
    pt = sft or sorted(src.glob("pytorch_model*.bin")) or sorted(
        p for p in src.iterdir()
        if p.suffix in TORCH_SUFFIXES and p.name not in NOT_WEIGHTS and not p.name.startswith("rng_state")
    )
    return [file_in(src, p.name) for p in pt], None, None


def _from_index(src: Path, name: str):
    index = file_in(src, name)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise ConversionError(f"{index}: not a valid shard index (no weight_map)") from None
    if not isinstance(weight_map, dict) or not all(type(f) is str for f in weight_map.values()):
        raise ConversionError(f"{index}: not a valid shard index (weight_map is not a map of file names)")
    files = []
    for f in sorted(set(weight_map.values())):
        path = file_in(src, f)
        if path is None:
            raise ConversionError(f"missing shard {f} (listed in {index.name})")
        files.append(path)
    return files, index, weight_map


class Checkpoint:
    """The tensors of a checkpoint directory: safetensors or torch zip files, via an index or not.

    Args:
        src: The directory.

    Raises:
        ConversionError: for no weight files, a missing shard, a tensor the
            index lists but its shard lacks, or any unreadable file.
    """

    def __init__(self, src: Path):
        self.src = src
        self.files, self.index, weight_map = _weight_files(src)
        if not self.files:
            raise ConversionError(f"{src}: no weight files (*.safetensors, *.bin, *.pt, *.pth)")
        self.torch = self.files[0].suffix in TORCH_SUFFIXES
        if any((f.suffix in TORCH_SUFFIXES) != self.torch for f in self.files):
            raise ConversionError(f"{src}: mixes safetensors and torch files")
        self._zips: Dict[Path, TorchZip] = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.dtypes: Dict[str, str] = {}
        self.where: Dict[str, Path] = {}
        for f in self.files:
            for name, (shape, dtype) in self._entries(f).items():
                if name in self.where:
                    raise ConversionError(f"{name} is in both {self.where[name].name} and {f.name}")
                self.shapes[name], self.dtypes[name], self.where[name] = shape, dtype, f
        if self.index is not None:
            for name, f in weight_map.items():
                if self.where.get(name) != src / f:
                    raise ConversionError(f"{name} is listed in {self.index.name} but not in {f}")

    def _entries(self, f: Path) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        if not self.torch:
            header, _ = safetensors_io.read_header(f)
            return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items()}
        self._zips[f] = TorchZip(f)
        return {k: (t.shape, t.dtype) for k, t in self._zips[f].tensors.items()}

    @property
    def kind(self) -> str:
        return "torch zip" if self.torch else "safetensors"

    @property
    def largest_file(self) -> int:
        return max(f.stat().st_size for f in self.files)

    def placeholders(self) -> Dict[str, mx.array]:
        """Stand-ins of every tensor's shape and dtype that hold no data: nothing is read."""
        return {
            k: mx.broadcast_to(mx.zeros((), safetensors_io.MX_DTYPES[self.dtypes[k]]), shape)
            for k, shape in self.shapes.items()
        }

    def load(self, stage: Path) -> Dict[str, mx.array]:
        """Every tensor as a lazy MLX array.

        Torch files are first rewritten as safetensors under ``stage``, one
        tensor in memory at a time, so that MLX can then load them lazily.
        """
        weights = {}
        for f in self.files:
            if self.torch:
                stage.mkdir(parents=True, exist_ok=True)
                f = _transcode(self._zips.pop(f), stage / f"{f.stem}.safetensors")
            weights.update(safetensors_io.load(f)[0])
        return weights


def _transcode(z: TorchZip, out: Path) -> Path:
    def item(t):
        if t.dtype == "F64":  # MLX computes in float32 at most
            return "F32", t.shape, lambda: t.raw().view(np.float64).astype(np.float32)
        return t.dtype, t.shape, t.raw

    safetensors_io.write(out, [(k, item(t)) for k, t in z.tensors.items()])
    return out
