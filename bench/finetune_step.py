"""Seconds per training step of `infini train` fine-tuning a converted SmolLM2's memory.

Each configuration (batch x segment_len x segments, memory only or + LoRA,
loss on every position or on the answers only) runs the project's trainer
for a few passkey steps in its own subprocess, base frozen; the first steps
warm up, the rest are timed. Prints a Markdown table with the load average.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 nice -n 10 \\
        python bench/finetune_step.py --model /tmp/smolf
    python bench/finetune_step.py --model DIR --shapes 1x512x8 --lora 0,8 --loss full,answers
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

INFINI = {"memory": "normalized", "conv_size": 4}
ANSWER_POSITIONS = 16  # a passkey's answer digits (and the key's second mention), then random targets


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_one(model: str, shape: str, lora: int, loss: str, warmup: int, timed: int) -> dict:
    """Runs in a fresh subprocess: a short training run, per-step wall times from its log."""
    import infini_mlx  # noqa: F401  OpenBLAS before MLX

    # isort: split
    import mlx.core as mx

    from infini_mlx.train import TrainArgs, train

    B, N, S = (int(v) for v in shape.split("x"))
    out = tempfile.mkdtemp(prefix="ftstep-")
    secs = []

    def log(line):
        if line.startswith("{"):
            secs.append(json.loads(line)["s"])
        else:
            print("#", line, file=sys.stderr, flush=True)

    args = TrainArgs(
        out=out, init=model, infini={**INFINI, "segment_len": N}, steps=warmup + timed, batch_size=B,
        segments=[S, S], mix={"passkey": 1.0}, loss_positions=ANSWER_POSITIONS if loss == "answers" else 0,
        warmup=0, checkpoint_every=10**6, freeze_base=True, lora_rank=lora,
        book_names=["alice_in_wonderland_pg11.txt"],
    )
    load0 = load_avg()
    try:
        train(args, log=log)
        trainer = json.loads(open(os.path.join(out, "checkpoint", "trainer.json")).read())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    steps = [b - a for a, b in zip([0.0] + secs, secs)]
    t = sum(steps[warmup:]) / timed
    return dict(
        shape=shape, lora=lora, loss=loss, s_step=t, tok_s=B * N * S / t, steps=[round(s, 1) for s in steps],
        cpu_s=trainer["cpu_seconds"], peak_mlx_gb=mx.get_peak_memory() / 2**30,
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, load=f"{load0} -> {load_avg()}",
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="converted SmolLM2 (float32 directory)")
    p.add_argument("--shapes", default="1x512x8,2x512x8,1x1024x8", help="batch x segment_len x segments")
    p.add_argument("--lora", default="0,8", help="LoRA ranks (0: memory only)")
    p.add_argument("--loss", default="full,answers", help="full: every position; answers: --loss-positions 16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timed", type=int, default=3)
    p.add_argument("--limit", type=int, default=1800, help="seconds per configuration")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.one:
        shape, lora, loss = a.one.split(":")
        print(json.dumps(run_one(a.model, shape, int(lora), loss, a.warmup, a.timed)))
        return

    rows = []
    print(f"# uptime at start: {load_avg()}", file=sys.stderr, flush=True)
    for shape in a.shapes.split(","):
        for lora in (int(r) for r in a.lora.split(",")):
            for loss in a.loss.split(","):
                cmd = [sys.executable, __file__, "--model", a.model, "--one", f"{shape}:{lora}:{loss}",
                       "--warmup", str(a.warmup), "--timed", str(a.timed)]
                tic = time.time()
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.limit)
                    row = (json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else
                           dict(shape=shape, lora=lora, loss=loss, skip="failed: " + r.stderr.strip().splitlines()[-1]))
                except subprocess.TimeoutExpired:
                    row = dict(shape=shape, lora=lora, loss=loss, skip=f"stopped after {a.limit} s")
                rows.append(row)
                print(f"# {json.dumps(row)} ({time.time() - tic:.0f} s)", file=sys.stderr, flush=True)

    print(f"\nSmolLM2-135M-Instruct (float32, 30 layers) fine-tuned with `infini train --freeze-base`, "
          f"memory {json.dumps(INFINI)}, passkey task; {a.warmup} warm-up + {a.timed} timed steps; "
          f"'answers' = `--loss-positions {ANSWER_POSITIONS}`. Load average (1, 5, 15 min) at the end: "
          f"{load_avg()}.\n")
    print("| batch x segment x segments | tokens/step | trained | loss on | s/step | tokens/s | CPU s/step "
          "| peak MLX (GB) | peak RSS (GB) | load before -> after |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        B, N, S = (int(v) for v in r["shape"].split("x"))
        what = "memory" if not r["lora"] else f"memory + LoRA {r['lora']}"
        loss = "all" if r["loss"] == "full" else f"answers ({ANSWER_POSITIONS})"
        if "skip" in r:
            print(f"| {r['shape']} | {B * N * S:,} | {what} | {loss} | {r['skip']} | | | | | |")
            continue
        cpu = r["cpu_s"] / (a.warmup + a.timed)
        print(f"| {r['shape']} | {B * N * S:,} | {what} | {loss} | {r['s_step']:.1f} | {r['tok_s']:.0f} "
              f"| {cpu:.1f} | {r['peak_mlx_gb']:.1f} | {r['peak_rss_gb']:.1f} | {r['load']} |")


if __name__ == "__main__":
    main()
