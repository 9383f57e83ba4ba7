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
    # Up to float32's largest: e^88.5 is finite, e^89 is not; unbounded inputs give 0 or inf, never NaN.
    y = np.array(fast.exp(mx.array([88.5, 89.0, -1e30, 1e30, mx.inf])))
    assert np.isclose(y[0], np.exp(88.5), rtol=3e-7) and y[1:].tolist() == [np.inf, 0.0, np.inf, np.inf]


def test_softmax_parts_masked_matches_mlx():
    s = mx.random.normal((2, 3, 40, 96), key=mx.random.key(3)) * 6
    mask = mx.arange(56, 96)[:, None] >= mx.arange(96)[None]
    e, total = fast.softmax_parts(s, mask)
    ref = mx.softmax(mx.where(mask, s, -mx.inf), axis=-1, precise=True)
    assert mx.allclose(e / total, ref, rtol=1e-5, atol=1e-7)
    assert not mx.any(mx.where(mask, 0.0, e)).item()  # masked weights are exactly 0
    e, total = fast.softmax_parts(s)
    assert mx.allclose(e / total, mx.softmax(s, axis=-1, precise=True), rtol=1e-5, atol=1e-7)


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


def test_silu_gradients_stay_finite_far_below_zero():
    # exp(-x) overflows below x = -88: the gradient must be 0 there, not inf / inf.
    x = mx.array([-1000.0, -100.0, -89.0, -30.0, 0.0, 30.0, 100.0])
    ref = mx.array([0.0, 0.0, 0.0, -2.7e-12, 0.5, 1.0, 1.0])
    assert mx.allclose(mx.grad(lambda t: fast.silu(t).sum())(x), ref, atol=1e-9)
    up = mx.array([2.0, -1.0, 3.0, 0.5, 1.0, -2.0, 4.0])
    dg, du = mx.grad(lambda g, u: fast._swiglu(g, u).sum(), argnums=(0, 1))(x, up)
    assert mx.allclose(dg, ref * up, atol=1e-9)
    assert mx.allclose(du, nn.silu(x), atol=1e-6)


def test_elu1_matches_mlx_and_its_gradient():
    x = mx.random.normal((512,), key=mx.random.key(4)) * 5
    ref = lambda t: mx.where(t > 0, t + 1, mx.exp(mx.minimum(t, 0)))  # noqa: E731
    assert mx.allclose(fast.elu1(x), ref(x), rtol=1e-6, atol=1e-7)
    ours, theirs = mx.grad(lambda t: fast.elu1(t).sum())(x), mx.grad(lambda t: ref(t).sum())(x)
    assert mx.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_softmax_parts_extreme_scores():
    # Scores 1e6 apart, masked ones above the real maximum: 0 weight, never NaN.
    s = mx.array([[0.0, -1e6, -1e30, 50.0, 3.0]])
    e, total = fast.softmax_parts(s, mx.array([True, True, True, False, True]))
    ref = np.exp(np.array([0.0, -np.inf, -np.inf, -np.inf, 3.0]) - 3.0)
    assert np.allclose(np.array(e)[0], ref, rtol=3e-7, atol=0) and np.isclose(total.item(), ref.sum())


def test_softmax_parts_gradient_matches_mlx():
    s = mx.random.normal((4, 32), key=mx.random.key(5)) * 4
    mask = mx.arange(4)[:, None] + 28 >= mx.arange(32)[None]
    w = mx.random.normal((4, 32), key=mx.random.key(6))

    def ours(t):
        e, total = fast.softmax_parts(t, mask)
        return (e / total * w).sum()

    def theirs(t):
        return (mx.softmax(mx.where(mask, t, -mx.inf), axis=-1, precise=True) * w).sum()

    assert mx.allclose(mx.grad(ours)(s), mx.grad(theirs)(s), rtol=1e-5, atol=1e-6)
