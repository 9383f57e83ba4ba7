"""Saving writes a directory mlx-lm still loads; infini_mlx.load restores everything."""

import json

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from tiny import VOCAB, save_base

import infini_mlx
from infini_mlx import InfiniConfig, InfiniSession, ModelNotFoundError
from infini_mlx.utils import DEFAULT_MODEL, memory_trained


def test_save_load_round_trip(tmp_path):
    base, _ = save_base(tmp_path / "base", "qwen3")
    tokens = mx.random.randint(0, VOCAB, (1, 30), key=mx.random.key(2))
    base_logits = base(tokens)

    model, tok, config = infini_mlx.load(
        tmp_path / "base", infini={"segment_len": 8, "update": "linear"}, return_config=True
    )
    for layer in model.layers:
        layer.self_attn.gate = mx.random.normal(layer.self_attn.gate.shape)
    expected = model(tokens)
    infini_mlx.save(tmp_path / "out", model, tok, config)

    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["infini"]["segment_len"] == 8 and saved["infini"]["update"] == "linear"
    again, _ = infini_mlx.load(tmp_path / "out")
    assert again.infini_config == model.infini_config
    assert mx.array_equal(again(tokens), expected)

    # mlx-lm itself loads the directory: the base model, gates ignored.
    plain, _ = mlx_lm.load(str(tmp_path / "out"))
    assert mx.allclose(plain(tokens), base_logits, atol=1e-5, rtol=0)

    with pytest.raises(FileExistsError):
        infini_mlx.save(tmp_path / "out", model, tok, config)


def test_missing_model_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        infini_mlx.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        infini_mlx.load(tmp_path / "empty")


def test_new_memory_parameters_round_trip_and_fine_tuning_switch(tmp_path):
    save_base(tmp_path / "base", "llama")
    tokens = mx.random.randint(0, VOCAB, (1, 30), key=mx.random.key(2))
    form = {"segment_len": 8, "memory": "normalized", "conv_size": 4}
    model, tok, config = infini_mlx.load(tmp_path / "base", infini=form, return_config=True)
    a = model.layers[0].self_attn
    a.k_conv1d.weight = mx.random.normal(a.k_conv1d.weight.shape)
    a.b_proj.weight = mx.random.normal(a.b_proj.weight.shape)
    a.gate = mx.ones_like(a.gate)
    expected = model(tokens)
    infini_mlx.save(tmp_path / "out", model, tok, config)
    again, _ = infini_mlx.load(tmp_path / "out")
    assert mx.array_equal(again(tokens), expected)
    assert mx.array_equal(again.layers[0].self_attn.k_conv1d.weight, a.k_conv1d.weight)
    # write_conv switched on for fine-tuning: its convolution starts as the identity.
    conv, _ = infini_mlx.load(tmp_path / "out", infini={"write_conv": True})
    assert mx.allclose(conv(tokens), expected, atol=1e-5)
    with pytest.raises(ValueError, match="write_conv needs"):
        infini_mlx.load(tmp_path / "base", infini={"write_conv": True})
    # qk_gate switched on for fine-tuning: its convolutions start at zero, the model unchanged.
    gated, _ = infini_mlx.load(tmp_path / "out", infini={"qk_gate": True})
    assert mx.array_equal(gated.layers[0].self_attn.k_gate_conv1d.weight, mx.zeros_like(a.k_conv1d.weight))
    assert mx.array_equal(gated(tokens), expected)
    with pytest.raises(ValueError, match="qk_gate needs"):
        infini_mlx.load(tmp_path / "base", infini={"qk_gate": True})
    # qk_expand: the keys' new half starts at 0, so only the read-out's scale moves (RMSNorm'd).
    wide, _ = infini_mlx.load(tmp_path / "out", infini={"qk_expand": True})
    assert mx.array_equal(wide.layers[0].self_attn.k_gate_conv1d.weight, mx.zeros_like(a.k_conv1d.weight))
    assert mx.allclose(wide(tokens), expected, atol=1e-3)
    with pytest.raises(ValueError, match="qk_expand needs"):
        infini_mlx.load(tmp_path / "out", infini={"qk_expand": True, "qk_gate": True})
    with pytest.raises(ValueError, match="write_scale needs"):
        infini_mlx.load(tmp_path / "base", infini={"write_scale": 0.5})
    for bad in (0, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="write_scale must be"):
            InfiniConfig(memory="normalized", write_scale=bad)
    # A wider window for fine-tuning: the saved taps are the newest ones, the model unchanged.
    wide, _ = infini_mlx.load(tmp_path / "out", infini={"conv_size": 7})
    assert wide.layers[0].self_attn.k_conv1d.weight.shape == (a.k_conv1d.weight.shape[0], 7)
    assert mx.allclose(wide(tokens), expected, atol=1e-5)
    with pytest.raises(ValueError, match="narrower"):
        infini_mlx.load(tmp_path / "out", infini={"conv_size": 2})

    # A saved paper-form model fine-tuned with the new options: those start fresh.
    paper, tok, config = infini_mlx.load(tmp_path / "base", infini={"segment_len": 8}, return_config=True)
    infini_mlx.save(tmp_path / "paper", paper, tok, config)
    switched, _ = infini_mlx.load(tmp_path / "paper", infini={"memory": "normalized", "conv_size": 4})
    w = switched.layers[0].self_attn.q_conv1d.weight
    assert mx.array_equal(w, mx.zeros_like(w).at[:, -1].add(1.0))
    # ... but a file that should hold them and does not is refused.
    (tmp_path / "out" / "infini.safetensors").unlink()
    mx.save_safetensors(str(tmp_path / "out" / "infini.safetensors"), {
        k: v for k, v in mx.load(str(tmp_path / "paper" / "infini.safetensors")).items()
    })
    with pytest.raises(ValueError, match="lacks"):
        infini_mlx.load(tmp_path / "out")


