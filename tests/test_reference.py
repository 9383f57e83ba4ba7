"""InfiniAttention against an independent NumPy implementation of Eqs. 7-10."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import llama

from infini_mlx import InfiniAttention, InfiniCache, InfiniConfig

B, L, DIM, H, HKV, D, N = 2, 41, 32, 4, 2, 8, 12  # 4 segments, the last partial


# ---- the reference: plain NumPy, written from the paper, not from the package ----


def np_sigma(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def np_rope(x, positions, base=10000.0):
    # Non-traditional RoPE (rotate halves), as Llama uses.
    half = x.shape[-1] // 2
    freqs = base ** (-np.arange(half) * 2.0 / x.shape[-1])
    ang = positions[:, None] * freqs[None]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def np_conv(x, w):
    # Causal depthwise conv over time: y[t] = sum_i w[:, i] x[t - (W - 1) + i], zeros before 0.
    W = w.shape[1]
    xp = np.concatenate([np.zeros((x.shape[0], W - 1, x.shape[2])), x], axis=1)
    return sum(xp[:, i : i + x.shape[1]] * w[:, i] for i in range(W))


def np_silu(x):
    return x / (1 + np.exp(-x))


def np_l2(x):
    return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)


def np_infini(x, Wq, Wk, Wv, Wo, beta, cfg, extra=None, starts=None):
    """``starts``: where segments start (default every N tokens); a segment ended
    early is folded all the same, and the next one's positions start N after its start."""
    Bx, Lx, _ = x.shape
    R = H // HKV
    extra = extra or {}

    def heads(t, n):
        return t.reshape(Bx, Lx, n, D).transpose(0, 2, 1, 3)

    qp, kp, vp = x @ Wq.T, x @ Wk.T, x @ Wv.T
    q, k, v = heads(qp, H), heads(kp, HKV), heads(vp, HKV)
    # The memory's q, k, v: after the short convolution, if there is one (no RoPE either way).
    qm, km, vm = q, k, v
    if "conv" in extra:
        wq, wk, wv = extra["conv"]
        qc, kc = np_conv(qp, wq), np_conv(kp, wk)
        if "qk_gate" in extra:  # times 1 + a second convolution of the same projections
            qc, kc = qc * (1 + np_conv(qp, extra["qk_gate"][0])), kc * (1 + np_conv(kp, extra["qk_gate"][1]))
        qm, km, vm = heads(qc, H), heads(kc, HKV), heads(np_conv(vp, wv), HKV)
        if "qk_expand" in extra:  # each head: [c, c * a second convolution], 2 D wide
            gq, gk = heads(np_conv(qp, extra["qk_expand"][0]), H), heads(np_conv(kp, extra["qk_expand"][1]), HKV)
            qm, km = np.concatenate([qm, qm * gq], -1), np.concatenate([km, km * gk], -1)
    normalized = cfg.get("memory") == "normalized"
    if normalized:
        qm, km = np_l2(np_silu(qm)), np_l2(np_silu(km))
        b = x @ extra["b_proj"].T
        if "b_conv" in extra:  # write logits over the last conv taps, per KV head
            b = np_conv(b, extra["b_conv"])
        if cfg.get("write_gate") == "clip":  # (B, L, HKV) write strengths
            wb = np.minimum(np.maximum(0.5 + b / 4, 0.0), 1.0)
        else:
            wb = 1 / (1 + np.exp(-b))
        wb = wb * cfg.get("write_scale", 1.0)
    # Which memory (KV head) each query head reads.
    kv_of = [h // R if cfg["gqa"] == "interleave" else h % HKV for h in range(H)]
    M = np.zeros((Bx, HKV, km.shape[-1], D))
    z = np.zeros((Bx, HKV, D))
    out = np.zeros((Bx, H, Lx, D))
    g = 1 / (1 + np.exp(-beta))

    def read(s, M, z):  # s: (..., n, D) already sigma'd
        num, den = s @ M, s @ z[..., None]
        if cfg["first"] == "eps":
            return num / (den + 1e-6)
        return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)

    starts = list(range(0, Lx, N)) if starts is None else list(starts)
    for i, s0 in enumerate(starts):
        s1 = min(Lx, s0 + N, *starts[i + 1 : i + 2])
        n = s1 - s0
        pos = np.arange(n) if cfg["rope"] == "segment" else np.arange(i * N, i * N + n)
        qs, ks, vs = q[:, :, s0:s1], k[:, :, s0:s1], v[:, :, s0:s1]
        qr, kr = np_rope(qs, pos), np_rope(ks, pos)
        for h in range(H):
            j = kv_of[h]
            # A_dot: causal softmax attention inside the segment (KV head h // R).
            a = h // R
            sc = qr[:, h] @ kr[:, a].transpose(0, 2, 1) / np.sqrt(D)
            sc = np.where(np.tril(np.ones((n, n))) > 0, sc, -np.inf)
            p = np.exp(sc - sc.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            local = p @ vs[:, a]
            if normalized:
                # q S of the memory as the segment began, then RMSNorm with its weight.
                r = qm[:, h, s0:s1] @ M[:, j]
                mem = r / np.sqrt((r * r).mean(-1, keepdims=True) + 1e-6) * extra["o_norm"]
            else:
                # A_mem (Eq. 7): un-rotated Q against the memory of segments < s.
                mem = read(np_sigma(qm[:, h, s0:s1]), M[:, j], z[:, j])
            out[:, h, s0:s1] = g[h] * mem + (1 - g[h]) * local
        if n < N and s1 == Lx:
            break  # the partial last segment stays pending
        if normalized:
            for t in range(s0, s1):  # the delta rule, one token at a time
                kt, vt = km[:, :, t, :, None], vm[:, :, t, None, :]  # (B, HKV, D, 1), (B, HKV, 1, D)
                err = vt - kt.transpose(0, 1, 3, 2) @ M
                M = M + wb[:, t, :, None, None] * kt @ err
            continue
        sk = np_sigma(km[:, :, s0:s1])  # un-rotated K
        upd = vm[:, :, s0:s1] - read(sk, M, z) if cfg["update"] == "delta" else vm[:, :, s0:s1]
        M = M + sk.transpose(0, 1, 3, 2) @ upd
        z = z + sk.sum(axis=2)
    y = out.transpose(0, 2, 1, 3).reshape(Bx, Lx, H * D) @ Wo.T
    return y, M, z


# ---- the test ----

CASES = [
    dict(update="linear", gqa="interleave", rope="segment", first="zero"),
    dict(update="delta", gqa="interleave", rope="segment", first="zero"),
    dict(update="delta", gqa="tile", rope="absolute", first="zero"),
    dict(update="linear", gqa="tile", rope="segment", first="eps"),
    dict(update="delta", gqa="interleave", rope="segment", first="zero", conv=3),
    dict(update="delta", gqa="interleave", rope="segment", first="zero", memory="normalized"),
    dict(update="delta", gqa="tile", rope="absolute", first="zero", memory="normalized", conv=4),
    dict(update="delta", gqa="interleave", rope="segment", first="zero", memory="normalized", conv=4,
         write_gate="clip"),
    dict(update="delta", gqa="interleave", rope="segment", first="zero", memory="normalized", conv=4,
         write_gate="clip", write_conv=True),
    dict(update="delta", gqa="interleave", rope="segment", first="zero", memory="normalized", conv=4,
         write_gate="clip", write_conv=True, write_scale=0.4),
    dict(update="delta", gqa="interleave", rope="segment", first="zero", memory="normalized", conv=4,
         write_gate="clip", write_conv=True, qk_gate=True),
    dict(update="delta", gqa="tile", rope="absolute", first="zero", memory="normalized", conv=4,
         write_gate="clip", write_conv=True, qk_expand=True),
    dict(update="delta", gqa="tile", rope="absolute", first="zero", conv=3, qk_gate=True),
]


def _layer(case):
    """A one-layer InfiniAttention with random parameters, and what the reference needs of them."""
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=DIM,
        num_hidden_layers=1,
        intermediate_size=64,
        num_attention_heads=H,
        num_key_value_heads=HKV,
        head_dim=D,
        rms_norm_eps=1e-5,
        vocab_size=10,
    )
    mx.random.seed(1)
    base = llama.Attention(args)
    cfg = InfiniConfig(
        segment_len=N,
        update=case["update"],
        gqa_memory=case["gqa"],
        rope_mode=case["rope"],
        first_segment=case["first"],
        memory=case.get("memory", "paper"),
        conv_size=case.get("conv", 0),
        write_gate=case.get("write_gate", "sigmoid"),
        write_conv=case.get("write_conv", False),
        write_scale=case.get("write_scale", 1.0),
        qk_gate=case.get("qk_gate", False),
        qk_expand=case.get("qk_expand", False),
    )
    layer = InfiniAttention(base, cfg)
    layer.gate = mx.random.normal((H,))
    extra = {}
    if cfg.conv_size:  # random filters, not the identity they start as
        for name in ("q_conv1d", "k_conv1d", "v_conv1d"):
            layer[name].weight = mx.random.normal(layer[name].weight.shape) * 0.7
        extra["conv"] = [np.array(layer[n].weight, np.float64) for n in ("q_conv1d", "k_conv1d", "v_conv1d")]
    if cfg.qk_gate or cfg.qk_expand:  # random, not the values they start at
        for name in ("q_gate_conv1d", "k_gate_conv1d"):
            layer[name].weight = mx.random.normal(layer[name].weight.shape) * 0.5
        extra["qk_gate" if cfg.qk_gate else "qk_expand"] = [
            np.array(layer[n].weight, np.float64) for n in ("q_gate_conv1d", "k_gate_conv1d")
        ]
    if cfg.memory == "normalized":
        # Logits of std ~3: the clip gate writes exactly 0 or 1 for many tokens.
        layer.b_proj.weight = mx.random.normal(layer.b_proj.weight.shape) * 0.5
        layer.o_norm.weight = 1 + mx.random.normal(layer.o_norm.weight.shape) * 0.3
        extra["b_proj"] = np.array(layer.b_proj.weight, np.float64)
        extra["o_norm"] = np.array(layer.o_norm.weight, np.float64)
    if cfg.write_conv:
        layer.b_conv1d.weight = mx.random.normal(layer.b_conv1d.weight.shape)
        extra["b_conv"] = np.array(layer.b_conv1d.weight, np.float64)
    return layer, base, cfg, extra


