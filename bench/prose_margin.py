"""How surely the model answers the prose passkey question: the answer's margins, teacher-forced.

For each document of ``bench/prose_passkey.py`` (same seed, same documents) the
text (a BOS first, blocks of 4,096 tokens) and then the question as ``infini
query`` asks it and the right answer (" KEY.") are read, the question starting
a segment of its own as ``InfiniSession`` starts it (``--continue-segment``: in
the text's last segment, as before), and at each answer token the right token's
logit minus the best other one is taken. The
least of them is the document's margin: above 0, greedy decoding answers
exactly. Twenty documents answered or not move by whole documents between
close models; the mean margin and the answer's log-probability move smoothly,
so candidates can be told apart on fewer documents.

    python bench/prose_margin.py --model DIR --seed 2 [--docs 20] [--continue-segment]
"""

import argparse

import infini_mlx  # first: OpenBLAS before MLX

# isort: split
import mlx.core as mx
import numpy as np
from prose_passkey import document_args, documents

from infini_mlx.tasks import plain_question


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    document_args(p)
    p.add_argument("--continue-segment", action="store_true",
                   help="the question goes on in the text's last segment (before InfiniSession.question_segment)")
    a = p.parse_args()
    model, tok = infini_mlx.load(a.model)
    margins, logps = [], []
    for i, (text, key, depth) in enumerate(documents(tok, a.tokens, a.docs, a.seed)):
        ids = tok.encode(text)
        ans = tok.encode(f" {key}.", add_special_tokens=False)
        ask = tok.encode("\n\n" + plain_question("What is the pass key?"), add_special_tokens=False) + ans
        cache = model.make_cache()
        for s in range(0, len(ids), 4096):
            mx.eval(model(mx.array(ids[s : s + 4096])[None], cache=cache))
        if not a.continue_segment:
            for c in cache:
                c.end_segment()
        # The question's last token and the answer's tokens but the last predict the answer.
        z = np.array(model(mx.array(ask)[None], cache=cache)[0, -len(ans) - 1 : -1].astype(mx.float32))
        right = z[np.arange(len(ans)), ans]
        other = z.copy()
        other[np.arange(len(ans)), ans] = -np.inf
        m = right - other.max(1)
        lp = right - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) - z.max(1)
        margins.append(m.min())
        logps.append(lp.sum())
        worst = int(np.argmin(m))
        print(f"doc {i:2d}  key {key:>5}  depth {depth:.2f}  margin {m.min():+6.2f} "
              f"(at {tok.decode(ans[: worst + 1])!r:9} -> {tok.decode([int(other[worst].argmax())])!r})  "
              f"log p(answer) {lp.sum():7.2f}", flush=True)
    margins = np.array(margins)
    print(f"prose margin, {a.tokens // 1024}K-token documents: {int((margins > 0).sum())}/{a.docs} above 0, "
          f"mean margin {margins.mean():+.2f}, median {np.median(margins):+.2f}, "
          f"mean log p(answer) {np.mean(logps):.2f}")


if __name__ == "__main__":
    main()
