"""scripts/average_models.py: every parameter is the weighted average, memory included."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tiny import save_base

import infini_mlx

SCRIPT = Path(__file__).parents[1] / "scripts" / "average_models.py"
INFINI = {"segment_len": 8, "memory": "normalized", "conv_size": 4, "write_gate": "clip", "write_conv": True}


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def _params(path):
    model, _ = infini_mlx.load(path)
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def _model(path, seed):
    save_base(path, "llama", seed=seed, infini=INFINI)
    # New parameters (gates, convolutions, write strengths) start the same in
    # every model: move every parameter by seed-dependent noise so each average is tested.
    model, tok, config = infini_mlx.load(path, return_config=True)
    rng = np.random.default_rng(seed)
    noise = [(k, v + mx.array(rng.normal(size=v.shape).astype(np.float32))) for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten(noise))
    infini_mlx.save(path, model, tok, config, overwrite=True)
    return path


def test_average_is_the_weighted_mean_of_every_parameter(tmp_path):
    a, b = _model(tmp_path / "a", 0), _model(tmp_path / "b", 1)
    r = _run(a, b, tmp_path / "out", "--t", "0.25")
    assert r.returncode == 0, r.stderr
    pa, pb, out = _params(a), _params(b), _params(tmp_path / "out")
    assert out.keys() == pa.keys() and any("gate" in k for k in out) and any("k_conv1d" in k for k in out)
    for k in out:
        assert not np.allclose(pa[k], pb[k]), k  # the two models differ
        np.testing.assert_allclose(out[k], 0.75 * pa[k] + 0.25 * pb[k], rtol=1e-6, atol=1e-6, err_msg=k)
    assert infini_mlx.load(tmp_path / "out")[0].infini_config.conv_size == 4


def test_refuses_other_configs_and_an_existing_output(tmp_path):
    a = _model(tmp_path / "a", 0)
    save_base(tmp_path / "c", "llama", seed=1, infini={**INFINI, "conv_size": 8})
    r = _run(a, tmp_path / "c", tmp_path / "out")
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    r = _run(a, a, tmp_path / "out")
    assert r.returncode != 0 and "exists" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "out" / "keep").read_text() == "mine"


def test_t_for_weighs_matching_parameters_apart(tmp_path):
    a, b = _model(tmp_path / "a", 0), _model(tmp_path / "b", 1)
    r = _run(a, b, tmp_path / "out", "--t", "0.25", "--t-for", r"layers\.0\.=0.9", "--t-for", r"layers\.[01]\.=0.5")
    assert r.returncode == 0, r.stderr
    pa, pb, out = _params(a), _params(b), _params(tmp_path / "out")
    for k in out:  # the first matching rule wins
        t = 0.9 if "layers.0." in k else 0.5 if "layers.1." in k else 0.25
        np.testing.assert_allclose(out[k], (1 - t) * pa[k] + t * pb[k], rtol=1e-6, atol=1e-6, err_msg=k)
    assert any("layers.0." in k for k in out) and any("layers.1." in k for k in out)
    for bad in ("layers=2", "[=0.5", "layers"):
        r = _run(a, b, tmp_path / "bad", "--t-for", bad)
        assert r.returncode != 0 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
        assert not (tmp_path / "bad").exists()
