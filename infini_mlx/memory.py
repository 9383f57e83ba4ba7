"""The compressive memory of Infini-attention (Eqs. 7-9), as pure functions.

Shapes: M is (..., Dk, Dv) and z is (..., Dk), kept in float32; keys and
queries arrive as (..., L, Dk) and values as (..., L, Dv).
"""

import mlx.core as mx

from . import fast


def sigma(x: mx.array, feature_map: str = "elu1") -> mx.array:
    """ELU(x) + 1 (or ReLU) in float32; exp sees only x <= 0 so no inf can leak into grads."""
    x = x.astype(mx.float32)
    if feature_map == "relu":
        return mx.maximum(x, 0)
    return fast.elu1(x)


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


# ---- the normalised memory (InfiniConfig.memory = "normalized") ----
# A deviation from the paper, after DeltaNet (Yang et al., 2024): no z, so what a
# key wrote does not fade as others are written; the delta rule runs token by token.


def l2_normalize(x: mx.array, eps: float = 1e-6) -> mx.array:
    """x / ||x|| over the last axis, in float32."""
    x = x.astype(mx.float32)
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


@mx.compile
def _silu_l2_cpu(x):
    return l2_normalize(fast._silu(x))


def silu_l2(x: mx.array) -> mx.array:
    """L2norm(SiLU(x)) in float32: the normalised memory's queries and keys."""
    x = x.astype(mx.float32)
    return _silu_l2_cpu(x) if fast.on_cpu(x) else l2_normalize(fast.silu(x))


def write_strength(b: mx.array, gate: str = "sigmoid") -> mx.array:
    """beta_t of the normalised memory from its logits ``b_proj x_t``, in float32.

    ``"clip"``: clip(0.5 + b / 4, 0, 1) (the sigmoid's slope at 0), exactly 0
    for b <= -2: such a token leaves the memory as it was.
    """
    b = b.astype(mx.float32)
    if gate == "clip":
        return mx.clip(0.5 + 0.25 * b, 0.0, 1.0)
    return fast.sigmoid(b)


def leaky_write(beta: mx.array, b: mx.array, leak: float) -> mx.array:
    """``beta`` unchanged in value, with gradient ``leak / 4`` where the clip cut it off.

    A training aid for ``write_gate="clip"``: a token (or a whole layer) that
    writes exactly nothing gets no gradient through the clip, so it could never
    learn to write again; here the loss still says whether writing would help.
    """
    b = b.astype(mx.float32)
    cut = (beta <= 0.0) | (beta >= 1.0)
    return beta + mx.where(cut, 0.25 * leak * (b - mx.stop_gradient(b)), 0.0)


def short_conv(x: mx.array, prev: mx.array, w: mx.array):
    """Causal depthwise convolution over time.

    Args:
        x: (B, L, C) inputs.
        prev: (B, W - 1, C) the inputs just before ``x`` (zeros at the start).
        w: (C, W) one filter per channel; ``w[:, -1]`` weighs the current input.

    Returns:
        ``(y, last)``: (B, L, C) outputs and the last W - 1 inputs, the next ``prev``.
    """
    W = w.shape[1]
    L = x.shape[1]
    xp = mx.concatenate([prev.astype(x.dtype), x], axis=1)
    w = w.astype(x.dtype)
    if L <= 16:  # decoding: one op; for long blocks MLX's grouped conv is slower than the taps
        y = mx.conv1d(xp, w[:, :, None], groups=w.shape[0])
    else:
        y = sum(xp[:, i : i + L] * w[:, i] for i in range(W))
    return y, xp[:, xp.shape[1] - (W - 1) :]


def gated_conv(x: mx.array, prev: mx.array, w: mx.array, wg: mx.array):
    """``short_conv`` with ``w``, times 1 + ``short_conv`` with ``wg`` of the same inputs
    (``InfiniConfig.qk_gate``); returns ``(y, last)`` as ``short_conv`` does."""
    y, last = short_conv(x, prev, w)
    return y * (1 + short_conv(x, prev, wg)[0]), last


