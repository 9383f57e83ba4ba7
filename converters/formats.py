"""The checkpoint formats: how each is recognised and what its tensors and conventions mean."""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx

from infini_mlx.config import InfiniConfig
from infini_mlx.upcycle import SUPPORTED_MODEL_TYPES

from .checkpoint import Checkpoint
from .config_check import check_config, whole
from .errors import ConversionError
from .paths import file_in

FORMATS = {
    "hf": "plain Hugging Face model of a supported family, upcycled with new gates",
    "beomi": "Hugging Face-style Infini checkpoint (Beomi InfiniTransformer Llama/Gemma, "
    "gemma-2B-10M): self_attn.gate [1,H,1,1]",
    "jlamprou": "jlamprou's Qwen1.5-MoE Infini checkpoint: self_attn.beta [1], stale M/z buffers",
    "nanotron": "nanotron Infini Llama checkpoint directory: tensor-parallel shards, fused qkv, "
    "balance_factors, model_config.json + config.yaml",
    "gguf": "llama.cpp GGUF file (llama/Mistral, Qwen2/3, Gemma 1-3): dequantized, tokenizer "
    "rebuilt from its metadata, upcycled with new gates",
}
DEFAULT_SEGMENT_LEN = 2048

# Beomi InfiniTransformer / gemma-2B-10M: no delta, nothing read from an empty memory,
# memory from un-rotated Q/K, RoPE restarting in every segment, GQA memories tiled.
BEOMI = dict(update="linear", first_segment="zero", rope_mode="segment",
             memory_rope=False, gqa_memory="tile")
# jlamprou: RoPE applied before the memory, eps 1e-8 in every denominator, linear update.
JLAMPROU = dict(update="linear", first_segment="eps", eps=1e-8, rope_mode="segment",
                memory_rope=True, gqa_memory="interleave")

_GATE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.gate$")
_BETA = re.compile(r"^model\.layers\.(\d+)\.self_attn\.beta$")
_BUFFER = re.compile(r"^model\.layers\.\d+\.self_attn\.(M|z)$")


