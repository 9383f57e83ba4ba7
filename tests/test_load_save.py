"""Saving writes a directory mlx-lm still loads; infini_mlx.load restores everything."""

import json

import mlx.core as mx
import mlx_lm
import pytest
from tiny import VOCAB, save_base

import infini_mlx
from infini_mlx import ModelNotFoundError


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
