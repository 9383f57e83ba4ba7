"""Clear one-line errors for damaged or unexpected checkpoints; DST is never half-written."""

import json
import shutil
import signal
from contextlib import contextmanager

import pytest
from convert_helpers import FIXTURES, copy_fixture
from infini_mlx.converters import ConversionError, TorchZip, convert


def _convert_fails(src, tmp_path, match, **kw):
    with pytest.raises(ConversionError, match=match) as e:
        convert(src, tmp_path / "dst", **kw)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "dst").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst")]  # temp dir cleaned


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_zip(tmp_path):
    src = copy_fixture("plain_llama_bin", tmp_path)
    _truncate(src / "pytorch_model-00002-of-00003.bin")
    _convert_fails(src, tmp_path, "truncated or corrupt zip")


def test_truncated_safetensors(tmp_path):
    src = copy_fixture("plain_llama_st", tmp_path)
    _truncate(src / "model-00003-of-00003.safetensors")
    _convert_fails(src, tmp_path, "truncated safetensors")


@pytest.mark.parametrize("name", ["plain_llama_bin", "plain_llama_st"])
def test_missing_shard(name, tmp_path):
    src = copy_fixture(name, tmp_path)
    next(src.glob("*-00002-of-00003.*")).unlink()
    _convert_fails(src, tmp_path, "missing shard .*00002-of-00003")


def test_missing_tensor_parallel_shard(tmp_path):
    src = copy_fixture("nanotron_llama", tmp_path)
    next(src.rglob("qkv_proj/*tp-rank-1-of-2.safetensors")).unlink()
    _convert_fails(src, tmp_path, "missing shard: .*qkv_proj.* tp-rank 1 of 2")


def test_shape_mismatch(tmp_path):
    src = copy_fixture("plain_llama_st", tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    _convert_fails(src, tmp_path, r"shape mismatch: model\.layers\.0\.mlp\..* is \[.*\] in the checkpoint, the config implies \[")


def test_gate_shape_mismatch(tmp_path):
    src = copy_fixture("beomi_gemma", tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_attention_heads": 2}))
    _convert_fails(src, tmp_path, r"shape mismatch: model\.layers\.\d\.self_attn\.gate is \[1, 4, 1, 1\]")


def test_unknown_layout(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.npz").write_bytes(b"")
    _convert_fails(tmp_path / "src", tmp_path, "unknown layout")


def test_bad_options(tmp_path):
    _convert_fails(FIXTURES / "plain_llama_st", tmp_path, "unknown format 'ggml'", fmt="ggml")
    _convert_fails(FIXTURES / "plain_llama_st", tmp_path, "cannot quantize to 7 bits", quantize=True, q_bits=7)
    _convert_fails(FIXTURES / "plain_llama_st", tmp_path, "invalid Infini semantics", infini={"update": "lstm"})
    _convert_fails(FIXTURES / "plain_llama_st", tmp_path, "not supported by the jlamprou format", fmt="jlamprou")


def test_existing_dst_needs_force(tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "config.json").write_text("{}")  # an earlier model: --force replaces it whole
    (dst / "keep").write_text("x")
    with pytest.raises(ConversionError, match="exists"):
        convert(FIXTURES / "plain_llama_st", dst)
    assert (dst / "keep").exists()
    convert(FIXTURES / "plain_llama_st", dst, force=True)
    assert not (dst / "keep").exists() and (dst / "infini.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_source_is_never_modified(tmp_path):
    src = copy_fixture("jlamprou_qwen2_moe", tmp_path)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    convert(src, tmp_path / "out", infini={"segment_len": 8})
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    shutil.rmtree(tmp_path / "out")


@contextmanager
def _within(seconds):
    def hang(*_):
        raise AssertionError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _edit_config(src, **changes):
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("changes, match", [
    ({"num_hidden_layers": 10**7}, "num_hidden_layers is 10000000, but the checkpoint has only 21 tensors"),
    ({"vocab_size": 10**12}, "vocab_size must be a whole number from 1 to 2147483647, got 1000000000000"),
    ({"hidden_size": 32.5}, "hidden_size must be a whole number"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a whole number"),
    ({"intermediate_size": "64"}, "intermediate_size must be a whole number"),
])
def test_absurd_configs_are_refused_before_building(changes, match, tmp_path):
    src = copy_fixture("plain_llama_st", tmp_path)
    _edit_config(src, **changes)
    with _within(10):
        _convert_fails(src, tmp_path, match)


def test_segment_size_must_be_whole(tmp_path):
    src = copy_fixture("beomi_gemma", tmp_path)
    _edit_config(src, segment_size="8; rm -rf /")
    _convert_fails(src, tmp_path, "segment_size must be a whole number")
    _edit_config(src, segment_size=1e400)
    _convert_fails(src, tmp_path, "segment_size must be a whole number")


def test_config_that_is_not_an_object(tmp_path):
    src = copy_fixture("plain_llama_st", tmp_path)
    (src / "config.json").write_text("[1, 2]")
    _convert_fails(src, tmp_path, "expected a JSON object, got list")


@pytest.mark.parametrize("changes", [{"intermediate_size": 96}, {"vocab_size": 65}])
def test_shapes_are_checked_before_any_tensor_is_read(changes, tmp_path, monkeypatch):
    """A tensor the config does not expect is never read into memory (the stride
    and storage checks bound its size by the file's; this bounds it by the config's)."""
    src = copy_fixture("plain_llama_bin", tmp_path)
    _edit_config(src, **changes)

    def read(*_):
        raise AssertionError("a tensor was read before the shapes were checked")

    monkeypatch.setattr(TorchZip, "read", read)
    _convert_fails(src, tmp_path, "shape mismatch")
