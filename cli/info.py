"""What a model directory or a state file holds, read without loading any weights."""

import json
import math
import struct
from pathlib import Path
from typing import Any, Dict

import mlx.core as mx

from infini_mlx.config import InfiniConfig
from infini_mlx.state import read_state
from infini_mlx.utils import memory_trained


def _safetensors_header(path: Path) -> Dict[str, Any]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def model_info(path: Path) -> Dict[str, Any]:
    """Architecture, size, tokenizer and Infini semantics of a model directory."""
    cfg = json.loads((path / "config.json").read_text())
    cfg = {**cfg.get("text_config", {}), **cfg}
    heads = cfg.get("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads else None)
    layers = cfg.get("num_hidden_layers")

    weights = sorted(p for p in path.glob("model*.safetensors"))
    params, dtypes = 0, set()
    for w in weights:
        for name, t in _safetensors_header(w).items():
            if name != "__metadata__":
                n = 1
                for d in t["shape"]:
                    n *= d
                params += n
                dtypes.add(t["dtype"])
    tok_cfg = path / "tokenizer_config.json"
    chat = (path / "chat_template.jinja").exists() or (path / "chat_template.json").exists()
    if tok_cfg.exists():
        chat = chat or bool(json.loads(tok_cfg.read_text()).get("chat_template"))
    infini = cfg.get("infini")
    icfg = InfiniConfig.from_dict(infini)
    seg = icfg.segment_len
    memory = segment = None
    if layers and kv_heads and head_dim:
        # M (and z for the paper's memory), float32; the convolution's last inputs.
        z = 1 if icfg.memory == "paper" else 0
        wide = 2 if icfg.qk_expand else 1  # keys twice the head size
        memory = layers * kv_heads * head_dim * (wide * head_dim + z) * 4
        if icfg.conv_size:
            memory += layers * (icfg.conv_size - 1) * (heads + 2 * kv_heads) * head_dim * 4
        # The current segment: its keys and values, and its pending dM, dz.
        # Activations are float32 unless the weights are half precision (cast to float32 on CPU).
        width = 2 if dtypes & {"F16", "BF16"} and mx.default_device() != mx.cpu else 4
        segment = layers * kv_heads * seg * head_dim * 2 * width + memory
    return {
        "kind": "model",
        "path": str(path),
        "model_type": cfg.get("model_type"),
        "layers": layers,
        "hidden_size": cfg.get("hidden_size"),
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": cfg.get("vocab_size"),
        # Stored elements: packed 4-bit weights count 8 to a uint32.
        "stored_parameters": params,
        "weight_dtypes": sorted(dtypes),
        "weights_bytes": sum(w.stat().st_size for w in weights),
        "quantization": cfg.get("quantization"),
        "chat_template": chat,
        "infini": infini,
        "gates": (path / "infini.safetensors").exists(),
        "memory_trained": memory_trained(path, infini),
        "segment_len": seg,
        "memory_bytes": memory,
        "segment_bytes": segment,
    }


def state_info(path: Path) -> Dict[str, Any]:
    """What was read into a state file, by which model, and how big its memory is."""
    arrays, meta = read_state(path)
    infini = json.loads(meta.get("infini", "{}"))
    notes = meta.get("strategy") == "notes"
    return {
        "kind": "state",
        "path": str(path),
        "strategy": meta.get("strategy", "memory"),
        "tokens_read": int(meta.get("notes_tokens" if notes else "tokens_read", 0)),
        "notes": len(json.loads(meta.get("notes", "[]"))) if notes else None,
        "complete": meta.get("complete", "1") == "1",
        "source": meta.get("source"),
        "source_bytes": int(meta["source_size"]) if "source_size" in meta else None,
        "model": meta.get("model") or None,
        "model_fingerprint": meta.get("model_fingerprint"),
        "prompt_format": meta.get("prompt_format"),
        "layers": int(meta.get("num_layers", 0)),
        "segment_len": infini.get("segment_len"),
        "infini": infini,
        "memory_bytes": sum(a.nbytes for k, a in arrays.items() if k.endswith((".M", ".z"))),
        "state_bytes": sum(a.nbytes for a in arrays.values()),
        "file_bytes": path.stat().st_size,
    }


def _mb(n) -> str:
    if n is None:
        return "?"
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024


def _gates(d: Dict[str, Any]) -> str:
    if d["gates"]:
        return f"{'trained' if d['memory_trained'] else 'saved, never trained'} (infini.safetensors)"
    cfg = InfiniConfig.from_dict(d["infini"])
    g = cfg.gate_init
    out = f"none: new gates start at gate_init={g}"
    if cfg.gate_act == "sigmoid" and cfg.gate_weights == "memory":
        out += f": the memory weighs sigmoid({g}) = {1 / (1 + math.exp(-g)):.1e}"
    return out


def format_info(d: Dict[str, Any]) -> str:
    """The human-readable lines of ``model_info`` or ``state_info``."""
    if d["kind"] == "state":
        what = f"all of {d['source']}" if d["complete"] else (
            f"part of {d['source']} (interrupted; finish it with --resume)")
        notes = d.get("notes") is not None
        rows = [
            ("state", d["path"]),
            ("read", f"{d['tokens_read']:,} tokens: {what}"
                     + (f", kept in {d['notes']} notes" if notes else "")),
            ("model", d["model"] or "the embedded default model"),
            ("fingerprint", d["model_fingerprint"]),
            ("prompts", d["prompt_format"]),
            ("memory", f"none: notes (file {_mb(d['file_bytes'])})" if notes else
                       f"{_mb(d['memory_bytes'])} compressive memory in {d['layers']} layers, "
                       f"{_mb(d['state_bytes'] - d['memory_bytes'])} of the current segment "
                       f"(file {_mb(d['file_bytes'])})"),
            ("infini", " ".join(f"{k}={v}" for k, v in d["infini"].items() if k != "version")),
        ]
    else:
        infini = d["infini"]
        rows = [
            ("model", d["path"]),
            ("type", f"{d['model_type']}, {d['layers']} layers, hidden {d['hidden_size']}, "
                     f"{d['heads']} heads ({d['kv_heads']} KV heads of {d['head_dim']})"),
            ("weights", f"{d['stored_parameters']:,} stored parameters "
                        f"({'/'.join(d['weight_dtypes']) or 'none'}, {_mb(d['weights_bytes'])})"
                        + (", quantized" if d["quantization"] else "")),
            ("tokenizer", f"{d['vocab_size']:,} tokens, "
                          + ("chat template" if d["chat_template"] else "no chat template")),
            ("infini", " ".join(f"{k}={v}" for k, v in infini.items() if k != "version")
             if infini else "none: upcycled when loaded (new gates, default semantics)"),
            ("gates", _gates(d)),
            ("trained", "yes: the memory was trained" if d["memory_trained"] else
             "no: the memory was never trained; answers see only the last segment"),
            ("memory", f"{_mb(d['memory_bytes'])} compressive memory + at most "
                       f"{_mb(d['segment_bytes'])} for the current segment of "
                       f"{d['segment_len']:,} tokens, whatever the length read"),
        ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
