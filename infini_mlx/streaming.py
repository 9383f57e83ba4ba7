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
    logits: bool = True,
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
        logits: Return the last token's logits. To compute them for that
            position only, ``tokens`` is read one token ahead of what
            ``progress`` reports; without them, exactly as far.

    Returns:
        The logits of the last token fed, shape (vocab,), or None if no token
        was fed or ``logits`` is False.
    """
    buf, fed = [], 0
    n = block_len(cache, block_size)

    def run(block, last=False):
        out = model(mx.array(block)[None], cache=cache)
        if last:
            out = out[0, -1]
            mx.eval(out, [c.state for c in cache])
            return out
        # Only the state is evaluated: the head never runs for these positions.
        mx.eval([c.state for c in cache])

    def step(block):
        nonlocal fed, n
        run(block)
        fed += len(block)
        n = block_len(cache, block_size)
        if progress:
            progress(fed)

    # With logits, one token is held back so that the last block's logits are
    # computed for its last position only (a block x vocabulary matrix otherwise).
    ahead = int(logits)
    for t in tokens:
        buf.append(t)
        if len(buf) == n + ahead:
            step(buf[:n])
            buf = buf[n:]
    if not logits or not buf:
        if buf:
            step(buf)
        return None
    if len(buf) > 1:
        step(buf[:-1])
    out = run(buf[-1:], last=True)
    fed += 1
    if progress:
        progress(fed)
    return out