def expanded_conv(x: mx.array, prev: mx.array, w: mx.array, wg: mx.array, D: int):
    """Per head of ``D`` channels, ``short_conv`` with ``w`` followed by itself times
    ``short_conv`` with ``wg`` of the same inputs (``InfiniConfig.qk_expand``): (B, L, 2 C)."""
    y, last = short_conv(x, prev, w)
    g = short_conv(x, prev, wg)[0]
    B, L, C = y.shape
    y, g = y.reshape(B, L, C // D, D), g.reshape(B, L, C // D, D)
    return mx.concatenate([y, y * g], axis=-1).reshape(B, L, 2 * C), last


@mx.custom_function
def _unit_lower_solve(A: mx.array, R: mx.array) -> mx.array:
    """U with (I + A) U = R, A strictly lower triangular (batched)."""
    I = mx.eye(A.shape[-1], dtype=A.dtype)
    return mx.linalg.solve_triangular(I + A, R, upper=False, stream=mx.cpu)


@_unit_lower_solve.vjp
def _unit_lower_solve_vjp(primals, cotangent, output):
    # MLX has no vjp for triangular solves: dR = (I + A)^-T dU, dA = -tril(dR U^T, -1).
    A, _ = primals
    I = mx.eye(A.shape[-1], dtype=A.dtype)
    dR = mx.linalg.solve_triangular(
        (I + A).swapaxes(-1, -2), cotangent, upper=True, stream=mx.cpu
    )
    dA = -mx.tril(dR @ output.swapaxes(-1, -2), -1)
    return dA, dR


def _chunk_maps(k: mx.array, v: mx.array, beta: mx.array):
    """Each chunk's write as an affine map of the memory, S -> P S + Q (WY form).

    With T = (I + tril(diag(beta) K K^T, -1))^-1 diag(beta), W = T K and U = T V,
    a chunk writes S + K^T (U - W S), so P = I - K^T W and Q = K^T U; the
    triangular solves of all chunks (axis -3 and before) run at once.
    """
    Dk = k.shape[-1]
    b = beta[..., None]
    w, u = b * k, b * v
    if k.shape[-2] > 1:
        A = mx.tril(w @ k.swapaxes(-1, -2), -1)
        wu = _unit_lower_solve(A, mx.concatenate([w, u], axis=-1))
        w, u = wu[..., :Dk], wu[..., Dk:]
    kt = k.swapaxes(-1, -2)
    return mx.eye(Dk, dtype=k.dtype) - kt @ w, kt @ u


def delta_rule(
    S: mx.array, k: mx.array, v: mx.array, beta: mx.array, chunk: int = 64
) -> mx.array:
    """The memory after writing a block token by token with the delta rule.

    For each token t in order: S <- S + beta_t k_t^T (v_t - k_t S). Computed in
    chunks with the WY form (DeltaNet): inside a chunk, (I + tril(diag(beta) K K^T, -1)) U
    = diag(beta) (V - K S) gives every token's correction U at once, S' = S + K^T U.
    Blocks of several chunks solve them all at once (``_chunk_maps``) and only
    apply them in order.

    Args:
        S: (..., Dk, Dv) memory before the block (float32).
        k: (..., L, Dk) L2-normalised keys.
        v: (..., L, Dv) values.
        beta: (..., L) write strengths in (0, 1).
        chunk: Tokens per triangular solve.

    Returns:
        (..., Dk, Dv) the memory after the block.
    """
    k, v, beta = k.astype(mx.float32), v.astype(mx.float32), beta.astype(mx.float32)
    L = k.shape[-2]
    if L <= chunk:
        b = beta[..., None]
        R = b * (v - k @ S)
        if L > 1:
            R = _unit_lower_solve(mx.tril(b * (k @ k.swapaxes(-1, -2)), -1), R)
        return S + k.swapaxes(-1, -2) @ R
    for P, Q in _maps(k, v, beta, chunk):
        S = mx.addmm(Q, P, S)
    return S


def _maps(k, v, beta, chunk):
    """(P, Q) of each chunk of the last-but-one axis, in order (see ``_chunk_maps``)."""
    L = k.shape[-2]
    n = L // chunk * chunk
    lead = k.shape[:-2]
    out = []
    if n:
        P, Q = _chunk_maps(
            k[..., :n, :].reshape(*lead, -1, chunk, k.shape[-1]),
            v[..., :n, :].reshape(*lead, -1, chunk, v.shape[-1]),
            beta[..., :n].reshape(*lead, -1, chunk),
        )
        out += [(P[..., i, :, :], Q[..., i, :, :]) for i in range(n // chunk)]
    if n < L:
        out.append(_chunk_maps(k[..., n:, :], v[..., n:, :], beta[..., n:]))
    return out


def delta_rule_segments(
    S: mx.array, k: mx.array, v: mx.array, beta: mx.array, chunk: int = 64
):
    """``delta_rule`` over whole segments: k (..., n, N, Dk), v (..., n, N, Dv), beta (..., n, N).

    Returns:
        ``(states, S)``: (..., n, Dk, Dv) the memory as each segment began, and after the last.
    """
    k, v, beta = k.astype(mx.float32), v.astype(mx.float32), beta.astype(mx.float32)
    maps = _maps(k, v, beta, chunk)  # each (..., n, D, D): every segment's i-th chunk
    states = []
    for j in range(k.shape[-3]):
        states.append(S)
        for P, Q in maps:
            S = mx.addmm(Q[..., j, :, :], P[..., j, :, :], S)
    return mx.stack(states, axis=-3), S
