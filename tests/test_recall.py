"""The chosen memory form learns ordered recall through the memory alone.

A tiny model is trained a few hundred steps on keys of 5 digits written in the
first segment and asked for in the last one (2-4 segments of 16 tokens, random
filler): local attention never sees the key from the question, so every digit
comes from the memory, in order. A memory whose keys are single tokens recalls
which digits were written but not their order; this test fails then.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from infini_mlx import InfiniConfig
from infini_mlx.train import (
    TRAIN_GATE_INIT,
    TrainArgs,
    logged_cache,
    make_optimizer,
    new_model,
    weighted_loss,
)

V, N, K = 64, 16, 5
DIGITS = np.arange(10, 20)
MARK = [3, 4, 5]  # "the pass key is"


def sample(rng, n_seg):
    T = n_seg * N + 1
    toks = rng.integers(20, V, T)
    key = rng.choice(DIGITS, K)
    at = rng.integers(0, N - K - 3)  # somewhere in the first segment
    toks[at : at + 3], toks[at + 3 : at + 3 + K] = MARK, key
    q = T - K - 3  # the question ends the last segment
    toks[q : q + 3], toks[q + 3 :] = MARK, key
    w = np.full(T - 1, 0.1, np.float32)
    w[q + 2 :] = 10.0  # the key's digits, predicted from the marker on
    return toks, w


def batch(rng, B, lo, hi):
    n = int(rng.integers(lo, hi + 1))
    t, w = zip(*(sample(rng, n) for _ in range(B)))
    t = np.stack(t)
    return mx.array(t[:, :-1]), mx.array(t[:, 1:]), mx.array(np.stack(w))


def exact_match(model, n_seg, trials=64):
    x, y, _ = batch(np.random.default_rng(1), trials, n_seg, n_seg)
    pred = mx.argmax(model(x)[:, -K:], axis=-1)  # teacher-forced = greedy when all are right
    return mx.all(pred == y[:, -K:], axis=1).mean().item()


# (write_gate, write_penalty): DeltaNet's sigmoid, and the shipped model's clip gate
# trained to write sparsely.
@pytest.mark.parametrize("gate,penalty", [("sigmoid", 0.0), ("clip", 0.1)], ids=["sigmoid", "clip+penalty"])
def test_normalized_memory_with_conv_recalls_keys_in_order(gate, penalty):
    arch = dict(
        hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=4,
    )
    infini = InfiniConfig(
        segment_len=N, memory="normalized", conv_size=4, write_gate=gate, gate_init=TRAIN_GATE_INIT
    )
    model, _ = new_model(arch, infini, V, seed=0)
    opt = make_optimizer(TrainArgs(out="-", lr=3e-3, warmup=20, weight_decay=0.0))
    loss_and_grad = nn.value_and_grad(model, weighted_loss)
    rng = np.random.default_rng(0)
    for _ in range(400):
        loss, grads = loss_and_grad(model, *batch(rng, 16, 2, 4), None, logged_cache(model), penalty)
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)
    model.eval()
    assert exact_match(model, 2) >= 0.8
    assert exact_match(model, 4) >= 0.8
    assert exact_match(model, 8) >= 0.8  # twice the longest training length
