"""Convert a checkpoint directory into an infini-mlx model directory."""

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_map_with_path
from mlx_lm.utils import (
    _get_classes,
    get_total_parameters,
    make_shards,
    quantize_model,
    save_config,
)

from infini_mlx.utils import GATES_FILE

from . import safetensors_io
from .errors import ConversionError
from .formats import FORMATS, Plan, detect, plan_beomi, plan_hf, plan_jlamprou, validate_infini
from .gguf import is_gguf, plan_gguf
from .nanotron import plan_nanotron
from .paths import file_in
from .staging import check_places, replace, staging

PLANNERS = {"hf": plan_hf, "beomi": plan_beomi, "jlamprou": plan_jlamprou, "nanotron": plan_nanotron}
PLANNERS["gguf"] = plan_gguf  # a single .gguf file, not a directory
ALIASES = {"gemma-2b-10m": "beomi", "infini-transformer": "beomi", "huggingface": "hf"}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
    "chat_template.jinja", "chat_template.json",
)
DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class ConversionSummary:
    """What a conversion found and did; ``str()`` is the human summary."""

    src: Path
    dst: Path
    fmt: str
    found: str
    model: str
    infini: Dict[str, Any]
    mapped: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    shards: List[str] = field(default_factory=list)
    tokenizer_files: List[str] = field(default_factory=list)
    quantization: Optional[Dict[str, Any]] = None
    nbytes: int = 0

    def __str__(self) -> str:
        sem = ", ".join(f"{k}={v}" for k, v in self.infini.items() if k != "version")
        quant = (
            f"{self.quantization['bits']}-bit, group size {self.quantization['group_size']}"
            if self.quantization else "none"
        )
        lines = [
            f"Converted {self.src} -> {self.dst}",
            f"  format:     {self.fmt} ({FORMATS[self.fmt]})",
            f"  found:      {self.found}",
            f"  model:      {self.model}",
            *[f"  mapped:     {m}" for m in self.mapped],
            *[f"  dropped:    {d}" for d in self.dropped],
            f"  semantics:  {sem}",
            f"  quantized:  {quant}",
            f"  wrote:      {len(self.shards)} weight shard(s) ({self.nbytes / 2**20:.2f} MiB), "
            f"{GATES_FILE}, config.json, {len(self.tokenizer_files)} tokenizer file(s)",
            *[f"  note:       {n}" for n in self.notes],
        ]
        return "\n".join(lines)


