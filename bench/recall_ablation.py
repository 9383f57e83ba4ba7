"""Ordered recall through the memory alone, per memory form, at equal steps.

The task of tests/test_recall.py (a 5-digit key in the first 16-token segment,
asked for in the last of 2-4 segments, random filler), a 2-layer model of
hidden 64 trained for the same steps on the same stream for each form; exact
match (all 5 digits) at 2, 4 and 8 segments, 64 trials each.

    python bench/recall_ablation.py --steps 500
"""

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_recall import N, V, batch, exact_match  # noqa: E402

from infini_mlx import InfiniConfig  # noqa: E402
from infini_mlx.train import TrainArgs, make_optimizer, new_model, weighted_loss  # noqa: E402

FORMS = {
    "paper": {},
    "paper + conv": {"conv_size": 4},
    "normalized": {"memory": "normalized"},
    "normalized + conv": {"memory": "normalized", "conv_size": 4},
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=500)
    a = p.parse_args()
    arch = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=4)
    print(f"{'form':<18} {'2 seg':>6} {'4 seg':>6} {'8 seg':>6} {'seconds':>8}")
    for name, form in FORMS.items():
        model, _ = new_model(arch, InfiniConfig(segment_len=N, **form), V, seed=0)
        opt = make_optimizer(TrainArgs(out="-", lr=3e-3, warmup=20, weight_decay=0.0))
        loss_and_grad = nn.value_and_grad(model, weighted_loss)
        rng, t0 = np.random.default_rng(0), time.time()
        for _ in range(a.steps):
            loss, grads = loss_and_grad(model, *batch(rng, 16, 2, 4))
            opt.update(model, grads)
            mx.eval(loss, model.parameters(), opt.state)
        model.eval()
        acc = [exact_match(model, n) for n in (2, 4, 8)]
        print(f"{name:<18} " + " ".join(f"{x:>6.0%}" for x in acc) + f" {time.time() - t0:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
