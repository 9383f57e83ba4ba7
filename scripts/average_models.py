"""Save the weighted average of two models with the same architecture (a model soup).

Every parameter, the memory's included, becomes (1 - t) * A + t * B. Two
fine-tunings of one model that trade one skill for another (passkeys against
needles) can keep some of both (Wortsman et al., 2022, "Model soups").

    python scripts/average_models.py runs/stage31/checkpoint/model runs/stage33/checkpoint/model OUT --t 0.5
"""

import argparse

from infini_mlx import load, save  # first: OpenBLAS before MLX

# isort: split
from mlx.utils import tree_flatten, tree_unflatten


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="model directory (infini-mlx)")
    p.add_argument("b", help="model directory with the same config")
    p.add_argument("out", help="new directory")
    p.add_argument("--t", type=float, default=0.5, help="weight of B (0: A, 1: B)")
    a = p.parse_args()
    if not 0.0 <= a.t <= 1.0:
        raise SystemExit(f"error: --t {a.t:g} is outside [0, 1]")
    model, tok, config = load(a.a, return_config=True)
    other, _, other_config = load(a.b, return_config=True)
    if config != other_config:
        raise SystemExit(f"error: {a.a} and {a.b} have different configs")
    # The same config means the same parameter names and shapes.
    w, v = dict(tree_flatten(model.parameters())), dict(tree_flatten(other.parameters()))
    model.update(tree_unflatten([(k, (1 - a.t) * w[k] + a.t * v[k]) for k in w]))
    try:
        save(a.out, model, tok, config)
    except FileExistsError:
        raise SystemExit(f"error: {a.out} exists")
    print(f"wrote {a.out}: {1 - a.t:g} x {a.a} + {a.t:g} x {a.b}")


if __name__ == "__main__":
    main()
