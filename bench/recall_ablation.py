"""Ordered recall through the memory alone, per memory form, at equal steps.

The task of tests/test_recall.py (a 5-digit key in the first 16-token segment,
asked for in the last of 2-4 segments, random filler), a 2-layer model of
hidden 64 trained for the same steps on the same stream for each form; exact
match (all 5 digits) at 2, 4 and 8 segments (``--segments``), 64 trials each.

    python bench/recall_ablation.py --steps 500
    python bench/recall_ablation.py --segments 2,4,8,64,256
"""

import argparse
import sys
import time
from pathlib import Path

import infini_mlx  # noqa: F401  OpenBLAS before MLX

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_recall import N, V, batch, exact_match  # noqa: E402

from infini_mlx import InfiniConfig  # noqa: E402
from infini_mlx.train import (  # noqa: E402
    TRAIN_GATE_INIT,
    TrainArgs,
    logged_cache,
    make_optimizer,
    new_model,
    weighted_loss,
)

# name: (InfiniConfig options, write penalty)
FORMS = {
    "paper": ({}, 0.0),
    "paper + conv": ({"conv_size": 4}, 0.0),
    "normalized": ({"memory": "normalized"}, 0.0),
    "normalized + conv": ({"memory": "normalized", "conv_size": 4}, 0.0),
    "normalized + conv + penalty": ({"memory": "normalized", "conv_size": 4}, 0.1),
    "normalized + conv + clip": ({"memory": "normalized", "conv_size": 4, "write_gate": "clip"}, 0.0),
    "normalized + conv + clip + penalty": ({"memory": "normalized", "conv_size": 4, "write_gate": "clip"}, 0.1),
    "normalized + conv + clip + write_conv": (
        {"memory": "normalized", "conv_size": 4, "write_gate": "clip", "write_conv": True}, 0.0),
    "normalized + conv + clip + write_conv + penalty": (
        {"memory": "normalized", "conv_size": 4, "write_gate": "clip", "write_conv": True}, 0.1),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--forms", default=",".join(FORMS), help="comma-separated names of FORMS")
    p.add_argument("--segments", default="2,4,8", help="segment counts at which exact match is measured")
    a = p.parse_args()
    segments = [int(n) for n in a.segments.split(",")]
    arch = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=4)
    print(f"{'form':<47} " + " ".join(f"{f'{n} seg':>7}" for n in segments) + f" {'seconds':>8}")
    for name in a.forms.split(","):
        form, penalty = FORMS[name.strip()]
        # Gates open at 0, as `infini train` starts an untrained memory (not the -12 of upcycling).
        model, _ = new_model(arch, InfiniConfig(segment_len=N, gate_init=TRAIN_GATE_INIT, **form), V, seed=0)
        opt = make_optimizer(TrainArgs(out="-", lr=3e-3, warmup=20, weight_decay=0.0))
        loss_and_grad = nn.value_and_grad(model, weighted_loss)
        rng, t0 = np.random.default_rng(0), time.time()
        for _ in range(a.steps):
            loss, grads = loss_and_grad(model, *batch(rng, 16, 2, 4), None, logged_cache(model), penalty)
            opt.update(model, grads)
            mx.eval(loss, model.parameters(), opt.state)
        model.eval()
        acc = [exact_match(model, n) for n in segments]
        print(f"{name.strip():<47} " + " ".join(f"{x:>7.0%}" for x in acc) + f" {time.time() - t0:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
