"""A passkey hidden in ordinary prose, asked the way a user asks: `infini query FILE QUESTION`.

Documents are windows of the held-out books (never seen in training) with the
paper's passkey line inserted after a sentence at a random depth; each is
answered by the real `infini query` command, and an answer counts when the
first integer in it is the key.

    python bench/prose_passkey.py --tokens 32768 --docs 20 [--model DIR]
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from infini_mlx import load
from infini_mlx.data import BOOKS_DIR, HELD_OUT_BOOKS, book_text
from infini_mlx.tasks import MAX_PASSKEY, info_line


def documents(tokenizer, n_tokens: int, n_docs: int, seed: int):
    """(text, key, depth) of ``n_docs`` held-out windows of about ``n_tokens`` tokens."""
    rng = np.random.default_rng(seed)
    texts = [book_text(BOOKS_DIR / b) for b in HELD_OUT_BOOKS]
    for i in range(n_docs):
        text = texts[i % len(texts)]
        chars = int(n_tokens * len(text) / len(tokenizer.encode(text[:200_000])) * 200_000 / len(text))
        chars = min(chars, len(text) - 1)
        a = int(rng.integers(0, len(text) - chars))
        window = text[a : a + chars]
        ends = [m.end() for m in re.finditer(r"[.!?] ", window)] or [0]
        depth = float(rng.random())
        cut = min(ends, key=lambda e: abs(e - depth * len(window)))
        key = int(rng.integers(1, MAX_PASSKEY + 1))
        yield window[:cut] + info_line(key) + " " + window[cut:], key, cut / len(window)


def document_args(p: argparse.ArgumentParser):
    """The options that choose the model and the documents (shared with ``bench/prose_read.py``)."""
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--docs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    document_args(p)
    p.add_argument("--question", default="What is the pass key?")
    a = p.parse_args()
    _, tok = load(a.model)
    right, t0, n_tok = 0, time.time(), 0
    with tempfile.TemporaryDirectory() as d:
        for i, (text, key, depth) in enumerate(documents(tok, a.tokens, a.docs, a.seed)):
            f = Path(d) / f"doc{i}.txt"
            f.write_text(text)
            cmd = ["infini", "query", str(f), a.question, "--max-tokens", "12", "--json"]
            if a.model:
                cmd += ["--model", a.model]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"infini query failed: {out.stderr.strip().splitlines()[-1]}")
            r = json.loads(out.stdout)
            got = re.search(r"\d+", r["answer"])
            ok = got is not None and int(got.group()) == key
            right += ok
            n_tok += r["tokens_read"]
            print(f"doc {i:2d}  {r['tokens_read']:>7,} tokens  depth {depth:.2f}  key {key:>5}  "
                  f"answer {r['answer'].strip()[:24]!r:28} {'ok' if ok else 'WRONG'}", flush=True)
    print(f"prose passkey, {a.tokens // 1024}K-token documents: {right}/{a.docs} "
          f"({right / a.docs:.0%}) answered, {n_tok / (time.time() - t0):,.0f} tokens/s overall")


if __name__ == "__main__":
    main()
