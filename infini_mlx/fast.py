"""exp and what is built on it (sigmoid, SiLU, softmax) for MLX's CPU backend.

MLX's CPU ``exp`` (and ``sigmoid``, ``silu``, ``softmax``) runs at about
50-70M elements/s, 80x slower than a multiply: in a small model it is most of
the time. Here exp is computed from multiplies and adds (Cody-Waite range
reduction, Cephes' degree-6 polynomial in Estrin's form, 2^n through the
exponent bits) in compiled kernels, within 3e-7 relative (mx.exp: 3e-6).
Only ops that the CPU compiler vectorizes are used (no float min/max, compare
or select: each costs as much as the whole polynomial), and the graph is kept
shallow, since MLX fuses at most 11 ops deep and stops at bit views: 2.8x
faster than the Horner form with float clamps.
exp(NaN) is inf here. Elsewhere than on the CPU, and for other dtypes than
float32, MLX's own ops are used.
"""

import mlx.core as mx
import mlx.nn as nn

LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4
BITS_100 = 0x42C80000  # 100.0f
P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _times_2n(x, e):
    """e^x from e, the biased exponent n + 127 of its power of two (2^n e^r, r = x - n ln 2)."""
    n = e.astype(mx.float32) - 127.0
    r = x - n * LN2_HI - n * LN2_LO
    r2 = r * r
    p = (P[0] * r + P[1]) * (r2 * r2) + (P[2] * r + P[3]) * r2 + (P[4] * r + P[5])
    return (p * r2 + r + 1.0) * mx.view(e << 23, mx.float32)


@mx.custom_function
def _exp(x):
    # Positive floats order as their bits: x above 100 (inf, NaN) becomes 100,
    # so that the float-to-int conversion below cannot overflow upwards.
    x = mx.view(mx.minimum(mx.view(x, mx.int32), BITS_100), mx.float32)
    # Biased exponent clamped in integers: 0 gives 0.0 and 254 lets
    # 2^127 * e^r overflow to inf by itself.
    e = mx.minimum(mx.maximum((x * LOG2E + 127.5).astype(mx.int32), 0), 254)
    y = _times_2n(x, e)
    # Where e is 0, r is unbounded (inf, NaN): clear the bits.
    return mx.view(mx.view(y, mx.int32) & -mx.minimum(e, 1), mx.float32)


def _exp_vjp(primals, cotangent, output):
    return cotangent * output  # MLX has no vjp for the bit view


_exp.vjp(_exp_vjp)
_cexp = mx.compile(_exp)


@mx.custom_function
def _exp_nonpos(x):
    # exp for -1e5 <= x <= 0 (softmax weights): no clamps, 3 kernels instead of 5.
    return _times_2n(x, mx.maximum((x * LOG2E + 127.5).astype(mx.int32), 0))


_exp_nonpos.vjp(_exp_vjp)
_cexp_nonpos = mx.compile(_exp_nonpos)


@mx.compile
def _sigmoid(x):
    return 1.0 / (1.0 + _exp(-x))


def _silu_grad(x, s):
    # s (1 + x (1 - s)) with s = sigmoid(x): where exp(-x) is inf, s is 0 and so is the
    # gradient (autodiff of x / (1 + exp(-x)) gives inf / inf = NaN below x = -88).
    return s + x * s * (1.0 - s)


@mx.custom_function
def _silu_fn(x):
    return x / (1.0 + _exp(-x))


@_silu_fn.vjp
def _silu_vjp(x, cotangent, output):  # one input: the primal itself, not a tuple
    return cotangent * _silu_grad(x, _sigmoid(x))


_silu = mx.compile(_silu_fn)


@mx.compile
def _elu1(x):
    # max + exp(min) rather than a select, which MLX's CPU backend does not vectorize.
    return mx.maximum(x, 0.0) + _exp(mx.minimum(x, 0.0))


@mx.custom_function
def _swiglu_fn(g, x):
    return g / (1.0 + _exp(-g)) * x


@_swiglu_fn.vjp
def _swiglu_vjp(primals, cotangent, output):
    g, x = primals
    s = _sigmoid(g)
    return cotangent * x * _silu_grad(g, s), cotangent * g * s


_swiglu = mx.compile(_swiglu_fn)


def on_cpu(x: mx.array) -> bool:
    return x.dtype == mx.float32 and mx.default_device() == mx.cpu


def exp(x):
    return _cexp(x) if on_cpu(x) else mx.exp(x)


def elu1(x):
    """ELU(x) + 1, with exp seeing only x <= 0 (no inf can reach the gradient)."""
    return _elu1(x) if on_cpu(x) else mx.where(x > 0, x + 1, mx.exp(mx.minimum(x, 0)))


def sigmoid(x):
    return _sigmoid(x) if on_cpu(x) else mx.sigmoid(x)


def silu(x):
    return _silu(x) if on_cpu(x) else nn.silu(x)


def softmax(s):
    """Softmax over the last axis."""
    if not on_cpu(s):
        return mx.softmax(s, axis=-1, precise=True)
    e, total = softmax_parts(s)
    return e / total


def softmax_parts(s, mask=None):
    """exp(s - max) over the last axis with masked scores (mask False) at 0, and its sums.

    Attention divides its output by the sums instead of dividing every weight.
    CPU float32 only (see ``on_cpu``). Every step is an op that MLX's CPU backend
    runs vectorized (a select, or a broadcast inside a compiled kernel, is 2-3x
    slower there); weights below e^-1e5 are 0.
    """
    if mask is not None:
        s = s + (mask.astype(s.dtype) - 1.0) * 1e5
    e = _cexp_nonpos(mx.maximum(s - s.max(-1, keepdims=True), -1e5))
    return e, e @ mx.ones((e.shape[-1], 1), e.dtype)


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
