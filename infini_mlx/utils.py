"""Load and save Infini models, reusing mlx-lm's loaders and savers."""

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import (
    DEFAULT_ALLOW_PATTERNS,
    _download,
    load_model,
    load_tokenizer,
    save_config,
    save_model,
)

from .attention import NEW_PARAMETERS, InfiniAttention, is_new_parameter
from .config import InfiniConfig
from .upcycle import upcycle

GATES_FILE = "infini.safetensors"
DEFAULT_MODEL = Path(__file__).parent / "default_model"


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_model_path(path_or_hf_repo: Optional[Union[str, Path]]) -> Path:
    """A local directory for a path, a Hugging Face id, or None (the embedded model)."""
    if path_or_hf_repo is None:
        if not (DEFAULT_MODEL / "config.json").exists():
            raise ModelNotFoundError("the embedded default model is not installed")
        return DEFAULT_MODEL
    path = Path(path_or_hf_repo)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a model directory (no config.json)")
        return path
    name = str(path_or_hf_repo)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"model {name!r} not found: no such directory")
    try:
        return _download(name, allow_patterns=DEFAULT_ALLOW_PATTERNS + [GATES_FILE])
    except Exception as e:  # hub errors vary: offline, 404, gated, bad id
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"model {name!r} is neither a local directory nor reachable on the "
            f"Hugging Face Hub ({reason})"
        ) from None


def _new_parameters(model: nn.Module):
    """The parameters Infini adds (gates, convolutions, ...), saved in GATES_FILE."""
    return {k: v for k, v in tree_flatten(model.parameters()) if is_new_parameter(k)}


def upcast_half(model: nn.Module) -> nn.Module:
    """Cast a model's float16 and bfloat16 parameters to float32, in place.

    MLX's CPU backend runs the matrix products of MoE experts (``GatherMM``) in
    float32 only, and half-precision matrix products, quantized ones included
    (their scales and biases), many times slower than float32 ones. Quantized
    weights stay packed.
    """
    half = (mx.float16, mx.bfloat16)
    model.update(tree_map(lambda v: v.astype(mx.float32) if v.dtype in half else v, model.parameters()))
    return model


def _gates_moved(params: Dict[str, mx.array], gate_init: float) -> bool:
    """Whether any saved gate differs from ``gate_init``, the value new gates start at."""
    gates = [v for k, v in params.items() if k.endswith(".gate")]
    return any(not mx.all(g == gate_init).item() for g in gates)


def memory_trained(model_path: Union[str, Path], infini: Optional[Dict[str, Any]] = None) -> bool:
    """Whether the memory of a model directory was trained.

    As recorded in ``infini.memory_trained``. A directory saved before that was
    recorded (the embedded model, converted Infini checkpoints) counts as
    trained when its gates have moved from ``gate_init``: a plain model
    converted by ``infini convert`` holds new gates only.

    Args:
        model_path: The model directory.
        infini: Its ``"infini"`` config block, if it has one.
    """
    cfg = InfiniConfig.from_dict(infini)
    if cfg.memory_trained is not None:
        return cfg.memory_trained
    gates_file = Path(model_path) / GATES_FILE
    return gates_file.exists() and _gates_moved(mx.load(str(gates_file)), cfg.gate_init)


