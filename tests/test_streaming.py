"""Streaming equivalence: however the input is cut, logits and memory are the same."""

import mlx.core as mx
import numpy as np
import pytest
from tiny import VOCAB, make_infini

N = 8
L = 45  # 5 full segments and a partial one


def run(model, tokens, sizes):
    cache = model.make_cache()
    outs, i = [], 0
    for n in sizes:
        outs.append(model(tokens[:, i : i + n], cache=cache))
        mx.eval(outs[-1], [c.state for c in cache])
        i += n
    assert i == tokens.shape[1]
    return mx.concatenate(outs, axis=1), cache


def random_sizes(rng, total, hi):
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(min(rng.integers(1, hi), total - sum(sizes))))
    return sizes


FORMS = {
    "linear": dict(update="linear"),
    "delta": dict(update="delta"),
    "delta+conv": dict(update="delta", conv_size=4),
    "normalized": dict(memory="normalized"),
    "normalized+conv": dict(memory="normalized", conv_size=3),
    "normalized+conv+clip": dict(memory="normalized", conv_size=3, write_gate="clip"),
    "normalized+conv+clip+write_conv": dict(memory="normalized", conv_size=3, write_gate="clip", write_conv=True),
    "normalized+conv+clip+write_scale": dict(memory="normalized", conv_size=3, write_gate="clip", write_scale=0.5),
    "normalized+conv+clip+write_conv+qk_gate": dict(
        memory="normalized", conv_size=3, write_gate="clip", write_conv=True, qk_gate=True
    ),
    "normalized+conv+clip+write_conv+qk_expand": dict(
        memory="normalized", conv_size=3, write_gate="clip", write_conv=True, qk_expand=True
    ),
}


@pytest.mark.parametrize("form", FORMS)
def test_chunkings_agree(form):
    model, _ = make_infini("llama", segment_len=N, **FORMS[form])
    tokens = mx.random.randint(0, VOCAB, (2, L), key=mx.random.key(3))
    rng = np.random.default_rng(0)

    full = model(tokens)  # no cache: one call, segments handled inside each layer
    ways = {
        "token by token": [1] * L,
        "whole segments": [N] * (L // N) + [L % N],
        "two segments at a time": [2 * N] * (L // (2 * N)) + [L % (2 * N)],
        "random chunks": random_sizes(rng, L, 2 * N + 3),
        "one chunk": [L],
    }
    results = {name: run(model, tokens, sizes) for name, sizes in ways.items()}
    ref_logits, ref_cache = results["whole segments"]
    assert mx.allclose(full, ref_logits, atol=1e-4, rtol=0)
    # Several whole segments in one call run batched across segments.
    assert mx.allclose(model(tokens[:, : 5 * N]), ref_logits[:, : 5 * N], atol=1e-4, rtol=0)
    for name, (logits, cache) in results.items():
        assert mx.allclose(logits, ref_logits, atol=1e-4, rtol=0), name
        for c, r in zip(cache, ref_cache):
            assert c.offset == r.offset == L
            for a, b in zip(c.state[2:], r.state[2:]):  # M, z, dM, dz, conv inputs
                assert (a is None) == (b is None), name
                assert a is None or mx.allclose(a, b, atol=1e-4, rtol=1e-5), name


def test_segment_folded_once_when_full():
    model, _ = make_infini("llama", segment_len=N)
    cache = model.make_cache()
    tokens = mx.random.randint(0, VOCAB, (1, N + 1), key=mx.random.key(4))
    for t in range(N - 1):
        model(tokens[:, t : t + 1], cache=cache)
    assert mx.all(cache[0].M == 0).item()  # nothing folded mid-segment
    assert cache[0].keys.shape[2] >= N - 1
    model(tokens[:, N - 1 : N], cache=cache)
    M_after = cache[0].M
    assert not mx.all(M_after == 0).item()
    assert cache[0].keys is None and cache[0].dM is None  # segment KV released
    model(tokens[:, N:], cache=cache)
    assert mx.array_equal(cache[0].M, M_after)  # not folded again by the next token


@pytest.mark.parametrize("n", [1, 17, 24, 45])
def test_prefill_logits_and_progress(n):
    """prefill's last logits and state match token-by-token feeding, whether the
    input ends inside a block or on a block's end; progress counts every token."""
    from infini_mlx import prefill

    model, _ = make_infini("llama", segment_len=N, **FORMS["normalized+conv"])
    tokens = mx.random.randint(0, VOCAB, (1, n), key=mx.random.key(7))
    ref, ref_cache = run(model, tokens, [1] * n)
    seen = []
    cache = model.make_cache()
    out = prefill(model, tokens[0].tolist(), cache, progress=seen.append, block_size=8)
    assert out.shape == (VOCAB,) and mx.allclose(out, ref[0, -1], atol=1e-4)
    assert cache[0].offset == n and seen[-1] == n and seen == sorted(seen)
    for c, r in zip(cache, ref_cache):
        assert all(a is None or mx.allclose(a, b, atol=1e-4) for a, b in zip(c.state, r.state))
    # Without logits: the same state, nothing returned.
    cache2 = model.make_cache()
    assert prefill(model, iter(tokens[0].tolist()), cache2, logits=False) is None
    assert cache2[0].offset == n
