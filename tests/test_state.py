"""State files: exact round trips, and refusal of anything that does not fit."""

import mlx.core as mx
import pytest
from tiny import VOCAB, make_infini

from infini_mlx import StateFileError, load_state, prefill, save_state

N = 8


@pytest.mark.parametrize(
    "form", [{}, dict(conv_size=4), dict(memory="normalized", conv_size=3)], ids=str
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
