"""Retrieval from early segments is really wired (Hugging Face's attempt never was)."""

import mlx.core as mx
import pytest
from tiny import VOCAB, make_infini

N = 8


def last_segment_logits(model, tokens):
    return model(tokens)[:, -N:]


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_first_segment_reaches_last_segment_through_memory(update):
    model, _ = make_infini("llama", segment_len=N, update=update)
    a = mx.random.randint(0, VOCAB, (1, 4 * N), key=mx.random.key(7))
    b = mx.concatenate([(a[:, :N] + 1) % VOCAB, a[:, N:]], axis=1)  # change segment 1 only

    # Layer 0's memory read-out in segment 4 changes.
    def layer0_readout(tokens):
        cache = model.make_cache()
        model(tokens[:, : 3 * N], cache=cache)
        c = cache[0]
        return c.M, c.z

    Ma, za = layer0_readout(a)
    Mb, zb = layer0_readout(b)
    assert mx.abs(Ma - Mb).max().item() > 1e-3

    la, lb = last_segment_logits(model, a), last_segment_logits(model, b)
    assert mx.abs(la - lb).max().item() > 1e-3

    # With the gates forced local, segment 4 cannot see segment 1 at all.
    for layer in model.layers:
        layer.self_attn.gate = mx.full(layer.self_attn.gate.shape, -40.0)
    la, lb = last_segment_logits(model, a), last_segment_logits(model, b)
    assert mx.allclose(la, lb, atol=1e-5, rtol=0)


def test_gradients_flow_through_memory_across_segments():
    # Training calls the model without a cache: the loss on the last segment must
    # reach the embeddings of tokens seen only in the first, through (M, z) alone.
    model, _ = make_infini("llama", segment_len=N)
    tokens = mx.random.randint(0, VOCAB, (1, 4 * N), key=mx.random.key(11))
    emb = model.model.embed_tokens

    def loss(w):
        emb.weight = w
        return model(tokens)[:, -N:].sum()

    g = mx.grad(loss)(emb.weight)
    later = set(tokens[0, N:].tolist())
    only_first = [t for t in tokens[0, :N].tolist() if t not in later]
    assert only_first
    assert all(mx.abs(g[t]).sum().item() > 1e-3 for t in only_first)
    # With local gates, no gradient crosses the segment boundary.
    for layer in model.layers:
        layer.self_attn.gate = mx.full(layer.self_attn.gate.shape, -40.0)
    g = mx.grad(loss)(emb.weight)
    assert all(mx.abs(g[t]).sum().item() < 1e-6 for t in only_first)
