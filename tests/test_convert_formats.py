"""Every format, converted without torch, reproduces the logits PyTorch computed
with that project's own math (tests/fixtures/make_fixtures.py) within 1e-4."""

import json

import mlx.core as mx
import pytest
from convert_helpers import FIXTURES, load_f32, max_diff, reference
from infini_mlx.converters import convert, detect

# fixture -> (reference, expected format, conversion kwargs, recorded semantics,
#             semantics that must change the logits if flipped)
CASES = {
    "plain_llama_st": ("plain_llama", "hf", {}, {}, {}),
    "plain_llama_bin": ("plain_llama", "hf", {}, {}, {}),
    "beomi_llama": (
        "beomi_llama", "beomi", {"infini": {"segment_len": 8}},
        dict(update="linear", first_segment="zero", memory_rope=False, gqa_memory="tile", segment_len=8),
        dict(update="delta", gqa_memory="interleave", memory_rope=True),
    ),
    "beomi_gemma": (
        "beomi_gemma", "beomi", {},
        dict(update="linear", first_segment="zero", memory_rope=False, segment_len=8),
        dict(update="delta", memory_rope=True),
    ),
    "jlamprou_qwen2_moe": (
        "jlamprou_qwen2_moe", "jlamprou", {"infini": {"segment_len": 8}},
        dict(update="linear", first_segment="eps", eps=1e-8, memory_rope=True, rope_mode="segment"),
        dict(update="delta", memory_rope=False, rope_mode="absolute"),
    ),
    "nanotron_llama": (
        "nanotron_llama", "nanotron", {"tokenizer": FIXTURES / "plain_llama_st"},
        dict(update="delta", first_segment="zero", memory_rope=False, gqa_memory="interleave",
             gate_act="hard_sigmoid", segment_len=8),
        dict(update="linear", gqa_memory="tile", gate_act="sigmoid", memory_rope=True),
    ),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    return {name: (convert(FIXTURES / name, out / name, **case[2]), out / name)
            for name, case in CASES.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_format_is_detected(name):
    assert detect(FIXTURES / name) == CASES[name][1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_converted_model_reproduces_pytorch_logits(name, converted):
    ref, fmt, _, semantics, _ = CASES[name]
    summary, path = converted[name]
    assert summary.fmt == fmt
    recorded = json.loads((path / "config.json").read_text())["infini"]
    assert {k: recorded[k] for k in semantics} == semantics
    tokens, expected, _ = reference(ref)
    model = load_f32(path)
    if fmt == "hf":  # fully local gates: the base model (the input fits in one segment)
        for layer in model.layers:
            layer.self_attn.gate = mx.full(layer.self_attn.gate.shape, -40.0)
    assert max_diff(model, tokens, expected) <= 1e-4


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if CASES[n][4]])
def test_each_recorded_semantic_matters(name, converted):
    """The comparison above can fail: any other convention misses the reference by far."""
    ref, _, _, _, flips = CASES[name]
    tokens, expected, _ = reference(ref)
    for key, wrong in flips.items():
        model = load_f32(converted[name][1], **{key: wrong})
        assert max_diff(model, tokens, expected) > 1e-2, key


def test_summary_says_what_was_found_and_mapped(converted):
    text = str(converted["jlamprou_qwen2_moe"][0])
    assert "jlamprou" in text and "2 torch zip file(s)" in text
    assert "self_attn.beta [1] -> gate (4,)" in text
    assert "4 stale memory buffers" in text
    assert "memory_rope=True" in text
    text = str(converted["nanotron_llama"][0])
    assert "tensor parallel 2" in text and "hard_sigmoid" in text
