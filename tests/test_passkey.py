"""Passkey prompts are the paper's; the shipped model retrieves; the command reports."""

import json
import random
import re
import struct
import zlib

import mlx.core as mx
import numpy as np
import typer
from mlx_lm import generate
from typer.testing import CliRunner

import infini_mlx
from infini_mlx.passkey import parse_depths, parse_length
from infini_mlx.tasks import Pieces, passkey_prompt

# Landmark Attention's generator, written out here independently of the package.
TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and "
    "memorize them. I will quiz you about the important information there."
)
GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def landmark_text(n_prefix_chars, n_suffix_chars, key):
    garbage_inf = " ".join([GARBAGE] * 50)
    lines = [
        TASK,
        garbage_inf[:n_prefix_chars],
        f"The pass key is {key}. Remember it. {key} is the pass key.",
        garbage_inf[:n_suffix_chars],
        "What is the pass key? The pass key is",
    ]
    return "\n".join(lines)


def test_prompt_is_the_papers_format(default_tokenizer):
    tok = default_tokenizer
    pieces = Pieces(tok)
    rng = random.Random(0)
    for _ in range(40):
        L, depth, key = rng.randrange(100, 700), rng.random(), rng.randint(1, 50000)
        ids = list(passkey_prompt(pieces, L, depth, key).tokens())
        assert len(ids) == L
        assert ids[0] == tok.bos_token_id
        lines = tok.decode(ids[1:]).split("\n")
        text = landmark_text(len(lines[1]), len(lines[3]), key)
        assert tok.decode(ids[1:]) == text
        # The streamed pieces are exactly how the tokenizer encodes the whole text.
        assert ids[1:] == tok.encode(text, add_special_tokens=False)
        # Depth: the prefix filler holds that share of the filler.
        n1, n2 = len(tok.encode(lines[1], add_special_tokens=False)), len(tok.encode(lines[3], add_special_tokens=False))
        assert abs(n1 - depth * (n1 + n2)) <= 3


def test_tokenizer_splits_digits(default_tokenizer):
    tok = default_tokenizer
    for n in [7, 90, 2024, 31415, 9054, 1000000, 123456789]:
        ids = tok.encode(f"The pass key is {n}.", add_special_tokens=False)
        pieces = tok.convert_ids_to_tokens(ids)
        digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
        assert digit_pieces == list(str(n)), pieces
        assert tok.decode(ids) == f"The pass key is {n}."


def test_shipped_model_answers_a_short_passkey():
    # Through mlx-lm's own generate: nothing of this package's evaluation code.
    # A 2-digit key must end where it ends (models trained on 1-50,000 ran on: 27 -> 2770).
    model, tok = infini_mlx.load()
    seg = model.infini_config.segment_len
    for key, prefix, suffix in [(31337, 0, 600), (4821, 300, 300), (27, 600, 0)]:
        prompt = landmark_text(prefix, suffix, key)
        ids = tok.encode(prompt)
        assert len(ids) > 2 * seg  # the key is in an earlier segment than the question (start)
        out = generate(model, tok, ids, max_tokens=8, verbose=False)
        assert int(re.search(r"\d+", out).group()) == key, out


def _answer_digit_hits(model, tok, prompts, keys):
    """Per-digit teacher-forced hits on the key after "The pass key is", plain mlx ops."""
    hits = []
    for prompt, key in zip(prompts, keys):
        ids = tok.encode(prompt + " " + str(key))
        logits = model(mx.array(ids)[None])[0]  # no cache: the training-time recurrence
        pred = np.array(mx.argmax(logits, axis=-1))
        n = len(str(key))
        hits += list(pred[-n - 1 : -1] == np.array(ids[-n:]))
    return np.mean(hits)


def test_shipped_model_reads_the_keys_digits_from_memory():
    """The key's digits come back from earlier segments through the memory.

    The key line sits in the first segments and the question several segments
    later, so local attention cannot see it: with every gate forced to local
    attention the digits are guesses; with the memory they are not.
    """
    model, tok = infini_mlx.load()
    rng = random.Random(1)
    keys = [rng.randint(10000, 50000) for _ in range(24)]
    prompts = [landmark_text(rng.randrange(0, 100), 1500, k) for k in keys]
    seg = model.infini_config.segment_len
    assert min(len(tok.encode(p)) for p in prompts) > 5 * seg
    with_memory = _answer_digit_hits(model, tok, prompts, keys)
    gates = [layer.self_attn.gate for layer in model.model.layers]
    for layer in model.model.layers:
        layer.self_attn.gate = mx.full(layer.self_attn.gate.shape, -1e9)
    without = _answer_digit_hits(model, tok, prompts, keys)
    for layer, g in zip(model.model.layers, gates):
        layer.self_attn.gate = g
    assert with_memory > without + 0.15 and without < 0.3, (with_memory, without)


def _read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h = struct.unpack(">II", chunks[b"IHDR"][:8])
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


