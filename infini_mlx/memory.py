"""The compressive memory of Infini-attention (Eqs. 7-9), as pure functions.

Shapes: M is (..., Dk, Dv) and z is (..., Dk), kept in float32; keys and
queries arrive as (..., L, Dk) and values as (..., L, Dv).
"""

import mlx.core as mx


def sigma(x: mx.array, feature_map: str = "elu1") -> mx.array:
    """ELU(x) + 1 (or ReLU) in float32; exp sees only x <= 0 so no inf can leak into grads."""
    x = x.astype(mx.float32)
    if feature_map == "relu":
        return mx.maximum(x, 0)
    return mx.where(x > 0, x + 1, mx.exp(mx.minimum(x, 0)))


def group_heads(x: mx.array, n_kv_heads: int, mode: str) -> mx.array:
    """(B, H, L, D) -> (B, Hkv, H // Hkv, L, D): the query heads that share a memory."""
    B, H, L, D = x.shape
    R = H // n_kv_heads
    if mode == "interleave":
        return x.reshape(B, n_kv_heads, R, L, D)
    return x.reshape(B, R, n_kv_heads, L, D).swapaxes(1, 2)


def ungroup_heads(x: mx.array, mode: str) -> mx.array:
    B, Hkv, R, L, D = x.shape
    if mode == "interleave":
        return x.reshape(B, Hkv * R, L, D)
    return x.swapaxes(1, 2).reshape(B, Hkv * R, L, D)


def retrieve(
    sq: mx.array, M: mx.array, z: mx.array, first_segment: str, eps: float
) -> mx.array:
    """Eq. 7: sigma(Q) M / (sigma(Q) z). ``sq`` is already sigma(Q)."""
    num = sq @ M
    den = sq @ z[..., None]
    if first_segment == "eps":
        return num / (den + eps)
    # den == 0 only while nothing has been written (or, with ReLU, nothing the
    # query matches): read 0, not 0/0.
    return num / mx.where(den > 0, den, 1.0)


def memory_delta(
    sk: mx.array,
    v: mx.array,
    M: mx.array,
    z: mx.array,
    update: str,
    first_segment: str,
    eps: float,
):
    """What a block of keys adds to (M, z): Eq. 8 (linear) or Eq. 9 (delta).

    The delta rule retrieves with the memory as it was before the segment, so the
    contributions of consecutive blocks of one segment add up to the whole
    segment's update.
    """
    v = v.astype(mx.float32)
    if update == "delta":
        v = v - retrieve(sk, M, z, first_segment, eps)
    return sk.swapaxes(-1, -2) @ v, sk.sum(axis=-2)
