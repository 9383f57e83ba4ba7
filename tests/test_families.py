"""Every supported mlx-lm family: upcycled with local gates it is the base model."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from tiny import CONFIGS, VOCAB, make_base, save_base

import infini_mlx
from infini_mlx import InfiniAttention, InfiniConfig, upcycle

L = 20  # longer than the sliding windows of llama_swa and gemma3_text (8)
# The paper's memory, and the normalised one with a convolution (its new parameters
# start neutral: identity convolution, zero write-strength projection).
FORMS = {"paper": {}, "normalized+conv": dict(memory="normalized", conv_size=4)}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_local_gates_reproduce_base_model(family, form):
    base, config = make_base(family)
    tokens = mx.random.randint(0, VOCAB, (2, L), key=mx.random.key(1))
    expected = base(tokens)
    mx.eval(expected)

    cfg = InfiniConfig(segment_len=L, gate_init=-40.0, **FORMS[form])
    model = upcycle(base, config["model_type"], cfg)
    assert all(isinstance(l.self_attn, InfiniAttention) for l in model.layers)
    assert mx.allclose(model(tokens), expected, atol=1e-4, rtol=0)
    # The same through the cache, in uneven chunks.
    cache = model.make_cache()
    out = mx.concatenate([model(tokens[:, a:b], cache=cache) for a, b in [(0, 7), (7, 8), (8, L)]], 1)
    assert mx.allclose(out, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_plain_model_loaded_by_default_is_the_base_model(family, tmp_path):
    base, _ = save_base(tmp_path, family)
    tokens = mx.random.randint(0, VOCAB, (2, L), key=mx.random.key(3))
    expected = base(tokens)
    model, _ = infini_mlx.load(tmp_path)  # no overrides: upcycled, its memory never trained
    assert model.infini_config.memory_trained is False
    assert mx.allclose(model(tokens), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_untrained_memory_leaves_each_segment_to_the_base_model(family, tmp_path):
    base, _ = save_base(tmp_path, family)
    tokens = mx.random.randint(0, VOCAB, (1, L), key=mx.random.key(4))
    model, _ = infini_mlx.load(tmp_path, infini={"segment_len": 8})
    out = model(tokens, cache=model.make_cache())
    for a in range(0, L, 8):  # the memory holds the segments before, with a weight of 6e-6
        assert mx.allclose(out[:, a : a + 8], base(tokens[:, a : a + 8]), atol=1e-4, rtol=0), a


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_memory_streaming_per_family(family, form):
    base, config = make_base(family)
    cfg = InfiniConfig(segment_len=6, gate_init=0.0, **FORMS[form])  # the memory weighs
    model = upcycle(base, config["model_type"], cfg)
    tokens = mx.random.randint(0, VOCAB, (1, L), key=mx.random.key(2))
    full = model(tokens)
    cache = model.make_cache()
    steps = mx.concatenate([model(tokens[:, i : i + 1], cache=cache) for i in range(L)], 1)
    assert mx.allclose(full, steps, atol=1e-4, rtol=0)


@pytest.mark.parametrize("form", FORMS)
def test_quantized_model_is_upcycled_with_its_quantized_projections(form):
    base, config = make_base("llama")
    nn.quantize(base, group_size=32, bits=8)
    tokens = mx.random.randint(0, VOCAB, (1, L), key=mx.random.key(5))
    expected = base(tokens)
    model = upcycle(base, "llama", InfiniConfig(segment_len=L, gate_init=-40.0, **FORMS[form]))
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert mx.allclose(model(tokens), expected, atol=1e-4, rtol=0)
    if form != "paper":  # the write strengths read the model's width, not the packed one
        assert model.layers[0].self_attn.b_proj.weight.shape == (2, 64)
        model(tokens, cache=model.make_cache())


def test_unsupported_family_is_refused():
    base, _ = make_base("llama")
    with pytest.raises(ValueError, match="not supported"):
        upcycle(base, "mamba", InfiniConfig())
