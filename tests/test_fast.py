"""fast.exp and what uses it agree with MLX's own ops to float32 precision."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from infini_mlx import fast


def test_exp_matches_float64():
    x = mx.clip(mx.random.normal((4096,), key=mx.random.key(0)) * 30, -86.0, 88.0)
    ref = np.exp(np.array(x, np.float64))
    assert np.allclose(np.array(fast.exp(x)), ref, rtol=3e-6, atol=0)
    assert np.array(fast.exp(mx.array([-mx.inf, -100.0, 100.0]))).tolist() == [0.0, 0.0, np.inf]


def test_silu_sigmoid_softmax_match_mlx():
    x = mx.random.normal((64, 96), key=mx.random.key(1)) * 8
    assert mx.allclose(fast.silu(x), nn.silu(x), rtol=1e-5, atol=1e-6)
    assert mx.allclose(fast.sigmoid(x), mx.sigmoid(x), rtol=1e-5, atol=1e-7)
    s = mx.where(mx.tri(64, 96, k=32) > 0, x, mx.finfo(mx.float32).min)
    assert mx.allclose(fast.softmax(s), mx.softmax(s, axis=-1), rtol=1e-5, atol=1e-7)
    # Other dtypes use MLX's own ops.
    h = x.astype(mx.bfloat16)
    assert mx.array_equal(fast.silu(h), nn.silu(h))


def test_gradients_match_mlx():
    x = mx.random.normal((256,), key=mx.random.key(2)) * 4
    for f, g in [(fast.silu, nn.silu), (fast.sigmoid, mx.sigmoid), (fast.exp, mx.exp)]:
        ours, theirs = mx.grad(lambda t, f=f: f(t).sum())(x), mx.grad(lambda t, g=g: g(t).sum())(x)
        assert mx.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
