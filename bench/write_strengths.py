"""Where a normalised memory writes: write strengths on passkey filler and on the key line.

    python bench/write_strengths.py                   # the embedded model
    python bench/write_strengths.py --model DIR
    python bench/write_strengths.py --tokens          # also each key-line token's strength
    python bench/write_strengths.py --book moby_dick_pg2701.txt   # also on book text
    python bench/write_strengths.py --book war_and_peace_pg2600.txt --book-tokens 32768

One passkey prompt (4K tokens, key at depth 0.1) is read in one call. Per layer
and head: the share of filler tokens written with strength exactly 0, the mean
strength on filler and on the key line, and how many of the head's key
directions one period of filler (27 tokens) leaves above 10% after 4K, 32K,
128K and 1M tokens of it: the eigenvalues of the product of (I - b k k^T) over
the period, raised to the number of periods. A stored key survives long filler
only in those directions. ``--tokens`` adds, per token of the key line, the
largest strength over each layer's heads (does the "." that ends the key write?).
``--book`` adds, per layer, the share of ``--book-tokens`` tokens of that book
(4,096 from its 20,000th token on) written with a strength above 0 (of heads x
tokens, and of tokens any head writes on) and the mean strength: a write on
book text is one a needle hidden in it can lose its value to.
"""

import argparse

import infini_mlx

# isort: split
import mlx.core as mx
import numpy as np

from infini_mlx.data import BOOKS_DIR, book_text
from infini_mlx.tasks import Pieces, info_line, passkey_prompt
from infini_mlx.train import logged_cache

KEY = 12345
LENGTHS = {"4K": 4096, "32K": 32768, "128K": 131072, "1M": 1 << 20}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--tokens", action="store_true", help="also print each key-line token's strength per layer")
    p.add_argument("--book", help="also measure on book text (a file name in the books folder)")
    p.add_argument("--book-tokens", type=int, default=4096, help="how many of the book's tokens (from the 20,000th)")
    a = p.parse_args()
    model, tok = infini_mlx.load(a.model)
    cfg = model.infini_config
    if cfg.memory != "normalized":
        raise SystemExit("error: this measures the normalised memory (infini.memory = normalized)")
    pieces = Pieces(tok)
    x = passkey_prompt(pieces, 4096, 0.1, KEY).array()
    info = pieces.line(info_line(KEY))
    at = next(i for i in range(len(x)) if list(x[i : i + len(info)]) == info)

    # The memory's keys come from each layer's _memory_inputs; the strengths from the cache's log.
    keys = []
    for layer in model.model.layers:
        attn = layer.self_attn
        f = attn._memory_inputs
        attn._memory_inputs = lambda *args, f=f: (lambda out: keys.append(out[1]) or out)(f(*args))
    cache = logged_cache(model)
    mx.eval(model(mx.array(x)[None], cache=cache))

    period = len(pieces.garbage)
    fill = slice(2000, 3000)  # filler after the key line
    print(f"model: {a.model or 'embedded'}, write_gate {cfg.write_gate}, write_conv {cfg.write_conv}")
    print("layer head  zero  b filler  b key line  directions kept: " + " ".join(f"{n:>5}" for n in LENGTHS))
    for li, (c, k) in enumerate(zip(cache, keys)):
        beta, K = np.array(c.write_log[0][0]), np.array(k[0])
        for h in range(beta.shape[0]):
            P = np.eye(K.shape[-1])
            for t in range(fill.start, fill.start + period):
                P = (np.eye(K.shape[-1]) - beta[h, t] * np.outer(K[h, t], K[h, t])) @ P
            ev = np.abs(np.linalg.eigvals(P))
            kept = [int((ev ** (n / period) > 0.1).sum()) for n in LENGTHS.values()]
            print(
                f"{li:>5} {h:>4} {np.mean(beta[h, fill] == 0):5.2f} {beta[h, fill].mean():9.3f}"
                f" {beta[h, at : at + len(info)].mean():11.3f}  {'':16}" + " ".join(f"{n:>5}" for n in kept)
            )

    if a.tokens:
        names = tok.convert_ids_to_tokens([int(t) for t in info])
        print("\nkey-line token  " + " ".join(f"{'layer ' + str(i):>8}" for i in range(len(cache))))
        for j, name in enumerate(names):
            row = [np.array(c.write_log[0][0])[:, at + j].max() for c in cache]
            print(f"{name!r:<15} " + " ".join(f"{b:8.3f}" for b in row))

    if a.book:
        ids = tok.encode(book_text(BOOKS_DIR / a.book), add_special_tokens=False)[20000 : 20000 + a.book_tokens]
        cache = logged_cache(model)
        mx.eval(model(mx.array(ids)[None], cache=cache))
        print(f"\n{a.book}, {len(ids)} tokens\nlayer  written  any head  mean b")
        for li, c in enumerate(cache):
            beta = np.array(c.write_log[0][0])  # (H, T)
            print(f"{li:>5} {np.mean(beta > 0):8.3f} {np.mean((beta > 0).any(0)):9.3f} {beta.mean():7.3f}")


if __name__ == "__main__":
    main()
