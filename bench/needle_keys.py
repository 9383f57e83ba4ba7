"""How alike are the memory keys that four needle facts write? (Why four facts collide.)

    python bench/needle_keys.py                     # the embedded model, layer 0
    python bench/needle_keys.py --model DIR --layer 3

Four facts ("The special code for <name> is <value>.", 5-digit values) in
1,024 tokens of training-book text, 10 prompts. Per head, for each token of a
fact's line from " is" on: the mean cosine between the memory keys two
different facts have at that token (the keys the delta rule writes under,
after the convolution, SiLU and L2 norm), the mean of the smaller of their two
write strengths, and the mean cosine of two keys at random positions of the
prompt. With the delta rule, writing value v_j under key k_j erases the
share (k_i . k_j)^2 of what an earlier fact stored under k_i, times the
write strength: aligned keys of cosine 0.9 make four facts overwrite one
another. A last line asks whether the keys' common direction is to blame
(SiLU makes them nearly non-negative): the same cosines at the value's first
digit, and of random pairs, once every key has the mean key of its head
(over all prompts) taken away and is normalised again. The last line asks
whether the question finds its fact: the memory query of the token before
the answer's first digit (the prompt, then the answer's "▁"), its cosine
with the asked fact's first-digit key and with the other facts', and how
often the asked fact's key is the nearest of the four.
"""

import argparse

import infini_mlx

# isort: split
import mlx.core as mx
import numpy as np

from infini_mlx.passkey import needle_hay
from infini_mlx.tasks import MAX_PASSKEY, NEEDLE_NAMES, Pieces, needle_prompt
from infini_mlx.train import logged_cache

OFFSETS = 7  # " is", then the value's tokens


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--prompts", type=int, default=10)
    a = p.parse_args()
    model, tok = infini_mlx.load(a.model)
    pieces = Pieces(tok)
    hay = needle_hay(tok)
    attn = model.model.layers[a.layer].self_attn
    seen = []
    inputs = attn._memory_inputs
    attn._memory_inputs = lambda *args: seen.append(inputs(*args)) or seen[-1]

    rng = np.random.default_rng(0)
    cross, rand, labels, asked = [], [], None, []
    keys, first_digits = [], []  # every prompt's keys; each fact's first-digit position
    for _ in range(a.prompts):
        names = rng.choice(len(NEEDLE_NAMES), 4, replace=False)
        facts = [(NEEDLE_NAMES[i], int(rng.integers(10000, MAX_PASSKEY + 1))) for i in names]
        start = int(rng.integers(0, len(hay) - 1024))
        ask = int(rng.integers(4))
        x = list(needle_prompt(pieces, hay, 1024, facts, rng.random(4), ask, start).tokens())
        x += pieces.word(str(facts[ask][1]))[:1]  # the answer's "▁": its query reads the first digit
        seen.clear()
        mx.eval(model(mx.array(x)[None], cache=logged_cache(model)))
        k = np.array(mx.concatenate([s[1] for s in seen], axis=2)[0])  # H, N, D
        q = np.array(mx.concatenate([s[0] for s in seen], axis=2)[0])[:, -1]  # H, D
        b = np.array(mx.concatenate([s[3] for s in seen], axis=-2)[0]).reshape(k.shape[0], -1)
        firsts = []  # position of each fact's " is"
        for name, value in facts:
            line = pieces.line(f"The special code for {name} is {value}.")
            s = next(j for j in range(len(x)) if x[j : j + len(line)] == line)
            firsts.append(s + len(pieces.line(f"The special code for {name} is")) - 1)
        keys.append(k)
        first_digits.append([f + 2 for f in firsts])  # " is", "▁", then the first digit
        for h in range(k.shape[0]):
            c = k[h, first_digits[-1]] @ q[h]
            asked.append((h, c[ask], np.delete(c, ask).mean(), c[ask] > np.delete(c, ask).max()))
        if labels is None:
            labels = tok.convert_ids_to_tokens([x[firsts[0] + o] for o in range(OFFSETS)])
        for h in range(k.shape[0]):
            for o in range(OFFSETS):
                for i in range(4):
                    for j in range(i + 1, 4):
                        pi, pj = firsts[i] + o, firsts[j] + o
                        cross.append((h, o, float(k[h, pi] @ k[h, pj]), min(b[h, pi], b[h, pj])))
            r = rng.integers(0, len(x), (200, 2))
            rand.append((h, float(np.mean(np.sum(k[h, r[:, 0]] * k[h, r[:, 1]], -1)))))
    cross, rand = np.array(cross), np.array(rand)
    print(f"layer {a.layer}, {a.prompts} prompts: cosine of two facts' keys at the same token / smaller write strength")
    print("head  " + "  ".join(f"{t!s:>11}" for t in labels) + "   random pairs")
    for h in range(int(cross[:, 0].max()) + 1):
        cells = []
        for o in range(OFFSETS):
            m = (cross[:, 0] == h) & (cross[:, 1] == o)
            cells.append(f"{cross[m, 2].mean():5.2f}/{cross[m, 3].mean():.2f}")
        print(f"{h:4d}  " + "  ".join(f"{c:>11}" for c in cells) + f"   {rand[rand[:, 0] == h, 1].mean():12.2f}")
    mean = np.concatenate(keys, axis=1).mean(axis=1, keepdims=True)  # H, 1, D
    cells = []
    for h in range(mean.shape[0]):
        ff, rr = [], []
        for k, f in zip(keys, first_digits):
            c = k[h] - mean[h]
            c /= np.linalg.norm(c, axis=-1, keepdims=True)
            ff += [c[f[i]] @ c[f[j]] for i in range(4) for j in range(i + 1, 4)]
            r = rng.integers(0, len(c), (200, 2))
            rr.append(np.mean(np.sum(c[r[:, 0]] * c[r[:, 1]], -1)))
        cells.append(f"head {h} {np.mean(ff):.2f} (random {np.mean(rr):.2f})")
    print("first digit, the mean key taken away: " + ", ".join(cells))
    asked = np.array(asked, dtype=np.float64)
    cells = []
    for h in range(int(asked[:, 0].max()) + 1):
        m = asked[asked[:, 0] == h]
        cells.append(f"head {h} {m[:, 1].mean():.2f} vs {m[:, 2].mean():.2f}, nearest {m[:, 3].mean():.0%}")
    print("the question's query, first-digit keys of the asked fact vs another: " + ", ".join(cells))


if __name__ == "__main__":
    main()
