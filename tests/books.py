"""Books of tiny-tokenizer words, and the reference computations the session and CLI tests check against."""

import json
import random
from pathlib import Path

import mlx.core as mx
from tiny import VOCAB, save_base

from infini_mlx import prefill

SEGMENT = 8


def model_dir(path: Path, chat_template: str = None) -> Path:
    """A tiny llama saved as an mlx-lm directory with segments of 8 tokens.

    It stands in for a trained Infini model: its memory counts as trained and
    its gates start at 0 (sigmoid 0.5), so the memory weighs in every answer.
    """
    infini = {"segment_len": SEGMENT, "gate_init": 0.0, "memory_trained": True}
    save_base(path, "llama", seed=0, infini=infini)
    if chat_template:
        cfg = path / "tokenizer_config.json"
        tok = json.loads(cfg.read_text())
        cfg.write_text(json.dumps({**tok, "chat_template": chat_template}))
    return path


# t0 is unknown; t1 is EOS, a special token the tokenizer finds inside "t12" too.
WORDS = [f"t{i}" for i in range(2, VOCAB) if not f"t{i}".startswith("t1")]


def book(n_words: int, seed: int = 0) -> str:
    """Lines of 1 to 15 random words, one token each, and some blank lines."""
    rng = random.Random(seed)
    lines, n = [], 0
    while n < n_words:
        k = min(rng.randint(1, 15), n_words - n)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)))
        n += k
        if rng.random() < 0.1:
            lines.append("")  # paragraph breaks
    return "\n".join(lines) + "\n"


def reference_cache(model, tokens):
    """The state of one uninterrupted prefill of ``tokens``."""
    cache = model.make_cache()
    prefill(model, tokens, cache, logits=False)
    return cache


def greedy(model, cache, prompt, n, eos):
    """A plain greedy loop: the tokens a model answers ``prompt`` with."""
    logits = model(mx.array(prompt)[None], cache=cache)[0, -1]
    out = []
    for _ in range(n):
        t = mx.argmax(logits).item()
        if t in eos:
            break
        out.append(t)
        logits = model(mx.array([[t]]), cache=cache)[0, -1]
    return out


def same_state(a, b) -> bool:
    """Bit-exact equality of two caches (offsets and every array)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.offset != y.offset:
            return False
        for u, v in zip(x.state, y.state):
            if (u is None) != (v is None) or (u is not None and not mx.array_equal(u, v)):
                return False
    return True
