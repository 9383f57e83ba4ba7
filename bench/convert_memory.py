"""Peak memory of `infini convert` on a multi-shard checkpoint, against its largest shard.

    # a 4-shard Llama checkpoint (torch.save .bin shards need torch; safetensors need numpy + safetensors)
    python bench/convert_memory.py make /tmp/bench_bin --format bin
    python bench/convert_memory.py make /tmp/bench_st --format safetensors
    # convert each in a fresh process and report its peak RSS and MLX's peak memory
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python bench/convert_memory.py measure /tmp/bench_bin

The converting process's RSS right before it starts converting (Python, MLX,
mlx-lm imported) is the baseline; the table reports the peak above it.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

CONFIG = dict(model_type="llama", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
              num_key_value_heads=16, num_hidden_layers=8, rms_norm_eps=1e-5, vocab_size=8192,
              rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32")


def _weights():
    c, rng = CONFIG, np.random.default_rng(0)
    d, i, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    w = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,), "lm_head.weight": (V, d)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        w.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
        w.update({p + f"self_attn.{k}_proj.weight": (d, d) for k in "qkvo"})
        w.update({p + "mlp.gate_proj.weight": (i, d), p + "mlp.up_proj.weight": (i, d), p + "mlp.down_proj.weight": (d, i)})
    for k, shape in w.items():  # one tensor at a time, so making the files stays small too
        yield k, (rng.standard_normal(shape, dtype=np.float32) * 0.02)


def make(out: Path, fmt: str, shards: int):
    out.mkdir(parents=True, exist_ok=False)
    if fmt == "bin":
        import torch
    else:
        from safetensors.numpy import save_file
    names = [k for k, _ in _weights()]
    per = -(-len(names) // shards)
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    weight_map, part, s = {}, {}, 0
    for n, (k, a) in enumerate(_weights()):
        part[k] = torch.from_numpy(a) if fmt == "bin" else a
        if len(part) == per or n == len(names) - 1:
            s += 1
            fname = f"{stem}-{s:05d}-of-{shards:05d}.{ext}"
            torch.save(part, out / fname) if fmt == "bin" else save_file(part, str(out / fname))
            weight_map.update({k: fname for k in part})
            part = {}
    (out / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(CONFIG))


_CHILD = """
import json, sys
import mlx.core as mx
from infini_mlx.converters import convert
def rss(key):
    return int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) * 1024
base = rss('VmRSS')
mx.reset_peak_memory()
convert(sys.argv[1], sys.argv[2], quantize=sys.argv[3] == '1', q_group_size=64, q_bits=4)
print(json.dumps(dict(base=base, peak=rss('VmHWM'), mlx=mx.get_peak_memory())))
"""


def measure(src: Path, quantize: bool):
    dst = src.with_name(src.name + ("_q4" if quantize else "") + "_converted")
    subprocess.run(["rm", "-rf", str(dst)], check=True)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst), "1" if quantize else "0"],
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    r = json.loads(out)
    files = [p for p in src.iterdir() if p.suffix in (".bin", ".safetensors")]
    mib = 2**20
    print(f"| {src.name}{' -q' if quantize else ''} | {len(files)} | {sum(p.stat().st_size for p in files) / mib:.1f} "
          f"| {max(p.stat().st_size for p in files) / mib:.1f} | {(r['peak'] - r['base']) / mib:.1f} "
          f"| {r['mlx'] / mib:.1f} | {r['base'] / mib:.0f} |")
    subprocess.run(["rm", "-rf", str(dst)], check=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out", type=Path)
    m.add_argument("--format", choices=("bin", "safetensors"), default="bin")
    m.add_argument("--shards", type=int, default=4)
    s = sub.add_parser("measure")
    s.add_argument("src", type=Path, nargs="+")
    s.add_argument("--quantize", action="store_true")
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.out, a.format, a.shards)
    else:
        print("| checkpoint | shards | total MiB | largest shard MiB | peak RSS above baseline MiB "
              "| mx.get_peak_memory MiB | baseline RSS MiB |")
        print("|---|---|---|---|---|---|---|")
        for src in a.src:
            measure(src, a.quantize)
