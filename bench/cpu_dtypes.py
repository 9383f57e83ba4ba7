"""Reading and decoding speed of one model stored in float32, float16, bfloat16, 8-bit and 4-bit.

A random-weight Llama-style model (the one of bench/prefill.py, 24.6M
parameters), stored and computed in each way (not cast as ``infini_mlx.load``
casts on CPU), is upcycled, reads ``--tokens`` random tokens with
``infini_mlx.prefill`` (segments of 512), then decodes ``--decode`` tokens one
at a time; each variant runs in its own subprocess, best of ``--repeats``.
Prints a Markdown table.

    python bench/cpu_dtypes.py
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefill import MODEL  # noqa: E402  the same 24.6M-parameter bench model

# name: (dtype of the floating weights, quantization bits or None)
VARIANTS = {
    "float32": ("float32", None),
    "float16": ("float16", None),
    "bfloat16": ("bfloat16", None),
    "8-bit (float16 scales)": ("float16", 8),
    "4-bit (float16 scales)": ("float16", 4),
    "8-bit (float32 scales)": ("float32", 8),
    "4-bit (float32 scales)": ("float32", 4),
}


def run_one(variant: str, tokens: int, decode: int) -> dict:
    import infini_mlx  # noqa: F401  first: on Linux it loads OpenBLAS before MLX loads

    # isort: split
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.models import llama
    from mlx_lm.utils import quantize_model

    from infini_mlx import InfiniConfig, prefill, upcycle

    dtype, bits = VARIANTS[variant]
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(MODEL))
    model.update(tree_map(lambda v: v.astype(getattr(mx, dtype)), model.parameters()))
    if bits:
        quantize_model(model, {}, 64, bits)
    mx.eval(model.parameters())
    upcycle(model, "llama", InfiniConfig(segment_len=512))
    ids = mx.random.randint(0, MODEL["vocab_size"], (tokens,)).tolist()
    cache = model.make_cache()
    tic = time.perf_counter()
    logits = prefill(model, ids, cache)
    read_s = time.perf_counter() - tic
    y = mx.argmax(logits)
    tic = time.perf_counter()
    for _ in range(decode):
        y = mx.argmax(model(y.reshape(1, 1), cache=cache)[0, -1])
        mx.eval(y)
    decode_s = time.perf_counter() - tic
    return dict(variant=variant, read_tok_s=tokens / read_s, decode_tok_s=decode / decode_s)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.tokens, a.decode)))
        return
    print("| weights | reading tokens/s | decoding tokens/s |\n|---|---:|---:|")
    for v in VARIANTS:
        runs = []
        for _ in range(a.repeats):
            out = subprocess.run(
                [sys.executable, __file__, "--one", v, "--tokens", str(a.tokens), "--decode", str(a.decode)],
                capture_output=True, text=True, check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = max(runs, key=lambda r: r["read_tok_s"])
        d = max(r["decode_tok_s"] for r in runs)
        print(f"| {v} | {r['read_tok_s']:,.0f} | {d:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
