"""nanotron's Infini Llama checkpoints: a directory of per-parameter, tensor-parallel shards.

Layout (nanotron ``save_weights``): ``model/<module path>/model_<param>[_pp-rank-P-of-N
_tp-rank-R-of-T].safetensors``, one tensor ``data`` per file; sharded files carry
``local_global_slices_pairs`` and ``unsharded_shape`` metadata saying where each
piece goes. Model shape is in ``model_config.json``, Infini settings under
``infini_attention`` in ``config.yaml``.
"""

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np
import yaml

from . import safetensors_io
from .config_check import check_config, whole
from .errors import ConversionError
from .formats import DEFAULT_SEGMENT_LEN, Plan
from .paths import file_in

_FILE = re.compile(
    r"^model_(?P<param>.+?)(?:_pp-rank-\d+-of-\d+_tp-rank-(?P<tp>\d+)-of-(?P<tps>\d+)"
    r"(?:_exp-rank-\d+-of-\d+)?)?\.safetensors$"
)
# nanotron's balance_act_type -> InfiniConfig.gate_act
GATE_ACTS = {"orig_sigmoid": "sigmoid", "sigmoid": "sigmoid", "orig_tanh": "tanh",
             "tanh": "tanh", "hard_sigmoid": "hard_sigmoid", "tanh_abs": "tanh_abs"}
# Always the delta rule; memory per KV head shared as repeat_kv shares it; RoPE only local.
NANOTRON = dict(update="delta", first_segment="zero", rope_mode="segment",
                memory_rope=False, gqa_memory="interleave")

_LAYER = "model.decoder.{}.pp_block."
_RENAMES = {
    "model.token_position_embeddings.pp_block.token_embedding.weight": "model.embed_tokens.weight",
    "model.final_layer_norm.pp_block.weight": "model.norm.weight",
    "model.lm_head.pp_block.weight": "lm_head.weight",
}
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


def _slices(s: str) -> Tuple[slice, ...]:
    return tuple(slice(*(None if x == "None" else int(x) for x in d.split(","))) for d in s.split("|"))


def _assemble(name: str, shards: Dict[int, Tuple[mx.array, dict]], tps: int) -> mx.array:
    """Put the tensor-parallel pieces of one parameter back where their metadata says."""
    missing = sorted(set(range(tps)) - set(shards))
    if missing:
        raise ConversionError(f"missing shard: {name} tp-rank {missing[0]} of {tps}")
    meta = shards[0][1]
    try:
        shape = tuple(int(x) for x in meta["unsharded_shape"].strip("()").split(",") if x.strip())
    except (KeyError, ValueError):
        raise ConversionError(f"{name}: sharded file without unsharded_shape metadata") from None
    full = mx.zeros(shape, shards[0][0].dtype)
    covered = 0
    for r in range(tps):
        piece, m = shards[r]
        for pair in m.get("local_global_slices_pairs", "").split(";"):
            try:
                local, glob = (_slices(s) for s in pair.split("#"))
                part = piece[local]
                full[glob] = part
            except (ValueError, IndexError):
                raise ConversionError(f"{name}: bad slice metadata {pair!r:.80}") from None
            covered += part.size
    if covered != full.size:
        raise ConversionError(f"{name}: its {tps} shards cover {covered} of {full.size} values")
    return full


def _read_params(src: Path) -> Tuple[Dict[str, mx.array], int, int, int]:
    root = src / "model"
    groups: Dict[str, Dict[int, Tuple[mx.array, dict]]] = {}
    sizes: Dict[str, int] = {}
    n_files, largest = 0, 0
    for f in sorted(root.rglob("*.safetensors")):
        f = file_in(src, f.relative_to(src))
        m = _FILE.match(f.name)
        if m is None:
            raise ConversionError(f"unexpected file in a nanotron checkpoint: {f.relative_to(root)}")
        name = ".".join(f.relative_to(root).parent.parts + (m["param"],))
        tensors, meta = safetensors_io.load(f)
        if "data" not in tensors:
            raise ConversionError(f"{f}: no 'data' tensor")
        groups.setdefault(name, {})[int(m["tp"] or 0)] = (tensors["data"], meta)
        sizes[name] = int(m["tps"] or 1)
        n_files, largest = n_files + 1, max(largest, f.stat().st_size)
    params = {}
    for name, shards in groups.items():
        params[name] = shards[0][0] if sizes[name] == 1 else _assemble(name, shards, sizes[name])
    return params, n_files, largest, max(sizes.values(), default=1)


