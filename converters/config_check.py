"""A checkpoint's config, checked against the tensors it comes with before any model is built."""

from typing import Dict, Iterable, Tuple

from .errors import ConversionError

MAX_SIZE = 2**31 - 1  # MLX array dimensions are 32-bit
# The config fields that size the model's tensors or its number of modules.
SIZES = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "num_hidden_layers", "vocab_size", "head_dim", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "shared_expert_intermediate_size",
)


def whole(value, what: str) -> int:
    """value, if it is a whole number from 1 to MAX_SIZE."""
    if type(value) is not int or not 0 < value <= MAX_SIZE:
        raise ConversionError(f"{what} must be a whole number from 1 to {MAX_SIZE}, got {value!r:.40}")
    return value


def check_config(config, shapes: Dict[str, Tuple[int, ...]], required: Iterable[str] = (),
                 where: str = "config.json") -> None:
    """Refuse a config whose sizes are not whole numbers or that has more layers than tensors.

    A model is built from the config before its tensors are compared with it:
    a layer count of millions would take hours to build and a size past 2^31
    cannot be built at all.
    """
    if not isinstance(config, dict):
        raise ConversionError(f"{where}: expected a JSON object, got {type(config).__name__}")
    for key in required:
        if key not in config:
            raise ConversionError(f"{where}: no {key}")
    for c in (config, config.get("text_config")):
        if not isinstance(c, dict):
            continue
        for key in SIZES:
            if c.get(key) is not None:
                whole(c[key], f"{where}: {key}")
        n = c.get("num_hidden_layers")
        if n is not None and n > len(shapes):
            raise ConversionError(
                f"{where}: num_hidden_layers is {n}, but the checkpoint has only {len(shapes)} tensors"
            )
