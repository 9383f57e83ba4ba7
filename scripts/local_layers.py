"""Save a copy of a model whose memory is switched off in some layers.

Those layers' gate logits are set to -30 (sigmoid ~1e-13: local attention only);
under Adam a gate that far out barely moves, so fine-tuning keeps them local.

    python scripts/local_layers.py MODEL OUT --layers 1,2
    python scripts/local_layers.py MODEL OUT --layers 0 --heads 3   # one head of layer 0
"""

import argparse

from infini_mlx import load, save  # first: OpenBLAS before MLX

# isort: split
import mlx.core as mx


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="model directory (infini-mlx)")
    p.add_argument("out", help="new directory")
    p.add_argument("--layers", required=True, help="comma-separated layer indices")
    p.add_argument("--heads", default=None, help="comma-separated heads of those layers (default: all)")
    p.add_argument("--logit", type=float, default=-30.0)
    a = p.parse_args()
    model, tok, config = load(a.model, return_config=True)
    if model.infini_config.gate_weights != "memory":
        raise SystemExit("error: only gate_weights 'memory' models (the gate weighs the memory)")
    for i in map(int, a.layers.split(",")):
        attn = model.layers[i].self_attn
        H = attn.gate.shape[0]
        heads = [int(h) for h in a.heads.split(",")] if a.heads else range(H)
        off = mx.array([h in heads for h in range(H)])
        attn.gate = mx.where(off, mx.array(a.logit, mx.float32), attn.gate)
    save(a.out, model, tok, config)
    which = f"heads {a.heads} of layers" if a.heads else "layers"
    print(f"wrote {a.out}: {which} {a.layers} local (gate logit {a.logit:g})")


if __name__ == "__main__":
    main()
