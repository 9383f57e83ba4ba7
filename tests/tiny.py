"""Tiny random models of every supported family, made locally (no downloads)."""

import json
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import _get_classes

from infini_mlx import InfiniConfig, upcycle

VOCAB = 97
_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=VOCAB,
)

CONFIGS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False, **_COMMON),
    # Mistral-style sliding-window layers through llama's layer_types.
    "llama_swa": dict(
        model_type="llama",
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        **_COMMON,
    ),
    "mistral": dict(model_type="mistral", rope_theta=1e6, **_COMMON),
    "qwen2": dict(model_type="qwen2", **_COMMON),
    "qwen3": dict(
        model_type="qwen3",
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        **_COMMON,
    ),
    "gemma": dict(model_type="gemma", head_dim=16, **_COMMON),
    "gemma2": dict(
        model_type="gemma2",
        head_dim=16,
        query_pre_attn_scalar=16,  # an int, as transformers (the tokenizer loader) checks
        attn_logit_softcapping=5.0,
        final_logit_softcapping=30.0,
        **_COMMON,
    ),
    "gemma3_text": dict(
        model_type="gemma3_text",
        head_dim=16,
        query_pre_attn_scalar=16,  # an int, as transformers (the tokenizer loader) checks
        sliding_window=8,
        sliding_window_pattern=2,
        **_COMMON,
    ),
    "phi3": dict(model_type="phi3", partial_rotary_factor=0.5, **_COMMON),
    # Qwen1.5-MoE (jlamprou's Infini checkpoints): q/k/v biases, routed + shared experts.
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        **_COMMON,
    ),
}


def make_base(family: str = "llama", seed: int = 0):
    """A random mlx-lm model of ``family`` (float32) and its config dict."""
    config = dict(CONFIGS[family])
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model, config


def make_infini(family: str = "llama", seed: int = 0, **infini):
    """A random Infini model; gates (and convolutions, write strengths) drawn at random."""
    model, config = make_base(family, seed)
    upcycle(model, config["model_type"], InfiniConfig(**infini))
    for i, layer in enumerate(model.layers):
        a = layer.self_attn
        a.gate = mx.random.normal(a.gate.shape, key=mx.random.key(100 + i))
        # Convolutions and write strengths at random too, not at their identity/zero start.
        names = ("q_conv1d", "k_conv1d", "v_conv1d", "b_proj", "b_conv1d", "q_gate_conv1d", "k_gate_conv1d")
        for j, name in enumerate(names):
            if name in a:
                w = a[name].weight
                a[name].weight = 0.5 * mx.random.normal(w.shape, key=mx.random.key(200 + 10 * i + j))
    mx.eval(model.parameters())
    return model, config


def make_tokenizer(path: Path):
    """Write a word-level Hugging Face tokenizer of VOCAB tokens ("t0".."t96") to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "t1"})
    )


def save_base(path: Path, family: str = "llama", seed: int = 0, dtype=None, bits=None, **extra_config):
    """Save a random base model as an mlx-lm directory with a tokenizer.

    Its weights are float32, or ``dtype`` ("float16", "bfloat16"), quantized
    to ``bits`` (groups of 32) if given, as mlx-lm's converter writes them.
    """
    from mlx_lm.utils import quantize_model, save_config, save_model

    model, config = make_base(family, seed)
    if dtype:
        model.set_dtype(getattr(mx, dtype))
        config["torch_dtype"] = dtype
    if bits:
        model, config = quantize_model(model, config, 32, bits)
    save_model(path, model)
    save_config({**config, **extra_config}, config_path=path / "config.json")
    make_tokenizer(path)
    return model, config
