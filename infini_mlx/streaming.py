"""Segment-by-segment prefill: bounded graph and memory for any input length."""

from typing import Callable, Iterable, List, Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import InfiniCache


def prefill(
    model: nn.Module,
    tokens: Iterable[int],
    cache: List[InfiniCache],
    progress: Optional[Callable[[int], None]] = None,
    block_size: int = 512,
) -> Optional[mx.array]:
    """Feed ``tokens`` through ``model`` one segment at a time, updating ``cache``.

    Blocks are aligned to segment boundaries, and the state is evaluated after
    each, so the graph and the memory in use stay bounded by one segment.
    Blocks shorter than a segment lower peak memory (the attention scores of a
    block are block_size x segment_len) and, on CPU, time: fewer masked scores.
    ``tokens`` may be any iterable (a generator over a huge file included).

    Args:
        model: An Infini model.
        tokens: Token ids.
        cache: The model's cache, from ``model.make_cache()`` or ``load_state``.
        progress: Called with the number of tokens fed so far.
        block_size: Most tokens fed per model call.

    Returns:
        The logits of the last token fed, shape (vocab,), or None if no token was fed.
    """
    seg = cache[0].segment_len
    logits, buf, fed = None, [], 0

    def run(block):
        # Only the state is evaluated: logits of all but the last block are never computed.
        out = model(mx.array(block)[None], cache=cache)[0, -1]
        mx.eval([c.state for c in cache])
        return out

    for t in tokens:
        buf.append(t)
        if len(buf) == min(block_size, seg - cache[0].segment_pos):
            logits = None  # let the previous block's graph go first
            logits = run(buf)
            fed += len(buf)
            buf = []
            if progress:
                progress(fed)
    if buf:
        logits = None
        logits = run(buf)
        fed += len(buf)
        if progress:
            progress(fed)
    if logits is not None:
        mx.eval(logits)
    return logits
