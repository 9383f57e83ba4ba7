"""Fine-tuning a loaded model's memory: frozen base, LoRA on the projections, resumable."""

import json

import mlx.core as mx
import numpy as np
import pytest
import typer
from mlx.utils import tree_flatten
from tiny import make_infini, save_base
from typer.testing import CliRunner

from infini_mlx import load
from infini_mlx.attention import NEW_PARAMETERS, is_new_parameter
from infini_mlx.finetune import LORA_FILE, add_lora, freeze_base, lora_fused
from infini_mlx.train import TrainArgs, train

NORMALIZED = {"segment_len": 32, "memory": "normalized", "conv_size": 4, "write_conv": True, "qk_gate": True}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def trainable(model):
    return {k for k, _ in tree_flatten(model.trainable_parameters())}


def x():
    return mx.array(np.random.default_rng(0).integers(0, 97, (2, 21)))


def test_freeze_base_leaves_only_the_memory_trainable():
    model, _ = make_infini("llama", **NORMALIZED)
    freeze_base(model)
    names = trainable(model)
    assert names == {k for k, _ in tree_flatten(model.parameters()) if is_new_parameter(k)}
    per_layer = {k.split("self_attn.")[1].split(".")[0] for k in names}
    assert per_layer == set(NEW_PARAMETERS)
    model, _ = make_infini("llama", segment_len=8)  # the paper's memory adds gates only
    freeze_base(model)
    assert trainable(model) == {f"model.layers.{i}.self_attn.gate" for i in range(2)}


def test_lora_at_init_computes_what_the_base_computes():
    model, _ = make_infini("llama", **NORMALIZED)
    before = model(x())
    freeze_base(model)
    add_lora(model, 4)
    assert mx.array_equal(model(x()), before)
    lora = {k for k in trainable(model) if not is_new_parameter(k)}
    assert lora == {f"model.layers.{i}.self_attn.{p}.lora_{ab}" for i in range(2) for p in PROJ for ab in "ab"}
    # Fused and unfused compute the same once the adapters have moved.
    for _, m in model.named_modules():
        if "lora_b" in m:
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    moved = model(x())
    assert not mx.allclose(moved, before)
    with lora_fused(model):
        assert mx.allclose(model(x()), moved, atol=1e-4)
    assert mx.array_equal(model(x()), moved)


@pytest.fixture
def plain(tmp_path):
    d = tmp_path / "plain"
    save_base(d, "llama")
    tok = d / "tokenizer_config.json"
    tok.write_text(json.dumps({**json.loads(tok.read_text()), "bos_token": "t2"}))  # books start with BOS
    return d


def run_args(out, plain, books_dir, **kw):
    base = dict(
        out=str(out), init=str(plain), infini=NORMALIZED, batch_size=2, segments=[2, 3],
        mix={"lm": 1.0, "passkey": 1.0}, loss_positions=6, answer_weight=10.0, warmup=0, freeze_base=True,
        book_names=["alice_in_wonderland_pg11.txt"], books=str(books_dir),
    )
    return TrainArgs(**{**base, **kw})


def weights(d):
    return {k: v for f in sorted(d.glob("model*.safetensors")) for k, v in mx.load(str(f)).items()}


def test_frozen_base_stays_bit_identical(tmp_path, plain, books_dir):
    train(run_args(tmp_path / "run", plain, books_dir, steps=3), log=lambda s: None)
    model_dir = tmp_path / "run" / "checkpoint" / "model"
    base, after = weights(plain), weights(model_dir)
    assert base.keys() == after.keys()
    assert all(mx.array_equal(base[k], after[k]) for k in base)
    model, _ = load(model_dir)
    assert model.infini_config.memory_trained and model.infini_config.memory == "normalized"
    news = {k: v for k, v in tree_flatten(model.parameters()) if is_new_parameter(k)}
    assert not mx.all(news["model.layers.0.self_attn.gate"] == 0).item()
    assert not mx.all(news["model.layers.1.self_attn.b_proj.weight"] == 0).item()


def test_lora_run_resumes_exactly_and_saves_the_adapters_fused(tmp_path, plain, books_dir):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(run_args(whole, plain, books_dir, steps=4, lora_rank=2), log=lambda s: None)
    train(run_args(split, plain, books_dir, steps=2, lora_rank=2), log=lambda s: None)
    train(run_args(split, plain, books_dir, steps=4, lora_rank=2), log=lambda s: None)

    def log(run):
        return [r["loss"] for r in json.loads((run / "checkpoint" / "trainer.json").read_text())["log"]]

    assert log(whole) == log(split) and len(log(split)) == 4
    la, lb = (mx.load(str(r / "checkpoint" / LORA_FILE)) for r in (whole, split))
    assert la.keys() == lb.keys() and len(la) == 2 * 4 * 2
    assert all(mx.array_equal(la[k], lb[k]) for k in la)
    assert not mx.all(la["model.layers.0.self_attn.q_proj.lora_b"] == 0).item()
    # The saved model holds W + scale * (A B)^T in the projections; the rest is the base.
    base, saved = weights(plain), weights(whole / "checkpoint" / "model")
    assert base.keys() == saved.keys()
    for k in base:
        p = k.rsplit(".", 2)[-2]
        if p not in PROJ:
            assert mx.array_equal(base[k], saved[k]), k
            continue
        a, b = la[k.replace(".weight", ".lora_a")], la[k.replace(".weight", ".lora_b")]
        assert mx.allclose(saved[k], base[k] + 20.0 * (a @ b).T, atol=1e-6), k


def test_cli_options(tmp_path, plain, books_dir):
    from infini_mlx.cli.train import train as train_cmd

    app = typer.Typer()
    app.command()(train_cmd)
    app.command("noop")(lambda: None)
    common = ["--books", "alice_in_wonderland_pg11.txt", "--books-dir", str(books_dir), "--batch-size", "1",
              "--segments", "2,2", "--mix", "lm=1", "--steps", "1"]
    r = CliRunner().invoke(app, ["train", str(tmp_path / "bad"), "--lora-rank", "2"] + common)
    assert r.exit_code != 0 and "--model" in r.output
    r = CliRunner().invoke(
        app,
        ["train", str(tmp_path / "run"), "--model", str(plain), "--infini", json.dumps(NORMALIZED),
         "--freeze-base", "--lora-rank", "2", "--loss-positions", "4"] + common,
    )
    assert r.exit_code == 0, r.output
    assert "trained)" in r.output
    saved = json.loads((tmp_path / "run" / "checkpoint" / "trainer.json").read_text())["args"]
    assert saved["freeze_base"] and saved["lora_rank"] == 2
