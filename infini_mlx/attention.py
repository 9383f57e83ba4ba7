"""InfiniAttention: causal attention inside a segment plus a compressive memory."""

from functools import lru_cache
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from . import fast
from .cache import InfiniCache
from .config import InfiniConfig
from .conv import ShortConv
from .memory import (
    delta_rule,
    delta_rule_segments,
    expanded_conv,
    gated_conv,
    group_heads,
    leaky_write,
    memory_delta,
    retrieve,
    short_conv,
    sigma,
    silu_l2,
    ungroup_heads,
    write_strength,
)

# Parameters InfiniAttention adds to a base attention module (its own names).
NEW_PARAMETERS = (
    "gate", "q_conv1d", "k_conv1d", "v_conv1d", "q_gate_conv1d", "k_gate_conv1d", "b_proj", "b_conv1d", "o_norm",
)


def is_new_parameter(path: str, _=None) -> bool:
    """Whether a parameter path ("model.layers.0.self_attn.gate") is one Infini adds."""
    parts = path.split(".")
    return "self_attn" in parts[:-1] and parts[parts.index("self_attn") + 1] in NEW_PARAMETERS


# InfiniConfig.gate_act: beta -> the weight of the gated side.
GATE_ACTS = {
    "sigmoid": mx.sigmoid,
    "tanh": mx.tanh,
    "hard_sigmoid": lambda b: mx.clip(0.2 * b + 0.5, 0.0, 1.0),
    "tanh_abs": lambda b: mx.abs(mx.tanh(b)),
}


