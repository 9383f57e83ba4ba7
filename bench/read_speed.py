"""Reading speed of a session on a text file, best of N readings.

    python bench/read_speed.py                       # examples/alice.txt, embedded model, best of 3
    python bench/read_speed.py BOOK.txt --model DIR --repeats 5

Each reading is `InfiniSession.read` on a fresh session (a fresh memory) of the
same loaded model; the first one also pays for building compiled kernels.
"""

import argparse
import time
from pathlib import Path

import infini_mlx  # noqa: F401  OpenBLAS before MLX

# isort: split
import mlx.core as mx

from infini_mlx import InfiniSession

ALICE = Path(__file__).resolve().parent.parent / "examples" / "alice.txt"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", nargs="?", default=str(ALICE))
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    text = Path(a.file).read_text(encoding="utf-8")
    base = InfiniSession.load(a.model)
    rates = []
    for i in range(a.repeats):
        s = InfiniSession(base.model, base.tokenizer, base.meta["model"])
        mx.reset_peak_memory()
        tic = time.perf_counter()
        s.read(text)
        dt = time.perf_counter() - tic
        rates.append(s.tokens_read / dt)
        print(f"reading {i + 1}: {s.tokens_read:,} tokens in {dt:.2f} s, {rates[-1]:,.0f} tokens/s, "
              f"peak MLX {mx.get_peak_memory() / 2**20:.1f} MB", flush=True)
    print(f"best of {a.repeats}: {max(rates):,.0f} tokens/s")


if __name__ == "__main__":
    main()
