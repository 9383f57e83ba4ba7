"""State files: exact round trips, and refusal of anything that does not fit."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny import VOCAB, make_infini

from infini_mlx import StateFileError, load_state, prefill, save_state
from infini_mlx.state import read_state

N = 8


@pytest.mark.parametrize(
    "form",
    [{}, dict(conv_size=4), dict(memory="normalized", conv_size=3),
     dict(memory="normalized", conv_size=3, write_gate="clip"),
     dict(memory="normalized", conv_size=3, write_gate="clip", write_conv=True),
     dict(memory="normalized", conv_size=3, write_gate="clip", write_conv=True, write_scale=0.5),
     dict(memory="normalized", conv_size=3, write_gate="clip", write_conv=True, qk_gate=True),
     dict(memory="normalized", conv_size=3, write_gate="clip", write_conv=True, qk_expand=True)],
    ids=str,
)
def test_round_trip_is_exact(tmp_path, form):
    model, _ = make_infini("llama", segment_len=N, **form)
    tokens = mx.random.randint(0, VOCAB, (37,), key=mx.random.key(1)).tolist()
    cache = model.make_cache()
    prefill(model, tokens[:27], cache)  # 3 segments folded, 3 tokens pending
    path = tmp_path / "book.state"
    save_state(path, cache, model, metadata={"source": "book.txt"})

    restored, meta = load_state(path, model)
    assert meta["source"] == "book.txt" and meta["tokens_read"] == "27"
    for c, r in zip(cache, restored):
        assert r.offset == c.offset
        for a, b in zip(c.state, r.state):
            assert (a is None and b is None) or mx.array_equal(a, b)
    # Continuing from either gives identical logits.
    a = model(mx.array(tokens[27:])[None], cache=cache)
    b = model(mx.array(tokens[27:])[None], cache=restored)
    assert mx.array_equal(a, b)


def test_other_model_or_config_is_refused(tmp_path):
    model, _ = make_infini("llama", segment_len=N)
    cache = model.make_cache()
    prefill(model, list(range(20)), cache)
    path = tmp_path / "s.state"
    save_state(path, cache, model)

    other, _ = make_infini("llama", seed=1, segment_len=N)  # same shapes, other weights
    with pytest.raises(StateFileError, match="another model"):
        load_state(path, other)
    wider, _ = make_infini("qwen3", segment_len=N)
    with pytest.raises(StateFileError, match="another model"):
        load_state(path, wider)
    model.infini_config = model.infini_config.replace(update="linear")
    with pytest.raises(StateFileError, match="update"):
        load_state(path, model)


def test_gate_init_and_memory_trained_do_not_keep_a_state_from_its_model(tmp_path):
    model, _ = make_infini("llama", segment_len=N)
    model.infini_config.memory_trained = False
    cache = model.make_cache()
    prefill(model, list(range(20)), cache)
    save_state(tmp_path / "s.state", cache, model)
    assert json.loads(read_state(tmp_path / "s.state")[1]["infini"])["memory_trained"] is False
    # Older files record neither memory_trained nor the gate_init of today.
    old = {k: v for k, v in model.infini_config.to_dict().items() if k != "memory_trained"}
    _resave(tmp_path / "s.state", tmp_path / "old.state", lambda a: a,
            {"infini": json.dumps({**old, "gate_init": 0.0})})
    for trained in (None, False, True):
        model.infini_config.memory_trained = trained
        for name in ("s.state", "old.state"):
            load_state(tmp_path / name, model)
    # A fine-tuned model is another model, whatever it records.
    model.layers[0].self_attn.gate = model.layers[0].self_attn.gate + 1
    with pytest.raises(StateFileError, match="another model"):
        load_state(tmp_path / "old.state", model)


def test_corrupt_truncated_and_foreign_files_are_refused(tmp_path):
    model, _ = make_infini("llama", segment_len=N)
    cache = model.make_cache()
    prefill(model, list(range(20)), cache)
    path = tmp_path / "s.state"
    save_state(path, cache, model)
    data = path.read_bytes()

    (tmp_path / "trunc.state").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.state").write_bytes(b"\x00\x01binary junk" * 10)
    mx.save_safetensors(str(tmp_path / "plain.safetensors"), {"a": mx.zeros(2)})
    for name in ["trunc.state", "junk.state", "plain.safetensors", "missing.state"]:
        with pytest.raises(StateFileError):
            load_state(tmp_path / name, model)


def test_save_is_atomic_and_leaves_no_temporary(tmp_path):
    model, _ = make_infini("llama", segment_len=N)
    cache = model.make_cache()
    prefill(model, list(range(10)), cache)
    path = tmp_path / "s.state"
    path.write_text("previous")
    save_state(path, cache, model)
    assert [p.name for p in tmp_path.iterdir()] == ["s.state"]
    load_state(path, model)


def _resave(src, dst, edit, meta_edit=None):
    """Rewrite a state file with edited arrays (and a matching checksum, unless told)."""
    from infini_mlx.state import _checksum

    arrays, meta = mx.load(str(src), format="safetensors", return_metadata=True)
    arrays = edit(dict(arrays))
    meta["checksum"] = _checksum(arrays)
    meta.update(meta_edit or {})
    mx.save_safetensors(str(dst) + ".safetensors", arrays, metadata=meta)
    Path(str(dst) + ".safetensors").rename(dst)


@pytest.mark.parametrize(
    "case, edit, meta, message",
    [
        ("nan M", lambda a: {**a, "layers.0.M": a["layers.0.M"] * mx.nan}, None, "NaN"),
        ("inf z", lambda a: {**a, "layers.1.z": a["layers.1.z"] + mx.inf}, None, "NaN or infinite"),
        ("negative z", lambda a: {**a, "layers.0.z": -a["layers.0.z"] - 1}, None, "negative"),
        ("float16 M", lambda a: {**a, "layers.0.M": a["layers.0.M"].astype(mx.float16)}, None, "float32"),
        ("int32 keys", lambda a: {**a, "layers.0.keys": a["layers.0.keys"].astype(mx.int32)}, None, "not a float"),
        ("wrong shape", lambda a: {**a, "layers.0.M": a["layers.0.M"][:, :, :3]}, None, "shape"),
        ("missing layer", lambda a: {k: v for k, v in a.items() if not k.startswith("layers.1.")}, None, "layer 1 has no"),
        ("offset -5", lambda a: a, {"offset": "-5"}, "out of range"),
        ("offset 1e30", lambda a: a, {"offset": str(10**30)}, "out of range"),
        ("offset text", lambda a: a, {"offset": "x"}, "offset"),
        ("byte flip", lambda a: a, {"checksum": "0" * 64}, "checksum"),
    ],
)
def test_state_arrays_are_checked_against_the_model(tmp_path, case, edit, meta, message):
    model, _ = make_infini("llama", segment_len=N)
    cache = model.make_cache()
    prefill(model, list(range(20)), cache)  # 2 segments folded, 4 tokens pending
    save_state(tmp_path / "s.state", cache, model)
    _resave(tmp_path / "s.state", tmp_path / "bad.state", edit, meta)
    with pytest.raises(StateFileError, match=message):
        load_state(tmp_path / "bad.state", model)


def test_a_flipped_byte_in_the_arrays_is_caught(tmp_path):
    model, _ = make_infini("llama", segment_len=N)
    cache = model.make_cache()
    prefill(model, list(range(20)), cache)
    path = tmp_path / "s.state"
    save_state(path, cache, model)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01  # inside the last array's data, not the header
    path.write_bytes(bytes(data))
    with pytest.raises(StateFileError, match="checksum"):
        load_state(path, model)


def test_fuzzed_state_files_load_or_fail_in_one_line(tmp_path):
    """Random byte flips, truncations and header edits: a state or a one-line StateFileError."""
    import resource

    model, _ = make_infini("llama", segment_len=N, conv_size=3)
    cache = model.make_cache()
    prefill(model, list(range(20)), cache)
    save_state(tmp_path / "s.state", cache, model)
    good = (tmp_path / "s.state").read_bytes()
    header_end = 8 + int.from_bytes(good[:8], "little")
    rng = np.random.default_rng(0)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, hard))  # a runaway allocation fails, not the machine
    outcomes = {"ok": 0, "refused": 0}
    try:
        for i in range(300):
            data = bytearray(good)
            kind = i % 3
            if kind == 0:  # byte flips anywhere
                for p in rng.integers(0, len(data), rng.integers(1, 5)):
                    data[p] ^= int(rng.integers(1, 256))
            elif kind == 1:  # truncation
                data = data[: int(rng.integers(0, len(data)))]
            else:  # a number in the JSON header made huge, or a digit changed
                digits = [j for j in range(8, header_end) if chr(data[j]).isdigit()]
                j = int(rng.choice(digits))
                data[j : j + 1] = b"99999999999" if rng.random() < 0.5 else bytes([48 + int(rng.integers(10))])
            path = tmp_path / f"f{i}.state"
            path.write_bytes(bytes(data))
            try:
                load_state(path, model)
                outcomes["ok"] += 1
            except StateFileError as e:
                assert "\n" not in str(e)
                outcomes["refused"] += 1
            path.unlink()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert outcomes["refused"] > 200, outcomes
