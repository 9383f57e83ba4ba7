"""How surely the model answers the prose passkey question: the answer's margins, teacher-forced.

For each document of ``bench/prose_passkey.py`` (same seed, same documents) the
text, the question as ``infini query`` asks it and the right answer (" KEY.")
are read as one token stream (a BOS first, blocks of 4,096 tokens), and at each
answer token the right token's logit minus the best other one is taken. The
least of them is the document's margin: above 0, greedy decoding answers
exactly. Twenty documents answered or not move by whole documents between
close models; the mean margin and the answer's log-probability move smoothly,
so candidates can be told apart on fewer documents.

    python bench/prose_margin.py --model DIR --seed 2 [--docs 20]
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
    a = p.parse_args()
    model, tok = infini_mlx.load(a.model)
    margins, logps = [], []
    for i, (text, key, depth) in enumerate(documents(tok, a.tokens, a.docs, a.seed)):
        ids = tok.encode(text + "\n\n" + plain_question("What is the pass key?"))
        ans = tok.encode(f" {key}.", add_special_tokens=False)
        ids += ans
        K, cache, tails = len(ans) + 1, model.make_cache(), []
        for s in range(0, len(ids), 4096):
            tails.append(model(mx.array(ids[s : s + 4096])[None], cache=cache)[0, -K:])
            mx.eval(tails[-1])
        # The last K positions of the stream; all but the last predict the answer's tokens.
        z = np.array(mx.concatenate(tails, 0)[-K:-1].astype(mx.float32))
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
