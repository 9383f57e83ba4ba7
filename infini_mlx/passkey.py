"""Passkey and multi-key needle retrieval, and perplexity with memory on and off.

Prompts are streamed in segment-aligned blocks into the model's caches (a batch
of trials at once), so memory in use does not depend on the prompt's length.
Logits are computed for the last block of a prefill only (the whole block).
"""

import itertools
import math
import re
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .data import BOOKS_DIR, TRAIN_BOOKS, book_text
from .streaming import block_len
from .tasks import MAX_PASSKEY, NEEDLE_NAMES, Pieces, needle_prompt, passkey_prompt

DEPTHS = {"start": 0.0, "middle": 0.5, "end": 1.0}
_INT = re.compile(r"\d+")


def parse_length(s: str) -> int:
    """'4k' -> 4096, '1m' -> 1048576, '300' -> 300."""
    t = s.strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20}.get(t[-1:], 1)
    try:
        n = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise ValueError(f"{s!r} is not a length: a number of tokens, e.g. 300, 4k or 1m") from None
    if not (math.isfinite(n) and n >= 1):
        raise ValueError(f"{s!r} is not a length: at least 1 token, e.g. 300, 4k or 1m")
    return int(n)


def format_length(n: int) -> str:
    for unit, m in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


def parse_depths(s: str) -> Dict[str, float]:
    """'start,middle,end', or 'sweep:5' for 0, 0.25, ..., 1, or numbers in [0, 1]."""
    if s.startswith("sweep:"):
        n = s.split(":")[1]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"{s!r}: sweep:N takes a number of depths N >= 1")
        return {f"{d:.2f}": d for d in np.linspace(0, 1, int(n))}
    out = {}
    for p in s.split(","):
        p = p.strip()
        try:
            d = DEPTHS[p] if p in DEPTHS else float(p)
        except ValueError:
            d = None
        if d is None or not 0 <= d <= 1:
            raise ValueError(f"{p!r} is not a depth: start, middle, end or a number in [0, 1]")
        out[p] = d
    return out


def first_int(text: str) -> Optional[int]:
    m = _INT.search(text)
    return int(m.group()) if m else None


# ---- streaming ----


def _feed(model, cache, x: mx.array, logits: bool):
    """Run a block; evaluate the caches (and the last position's logits if asked)."""
    out = model(x, cache=cache)
    if logits:
        out = out[:, -1].astype(mx.float32)
        mx.eval(out, [c.state for c in cache])
        return out
    # The logits are never evaluated, so the head (and the last MLP) never run.
    mx.eval([c.state for c in cache])
    return None


def prefill_batch(model, streams: Sequence[Iterator[int]], n: int, cache=None, block_size: int = 512):
    """Feed ``n`` tokens of every stream in segment-aligned blocks (``streaming.block_len``).

    Returns the caches and the logits (B, vocab) after the last token.
    """
    cache = cache if cache is not None else model.make_cache()
    fed, logits = 0, None
    while fed < n:
        k = min(block_len(cache, block_size), n - fed)
        if k == n - fed > 1:
            k -= 1  # the last token alone: logits for one position, not k
        block = np.stack([np.fromiter(itertools.islice(s, k), np.int32, k) for s in streams])
        fed += k
        logits = _feed(model, cache, mx.array(block), fed == n)
    return cache, logits


def greedy_answers(model, tokenizer, cache, logits, max_new: int = 8) -> List[Optional[int]]:
    """Greedy-decode each row until its first integer is complete; parse it."""
    B = logits.shape[0]
    gen = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    for _ in range(max_new):
        nxt = mx.argmax(logits, axis=-1)
        ids = np.array(nxt).tolist()
        for i, t in enumerate(ids):
            if not done[i]:
                gen[i].append(t)
                text = tokenizer.decode(gen[i])
                m = _INT.search(text)
                done[i] = m is not None and m.end() < len(text.rstrip("\ufffd"))
        if done.all():
            break
        logits = _feed(model, cache, nxt[:, None], True)
    return [first_int(tokenizer.decode(g)) for g in gen]


def teacher_forced_match(model, rows: Sequence[np.ndarray], n_answers: Sequence[int]) -> List[bool]:
    """Whether greedy decoding would reproduce each row's last ``n_answers`` tokens.

    Rows have one length; the prompt is streamed, the tail run in one block.
    """
    T = len(rows[0])
    K = max(n_answers) + 1
    cache, _ = prefill_batch(model, [iter(r.tolist()) for r in rows], T - K)
    tail = mx.array(np.stack([r[T - K :] for r in rows]))
    pred = np.array(mx.argmax(model(tail[:, :-1], cache=cache), axis=-1))
    tgt = np.array(tail[:, 1:])
    return [bool((pred[i, -a:] == tgt[i, -a:]).all()) for i, a in enumerate(n_answers)]


# ---- memory accounting ----


def _reset_peak_rss():
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- evaluations ----


