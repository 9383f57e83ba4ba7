"""The short causal convolution in front of the memory (InfiniConfig.conv_size)."""

import mlx.core as mx
import mlx.nn as nn

from .memory import short_conv


class ShortConv(nn.Module):
    """Depthwise causal convolution over time, one filter of ``size`` taps per channel.

    ``weight`` is (channels, size), flash-linear-attention's ``(C, 1, W)`` conv
    weight without its middle axis. It starts as the identity (last tap 1), so
    a new convolution leaves the memory's inputs as they were.
    """

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.weight = mx.zeros((channels, size)).at[:, -1].add(1.0)

    def __call__(self, x: mx.array, prev: mx.array):
        """(B, L, C) inputs and the (B, size - 1, C) before them -> outputs, next ``prev``."""
        return short_conv(x, prev, self.weight)