def test_memory_trained_is_recorded_and_inferred_for_older_directories(tmp_path):
    save_base(tmp_path / "base", "llama")
    model, tok, config = infini_mlx.load(tmp_path / "base", return_config=True)
    assert model.infini_config.memory_trained is False
    assert mx.all(model.layers[0].self_attn.gate == -12.0).item()  # sigmoid: 6e-6
    assert not memory_trained(tmp_path / "base")
    opened, _ = infini_mlx.load(tmp_path / "base", infini={"gate_init": 0.0})  # the override
    assert mx.all(opened.layers[0].self_attn.gate == 0.0).item()

    infini_mlx.save(tmp_path / "saved", model, tok, config)
    path = tmp_path / "saved" / "config.json"
    saved = json.loads(path.read_text())
    assert saved["infini"]["memory_trained"] is False
    assert infini_mlx.load(tmp_path / "saved")[0].infini_config.memory_trained is False

    # Saved before it was recorded: trained if the gates moved from gate_init
    # (a plain model converted by `infini convert` holds new gates only).
    del saved["infini"]["memory_trained"]
    path.write_text(json.dumps(saved))
    assert not memory_trained(tmp_path / "saved", saved["infini"])
    assert infini_mlx.load(tmp_path / "saved")[0].infini_config.memory_trained is False
    gates = mx.load(str(tmp_path / "saved" / "infini.safetensors"))
    gates["model.layers.1.self_attn.gate"] = gates["model.layers.1.self_attn.gate"] + 1
    mx.save_safetensors(str(tmp_path / "saved" / "infini.safetensors"), gates)
    assert memory_trained(tmp_path / "saved", saved["infini"])
    assert infini_mlx.load(tmp_path / "saved")[0].infini_config.memory_trained is True
    # The embedded model records it.
    default = json.loads((DEFAULT_MODEL / "config.json").read_text())["infini"]
    assert default["memory_trained"] is True and memory_trained(DEFAULT_MODEL, default)


@pytest.mark.filterwarnings("ignore:the memory of")
@pytest.mark.parametrize("dtype,bits", [("float16", None), ("bfloat16", None), ("float16", 4)])
def test_half_precision_moe_reads_and_generates_on_cpu(tmp_path, dtype, bits):
    save_base(tmp_path, "qwen2_moe", dtype=dtype, bits=bits)
    session = InfiniSession.load(tmp_path, segment_len=8)
    session.read(" ".join(f"t{2 + i % 90}" for i in range(30)))
    session.ask("t5 t6", max_tokens=4)
    assert session.response.generation_tokens >= 1
    params = dict(tree_flatten(session.model.parameters()))
    experts = params["model.layers.0.mlp.switch_mlp.gate_proj.weight"]
    assert experts.dtype == (mx.uint32 if bits else mx.float32)  # quantized weights stay packed
    if mx.default_device() == mx.cpu:  # what the CPU backend runs fast, or at all
        assert {a.dtype for a in params.values()} <= {mx.float32, mx.uint32}
