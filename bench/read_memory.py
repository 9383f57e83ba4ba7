"""Peak RSS of `infini read` on a 1 MB and a 30 MB text: memory must not grow with the input.

    python bench/read_memory.py [--model DIR] [--workdir DIR] [--sizes 1 30]

The texts are the training books concatenated (and repeated to reach the size);
each reading runs as its own `infini read` process, whose peak resident set is
taken from the kernel (wait4) when it exits. Without --model, a random
1.2M-parameter llama (bench/random_model.py) is made in the work directory.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from random_model import BOOKS, make  # noqa: E402

# Training books only (frankenstein and crime_and_punishment are held out).
TEXTS = [
    "alice_in_wonderland_pg11.txt",
    "pride_and_prejudice_pg1342.txt",
    "moby_dick_pg2701.txt",
    "count_of_monte_cristo_pg1184.txt",
    "war_and_peace_pg2600.txt",
]


def write_text(path: Path, size: int):
    """The books concatenated, repeated until ``size`` bytes, ended at a line."""
    with open(path, "wb") as out:
        n = 0
        while n < size:
            for name in TEXTS:
                for line in open(BOOKS / name, "rb"):
                    if n >= size:
                        return
                    out.write(line)
                    n += len(line)


def measure(infini: str, text: Path, state: Path, model: Path):
    cmd = [infini, "read", str(text), "-o", str(state), "--model", str(model), "--force", "--json"]
    with open(state.with_suffix(".json"), "w") as out:
        p = subprocess.Popen(cmd, stdout=out)
        _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    result = json.loads(state.with_suffix(".json").read_text())
    return usage.ru_maxrss * 1024, result  # KiB on Linux


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/infini-bench"))
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 30], help="MB (10^6 bytes)")
    a = p.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    model = a.model or a.workdir / "model"
    if not (model / "config.json").exists():
        make(model)
    infini = shutil.which("infini") or str(Path(sys.executable).parent / "infini")

    rows = []
    for mb in a.sizes:
        text = a.workdir / f"books-{mb}MB.txt"
        if not text.exists():
            write_text(text, mb * 10**6)
        rss, r = measure(infini, text, a.workdir / f"books-{mb}MB.state", model)
        rows.append((mb, text.stat().st_size, r["tokens_read"], r["seconds"], rss))
        print(f"{mb} MB: {r['tokens_read']:,} tokens, {r['seconds']:.0f} s, "
              f"peak RSS {rss / 2**20:.1f} MiB", flush=True)

    print(f"\nmodel: {model}\n")
    print("| input | bytes | tokens | seconds | tokens/s | peak RSS |")
    print("|---|---|---|---|---|---|")
    for mb, size, tokens, secs, rss in rows:
        print(f"| {mb} MB | {size:,} | {tokens:,} | {secs:,.0f} | {tokens / secs:,.0f} | {rss / 2**20:.1f} MiB |")
    lo, hi = min(r[4] for r in rows), max(r[4] for r in rows)
    print(f"\npeak RSS differs by {100 * (hi - lo) / lo:.2f}% between the sizes")


if __name__ == "__main__":
    main()
