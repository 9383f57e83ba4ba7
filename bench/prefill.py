"""Prefill benchmark: Infini streaming vs mlx-lm's KVCache and RotatingKVCache.

A random-weight Llama-style model of about 25M parameters in float32 reads
random tokens; each (method, length) runs in its own subprocess so that peak
RSS belongs to that run alone. Prints a Markdown table.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python bench/prefill.py
    python bench/prefill.py --lengths 2k,8k,32k,128k,1m   # 1M too
"""

import argparse
import json
import resource
import subprocess
import sys
import time

MODEL = dict(
    model_type="llama",
    hidden_size=512,
    num_hidden_layers=6,
    intermediate_size=1536,
    num_attention_heads=4,
    num_key_value_heads=4,
    rms_norm_eps=1e-5,
    vocab_size=8192,
    tie_word_embeddings=True,
)
METHODS = ("infini", "kv", "rotating")
LIMIT_S = 600


def parse_len(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(s[-1], 1)
    return int(float(s.rstrip("km")) * mult)


def run_one(method: str, length: int, segment_len: int, step: int) -> dict:
    """Runs in a fresh subprocess: build the model, prefill, report."""
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    from infini_mlx import InfiniConfig, prefill, upcycle

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(MODEL))
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
    tokens = mx.random.randint(0, MODEL["vocab_size"], (length,)).tolist()

    if method == "infini":
        upcycle(model, "llama", InfiniConfig(segment_len=segment_len))
        cache = model.make_cache()
    elif method == "kv":
        cache = [KVCache() for _ in model.layers]
    else:
        cache = [RotatingKVCache(max_size=segment_len, keep=4) for _ in model.layers]

    weights = mx.get_active_memory()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    if method == "infini":
        logits = prefill(model, tokens, cache, block_size=step)
    else:
        # As mlx_lm.generate_step prefills: chunks, evaluating the cache state after each.
        for i in range(0, length, step):
            logits = model(mx.array(tokens[i : i + step])[None], cache=cache)[0, -1]
            mx.eval([c.state for c in cache])
        mx.eval(logits)
    dt = time.perf_counter() - tic
    return dict(
        method=method,
        length=length,
        params=n_params,
        seconds=dt,
        tok_s=length / dt,
        peak_mlx_mb=mx.get_peak_memory() / 2**20,
        working_mb=(mx.get_peak_memory() - weights) / 2**20,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        cache_mb=sum(c.nbytes for c in cache) / 2**20,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="2k,8k,32k,128k")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--segment-len", type=int, default=2048)
    p.add_argument("--prefill-step", type=int, default=512)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one:
        method, length = args.one.split(":")
        print(json.dumps(run_one(method, int(length), args.segment_len, args.prefill_step)))
        return

    lengths = [parse_len(s) for s in args.lengths.split(",")]
    rows, skipped = [], {}
    for method in args.methods.split(","):
        done = []
        for length in lengths:
            if method in skipped:
                rows.append(dict(method=method, length=length, skip=skipped[method]))
                continue
            # KVCache prefill time is a*L + b*L^2: skip what would pass the limit.
            if len(done) >= 2 and method == "kv":
                (l1, t1), (l2, t2) = [(r["length"], r["seconds"]) for r in done[-2:]]
                b = max(0.0, (t2 / l2 - t1 / l1) / (l2 - l1))
                est = (t2 / l2 - b * l2) * length + b * length**2
                if est > LIMIT_S:
                    rows.append(dict(method=method, length=length, skip=f"skipped: ~{est/60:.0f} min expected"))
                    skipped[method] = "skipped (longer still)"
                    continue
            cmd = [sys.executable, __file__, "--one", f"{method}:{length}",
                   "--segment-len", str(args.segment_len), "--prefill-step", str(args.prefill_step)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=1.5 * LIMIT_S)
            except subprocess.TimeoutExpired:
                rows.append(dict(method=method, length=length, skip="stopped: over 15 min"))
                skipped[method] = "skipped (longer still)"
                continue
            if out.returncode != 0:
                rows.append(dict(method=method, length=length, skip="failed: " + out.stderr.strip().splitlines()[-1]))
                continue
            done.append(json.loads(out.stdout.strip().splitlines()[-1]))
            rows.append(done[-1])
            print(f"# {method} {length}: {done[-1]['tok_s']:.0f} tok/s", file=sys.stderr, flush=True)

    params = next((r["params"] for r in rows if "params" in r), 0)
    print(f"\nLlama-style model, {params/1e6:.1f}M parameters ({params*4/2**20:.0f} MB), float32, "
          f"segment_len {args.segment_len}, prefill chunks of {args.prefill_step} tokens for "
          f"every method, RotatingKVCache max_size {args.segment_len} (keep 4)\n")
    print("| method | tokens | tokens/s | peak MLX memory (MB) | of which beyond weights (MB) "
          "| peak RSS (MB) | final cache (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    names = {"infini": "Infini streaming", "kv": "mlx-lm KVCache", "rotating": "mlx-lm RotatingKVCache"}
    for r in rows:
        n = f"{r['length'] // 1024}K" if r["length"] < 2**20 else f"{r['length'] // 2**20}M"
        if "skip" in r:
            print(f"| {names[r['method']]} | {n} | {r['skip']} | | | | |")
        else:
            print(f"| {names[r['method']]} | {n} | {r['tok_s']:,.0f} | {r['peak_mlx_mb']:,.0f} "
                  f"| {r['working_mb']:,.0f} | {r['peak_rss_mb']:,.0f} | {r['cache_mb']:,.1f} |")


if __name__ == "__main__":
    main()
