"""What a conversion touches on disk: only files inside SRC are read, SRC is never
in harm's way, and nothing is left behind, even when the conversion is killed."""

import json

import pytest
from convert_helpers import FIXTURES, copy_fixture
from infini_mlx.converters import ConversionError, convert

# --- Paths that escape SRC ------------------------------------------------------


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_index_naming_a_file_outside_src_is_refused(where, tmp_path):
    src = copy_fixture("plain_llama_st", tmp_path)
    outside = tmp_path / "outside.safetensors"
    (src / "model-00003-of-00003.safetensors").rename(outside)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = str(outside) if where == "absolute" else "../outside.safetensors"
    index["weight_map"] = {k: name if v.endswith("00003.safetensors") else v for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="leads outside"):
        convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_index_weight_map_must_name_files(tmp_path):
    src = copy_fixture("plain_llama_st", tmp_path)
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": ["x"]}}))
    with pytest.raises(ConversionError, match="not a map of file names"):
        convert(src, tmp_path / "dst")


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "model-00001-of-00003.safetensors"])
def test_links_to_host_files_are_refused(name, tmp_path):
    """A tokenizer.json linked to /etc/hostname was copied into DST."""
    src = copy_fixture("plain_llama_st", tmp_path)
    (src / name).unlink()
    (src / name).symlink_to("/etc/hostname")
    with pytest.raises(ConversionError, match=f"{name}: leads outside"):
        convert(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain_llama_st"]


def test_links_inside_src_and_a_hugging_face_cache_are_followed(tmp_path):
    """The Hugging Face cache links every file of a snapshot to ../../blobs."""
    repo = tmp_path / "models--tiny--llama"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted((FIXTURES / "plain_llama_st").iterdir())):
        (repo / "blobs" / f"blob{i}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    summary = convert(snap, tmp_path / "dst")
    assert summary.tokenizer_files == ["tokenizer.json", "tokenizer_config.json"]
    (snap / "tokenizer.json").unlink()
    (snap / "tokenizer.json").symlink_to("/etc/hostname")
    with pytest.raises(ConversionError, match="tokenizer.json: leads outside"):
        convert(snap, tmp_path / "dst2")


def test_nanotron_files_outside_src_are_refused(tmp_path):
    src = copy_fixture("nanotron_llama", tmp_path)
    f = next((src / "model").rglob("*.safetensors"))
    (tmp_path / "elsewhere.safetensors").write_bytes(f.read_bytes())
    f.unlink()
    f.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ConversionError, match="leads outside"):
        convert(src, tmp_path / "dst", tokenizer=FIXTURES / "plain_llama_st")