def _weights(base):
    return [np.array(m.weight, dtype=np.float64) for m in (base.q_proj, base.k_proj, base.v_proj, base.o_proj)]


@pytest.mark.parametrize("cuts", [(L,), (3 * N, L - 3 * N)], ids=["one call", "segments batched"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_layer_matches_numpy_reference(case, cuts):
    layer, base, cfg, extra = _layer(case)
    x = mx.random.normal((B, L, DIM))

    cache = InfiniCache(N, cfg.memory)
    ys, a = [], 0
    for n in cuts:  # 3 whole segments from the start run batched across segments
        ys.append(layer(x[:, a : a + n], cache=cache))
        mx.eval(ys[-1], cache.state)
        a += n
    y = mx.concatenate(ys, axis=1)

    w = {k: np.array(v, dtype=np.float64) for k, v in
         [("q", base.q_proj.weight), ("k", base.k_proj.weight),
          ("v", base.v_proj.weight), ("o", base.o_proj.weight)]}
    y_ref, M_ref, z_ref = np_infini(
        np.array(x, dtype=np.float64), w["q"], w["k"], w["v"], w["o"],
        np.array(layer.gate, dtype=np.float64), case, extra,
    )
    assert np.abs(np.array(y) - y_ref).max() <= 1e-4
    # The pending partial segment is not folded: M, z hold the 3 full segments.
    assert np.abs(np.array(cache.M) - M_ref).max() <= 1e-4 * max(1, np.abs(M_ref).max())
    if cfg.memory == "paper":
        assert np.abs(np.array(cache.z) - z_ref).max() <= 1e-4 * max(1, np.abs(z_ref).max())
    else:
        assert cache.z is None
    assert cache.offset == L and cache.segment_pos == L % N



@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_a_segment_ended_early_matches_numpy_reference(case):
    # Segments start at 0, 12, 24, then 29 and 36 where end_segment cut them (a question's start).
    layer, base, cfg, extra = _layer(case)
    x = mx.random.normal((B, L, DIM))
    cache = InfiniCache(N, cfg.memory)
    ys = []
    for a, b in ((0, 29), (29, 36), (36, L)):
        cache.end_segment()
        ys.append(layer(x[:, a:b], cache=cache))
        mx.eval(ys[-1], cache.state)
    y_ref, M_ref, z_ref = np_infini(
        np.array(x, dtype=np.float64), *_weights(base), np.array(layer.gate, dtype=np.float64), case, extra,
        starts=[0, 12, 24, 29, 36],
    )
    assert np.abs(np.array(mx.concatenate(ys, axis=1)) - y_ref).max() <= 1e-4
    assert np.abs(np.array(cache.M) - M_ref).max() <= 1e-4 * max(1, np.abs(M_ref).max())
    if cfg.memory == "paper":
        assert np.abs(np.array(cache.z) - z_ref).max() <= 1e-4 * max(1, np.abs(z_ref).max())
    # The offset moved on to each new segment's start; the last 5 tokens are pending.
    assert cache.offset == 48 + 5 and cache.segment_pos == 5 and cache.keys.shape[2] >= 5

def test_memory_is_float32_in_half_precision():
    args = llama.ModelArgs(
        model_type="llama", hidden_size=DIM, num_hidden_layers=1, intermediate_size=64,
        num_attention_heads=H, num_key_value_heads=HKV, rms_norm_eps=1e-5, vocab_size=10,
    )
    base = llama.Attention(args)
    base.set_dtype(mx.bfloat16)
    layer = InfiniAttention(base, InfiniConfig(segment_len=N))
    cache = InfiniCache(N)
    y = layer(mx.random.normal((1, 2 * N + 3, DIM)).astype(mx.bfloat16), cache=cache)
    assert y.dtype == mx.bfloat16
    assert cache.M.dtype == mx.float32 and cache.z.dtype == mx.float32
    assert cache.dM.dtype == mx.float32
