"""Turn a loaded mlx-lm model into an Infini-attention model, in place."""

from typing import Optional

import mlx.nn as nn
from mlx_lm.models import llama, qwen2, qwen3

from .attention import InfiniAttention
from .cache import InfiniCache
from .config import InfiniConfig
from .fast import SwiGLU

# model_type values (as in config.json) whose attention InfiniAttention can adopt.
SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "phi3",
    "qwen2_moe",
)


def _sliding_window(model: nn.Module) -> Optional[int]:
    inner = model.language_model if "language_model" in model else model
    inner = inner.model
    return getattr(inner, "sliding_window", None) or getattr(inner, "window_size", None)


# MLPs computing down(silu(gate(x)) * up(x)) with mlx-lm's swiglu: SwiGLU does it
# with fast.exp on CPU.
SWIGLU_MLPS = (llama.MLP, qwen2.MLP, qwen3.MLP)


def is_infini(model: nn.Module) -> bool:
    return any(isinstance(l.self_attn, InfiniAttention) for l in model.layers)


def upcycle(model: nn.Module, model_type: str, config: InfiniConfig) -> nn.Module:
    """Replace every attention module of ``model`` with an ``InfiniAttention``.

    The base projections (quantized ones included) are reused, not copied; new
    gates start at ``config.gate_init``. ``model.make_cache`` is replaced so
    that ``mlx_lm.models.cache.make_prompt_cache`` returns ``InfiniCache``s.

    Args:
        model: A model loaded by mlx-lm.
        model_type: The ``model_type`` of its config.json.
        config: The Infini semantics to use.

    Returns:
        The same model, modified.
    """
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported; supported: "
            + ", ".join(SUPPORTED_MODEL_TYPES)
        )
    if is_infini(model):
        raise ValueError("the model already uses Infini-attention")
    window = _sliding_window(model)
    for layer in model.layers:
        attn = layer.self_attn
        sliding = getattr(layer, "use_sliding", False) or getattr(attn, "is_sliding", False)
        layer.self_attn = InfiniAttention(attn, config, window if sliding else None)
        if type(getattr(layer, "mlp", None)) in SWIGLU_MLPS:
            layer.mlp = SwiGLU(layer.mlp)
    n = len(model.layers)
    model.make_cache = lambda: [InfiniCache(config.segment_len, config.memory) for _ in range(n)]
    model.infini_config = config
    return model