def load(
    path_or_hf_repo: Optional[Union[str, Path]] = None,
    infini: Optional[Dict[str, Any]] = None,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    lazy: bool = False,
    return_config: bool = False,
):
    """Load a model as an Infini-attention model, with its tokenizer.

    A model saved by infini-mlx (or converted by ``infini convert``) comes back
    with its gates and its ``"infini"`` semantics. Any other mlx-lm model of a
    supported family is upcycled: its attention is replaced and new gates start
    at ``gate_init`` (by default -12: the untrained memory gets almost no
    weight, so inside a segment the model is its base model).
    ``model.infini_config.memory_trained`` says whether the memory was trained.
    Where the default device is the CPU, float16 and bfloat16 weights are cast
    to float32 (``upcast_half``); quantized weights stay quantized.

    Args:
        path_or_hf_repo: Local directory or Hugging Face id; ``None`` for the
            embedded default model.
        infini: Overrides of the ``"infini"`` config block, e.g.
            ``{"segment_len": 512}``.
        tokenizer_config: Passed to mlx-lm's tokenizer loader.
        lazy: Leave the weights unevaluated until first use.
        return_config: Also return the config dict (with its ``"infini"`` block).

    Returns:
        ``(model, tokenizer)`` or ``(model, tokenizer, config)``.
    """
    model_path = resolve_model_path(path_or_hf_repo)
    model, config = load_model(model_path, lazy=True)
    cfg = InfiniConfig.from_dict({**config.get("infini", {}), **(infini or {})})
    upcycle(model, config["model_type"], cfg)

    gates_file = model_path / GATES_FILE
    if gates_file.exists():
        gates = mx.load(str(gates_file))
        missing = set(_new_parameters(model)) - set(gates)
        saved = InfiniConfig.from_dict(config.get("infini"))
        # Options that add parameters may be switched on for fine-tuning: those start fresh.
        if missing and (saved.memory, saved.conv_size, saved.write_conv, saved.qk_gate, saved.qk_expand) == (
            cfg.memory, cfg.conv_size, cfg.write_conv, cfg.qk_gate, cfg.qk_expand
        ):
            raise ValueError(
                f"{gates_file} lacks {len(missing)} Infini parameters, e.g. {min(missing)}"
            )
        gates = _widen_convs(gates, saved.conv_size, cfg.conv_size)
        model.load_weights(list(gates.items()), strict=False)
        if cfg.memory_trained is None:
            cfg.memory_trained = _gates_moved(gates, saved.gate_init)
    cfg.memory_trained = bool(cfg.memory_trained)
    if mx.default_device() == mx.cpu:
        upcast_half(model)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()

    config["infini"] = cfg.to_dict()
    tokenizer = load_tokenizer(
        model_path, tokenizer_config, eos_token_ids=config.get("eos_token_id", None)
    )
    if return_config:
        return model, tokenizer, config
    return model, tokenizer


def _widen_convs(gates: Dict[str, mx.array], saved: int, size: int) -> Dict[str, mx.array]:
    """Saved convolutions of ``saved`` taps as ``size`` taps: zeros before the oldest tap.

    A wider window for fine-tuning starts as the same function (the last tap is
    the current token); a narrower one would drop learned taps and is refused.
    """
    if not saved or size == saved:
        return gates
    if size < saved:
        raise ValueError(f"conv_size {size} is narrower than the saved model's {saved}")
    pad = size - saved
    return {
        k: mx.pad(v, [(0, 0), (pad, 0)]) if k.endswith("_conv1d.weight") else v
        for k, v in gates.items()
    }


@contextmanager
def _gates_removed(model: nn.Module):
    """Hide the Infini parameters so mlx-lm's save_model writes only the base weights."""
    attns = [l.self_attn for l in model.layers if isinstance(l.self_attn, InfiniAttention)]
    hidden = [{n: a.pop(n) for n in NEW_PARAMETERS if n in a} for a in attns]
    try:
        yield
    finally:
        for a, h in zip(attns, hidden):
            for name, value in h.items():
                a[name] = value


def save(
    path: Union[str, Path],
    model: nn.Module,
    tokenizer: Any,
    config: Dict[str, Any],
    overwrite: bool = False,
) -> None:
    """Save an Infini model as an mlx-lm directory plus its gates.

    The base weights go to ``model*.safetensors`` exactly as mlx-lm writes them,
    so ``mlx_lm.load`` still loads the directory as the base model; the gates go
    to ``infini.safetensors`` and the semantics to ``config.json["infini"]``.
    The directory is written next to its destination and renamed into place.

    Args:
        path: Destination directory; it must not exist unless ``overwrite``.
        model: The Infini model.
        tokenizer: Its tokenizer (anything with ``save_pretrained``), or None.
        config: The model's config dict.
        overwrite: Replace an existing directory.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    config = dict(config)
    config["infini"] = model.infini_config.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        gates = _new_parameters(model)
        with _gates_removed(model):
            save_model(tmp, model)
        mx.save_safetensors(str(tmp / GATES_FILE), gates, metadata={"format": "mlx"})
        save_config(config, config_path=tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