class InfiniAttention(nn.Module):
    """Infini-attention (Eqs. 7-10) built around an mlx-lm attention module.

    The base module's children (``q_proj``/``k_proj``/``v_proj``/``o_proj`` or a
    fused ``qkv_proj``, optional ``q_norm``/``k_norm``, ``rope``) are adopted
    under their own names, so Hugging Face weight names are unchanged. New
    parameters: ``gate``, one logit beta per query head; with
    ``config.conv_size``, ``q_conv1d``/``k_conv1d``/``v_conv1d`` (identity at
    first); with ``config.qk_gate`` or ``config.qk_expand``,
    ``q_gate_conv1d``/``k_gate_conv1d`` (zero at first; the queries' 0.001 times
    the identity under ``qk_expand``); with the normalised memory, ``b_proj`` (per-token write strength
    per KV head, sigmoid(0) = 0.5 at first) and ``o_norm`` (RMSNorm of the
    read-out), named as in flash-linear-attention's DeltaNet.

    Args:
        base: The mlx-lm attention module to replace (quantized or not).
        config: The model's Infini semantics.
        window: Sliding window of the base layer, if it has one.
    """

    def __init__(
        self, base: nn.Module, config: InfiniConfig, window: Optional[int] = None
    ):
        super().__init__()
        for name, child in base.items():
            self[name] = child
        self.n_heads = base.n_heads
        self.n_kv_heads = base.n_kv_heads
        self.scale = base.scale
        self.softcap = getattr(base, "attn_logit_softcapping", None)
        self.window = window
        self.config = config
        self.gate = mx.full((self.n_heads,), config.gate_init, mx.float32)
        d_in, d_q, d_k, d_v = _dims(base, self.n_heads, self.n_kv_heads)
        # Per-row shapes of the streaming state, checked when a state file is loaded.
        wide = 2 if config.qk_expand else 1  # the memory's keys, not local attention's
        self.state_shapes = {
            "M": (self.n_kv_heads, wide * d_k // self.n_kv_heads, d_v // self.n_kv_heads),
            "z": (self.n_kv_heads, d_k // self.n_kv_heads),
            "keys": (self.n_kv_heads, None, d_k // self.n_kv_heads),
            "values": (self.n_kv_heads, None, d_v // self.n_kv_heads),
        }
        if config.conv_size:
            W = config.conv_size - 1
            self.state_shapes.update(conv_q=(W, d_q), conv_k=(W, d_k), conv_v=(W, d_v))
        if config.write_conv:
            self.state_shapes.update(conv_b=(config.conv_size - 1, self.n_kv_heads))
        if config.conv_size:
            self.q_conv1d = ShortConv(d_q, config.conv_size)
            self.k_conv1d = ShortConv(d_k, config.conv_size)
            self.v_conv1d = ShortConv(d_v, config.conv_size)
        if config.qk_gate or config.qk_expand:
            self.q_gate_conv1d = ShortConv(d_q, config.conv_size)
            self.k_gate_conv1d = ShortConv(d_k, config.conv_size)
            # qk_expand: the keys' new half starts at 0, the queries' small (not 0, or neither
            # half would get a gradient), so the read-out's RMSNorm sees the read as it was.
            self.q_gate_conv1d.weight = self.q_gate_conv1d.weight * (1e-3 if config.qk_expand else 0.0)
            self.k_gate_conv1d.weight = mx.zeros_like(self.k_gate_conv1d.weight)
        if config.memory == "normalized":
            self.b_proj = nn.Linear(d_in, self.n_kv_heads, bias=False)
            self.b_proj.weight = mx.zeros_like(self.b_proj.weight)
            self.o_norm = nn.RMSNorm(d_v // self.n_kv_heads, eps=1e-6)
        if config.write_conv:
            self.b_conv1d = ShortConv(self.n_kv_heads, config.conv_size)

    def _project(self, x: mx.array):
        B, L, _ = x.shape
        if "qkv_proj" in self:
            qkv = self.qkv_proj(x)
            nq = qkv.shape[-1] * self.n_heads // (self.n_heads + 2 * self.n_kv_heads)
            nk = (qkv.shape[-1] - nq) // 2
            q, k, v = mx.split(qkv, [nq, nq + nk], axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, L, self.n_heads, -1)
        k = k.reshape(B, L, self.n_kv_heads, -1)
        # q_norm/k_norm normalise over head_dim, so before or after the transpose is the same.
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        v = v.reshape(B, L, self.n_kv_heads, -1)
        return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def _local(self, q, k, v, start: int):
        """Causal softmax attention of queries at in-segment positions start.. over k, v."""
        qL, kL = q.shape[2], k.shape[2]
        mask = None
        if self.window is not None and kL > self.window:
            qi = mx.arange(start, start + qL)[:, None]
            ki = mx.arange(kL)[None]
            mask = (qi >= ki) & (qi < ki + self.window)
        elif qL > 1:
            mask = "causal"
        if self.softcap is None and (qL == 1 or not fast.on_cpu(q)):
            return mx.fast.scaled_dot_product_attention(
                q, k, v, scale=self.scale, mask=mask
            )
        # Gemma 2's logits are soft-capped before the softmax; on CPU, the softmax's
        # exp is fast.exp (MLX's own is most of the time of local attention there;
        # one decoded token has too few scores to matter).
        B, H, _, D = q.shape
        Hkv = k.shape[1]
        q = (q * self.scale).reshape(B, Hkv, H // Hkv, qL, D)
        s = q @ mx.expand_dims(k, 2).swapaxes(-1, -2)
        if self.softcap is not None:
            s = mx.tanh(s / self.softcap) * self.softcap
        if isinstance(mask, str):
            mask = mx.arange(kL - qL, kL)[:, None] >= mx.arange(kL)[None]
        if fast.on_cpu(s):
            e, total = fast.softmax_parts(s, mask)
            out = (e.astype(v.dtype) @ mx.expand_dims(v, 2)) / total.astype(v.dtype)
        else:
            if mask is not None:
                s = mx.where(mask, s, mx.finfo(s.dtype).min)
            out = mx.softmax(s.astype(mx.float32), axis=-1, precise=True).astype(v.dtype) @ mx.expand_dims(v, 2)
        return out.reshape(B, H, qL, -1)

    def _memory_inputs(self, x, q, k, v, cache: InfiniCache):
        """The q, k, v (normalised, with write strengths, for the normalised memory) of the memory."""
        cfg = self.config
        B, _, L, _ = q.shape
        normalized = cfg.memory == "normalized"
        b = self.b_proj(x) if normalized else None
        prevs, ws = [], []
        if cfg.conv_size:
            for t, name in ((q, "conv_q"), (k, "conv_k"), (v, "conv_v")):
                prevs.append(cache.conv_state(name, B, cfg.conv_size, t.shape[1] * t.shape[-1], t.dtype))
                ws.append(self[name[-1] + "_conv1d"].weight)
        if cfg.write_conv:
            prevs.append(cache.conv_state("conv_b", B, cfg.conv_size, self.n_kv_heads, mx.float32))
            ws.append(self.b_conv1d.weight)
        if cfg.qk_gate or cfg.qk_expand:  # after the write logits' weight: they read conv_q's and conv_k's states
            ws += [self.q_gate_conv1d.weight, self.k_gate_conv1d.weight]
        # One decoded token: compiled, since its many small ops cost more than their math.
        compiled = L == 1 and normalized and bool(cfg.conv_size)
        leak = cache.write_leak if normalized and cfg.write_gate == "clip" else 0.0
        f = _memory_inputs_fn(
            bool(cfg.conv_size), normalized and cfg.write_gate, cfg.write_conv, compiled, leak, cfg.write_scale,
            "gate" if cfg.qk_gate else "expand" if cfg.qk_expand else None,
        )
        q, k, v, beta, logged, lasts = f(q, k, v, b, prevs, ws)
        if cfg.conv_size:
            cache.conv_q, cache.conv_k, cache.conv_v = lasts[:3]
        if cfg.write_conv:
            cache.conv_b = lasts[3]
        if cache.write_log is not None and beta is not None:
            cache.write_log.append(logged)
        if cache.key_log is not None and beta is not None:
            cache.key_log.append((k, logged))
        return q, k, v, beta

    def _read_write(self, qm, km, vm, beta, cache: InfiniCache):
        """Read the memory as it was when the segment began; write the block into it."""
        cfg = self.config
        M, z = cache.memory(qm.shape[0], self.n_kv_heads, km.shape[-1], vm.shape[-1])
        if cfg.memory == "normalized":
            step = _normalized_step(self.n_kv_heads, cfg.gqa_memory, self.o_norm.eps, qm.shape[2] == 1)
            mem, S = step(qm, km, vm, beta, M, cache.running(), self.o_norm.weight)
            cache.accumulate(S, None)
            return mem
        sq = group_heads(sigma(qm, cfg.feature_map), self.n_kv_heads, cfg.gqa_memory)
        mem = retrieve(sq, M[:, :, None], z[:, :, None], cfg.first_segment, cfg.eps)
        cache.accumulate(
            *memory_delta(
                sigma(km, cfg.feature_map), vm, M, z, cfg.update, cfg.first_segment, cfg.eps
            )
        )
        return ungroup_heads(mem, cfg.gqa_memory)

    def _block(self, q, k, v, qm, km, vm, beta, cache: InfiniCache):
        """One block of tokens that lies inside a single segment."""
        cfg = self.config
        start = cache.segment_pos
        pos = start if cfg.rope_mode == "segment" else cache.offset
        q_rot = self.rope(q, offset=pos)
        k_rot = self.rope(k, offset=pos)
        if cfg.memory_rope:
            qm, km = q_rot, k_rot

        keys, values = cache.update_and_fetch(k_rot, v)
        local = self._local(q_rot, keys, values, start)
        mem = self._read_write(qm, km, vm, beta, cache)
        cache.fold_if_full()

        return self._mix(mem, local)

    def _mix(self, mem, local):
        return _mix(self.config.gate_act, self.config.gate_weights == "local")(self.gate, mem, local)

    def _segments(self, q, k, v, qm, km, vm, beta, cache: InfiniCache):
        """Whole segments from a segment's start: local attention and memory reads
        run for all segments at once; only the memory's recurrence loops."""
        cfg = self.config
        B, H, L, _ = q.shape
        n = L // cfg.segment_len
        def seg(t):
            return t.reshape(t.shape[0], t.shape[1], n, -1, t.shape[-1])
        if cfg.rope_mode == "segment":
            q_rot, k_rot = seg(self.rope(seg(q))), seg(self.rope(seg(k)))
        else:
            q_rot, k_rot = seg(self.rope(q, offset=cache.offset)), seg(self.rope(k, offset=cache.offset))
        if cfg.memory_rope:
            qm, km = q_rot.reshape(q.shape), k_rot.reshape(k.shape)

        # Segments become batch entries: (B * n, heads, N, D).
        def bat(t):
            return t.swapaxes(1, 2).reshape(B * n, t.shape[1], -1, t.shape[-1])
        local = self._local(bat(q_rot), bat(k_rot), bat(seg(v)), 0)
        local = local.reshape(B, n, H, -1, local.shape[-1]).swapaxes(1, 2).reshape(B, H, L, -1)

        M, z = cache.memory(B, self.n_kv_heads, km.shape[-1], vm.shape[-1])
        if cfg.memory == "normalized":
            Ms, M = delta_rule_segments(M, seg(km), seg(vm), beta.reshape(B, -1, n, L // n))
            sq = group_heads(qm, self.n_kv_heads, cfg.gqa_memory)
            sq = sq.reshape(*sq.shape[:3], n, -1, sq.shape[-1])
            mem = (sq @ Ms[:, :, None]).reshape(*sq.shape[:3], L, -1)
            mem = self.o_norm(ungroup_heads(mem, cfg.gqa_memory))
        else:
            sk, vm = seg(sigma(km, cfg.feature_map)), seg(vm)
            Ms, zs = [], []
            for j in range(n):
                Ms.append(M), zs.append(z)
                dM, dz = memory_delta(
                    sk[:, :, j], vm[:, :, j], M, z, cfg.update, cfg.first_segment, cfg.eps
                )
                M, z = M + dM, z + dz
            sq = group_heads(sigma(qm, cfg.feature_map), self.n_kv_heads, cfg.gqa_memory)
            sq = sq.reshape(*sq.shape[:3], n, -1, sq.shape[-1])
            mem = retrieve(
                sq, mx.stack(Ms, 2)[:, :, None], mx.stack(zs, 2)[:, :, None],
                cfg.first_segment, cfg.eps,
            )
            mem = ungroup_heads(mem.reshape(*sq.shape[:3], L, -1), cfg.gqa_memory)
        cache.advance(L, M, z)
        return self._mix(mem, local)

    def __call__(
        self, x: mx.array, mask: Optional[Any] = None, cache: Optional[Any] = None
    ) -> mx.array:
        # The model's mask is ignored: masks are built per segment in _local.
        B, L, _ = x.shape
        q, k, v = self._project(x)
        if cache is None:
            cache = InfiniCache(self.config.segment_len, self.config.memory)
        qm, km, vm, beta = self._memory_inputs(x, q, k, v, cache)
        N = self.config.segment_len
        if cache.segment_pos == 0 and L > N and L % N == 0 and (self.window or N) >= N:
            out = self._segments(q, k, v, qm, km, vm, beta, cache)
            return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
        outs, a = [], 0
        while a < L:
            b = min(L, a + self.config.segment_len - cache.segment_pos)
            s = slice(a, b)
            outs.append(
                self._block(
                    q[:, :, s], k[:, :, s], v[:, :, s], qm[:, :, s], km[:, :, s], vm[:, :, s],
                    None if beta is None else beta[:, :, s], cache,
                )
            )
            a = b
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


@lru_cache(maxsize=None)
def _memory_inputs_fn(
    conv: bool, write_gate, write_conv: bool, compiled: bool, leak: float = 0.0, scale: float = 1.0,
    key_form: Optional[str] = None,
):
    """(q, k, v, b, conv states, conv weights) -> the memory's q, k, v, beta, the beta to
    log (without ``leak``: the write penalty acts on what is written) and the next conv states.

    ``write_gate``: the normalised memory's ``InfiniConfig.write_gate``; falsy for the paper's.
    ``write_conv``: the fourth conv state and weight are the write logits'.
    ``leak``: the clip's gradient where it cuts off (training only; ``leaky_write``).
    ``scale``: ``InfiniConfig.write_scale``, times every write strength.
    ``key_form``: ``"gate"`` (``InfiniConfig.qk_gate``): the last two conv weights gate
    q's and k's convolutions (``gated_conv``); ``"expand"`` (``qk_expand``): they widen
    q and k (``expanded_conv``).
    """

    def f(q, k, v, b, prevs, ws):
        lasts = []
        if conv:
            B, _, L, _ = q.shape
            outs = []
            gates = ws[-2:] + [None] if key_form else [None] * 3
            for t, prev, w, wg in zip((q, k, v), prevs[:3], ws[:3], gates):
                D = t.shape[-1]
                x = t.transpose(0, 2, 1, 3).reshape(B, L, -1)
                if wg is None:
                    y, last = short_conv(x, prev, w)
                elif key_form == "gate":
                    y, last = gated_conv(x, prev, w, wg)
                else:
                    y, last = expanded_conv(x, prev, w, wg, D)
                    D *= 2
                lasts.append(last)
                outs.append(y.reshape(B, L, -1, D).transpose(0, 2, 1, 3))
            q, k, v = outs
        beta = None
        if write_gate:
            q, k = silu_l2(q), silu_l2(k)
            if write_conv:
                b, last = short_conv(b.astype(mx.float32), prevs[3], ws[3])
                lasts.append(last)
            beta = write_strength(b, write_gate)
            if scale != 1.0:
                beta = beta * scale
            logged = beta = beta.transpose(0, 2, 1)
            if leak:
                beta = leaky_write(logged, b.transpose(0, 2, 1), leak)
            return q, k, v, beta, logged, lasts
        return q, k, v, beta, beta, lasts

    return mx.compile(f) if compiled else f


@lru_cache(maxsize=None)
def _normalized_step(n_kv_heads: int, gqa: str, eps: float, compiled: bool):
    """The normalised memory's read (RMSNorm'd) and token-by-token write of a block;
    compiled for one decoded token, whose many small ops cost more than their math."""

    def step(qm, km, vm, beta, M, S, w):
        sq = group_heads(qm, n_kv_heads, gqa)
        mem = mx.fast.rms_norm(ungroup_heads(sq @ M[:, :, None], gqa), w, eps)
        return mem, delta_rule(S, km, vm, beta)

    return mx.compile(step) if compiled else step


@lru_cache(maxsize=None)
def _mix(act: str, flip: bool):
    """Eq. 10 as one compiled kernel: a decoded token runs it in every layer."""

    def mix(gate, mem, local):
        g = GATE_ACTS[act](gate.astype(mx.float32))[:, None, None]
        if flip:
            g = 1 - g
        return (g * mem + (1 - g) * local.astype(mx.float32)).astype(local.dtype)

    return mx.compile(mix)


def _dims(base: nn.Module, H: int, Hkv: int):
    """(input, query, key, value) dims of a base attention module's projections."""

    def io(lin):
        d_out, d_in = lin.weight.shape
        bits = getattr(lin, "bits", None)
        return (d_in * 32 // bits if bits else d_in), d_out

    if "qkv_proj" in base:
        d_in, d_out = io(base.qkv_proj)
        D = d_out // (H + 2 * Hkv)
        return d_in, H * D, Hkv * D, Hkv * D
    d_in, d_q = io(base.q_proj)
    return d_in, d_q, io(base.k_proj)[1], io(base.v_proj)[1]
