"""Needle recall by prompt length and number of facts: does a fact fade, or do facts collide?

    python bench/needle_facts.py                                  # the embedded model
    python bench/needle_facts.py --model DIR --lengths 1k,32k --facts 1,4 --trials 20

The prompts of ``infini passkey --needle`` (book text of the training books,
"The special code for <name> is <value>." lines at random depths, one asked),
with 1 to 4 facts. One fact at every length separates fading (text read after
a fact erases it) from interference (four facts in a short prompt); a miss
that answers another fact's value is counted apart. Seeded by length and
number of facts, so models are compared on the same prompts. With several
facts, the last two columns split the exact answers by where the asked fact
was written: first or last of them (a delta-rule memory's later writes
overwrite earlier ones under alike keys). ``--gaps`` also splits them by
how far the asked fact lies from its nearest other fact (the gap in depth
times the prompt's length, in tokens).

``--misses`` sorts the misses: another fact's value, a wrong first digit,
the right digits with a wrong last one, a value run on or stopped short
(its digits a prefix of the other), or a wrong digit in between.
``--hay grass`` hides the facts in the passkey's grass/sky filler instead of
book text (the shipped memory writes nothing there). ``--prompts-of 32k``
draws every length's prompts as for 32K tokens (the same facts, depths and
question) and builds them at each of ``--lengths``: does a model lose facts
to the length, or to which facts a length's draw happened to hold?
``--seed`` draws other prompts (0: the ones the model card quotes).
"""

import argparse

import infini_mlx

# isort: split
import numpy as np

from infini_mlx.passkey import (
    format_length,
    greedy_answers,
    needle_hay,
    parse_length,
    prefill_batch,
)
from infini_mlx.tasks import MAX_PASSKEY, NEEDLE_NAMES, Pieces, needle_prompt

GAP_BINS = (0, 32, 64, 128, 256)
MISSES = ("another fact", "first digit", "last digit", "run on / short", "a middle digit")


def miss_kind(got, answer: int, values) -> str:
    """Which of ``MISSES`` a wrong answer is (None: nothing parsed, a wrong first digit)."""
    g, a = str(got), str(answer)
    if got in values:
        return MISSES[0]
    if got is None or g[0] != a[0]:
        return MISSES[1]
    if g.startswith(a) or a.startswith(g):
        return MISSES[3]
    if len(g) == len(a) and g[:-1] == a[:-1]:
        return MISSES[2]
    return MISSES[4]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--lengths", default="1k,4k,32k", help="prompt lengths in tokens")
    p.add_argument("--facts", default="1,4", help="numbers of facts per prompt")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--gaps", action="store_true", help="split exact answers by the distance to the nearest other fact")
    p.add_argument("--misses", action="store_true", help="sort the misses by kind")
    p.add_argument("--hay", choices=("books", "grass"), default="books", help="the text the facts hide in")
    p.add_argument("--prompts-of", default=None, help="draw the prompts as for this length, build them at each length")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    model, tok = infini_mlx.load(a.model)
    pieces = Pieces(tok)
    lengths = list(map(parse_length, a.lengths.split(",")))
    drawn_at = parse_length(a.prompts_of) if a.prompts_of else None
    if a.hay == "grass":  # periodic: any start will do
        hay = np.fromiter(pieces.filler(max(lengths) + (drawn_at or 0) + 65536), np.int32)
    else:
        hay = needle_hay(tok)
    print(f"{'length':>7} {'facts':>5} {'exact':>6} {'another fact':>13} trials {'first written':>13} {'last written':>13}")
    for L in lengths:
        for nf in map(int, a.facts.split(",")):
            drawn = drawn_at or L
            rng = np.random.default_rng([a.seed, drawn, nf])
            prompts = []
            for _ in range(a.trials):
                names = rng.choice(len(NEEDLE_NAMES), nf, replace=False)
                facts = [(NEEDLE_NAMES[i], int(rng.integers(1, MAX_PASSKEY + 1))) for i in names]
                start, ask = int(rng.integers(0, len(hay) - drawn)), int(rng.integers(nf))
                start = min(start, len(hay) - L)
                depths = rng.random(nf)
                gap = min((abs(depths[ask] - d) for j, d in enumerate(depths) if j != ask), default=1.0) * L
                prompts.append((facts, needle_prompt(pieces, hay, L, facts, depths, ask, start), gap))
            hit = 0
            by_gap = {b: [0, 0] for b in GAP_BINS}
            ends = {0: [0, 0], nf - 1: [0, 0]}  # write rank -> [exact, asked]
            kinds = dict.fromkeys(MISSES, 0)
            for i in range(0, a.trials, a.batch):
                chunk = prompts[i : i + a.batch]
                cache, logits = prefill_batch(model, [q.tokens() for _, q, _ in chunk], L)
                for got, (facts, q, gap) in zip(greedy_answers(model, tok, cache, logits), chunk):
                    b = max(b for b in GAP_BINS if gap >= b)
                    by_gap[b][0] += got == q.answer
                    by_gap[b][1] += 1
                    hit += got == q.answer
                    if got != q.answer:
                        kinds[miss_kind(got, q.answer, [v for _, v in facts])] += 1
                    rank = q.facts.index(q.answer)
                    if rank in ends:
                        ends[rank][0] += got == q.answer
                        ends[rank][1] += 1
            n = a.trials
            split = "".join(f" {f'{h}/{m}':>13}" for h, m in (ends[0], ends[nf - 1])) if nf > 1 else ""
            print(f"{format_length(L):>7} {nf:>5} {hit / n:>6.0%} {kinds[MISSES[0]] / n:>13.0%} {n:>6}{split}", flush=True)
            if a.gaps and nf > 1:
                cells = ", ".join(f"{b}+: {h}/{m}" for b, (h, m) in by_gap.items() if m)
                print(f"{'':>7} nearest other fact (tokens) {cells}", flush=True)
            if a.misses:
                print(f"{'':>7} misses: " + ", ".join(f"{k} {m}" for k, m in kinds.items()), flush=True)


if __name__ == "__main__":
    main()