def convert(
    src: Union[str, Path],
    dst: Union[str, Path],
    fmt: Optional[str] = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    force: bool = False,
    infini: Optional[Dict[str, Any]] = None,
    dtype: Optional[str] = None,
    tokenizer: Optional[Union[str, Path]] = None,
) -> ConversionSummary:
    """Convert a PyTorch or Hugging Face checkpoint into an infini-mlx model directory.

    Nothing in the source is executed: pickles go through a restricted
    unpickler and weights are read one tensor at a time. The result loads with
    ``infini_mlx.load`` (and its base weights with ``mlx_lm.load``).

    Args:
        src: The checkpoint directory.
        dst: The directory to create.
        fmt: One of ``FORMATS`` (``hf``, ``beomi``, ``jlamprou``, ``nanotron``);
            detected when None.
        quantize: Quantize the base weights with mlx-lm.
        q_bits: Bits per weight when quantizing.
        q_group_size: Group size when quantizing.
        force: Replace ``dst`` if it exists.
        infini: Overrides of the recorded ``"infini"`` semantics, e.g.
            ``{"segment_len": 1024}`` (for a plain model: any field, such as
            ``gate_init``).
        dtype: Cast floating-point weights to ``float16``/``bfloat16``/
            ``float32``; by default the config's ``torch_dtype``, as mlx-lm does.
        tokenizer: A directory to copy tokenizer files from when ``src`` has none.

    Returns:
        A ``ConversionSummary``.

    Raises:
        ConversionError: unknown layout, missing shard, shape mismatch,
            truncated file, forbidden pickle global, existing ``dst``.
    """
    src, dst = Path(src), Path(dst)
    tok_src = Path(tokenizer) if tokenizer else src
    if not src.exists():
        raise ConversionError(f"{src}: no such directory")
    gguf = is_gguf(src)
    if not src.is_dir() and not gguf:
        raise ConversionError(f"{src}: expected a checkpoint directory (with config.json), got a file")
    check_places(src, dst, force, tok_src)
    if quantize and (q_bits not in (2, 3, 4, 5, 6, 8) or q_group_size not in (32, 64, 128)):
        raise ConversionError(
            f"cannot quantize to {q_bits} bits in groups of {q_group_size} "
            "(bits: 2, 3, 4, 5, 6 or 8; group size: 32, 64 or 128)"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    fmt = ALIASES.get(fmt, fmt) if fmt else ("gguf" if gguf else detect(src))
    if fmt not in PLANNERS:
        raise ConversionError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")

    # Config, tensor names and shapes are checked on placeholders before any tensor is read.
    _build(PLANNERS[fmt](src, None))

    with staging(dst) as tmp:
        plan = PLANNERS[fmt](src, tmp / ".stage")
        summary = _write(plan, tmp, infini or {}, quantize, q_bits, q_group_size, dtype)
        # A GGUF file's tokenizer is rebuilt from its metadata into the stage directory.
        tok_src = Path(tokenizer) if tokenizer else (tmp / ".stage" if fmt == "gguf" else src)
        summary.tokenizer_files = _copy_tokenizer(tok_src, tmp)
        if not summary.tokenizer_files:
            summary.notes.append(f"no tokenizer files in {tokenizer or src}: add them (or pass --tokenizer DIR)")
        shutil.rmtree(tmp / ".stage", ignore_errors=True)
        replace(tmp, dst)
    summary.src, summary.dst = src, dst
    return summary


def _build(plan: Plan):
    """The mlx-lm model of the plan's config holding its (still lazy) base weights."""
    try:
        model_class, args_class = _get_classes(plan.config)
        model = model_class(args_class.from_dict(plan.config))
    except Exception as e:  # whatever mlx-lm makes of a config it cannot build
        raise ConversionError(
            f"config.json does not describe a {plan.config.get('model_type')} model: {type(e).__name__}: {e}"
        ) from None
    # RoPE frequencies are recomputed, never loaded (old .bin files carry them).
    derived = [k for k in plan.weights if k.endswith("rotary_emb.inv_freq")]
    for k in derived:
        del plan.weights[k]
    if derived:
        plan.dropped.append(f"{len(derived)} precomputed rotary_emb.inv_freq buffers")
    before = set(plan.weights)
    try:
        weights = model.sanitize(plan.weights) if hasattr(model, "sanitize") else plan.weights
    except (KeyError, IndexError, ValueError) as e:  # e.g. a MoE layer missing one expert
        raise ConversionError(
            f"the tensors do not fit mlx-lm's {plan.config['model_type']} layout ({type(e).__name__}: {e})"
        ) from None
    gone, new = before - set(weights), set(weights) - before
    if gone and not new:
        plan.dropped.append(f"{len(gone)} tensors mlx-lm does not use, e.g. {min(gone)}")
    elif gone:
        plan.mapped.append(f"{len(gone)} tensors -> {len(new)} by mlx-lm's sanitize, e.g. {min(new)}")
    ours = dict(tree_flatten(model.parameters()))
    if "lm_head.weight" in weights and "lm_head.weight" not in ours and "model.embed_tokens.weight" in ours:
        del weights["lm_head.weight"]  # a tied copy of the embeddings
        plan.dropped.append("lm_head.weight (tied to the embeddings)")
    missing, extra = sorted(set(ours) - set(weights)), sorted(set(weights) - set(ours))
    if missing:
        raise ConversionError(f"missing tensor {missing[0]} ({len(missing)} missing in all)")
    if extra:
        raise ConversionError(f"unexpected tensor {extra[0]} ({len(extra)} not in a {plan.config['model_type']} model)")
    for k, w in weights.items():
        if w.shape != ours[k].shape:
            raise ConversionError(
                f"shape mismatch: {k} is {list(w.shape)} in the checkpoint, the config implies {list(ours[k].shape)}"
            )
    model.load_weights(list(weights.items()))
    return model


def _write(plan: Plan, out: Path, overrides, quantize, q_bits, q_group_size, dtype) -> ConversionSummary:
    # A checkpoint with gates was trained with its memory; a plain model's memory never was.
    cfg = validate_infini({"memory_trained": bool(plan.gates), **plan.infini, **overrides})
    if overrides:
        plan.notes.append("overridden by the caller: " + ", ".join(f"{k}={v}" for k, v in overrides.items()))
    config = dict(plan.config)
    model = _build(plan)
    plan.weights = None

    dtype = dtype or config.get("torch_dtype") or config.get("dtype")
    if dtype in DTYPES:  # as mlx_lm.convert does
        cast = getattr(model, "cast_predicate", lambda _: True)
        to = getattr(mx, dtype)
        model.update(tree_map_with_path(
            lambda k, v: v.astype(to) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters(),
        ))
    gate_keys = _gate_keys(model)
    n_heads = model.layers[0].self_attn.n_heads
    gates = plan.gates or [mx.full((n_heads,), cfg.gate_init) for _ in gate_keys]
    if len(gates) != len(gate_keys):
        raise ConversionError(f"{len(gates)} gates for {len(gate_keys)} layers")
    if quantize:
        model, config = quantize_model(model, config, q_group_size, q_bits)

    params = dict(tree_flatten(model.parameters()))
    n_params = get_total_parameters(model)
    # Only the shards below hold the (lazy) weights: each is freed once written.
    model.update(tree_map(lambda _: mx.array([]), model.parameters()))
    shards_names = _save_shards(params, out, n_params)
    nbytes = sum((out / s).stat().st_size for s in shards_names)

    mx.save_safetensors(
        str(out / GATES_FILE),
        {k: g.astype(mx.float32) for k, g in zip(gate_keys, gates)},
        metadata={"format": "mlx"},
    )
    config["infini"] = cfg.to_dict()
    save_config(config, config_path=out / "config.json")
    H, Hkv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    model_desc = (
        f"{config['model_type']}, {len(gate_keys)} layers, {H} heads"
        + (f" ({Hkv} KV)" if Hkv and Hkv != H else "")
        + f", {n_params:,} parameters" + (f", {dtype}" if dtype else "")
    )
    return ConversionSummary(
        src=Path(), dst=Path(), fmt=plan.fmt, found=plan.found, model=model_desc,
        infini=cfg.to_dict(), mapped=plan.mapped, dropped=plan.dropped, notes=plan.notes,
        shards=shards_names, quantization=config.get("quantization"), nbytes=nbytes,
    )


def _gate_keys(model) -> List[str]:
    keys = [k for k, _ in tree_flatten(model.parameters()) if k.endswith(".self_attn.o_proj.weight")]
    keys.sort(key=lambda k: int(re.search(r"layers\.(\d+)\.", k).group(1)))
    return [k[: -len("o_proj.weight")] + "gate" for k in keys]


def _save_shards(params: Dict[str, mx.array], out: Path, n_params: int) -> List[str]:
    """mlx-lm's save_model layout, written one tensor at a time (mx.save_safetensors
    would hold a whole shard in memory)."""
    total = sum(v.nbytes for v in params.values())
    shards = make_shards(params)
    params.clear()
    fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map, names = {}, []
    for i in range(len(shards)):
        shard, shards[i] = shards[i], None
        name = fmt.format(i + 1, len(shards))
        weight_map.update({k: name for k in shard})
        # No name may hold this list: write() releases each tensor once written.
        safetensors_io.write(
            out / name, [(k, safetensors_io.mlx_item(shard.pop(k))) for k in list(shard)],
            metadata={"format": "mlx"},
        )
        names.append(name)
    index = {
        "metadata": {"total_size": total, "total_parameters": n_params},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    return names


def _copy_tokenizer(src: Path, out: Path) -> List[str]:
    copied = []
    for name in TOKENIZER_FILES:
        path = file_in(src, name)
        if path is not None:
            shutil.copy(path, out / name)
            copied.append(name)
    return copied