def _hf_config(mc: dict) -> dict:
    if mc.get("is_using_mup"):
        raise ConversionError("muP checkpoints (is_using_mup) are not supported")
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
            "rms_norm_eps", "vocab_size", "max_position_embeddings", "rope_theta",
            "rope_scaling", "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act")
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers"):
        if k not in mc:
            raise ConversionError(f"model_config.json: no {k}")
    config = {k: mc[k] for k in keys if k in mc}
    config["model_type"] = "llama"
    config["num_key_value_heads"] = mc.get("num_key_value_heads") or mc["num_attention_heads"]
    config["rope_traditional"] = bool(mc.get("rope_interleaved", False))
    config["tie_word_embeddings"] = bool(mc.get("tie_word_embeddings", False))
    return config


def plan_nanotron(src: Path, stage: Optional[Path]) -> Plan:
    """Its tensors are read lazily from safetensors files: ``stage`` is not needed."""
    mc_path, yml_path = file_in(src, "model_config.json"), file_in(src, "config.yaml")
    try:
        mc = json.loads(mc_path.read_text())
        yml = yaml.safe_load(yml_path.read_text()) if yml_path else {}
    except (ValueError, RecursionError, yaml.YAMLError) as e:
        raise ConversionError(f"{src}: unreadable nanotron config ({e})") from None
    if not isinstance(mc, dict) or not isinstance(yml or {}, dict):
        raise ConversionError(f"{src}: unreadable nanotron config (not a mapping)")
    config = _hf_config(mc)
    args = (yml or {}).get("infini_attention") or {}
    if not isinstance(args, dict):
        raise ConversionError("config.yaml: infini_attention is not a mapping")
    notes: List[str] = []
    if args.get("turn_on_memory") is False:
        raise ConversionError("this nanotron run has turn_on_memory: false (no Infini memory to convert)")
    seg = args.get("segment_length")
    if seg is None:
        notes.append(f"config.yaml has no infini_attention.segment_length: {DEFAULT_SEGMENT_LEN} assumed")
        seg = DEFAULT_SEGMENT_LEN
    act = args.get("balance_act_type", "orig_sigmoid")
    if not isinstance(act, str) or act not in GATE_ACTS:
        raise ConversionError(f"unknown balance_act_type {act!r} (known: {', '.join(GATE_ACTS)})")

    params, n_files, largest, tp = _read_params(src)
    check_config(config, {k: v.shape for k, v in params.items()}, where="model_config.json")
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    D = config["hidden_size"] // H
    n_layers, inter = config["num_hidden_layers"], config["intermediate_size"]
    weights, gates = {}, []
    for old, new in _RENAMES.items():
        if old in params:
            weights[new] = params.pop(old)
    for i in range(n_layers):
        pre, out = _LAYER.format(i), f"model.layers.{i}."
        take = lambda k, pre=pre: _pop(params, pre + k)  # noqa: E731
        for old, new in _LAYER_RENAMES.items():
            weights[out + new] = take(old)
        qkv = _split(take("attn.qkv_proj.weight"), [H * D, Hkv * D, Hkv * D], pre + "attn.qkv_proj.weight")
        for p, w in zip(("q_proj", "k_proj", "v_proj"), qkv):
            weights[f"{out}self_attn.{p}.weight"] = w
        gu = _split(take("mlp.gate_up_proj.weight"), [inter, inter], pre + "mlp.gate_up_proj.weight")
        weights[out + "mlp.gate_proj.weight"], weights[out + "mlp.up_proj.weight"] = gu
        b = take("attn.balance_factors")
        if b.shape != (H,):
            raise ConversionError(f"shape mismatch: {pre}attn.balance_factors is {list(b.shape)}, expected [{H}]")
        gates.append(b)
    if params:
        raise ConversionError(f"unexpected tensor in the nanotron checkpoint: {min(params)}")
    found = f"{n_files} per-parameter safetensors files, tensor parallel {tp}"
    mapped = [
        f"{n_layers} x attn.qkv_proj -> q_proj/k_proj/v_proj ({H}+{Hkv}+{Hkv} heads of {D})",
        f"{n_layers} x mlp.gate_up_proj -> gate_proj/up_proj",
        f"{n_layers} x attn.balance_factors ({H},) -> gate, activation {GATE_ACTS[act]}",
    ]
    seg = whole(seg, "config.yaml: infini_attention.segment_length")
    infini = dict(NANOTRON, segment_len=seg, gate_act=GATE_ACTS[act])
    return Plan("nanotron", config, infini, weights, gates, found, largest, mapped=mapped, notes=notes)


def _pop(params: Dict[str, mx.array], name: str) -> mx.array:
    try:
        return params.pop(name)
    except KeyError:
        raise ConversionError(f"missing tensor in the nanotron checkpoint: {name}") from None


def _split(w: mx.array, sizes: List[int], name: str) -> List[mx.array]:
    if w.shape[0] != sum(sizes):
        raise ConversionError(f"shape mismatch: {name} has {w.shape[0]} rows, the config implies {sum(sizes)}")
    return mx.split(w, list(np.cumsum(sizes)[:-1]), axis=0)
