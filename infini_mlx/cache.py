"""InfiniCache: the streaming state of one Infini-attention layer.

It follows mlx-lm's cache protocol, so ``mlx_lm.generate_step`` and
``mlx_lm.stream_generate`` take a list of them as ``prompt_cache`` unchanged.
"""

from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache

STATE_NAMES = ("keys", "values", "M", "z", "dM", "dz", "conv_q", "conv_k", "conv_v", "conv_b")


class InfiniCache(_BaseCache):
    """The current segment's KV plus the compressive memory (M, z) of one layer.

    ``keys``/``values`` hold the current segment's (RoPE-rotated) keys and values
    for local attention. ``M``/``z`` hold every earlier segment. ``dM``/``dz``
    accumulate the current segment's contribution (computed against the memory
    as it was when the segment began) and are folded into ``M``/``z`` exactly
    once, when the segment is full. With the normalised memory there is no z,
    and ``dM`` is the memory after the segment's tokens so far, which replaces
    ``M`` at the fold. ``conv_q``/``conv_k``/``conv_v`` hold the last inputs of
    the memory's short convolution, if the model has one, ``conv_b`` the last
    write-strength logits (``InfiniConfig.write_conv``).

    Args:
        segment_len: Tokens per segment.
        memory: ``InfiniConfig.memory``: ``"paper"`` or ``"normalized"``.
    """

    step = 256

    def __init__(self, segment_len: int, memory: str = "paper"):
        self.segment_len = segment_len
        self.form = memory
        self.additive = memory == "paper"
        self.offset = 0
        self.keys = self.values = None
        self.M = self.z = self.dM = self.dz = None
        self.conv_q = self.conv_k = self.conv_v = self.conv_b = None
        # A list to which the layer appends its write strengths (training penalises them).
        self.write_log = None
        # Training only: a list to which the layer appends (keys, write strengths) (train.key_overlap).
        self.key_log = None
        # Training only: the clip's gradient where it writes nothing (memory.leaky_write).
        self.write_leak = 0.0

    # Position of the next token inside its segment.
    @property
    def segment_pos(self) -> int:
        return self.offset % self.segment_len

    def memory(self, B: int, H: int, Dk: int, Dv: int):
        if self.M is None:
            self.M = mx.zeros((B, H, Dk, Dv), mx.float32)
            if self.additive:
                self.z = mx.zeros((B, H, Dk), mx.float32)
        return self.M, self.z

    def running(self) -> mx.array:
        """The normalised memory after the current segment's tokens so far."""
        return self.M if self.dM is None else self.dM

    def conv_state(self, name: str, B: int, W: int, C: int, dtype) -> mx.array:
        prev = getattr(self, name)
        return mx.zeros((B, W - 1, C), dtype) if prev is None else prev

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append a block of the current segment; return the segment's KV so far."""
        prev = self.segment_pos
        L = keys.shape[2]
        if prev + L > self.segment_len:
            raise ValueError("a block may not cross a segment boundary")
        self.offset += L
        if prev == 0 and L == self.segment_len:
            # A whole segment at once: it is folded right away, nothing to keep.
            self.keys = self.values = None
            return keys, values
        if self.keys is None or prev + L > self.keys.shape[2]:
            B, H, _, Dk = keys.shape
            size = min(self.segment_len, (prev + L + self.step - 1) // self.step * self.step)
            new_k = mx.zeros((B, H, size, Dk), keys.dtype)
            new_v = mx.zeros((B, H, size, values.shape[3]), values.dtype)
            if prev > 0:
                new_k[..., :prev, :] = self.keys[..., :prev, :]
                new_v[..., :prev, :] = self.values[..., :prev, :]
            self.keys, self.values = new_k, new_v
        self.keys[..., prev : prev + L, :] = keys
        self.values[..., prev : prev + L, :] = values
        return self.keys[..., : prev + L, :], self.values[..., : prev + L, :]

    def accumulate(self, dM: mx.array, dz: Optional[mx.array]):
        """Add a block's contribution; for the normalised memory, dM is the new running memory."""
        if not self.additive:
            self.dM = dM
        elif self.dM is None:
            self.dM, self.dz = dM, dz
        else:
            self.dM, self.dz = self.dM + dM, self.dz + dz

    def fold_if_full(self):
        """Fold the finished segment into (M, z) and start an empty one."""
        if self.segment_pos != 0 or self.dM is None:
            return
        if self.additive:
            self.M, self.z = self.M + self.dM, self.z + self.dz
        else:
            self.M = self.dM
        self.dM = self.dz = None
        self.keys = self.values = None

    def end_segment(self):
        """End the current segment early: fold what it holds into the memory now.

        The next token starts a segment, as if the text had ended on a segment
        boundary (the offset moves on to it). A question asked after a text
        then sits in one segment, where local attention sees all of it.
        """
        if self.segment_pos == 0:
            return
        self.offset += self.segment_len - self.segment_pos
        self.fold_if_full()
        self.keys = self.values = None

    def advance(self, L: int, M: mx.array, z: Optional[mx.array]):
        """After whole segments fed at once from a segment's start: the memory after them."""
        self.offset += L
        self.M, self.z = M, z
        self.dM = self.dz = None
        self.keys = self.values = None

    # mlx-lm cache protocol
    def make_mask(self, *args, **kwargs):
        # InfiniAttention builds its own in-segment masks.
        return None

    def size(self):
        return self.segment_pos

    @property
    def state(self):
        return tuple(getattr(self, n) for n in STATE_NAMES)

    @state.setter
    def state(self, v):
        for n, a in zip(STATE_NAMES, v):
            setattr(self, n, a)

    @property
    def meta_state(self):
        return tuple(map(str, (self.segment_len, self.offset)))

    @meta_state.setter
    def meta_state(self, v):
        self.segment_len, self.offset = map(int, v)

    def is_trimmable(self):
        # Folded segments cannot be taken out of the memory again.
        return False

    def trim(self, n):
        return 0

    def empty(self):
        return self.offset == 0

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.state if a is not None)

    def __repr__(self) -> Optional[str]:
        return f"InfiniCache(segment_len={self.segment_len}, offset={self.offset})"