def test_passkey_command(tmp_path):
    from infini_mlx.cli.passkey import passkey

    app = typer.Typer()
    app.command()(passkey)
    app.command("noop")(lambda: None)  # keep `passkey` a subcommand
    out = CliRunner().invoke(
        app,
        ["passkey", "--lengths", "300,1k", "--depths", "start,end", "--trials", "3",
         "--batch", "2", "-o", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")],
    )
    assert out.exit_code == 0, out.output
    table = out.stdout.splitlines()
    assert table[0].split()[:3] == ["length", "start", "end"]
    assert table[1].split()[0] == "300" and table[2].split()[0] == "1K"
    r = json.loads((tmp_path / "r.json").read_text())
    assert [x["length"] for x in r["passkey"]] == [300, 1024]
    cells = r["passkey"][0]["cells"]
    assert set(cells) == {"start", "end"} and cells["start"]["trials"] == 3
    for c in (c for row in r["passkey"] for c in row["cells"].values()):  # every miss, with what came back
        assert len(c["misses"]) == round(c["trials"] * (1 - c["accuracy"]))
        assert all(1 <= m["key"] <= 50000 and m["answer"] != m["key"] for m in c["misses"])
    assert all(x["peak_memory_mb"] > 0 and x["tokens_per_s"] > 0 for x in r["passkey"])
    img = _read_png(tmp_path / "r.png")
    assert img.shape[0] > 100 and img.shape[1] > 100 and img.dtype == np.uint8

    # --json: the results on stdout instead of the table, as every other command.
    out = CliRunner().invoke(app, ["passkey", "--lengths", "300", "--depths", "end", "--trials", "1", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["passkey"][0]["cells"]["end"]["trials"] == 1


def test_plain_passkey_is_a_quick_check(monkeypatch):
    from infini_mlx.cli.main import app

    import infini_mlx.passkey as pk

    asked = []

    def fake_eval(model, tok, lengths, depths, trials, *args, **kwargs):
        asked.append((lengths[0], len(depths), trials))
        cells = {d: {"accuracy": 0.0, "trials": trials} for d in depths}
        return [dict(length=lengths[0], cells=cells, tokens_per_s=1.0, peak_memory_mb=1.0, peak_rss_mb=1.0)]

    monkeypatch.setattr(pk, "passkey_eval", fake_eval)
    monkeypatch.setattr(infini_mlx, "load", lambda model: (None, None))
    r = CliRunner().invoke(app, ["passkey"])
    assert r.exit_code == 0, r.output
    # About a minute of reading on 2 cores at ~7K tokens/s; the full evaluation is ~30M tokens.
    assert sum(length * depths * trials for length, depths, trials in asked) <= 400_000, asked
    help = " ".join(CliRunner().invoke(app, ["passkey", "--help"]).stdout.replace("│", " ").split())
    assert "--lengths 4k,32k,128k,1m --trials 20,20,20,5" in help and "about an hour" in help


def test_parsers():
    assert [parse_length(s) for s in ["4k", "32K", "1m", "300", "0.5k"]] == [4096, 32768, 1 << 20, 300, 512]
    assert parse_depths("start,middle,end") == {"start": 0.0, "middle": 0.5, "end": 1.0}
    assert list(parse_depths("sweep:3").values()) == [0.0, 0.5, 1.0]


def test_perplexity_streams_what_the_whole_sequence_scores():
    import mlx.nn as nn
    from tiny import make_infini

    from infini_mlx.passkey import memory_disabled, perplexity

    model, config = make_infini("llama", seed=3, segment_len=16)
    vocab = config["vocab_size"]
    tokens = np.random.default_rng(0).integers(0, vocab, 200).astype(np.int32)
    x, y = mx.array(tokens[:-1])[None], mx.array(tokens[1:])[None]

    def whole():  # no cache: the training-time segment recurrence, in one call
        return float(np.exp(nn.losses.cross_entropy(model(x), y).mean().item()))

    assert abs(perplexity(model, tokens) - whole()) < 1e-3 * whole()
    with memory_disabled(model):
        off = perplexity(model, tokens)
    for layer in model.model.layers:
        layer.self_attn.gate = mx.full(layer.self_attn.gate.shape, -1e9)
    assert abs(off - whole()) < 1e-3 * off


def test_needle_prompt_lists_its_facts_in_text_order(default_tokenizer):
    from infini_mlx.tasks import needle_prompt

    hay = np.array(default_tokenizer.encode("Alice was beginning to get very tired. " * 100), np.int32)
    facts = [("apple", 111), ("badger", 22222), ("candle", 3), ("dragon", 4444)]
    p = needle_prompt(Pieces(default_tokenizer), hay, 600, facts, [0.9, 0.1, 0.5, 0.3], ask=2, start=0)
    text = default_tokenizer.decode(p.array().tolist())
    found = [int(v) for v in re.findall(r"special code for \w+ is (\d+)\.", text)]
    assert list(p.facts) == found == [22222, 4444, 3, 111] and p.answer == 3


def test_needle_misses_keep_every_fact_of_their_prompt(default_tokenizer, books_dir, tmp_path):
    from infini_mlx.config import InfiniConfig
    from infini_mlx.data import TRAIN_BOOKS
    from infini_mlx.passkey import needle_eval
    from infini_mlx.train import new_model

    for b in TRAIN_BOOKS:  # needles hide in every training book: here each is Alice
        (tmp_path / b).write_text((books_dir / "alice_in_wonderland_pg11.txt").read_text())

    arch = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2)
    model = new_model(arch, InfiniConfig(segment_len=64), len(default_tokenizer.vocab), 0)[0]
    r = needle_eval(model, default_tokenizer, [512], trials=3, batch=3, books_dir=tmp_path)
    misses = r[0]["cells"]["random"]["misses"]
    assert len(misses) == 3  # an untrained model finds none
    for m in misses:
        assert len(m["facts"]) == 4 and m["key"] in m["facts"], m
