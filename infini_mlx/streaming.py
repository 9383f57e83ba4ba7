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
) -> Optional[mx.array]:
    """Feed ``tokens`` through ``model`` one segment at a time, updating ``cache``.

    Blocks are aligned to segment boundaries, and the state is evaluated after
    each, so the graph and the memory in use stay bounded by one segment.
    ``tokens`` may be any iterable (a generator over a huge file included).

    Args:
        model: An Infini model.
        tokens: Token ids.
        cache: The model's cache, from ``model.make_cache()`` or ``load_state``.
        progress: Called with the number of tokens fed so far.

    Returns:
        The logits of the last token fed, shape (vocab,), or None if no token was fed.
    """
    seg = cache[0].segment_len
    logits, buf, fed = None, [], 0

    def run(block):
        # Only the state is evaluated: the logits (the whole vocabulary at
        # every position) are computed lazily, for the last block alone.
        out = model(mx.array(block)[None], cache=cache)
        mx.eval([c.state for c in cache])
        return out

    for t in tokens:
        buf.append(t)
        if len(buf) == seg - cache[0].segment_pos:
            logits = run(buf)
            fed += len(buf)
            buf = []
            if progress:
                progress(fed)
    if buf:
        logits = run(buf)
        fed += len(buf)
        if progress:
            progress(fed)
    return None if logits is None else logits[0, -1]
