"""Segment-by-segment prefill: bounded graph and memory for any input length."""

from typing import Callable, Iterable, List, Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import InfiniCache

# Tokens of whole short segments fed per call (at least): they run batched across
# segments inside each layer, so per-call costs are paid once for all of them.
WHOLE = 1024


def block_len(cache: List[InfiniCache], block_size: int) -> int:
    """Tokens of the next block: up to the segment's end, or whole segments.

    Segments longer than ``block_size`` are fed in pieces that never cross a
    segment boundary; shorter ones (small models) are fed several at a time
    (up to ``max(block_size, WHOLE)`` tokens), since a model call costs far
    more than one short segment's work.
    """
    seg, pos = cache[0].segment_len, cache[0].segment_pos
    if pos or seg >= block_size:
        return min(block_size, seg - pos)
    return max(block_size, WHOLE) // seg * seg


def prefill(
    model: nn.Module,
    tokens: Iterable[int],
    cache: List[InfiniCache],
    progress: Optional[Callable[[int], None]] = None,
    block_size: int = 512,
) -> Optional[mx.array]:
    """Feed ``tokens`` through ``model`` in segment-aligned blocks, updating ``cache``.

    Blocks are aligned to segment boundaries (see ``block_len``), and the state
    is evaluated after each, so the graph and the memory in use stay bounded by
    ``max(block_size, segment_len, WHOLE)`` tokens. Blocks shorter than a segment lower
    peak memory (the attention scores of a block are block_size x segment_len)
    and, on CPU, time: fewer masked scores.
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
    logits, buf, fed = None, [], 0
    n = block_len(cache, block_size)

    def run(block):
        # Only the state is evaluated: logits of all but the last block are never computed.
        out = model(mx.array(block)[None], cache=cache)[0, -1]
        mx.eval([c.state for c in cache])
        return out

    for t in tokens:
        buf.append(t)
        if len(buf) == n:
            logits = None  # let the previous block's graph go first
            logits = run(buf)
            fed += len(buf)
            buf = []
            n = block_len(cache, block_size)
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
