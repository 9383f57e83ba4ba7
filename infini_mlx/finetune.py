"""Fine-tuning a pretrained model's memory: base frozen, optional LoRA on the attention projections.

The trainable set is the memory's own parameters (gates, convolutions, write
strengths, read-out norm) plus, with a LoRA rank, mlx-lm's ``LoRALinear``
adapters on the attention projections. Saved model directories hold the
LoRA fused into the projections, so they load anywhere; the unfused adapter
weights travel beside them (``LORA_FILE``).
"""

from contextlib import contextmanager
from typing import Dict, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from .attention import NEW_PARAMETERS

LORA_FILE = "lora.safetensors"
LORA_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj")


def freeze_base(model: nn.Module) -> nn.Module:
    """Freeze everything but the parameters Infini adds (gates and the memory's own).

    Args:
        model: An Infini model.

    Returns:
        The same model.
    """
    model.freeze()
    for l in model.layers:
        a = l.self_attn
        a.unfreeze(keys=[n for n in NEW_PARAMETERS if n in a and isinstance(a[n], mx.array)], recurse=False)
        for n in NEW_PARAMETERS:
            if n in a and isinstance(a[n], nn.Module):
                a[n].unfreeze()
    return model


def add_lora(
    model: nn.Module, rank: int, scale: float = 20.0, keys: Sequence[str] = LORA_KEYS
) -> nn.Module:
    """Wrap the attention projections of every layer in mlx-lm's ``LoRALinear``.

    Freeze the base first (``freeze_base``): the wrapped projections keep
    their frozen state and only ``lora_a``/``lora_b`` train. ``lora_b`` starts
    at zero, so at first the model computes what it did before.

    Args:
        model: An Infini model.
        rank: LoRA rank.
        scale: mlx-lm's LoRA scale (its default is 20).
        keys: Which projections of ``self_attn`` to adapt.

    Returns:
        The same model.
    """
    cfg = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": [f"self_attn.{k}" for k in keys]}
    linear_to_lora_layers(model, len(model.layers), cfg)
    return model


def lora_modules(model: nn.Module):
    return [(k, m) for k, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_weights(model: nn.Module) -> Dict[str, mx.array]:
    """The LoRA matrices (``...q_proj.lora_a`` etc.), unfused."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}


@contextmanager
def lora_fused(model: nn.Module):
    """Inside, every ``LoRALinear`` is replaced by a plain linear holding W + scale * (AB)^T."""
    mods = lora_modules(model)
    if not mods:
        yield model
        return
    model.update_modules(tree_unflatten([(k, m.fuse()) for k, m in mods]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(mods))


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