def _cells(model, tokenizer, make_prompt, lengths, depths, trials, batch, seed, progress):
    """Accuracy per (length, depth) of prompts from ``make_prompt(length, depth, rng)``."""
    results = []
    for L in lengths:
        mx.reset_peak_memory()
        _reset_peak_rss()
        t0, toks = time.time(), 0
        row = {"length": L, "cells": {}}
        # Every depth's prompts share the batches, so a small cell still fills one.
        prompts = []
        for name, d in depths.items():
            rng = np.random.default_rng([seed, L, int(round(d * 1e6))])
            prompts += [(name, make_prompt(L, d, rng)) for _ in range(trials)]
        hits = {name: [] for name in depths}
        misses = {name: [] for name in depths}
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            cache, logits = prefill_batch(model, [p.tokens() for _, p in chunk], L)
            got = greedy_answers(model, tokenizer, cache, logits)
            for g, (name, p) in zip(got, chunk):
                hits[name].append(g == p.answer)
                if g != p.answer:
                    miss = {"key": p.answer, "answer": g}
                    if p.facts:  # a needle's values: is the answer another fact's?
                        miss["facts"] = list(p.facts)
                    misses[name].append(miss)
            toks += L * len(chunk)
            del cache, logits
        for name in depths:
            row["cells"][name] = {
                "accuracy": float(np.mean(hits[name])),
                "trials": len(hits[name]),
                "misses": misses[name],  # what was asked and what came back (None: no number)
            }
            if progress:
                progress(f"{format_length(L)} {name}: {np.mean(hits[name]):.0%} ({len(hits[name])} trials)")
        dt = time.time() - t0
        row.update(
            peak_memory_mb=mx.get_peak_memory() / 2**20,
            peak_rss_mb=_peak_rss_mb(),
            tokens_per_s=toks / dt,
            seconds=dt,
        )
        results.append(row)
    return results


def passkey_eval(
    model,
    tokenizer,
    lengths: Sequence[int],
    depths: Dict[str, float],
    trials: int = 20,
    seed: int = 0,
    batch: int = 5,
    progress=None,
) -> List[Dict]:
    """Passkey exact-match accuracy (first integer generated, greedy) per length and depth.

    Args:
        model: An Infini model.
        tokenizer: Its tokenizer (mlx-lm ``TokenizerWrapper``).
        lengths: Prompt lengths in tokens.
        depths: Named depths in [0, 1] of the passkey line.
        trials: Prompts per cell (random passkeys in 1..50000).
        seed: Fixes every passkey.
        batch: Prompts streamed together; fix it to compare memory across lengths.
        progress: Called with a line of text after every cell.

    Returns:
        One dict per length: ``cells`` (accuracy and trials per depth),
        ``peak_memory_mb`` (MLX), ``peak_rss_mb``, ``tokens_per_s``, ``seconds``.
    """
    pieces = Pieces(tokenizer)

    def make(L, d, rng):
        return passkey_prompt(pieces, L, d, int(rng.integers(1, MAX_PASSKEY + 1)))

    return _cells(model, tokenizer, make, lengths, depths, trials, batch, seed, progress)


def needle_hay(tokenizer, books_dir: Path = BOOKS_DIR) -> np.ndarray:
    """The text needles hide in: the training books (never the held-out ones), tokenized."""
    text = "\n".join(book_text(Path(books_dir) / b) for b in TRAIN_BOOKS[::-1])
    return np.array(tokenizer.encode(text, add_special_tokens=False), np.int32)


def needle_eval(
    model,
    tokenizer,
    lengths: Sequence[int],
    trials: int = 20,
    n_facts: int = 4,
    seed: int = 0,
    batch: int = 5,
    books_dir: Path = BOOKS_DIR,
    progress=None,
) -> List[Dict]:
    """Multi-key needle accuracy: ``n_facts`` "special code" facts in book text, one asked.

    Facts sit at random depths in text of the training books (never the
    held-out ones); the depth column is "random".
    """
    pieces = Pieces(tokenizer)
    hay = needle_hay(tokenizer, books_dir)

    def make(L, _, rng):
        names = rng.choice(len(NEEDLE_NAMES), n_facts, replace=False)
        facts = [(NEEDLE_NAMES[i], int(rng.integers(1, MAX_PASSKEY + 1))) for i in names]
        start = int(rng.integers(0, len(hay) - L))
        return needle_prompt(
            pieces, hay, L, facts, rng.random(n_facts), int(rng.integers(n_facts)), start
        )

    return _cells(model, tokenizer, make, lengths, {"random": 0.5}, trials, batch, seed, progress)


@contextmanager
def memory_disabled(model):
    """Force every gate to local attention (gate logit -inf)."""
    attns = [l.self_attn for l in model.layers]
    saved = [a.gate for a in attns]
    off = -1e30 if attns[0].config.gate_weights == "memory" else 1e30
    try:
        for a in attns:
            a.gate = mx.full(a.gate.shape, off, mx.float32)
        yield model
    finally:
        for a, g in zip(attns, saved):
            a.gate = g


def perplexity(model, tokens: np.ndarray, block: Optional[int] = None) -> float:
    """Perplexity of ``tokens`` streamed through the caches in segment-aligned blocks."""
    cache = model.make_cache()
    block = block or block_len(cache, 512)
    nll, n = 0.0, 0
    for a in range(0, len(tokens) - 1, block):
        x = mx.array(tokens[a : min(a + block, len(tokens) - 1)])[None]
        y = mx.array(tokens[a + 1 : a + 1 + x.shape[1]])[None]
        loss = nn.losses.cross_entropy(model(x, cache=cache), y, reduction="sum")
        mx.eval(loss, [c.state for c in cache])
        nll += loss.item()
        n += y.size
    return float(np.exp(nll / n))
