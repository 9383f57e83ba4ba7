"""Save the weighted average of two models with the same architecture (a model soup).

Every parameter, the memory's included, becomes (1 - t) * A + t * B. Two
fine-tunings of one model that trade one skill for another (passkeys against
needles) can keep some of both (Wortsman et al., 2022, "Model soups").

    python scripts/average_models.py runs/stage31/checkpoint/model runs/stage33/checkpoint/model OUT --t 0.5

``--t-for REGEX=T`` gives the parameters whose names match REGEX (the first
such option that matches) their own weight, e.g. ``--t-for "layers\\.0\\.=0.7"``.
"""

import argparse
import re

from infini_mlx import load, save  # first: OpenBLAS before MLX

# isort: split
from mlx.utils import tree_flatten, tree_unflatten


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="model directory (infini-mlx)")
    p.add_argument("b", help="model directory with the same config")
    p.add_argument("out", help="new directory")
    p.add_argument("--t", type=float, default=0.5, help="weight of B (0: A, 1: B)")
    p.add_argument("--t-for", action="append", default=[], metavar="REGEX=T",
                   help="weight of B for the parameters whose names match REGEX (repeatable; the first match wins)")
    a = p.parse_args()
    rules = []
    for r in a.t_for:
        pat, _, t = r.rpartition("=")
        try:
            rules.append((re.compile(pat), float(t)))
        except (re.error, ValueError):
            raise SystemExit(f"error: --t-for {r!r} is not REGEX=T")
    for t in [a.t] + [t for _, t in rules]:
        if not 0.0 <= t <= 1.0:
            raise SystemExit(f"error: weight {t:g} is outside [0, 1]")
    model, tok, config = load(a.a, return_config=True)
    other, _, other_config = load(a.b, return_config=True)
    if config != other_config:
        raise SystemExit(f"error: {a.a} and {a.b} have different configs")
    # The same config means the same parameter names and shapes.
    w, v = dict(tree_flatten(model.parameters())), dict(tree_flatten(other.parameters()))

    def t_of(k):
        return next((t for pat, t in rules if pat.search(k)), a.t)

    model.update(tree_unflatten([(k, (1 - t_of(k)) * w[k] + t_of(k) * v[k]) for k in w]))
    try:
        save(a.out, model, tok, config)
    except FileExistsError:
        raise SystemExit(f"error: {a.out} exists")
    print(f"wrote {a.out}: {1 - a.t:g} x {a.a} + {a.t:g} x {a.b}"
          + "".join(f"; {pat.pattern}: {t:g} x B" for pat, t in rules))


if __name__ == "__main__":
    main()