@dataclass
class Plan:
    """What a format reader found: everything the writer needs, all weights lazy."""

    fmt: str
    config: dict
    infini: Dict[str, object]  # InfiniConfig fields
    weights: Dict[str, mx.array]
    gates: Optional[List[mx.array]]
    found: str
    largest_file: int
    mapped: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def read_config(src: Path) -> dict:
    path = file_in(src, "config.json")
    if path is None:
        raise ConversionError(f"{src}: unknown layout (no config.json, no model_config.json)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def detect(src: Path) -> str:
    """The format of a checkpoint directory, from its files and tensor names alone."""
    if (src / "model_config.json").exists() and (src / "model").is_dir():
        return "nanotron"
    read_config(src)
    if (src / "infini.safetensors").exists():
        raise ConversionError(f"{src}: already an infini-mlx model (load it directly)")
    names = Checkpoint(src).shapes
    if any(_BETA.match(n) or _BUFFER.match(n) for n in names):
        return "jlamprou"
    if any(_GATE.match(n) for n in names):
        return "beomi"
    return "hf"


def _check_family(config: dict, fmt: str, allowed) -> None:
    mt = config.get("model_type")
    if mt not in allowed:
        raise ConversionError(
            f"model_type {mt!r} is not supported by the {fmt} format (supported: {', '.join(allowed)})"
        )


def _segment_len(config: dict, notes: List[str]) -> int:
    if "segment_size" in config:
        return whole(config.pop("segment_size"), "config.json: segment_size")
    notes.append(f"segment length not recorded: {DEFAULT_SEGMENT_LEN} assumed (override with --segment-len)")
    return DEFAULT_SEGMENT_LEN


def _gelu_note(config: dict, notes: List[str]) -> None:
    act = config.get("hidden_activation") or "gelu_pytorch_tanh"
    if config.get("model_type") == "gemma" and act != "gelu":
        notes.append(
            f"the checkpoint's MLP uses {act}; mlx-lm's Gemma uses exact GELU (~1e-3 apart)"
        )


def _open(src: Path, stage: Optional[Path], config: dict, required=()):
    """The checkpoint, its tensors (placeholders when stage is None) and what was found."""
    ckpt = Checkpoint(src)
    check_config(config, ckpt.shapes, required)
    found = f"{len(ckpt.shapes)} tensors in {len(ckpt.files)} {ckpt.kind} file(s)"
    if ckpt.index is not None:
        found += f" (index {ckpt.index.name})"
    return ckpt, ckpt.placeholders() if stage is None else ckpt.load(stage), found


def _per_layer(found: Dict[int, mx.array], n_layers: int, what: str) -> List[mx.array]:
    missing = sorted(set(range(n_layers)) - set(found))
    if missing or len(found) != n_layers:
        raise ConversionError(f"{what}: expected one per layer for {n_layers} layers, missing {missing}")
    return [found[i] for i in range(n_layers)]


def plan_hf(src: Path, stage: Optional[Path]) -> Plan:
    """The plan of a plain model; with stage None its weights are placeholders, nothing is read."""
    config = read_config(src)
    _check_family(config, "hf", SUPPORTED_MODEL_TYPES)
    ckpt, weights, found = _open(src, stage, config)
    notes = ["no Infini gates in the checkpoint: new gates start at gate_init"]
    _gelu_note(config, notes)
    return Plan("hf", config, {}, weights, None, found, ckpt.largest_file, notes=notes)


def plan_beomi(src: Path, stage: Optional[Path]) -> Plan:
    config = read_config(src)
    _check_family(config, "beomi", ("llama", "gemma"))
    ckpt, weights, found = _open(src, stage, config, ("num_attention_heads", "num_hidden_layers"))
    H, n_layers = config["num_attention_heads"], config["num_hidden_layers"]
    notes: List[str] = []
    seg = _segment_len(config, notes)
    _gelu_note(config, notes)
    gates = {}
    for name in [n for n in weights if _GATE.match(n)]:
        g = weights.pop(name)
        if g.shape != (1, H, 1, 1):
            raise ConversionError(f"shape mismatch: {name} is {list(g.shape)}, expected [1, {H}, 1, 1]")
        gates[int(_GATE.match(name).group(1))] = g.reshape(H)
    gates = _per_layer(gates, n_layers, "self_attn.gate")
    mapped = [f"{n_layers} x model.layers.N.self_attn.gate [1,{H},1,1] -> gate ({H},)"]
    return Plan("beomi", config, dict(BEOMI, segment_len=seg), weights, gates, found,
                ckpt.largest_file, mapped=mapped, notes=notes)


def plan_jlamprou(src: Path, stage: Optional[Path]) -> Plan:
    config = read_config(src)
    _check_family(config, "jlamprou", ("qwen2_moe",))
    ckpt, weights, found = _open(src, stage, config, ("num_attention_heads", "num_hidden_layers"))
    H, n_layers = config["num_attention_heads"], config["num_hidden_layers"]
    notes: List[str] = []
    seg = _segment_len(config, notes)
    dropped = sorted(n for n in weights if _BUFFER.match(n))
    for n in dropped:
        del weights[n]
    betas = {}
    for name in [n for n in weights if _BETA.match(n)]:
        b = weights.pop(name)
        if b.size != 1:
            raise ConversionError(f"shape mismatch: {name} is {list(b.shape)}, expected [1]")
        betas[int(_BETA.match(name).group(1))] = mx.broadcast_to(b.reshape(1), (H,))
    gates = _per_layer(betas, n_layers, "self_attn.beta")
    mapped = [f"{n_layers} x model.layers.N.self_attn.beta [1] -> gate ({H},), one value per layer"]
    dropped = [f"{len(dropped)} stale memory buffers self_attn.M / self_attn.z"] if dropped else []
    return Plan("jlamprou", config, dict(JLAMPROU, segment_len=seg), weights, gates, found,
                ckpt.largest_file, mapped=mapped, dropped=dropped, notes=notes)


def validate_infini(d: Dict) -> InfiniConfig:
    try:
        return InfiniConfig.from_dict(d)
    except (ValueError, TypeError, OverflowError) as e:
        raise ConversionError(f"invalid Infini semantics: {e}") from None
