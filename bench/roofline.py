"""Reading and decoding speed as a fraction of the CPU's measured matmul peak.

First measures the float32 matmul peak (2048 x 2048, best of 5) in this run;
then, for each model, method and length, in its own subprocess, after a
warm-up on a throwaway cache (2,048 tokens read, 2 decoded): reads the
tokens (Infini: ``infini_mlx.prefill``; mlx-lm ``KVCache`` and
``RotatingKVCache``: chunks of 512, the cache evaluated after each, as
``mlx_lm.generate_step`` prefills) and decodes ``--decode`` tokens one at a
time (the median token's time is reported). FLOPs counted: the weights'
matmuls (2 per parameter and token, the vocabulary projection only for decoded
tokens), causal attention over the keys each query sees (4 x heads x head_dim
per key), and for Infini the memory's read (2 x Dk x Dv per query head) and
write (4 x Dk x Dv per KV head).
Prints Markdown tables.

    python bench/roofline.py                                  # bench model, 2K and 32K
    python bench/roofline.py --models embedded --lengths 2k,1m --methods infini
    python bench/roofline.py --models smol --lengths 2k       # /tmp/smolf, if present
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefill import MODEL, parse_len  # noqa: E402  the 24.6M-parameter bench model

NAMES = {"infini": "Infini", "kv": "mlx-lm KVCache", "rotating": "mlx-lm RotatingKVCache"}


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    import infini_mlx  # noqa: F401  OpenBLAS before MLX

    # isort: split
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    best = 1e9
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best / 1e9


def build(name: str, method: str, segment_len: int):
    from mlx_lm.models import llama

    import infini_mlx

    # isort: split
    import mlx.core as mx

    if name == "bench":
        mx.random.seed(0)
        model = llama.Model(llama.ModelArgs.from_dict(MODEL))
        mx.eval(model.parameters())
        args = MODEL
        if method == "infini":
            infini_mlx.upcycle(model, "llama", infini_mlx.InfiniConfig(segment_len=segment_len))
    else:
        path = None if name == "embedded" else name
        if method == "infini":
            model, _ = infini_mlx.load(path, infini={"segment_len": segment_len} if segment_len else None)
        else:
            import mlx_lm

            model, _ = mlx_lm.load(str(path or Path(infini_mlx.__file__).parent / "default_model"))
        args = json.loads((Path(path or Path(infini_mlx.__file__).parent / "default_model") / "config.json").read_text())
    if method == "infini":
        window = model.make_cache()[0].segment_len
    else:
        window = 0 if method == "kv" else segment_len or 2048
    return model, args, window


def new_cache(model, method: str, window: int):
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    if method == "infini":
        return model.make_cache()
    if method == "kv":
        return [KVCache() for _ in model.layers]
    return [RotatingKVCache(max_size=window, keep=4) for _ in model.layers]


def read(model, method: str, tokens, cache):
    """Feed ``tokens``; the last token's logits. Infini: ``prefill``; mlx-lm caches: chunks of
    512, the cache evaluated after each, as ``mlx_lm.generate_step`` prefills."""
    import infini_mlx

    # isort: split
    import mlx.core as mx

    if method == "infini":
        return infini_mlx.prefill(model, tokens, cache)
    for i in range(0, len(tokens), 512):
        logits = model(mx.array(tokens[i : i + 512])[None], cache=cache)[0, -1]
        mx.eval([c.state for c in cache])
    mx.eval(logits)
    return logits


def flops(args, method, window, positions, logits: bool) -> float:
    """Matmul and attention FLOPs of tokens at ``positions`` (0-based) of a reading."""
    h, n, f, V = args["hidden_size"], args["num_hidden_layers"], args["intermediate_size"], args["vocab_size"]
    H = args["num_attention_heads"]
    Hkv = args.get("num_key_value_heads", H)
    D = args.get("head_dim") or h // H
    per_tok = n * 2 * (2 * h * H * D + 2 * h * Hkv * D + 3 * h * f) + (2 * h * V if logits else 0)
    if method == "infini":
        keys = sum(p % window + 1 for p in positions)
        per_tok += n * (2 * H * D * D + 4 * Hkv * D * D)
    elif method == "kv":
        keys = sum(p + 1 for p in positions)
    else:
        keys = sum(min(p + 1, window) for p in positions)
    return len(positions) * per_tok + n * 4 * H * D * keys


def warm_up(model, method, window, V):
    """Read 2,048 tokens and decode 2 on a throwaway cache: compiled kernels are
    built and traced on first use, a one-time cost the timed run should not carry."""
    import mlx.core as mx

    cache = new_cache(model, method, window)
    y = mx.argmax(read(model, method, mx.random.randint(0, V, (2048,), key=mx.random.key(2)).tolist(), cache))
    for _ in range(2):
        y = mx.argmax(model(y.reshape(1, 1), cache=cache)[0, -1])
        mx.eval(y)


def run_one(name, method, length, decode, segment_len) -> dict:
    import infini_mlx  # noqa: F401  OpenBLAS before MLX

    # isort: split
    import mlx.core as mx

    model, args, window = build(name, method, segment_len)
    V = args["vocab_size"]
    warm_up(model, method, window, V)
    cache = new_cache(model, method, window)
    weights = mx.get_active_memory()
    mx.reset_peak_memory()
    tokens = mx.random.randint(0, V, (length,), key=mx.random.key(1)).tolist()
    tic = time.perf_counter()
    logits = read(model, method, tokens, cache)
    read_s = time.perf_counter() - tic
    y = mx.argmax(logits)
    mx.eval(y)
    times = []
    for _ in range(decode):
        tic = time.perf_counter()
        y = mx.argmax(model(y.reshape(1, 1), cache=cache)[0, -1])
        mx.eval(y)
        times.append(time.perf_counter() - tic)
    # The median token: one token is a few milliseconds, so a stray process shows.
    dec_s = float(np.median(times)) if times else 0.0
    return dict(
        model=name, method=method, length=length, read_s=read_s, decode_s=dec_s,
        read_flops=flops(args, method, window, range(length), False),
        decode_flops=flops(args, method, window, range(length, length + decode), True) / max(decode, 1),
        peak_mb=mx.get_peak_memory() / 2**20, working_mb=(mx.get_peak_memory() - weights) / 2**20,
        rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def fmt_len(n):
    return f"{n // 2**20}M" if n >= 2**20 else f"{n // 1024}K"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bench", help="bench, embedded, smol (/tmp/smolf) or a directory")
    p.add_argument("--methods", default="infini,kv,rotating")
    p.add_argument("--lengths", default="2k,32k")
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--segment-len", type=int, default=0, help="default: 2048 for the bench model, else the model's")
    p.add_argument("--repeats", type=int, default=1, help="runs per cell, taken in turns; the fastest is shown")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        name, method, length = a.one.split(":")
        print(json.dumps(run_one(name, method, int(length), a.decode, a.segment_len)))
        return

    peak = matmul_peak()
    print(f"\nfloat32 matmul peak, 2048 x 2048, best of 5: **{peak:.1f} GFLOP/s**\n")
    print("| model | method | tokens | reading tokens/s | GFLOP/s | % of peak | decode ms/token "
          "| GFLOP/s | % of peak | peak MLX MB | peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in a.models.split(","):
        model = {"smol": "/tmp/smolf"}.get(name, name)
        if name == "smol" and not Path(model).exists():
            print("| smol | (no /tmp/smolf) | | | | | | | | | |")
            continue
        seg = a.segment_len or (2048 if name == "bench" else 0)
        cells = [(m, n) for m in a.methods.split(",") for n in map(parse_len, a.lengths.split(","))]
        runs = {c: [] for c in cells}
        # Repeats go round all cells in turn, so that a slow spell of the machine
        # does not fall on one method only.
        for _ in range(a.repeats):
            for method, length in cells:
                cmd = [sys.executable, __file__, "--one", f"{model}:{method}:{length}",
                       "--decode", str(a.decode), "--segment-len", str(seg)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    print(out.stderr[-2000:], file=sys.stderr)
                    continue
                runs[(method, length)].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for (method, length), rs in runs.items():
            if not rs:
                continue
            r = min(rs, key=lambda r: r["read_s"])
            d = min(r["decode_s"] for r in rs)
            rg = r["read_flops"] / r["read_s"] / 1e9
            dg = r["decode_flops"] / d / 1e9
            print(f"| {name} | {NAMES[method]} | {fmt_len(length)} | {length / r['read_s']:,.0f} "
                  f"| {rg:.1f} | {100 * rg / peak:.0f}% | {1e3 * d:.2f} | {dg:.1f} | {100 * dg / peak:.0f}% "
                  f"| {r['peak_mb']:,.0f} | {r['rss_mb']:,.0f} |", flush=True)

if __name__ == "__main__":
    main()
