"""Passkey exact match by the key's number of digits: does the model read where a key ends?

    python bench/key_lengths.py                                   # the embedded model
    python bench/key_lengths.py --model DIR --lengths 4k,32k --trials 20

The prompts of ``infini passkey`` (the paper's format, grass/sky filler, the
key line at a random depth), with keys of 1 to 5 digits drawn evenly. The
paper draws keys from 1-50,000, so four in five have five digits and a model
can answer most of them without knowing where a key ends; keys of one or two
digits then run on ("27" -> "2770"). ``--range paper`` keeps 5-digit keys in
10,000-50,000 as the paper draws them; ``full`` draws them from 10,000-99,999
(a key that starts with 5-9 is then five digits long, which no paper key is).
Seeded by length and digits, so models are compared on the same prompts.
"""

import argparse

import infini_mlx

# isort: split
import numpy as np

from infini_mlx.passkey import format_length, greedy_answers, parse_length, prefill_batch
from infini_mlx.tasks import MAX_PASSKEY, Pieces, passkey_prompt


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--lengths", default="4k", help="prompt lengths in tokens")
    p.add_argument("--digits", default="1,2,3,4,5", help="numbers of digits of the keys")
    p.add_argument("--range", choices=("paper", "full"), default="paper", help="5-digit keys up to 50,000 or 99,999")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--batch", type=int, default=10)
    a = p.parse_args()
    model, tok = infini_mlx.load(a.model)
    pieces = Pieces(tok)
    top = MAX_PASSKEY if a.range == "paper" else 99999
    print(f"{'length':>7} {'digits':>6} {'exact':>6} {'too long':>9} {'too short':>10} trials")
    for L in map(parse_length, a.lengths.split(",")):
        for nd in map(int, a.digits.split(",")):
            rng = np.random.default_rng([1, L, nd])
            keys = [int(rng.integers(10 ** (nd - 1), min(10**nd - 1, top) + 1)) for _ in range(a.trials)]
            prompts = [passkey_prompt(pieces, L, float(rng.random()), k) for k in keys]
            hit = long = short = 0
            for i in range(0, a.trials, a.batch):
                chunk = prompts[i : i + a.batch]
                cache, logits = prefill_batch(model, [q.tokens() for q in chunk], L)
                for got, q in zip(greedy_answers(model, tok, cache, logits), chunk):
                    n = len(str(got)) if got is not None else 0
                    hit += got == q.answer
                    long += got != q.answer and n > nd
                    short += got != q.answer and 0 < n < nd
            n = a.trials
            print(f"{format_length(L):>7} {nd:>6} {hit / n:>6.0%} {long / n:>9.0%} {short / n:>10.0%} {n:>6}", flush=True)


if __name__ == "__main__":
    main()
