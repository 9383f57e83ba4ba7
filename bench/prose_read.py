"""What the question's query prefers among the memory's writes, in the prose passkey documents.

For each document of ``bench/prose_passkey.py`` (same seed, same documents) the
text and the question after it, as ``infini query`` asks it, are tokenized as one
text (a BOS first) and read in blocks of 4,096 tokens, and one head's memory query at the last prompt token
("Answer:") is scored against every key that head wrote (write strength above
0): the score of the key's first digit (its first mention) and each written key
that scores higher, with its offset from the key and the text that ends there.
A key the question's query does not prefer is one the read may miss.

    python bench/prose_read.py --model DIR --seed 2 [--layer 0 --head 1]
"""

import argparse

import infini_mlx  # first: OpenBLAS before MLX

# isort: split
import mlx.core as mx
import numpy as np
from prose_passkey import document_args, documents

from infini_mlx.tasks import plain_question
from infini_mlx.train import logged_cache


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    document_args(p)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--head", type=int, default=1)
    a = p.parse_args()
    model, tok = infini_mlx.load(a.model)
    if model.infini_config.memory != "normalized":
        raise SystemExit("error: this measures the normalised memory (infini.memory = normalized)")
    attn = model.model.layers[a.layer].self_attn
    got, inputs = [], attn._memory_inputs

    def hook(*args):
        q, k, v, beta = inputs(*args)
        got.append((np.array(q[0, a.head]), np.array(k[0, a.head]), np.array(beta[0, a.head]).reshape(-1)))
        return q, k, v, beta

    attn._memory_inputs = hook
    print(f"layer {a.layer} head {a.head}: score of the key's first digit, written keys above it (offset: text)")
    for i, (text, key, _) in enumerate(documents(tok, a.tokens, a.docs, a.seed)):
        ids = tok.encode(text + "\n\n" + plain_question("What is the pass key?"))
        got.clear()
        cache = logged_cache(model)
        for s in range(0, len(ids), 4096):
            mx.eval(model(mx.array(ids[s : s + 4096])[None], cache=cache))
        Q, K, B = (np.concatenate([g[j] for g in got], 0 if j < 2 else -1) for j in range(3))
        digits = tok.convert_tokens_to_ids(list(str(key)))
        at = next(j for j in range(len(ids)) if ids[j : j + len(digits)] == digits)
        s = K @ Q[-1]
        above = [t for t in np.flatnonzero(B > 0) if s[t] > s[at]]
        ctx = "; ".join(f"{t - at:+d}: {tok.decode(ids[max(0, t - 4) : t + 1])!r} {s[t]:.2f}" for t in above)
        print(f"doc {i:2d}  key {key:>5}  written {B[at]:.2f}  score {s[at]:.2f}  "
              f"above it {len(above)} of {int((B > 0).sum())}  {ctx}", flush=True)


if __name__ == "__main__":
    main()
