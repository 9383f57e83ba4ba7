"""Copy a training checkpoint's model into the package as the embedded default model.

    python scripts/export_default_model.py /work/runs/main/checkpoint/model
    python scripts/export_default_model.py runs/stage35 --infini '{"write_scale": 0.5}'
"""

import argparse
import json
from pathlib import Path

from infini_mlx import load, save
from infini_mlx.utils import DEFAULT_MODEL


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="A model directory (e.g. RUN/checkpoint/model).")
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--infini", type=json.loads, default=None, help="JSON overrides of the \"infini\" config block.")
    a = p.parse_args()
    model, tok, config = load(a.model, infini=a.infini, return_config=True)
    save(a.out, model, tok, config, overwrite=True)
    a.out.chmod(0o755)  # save() writes through a private temporary directory
    size = sum(f.stat().st_size for f in a.out.iterdir())
    print(f"{a.out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
