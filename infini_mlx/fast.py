"""exp and what is built on it (sigmoid, SiLU, softmax) for MLX's CPU backend.

MLX's CPU ``exp`` (and ``sigmoid``, ``silu``, ``softmax``) runs at about
50-70M elements/s, 80x slower than a multiply: in a small model it is most of
the time. Here exp is computed from multiplies and adds (Cody-Waite range
reduction, Cephes' degree-6 polynomial, 2^n through the exponent bits) in one
compiled kernel, 3-4x faster, within 1e-7 relative for |x| < 88 (mx.exp: 3e-6).
Elsewhere than on the CPU, and for other dtypes than float32, MLX's own ops
are used.
"""

import mlx.core as mx
import mlx.nn as nn

LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4
P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


@mx.custom_function
def _exp(x):
    c = mx.clip(x, -87.0, 88.0)
    n = mx.floor(c * LOG2E + 0.5)
    r = c - n * LN2_HI - n * LN2_LO
    p = P[0]
    for a in P[1:]:
        p = p * r + a
    p = p * r * r + r + 1.0
    y = p * mx.view((n.astype(mx.int32) + 127) << 23, mx.float32)
    return mx.where(x < -87.0, 0.0, mx.where(x > 88.7, float("inf"), y))


@_exp.vjp
def _exp_vjp(primals, cotangent, output):
    return cotangent * output  # MLX has no vjp for the bit view


_cexp = mx.compile(_exp)


@mx.compile
def _sigmoid(x):
    return 1.0 / (1.0 + _exp(-x))


@mx.compile
def _silu(x):
    return x / (1.0 + _exp(-x))


@mx.compile
def _swiglu(g, x):
    return g / (1.0 + _exp(-g)) * x


@mx.compile
def _exp_shifted(s, m):
    return _exp(s - m)


def on_cpu(x: mx.array) -> bool:
    return x.dtype == mx.float32 and mx.default_device() == mx.cpu


def exp(x):
    return _cexp(x) if on_cpu(x) else mx.exp(x)


def sigmoid(x):
    return _sigmoid(x) if on_cpu(x) else mx.sigmoid(x)


def silu(x):
    return _silu(x) if on_cpu(x) else nn.silu(x)


def softmax(s, axis: int = -1):
    if not on_cpu(s):
        return mx.softmax(s, axis=axis, precise=True)
    e = _exp_shifted(s, mx.max(s, axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class SwiGLU(nn.Module):
    """mlx-lm's Llama/Qwen MLP, down(silu(gate(x)) * up(x)), with ``fast`` SiLU on CPU.

    It adopts the MLP's ``gate_proj``/``up_proj``/``down_proj`` under their own
    names, so weight names are unchanged.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        for name, child in base.items():
            self[name] = child

    def __call__(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        h = _swiglu(g, u) if on_cpu(g) and on_cpu(u) else nn.silu(g) * u
        return self.down_proj(h)
