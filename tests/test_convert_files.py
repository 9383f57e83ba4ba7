"""What a conversion touches on disk: only files inside SRC are read, SRC is never
in harm's way, and nothing is left behind, even when the conversion is killed."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from convert_helpers import FIXTURES, copy_fixture
from infini_mlx.cli.main import app
from infini_mlx.converters import ConversionError, convert
from typer.testing import CliRunner


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- DST and SRC ---------------------------------------------------------------


@pytest.mark.parametrize("via_link", [False, True])
def test_dst_containing_src_is_refused_even_with_force(via_link, tmp_path):
    """`infini convert anc/src anc --force` once deleted SRC and its siblings."""
    anc = tmp_path / "anc"
    anc.mkdir()
    src = copy_fixture("plain_llama_st", anc)
    (anc / "sibling.txt").write_text("keep me")
    before = _snapshot(anc)
    dst = anc
    if via_link:
        dst = tmp_path / "link"
        dst.symlink_to(anc)
    r = CliRunner().invoke(app, ["convert", str(src), str(dst), "--force"])
    assert r.exit_code == 1 and "contains SRC" in r.stderr and r.stderr.count("\n") == 1
    assert _snapshot(anc) == before


def test_dst_inside_src_is_refused(tmp_path):
    src = copy_fixture("plain_llama_st", tmp_path)
    before = _snapshot(src)
    with pytest.raises(ConversionError, match="is inside SRC"):
        convert(src, src / "out")
    with pytest.raises(ConversionError, match="is inside SRC"):
        convert(src, src / "sub" / "out")
    assert _snapshot(src) == before and not (src / "sub").exists()


def test_dst_containing_the_tokenizer_directory_is_refused(tmp_path):
    tok = tmp_path / "out" / "tok"
    tok.mkdir(parents=True)
    (tok / "tokenizer.json").write_text("{}")
    with pytest.raises(ConversionError, match="contains the tokenizer directory"):
        convert(FIXTURES / "nanotron_llama", tmp_path / "out", force=True, tokenizer=tok)
    assert (tok / "tokenizer.json").exists()


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


# --- Leftovers ------------------------------------------------------------------

# Converts argv[1] into argv[2], pausing (marker file argv[3]) once the torch files are staged.
PAUSED = """
import sys, time, pathlib
import infini_mlx.converters
c = sys.modules["infini_mlx.converters.convert"]
def paused(*args, **kw):
    pathlib.Path(sys.argv[3]).touch()
    time.sleep(120)
c._save_shards = paused
c.convert(sys.argv[1], sys.argv[2])
"""


def _killed_mid_conversion(tmp_path, sig):
    marker = tmp_path / "paused"
    p = subprocess.Popen([sys.executable, "-c", PAUSED, str(FIXTURES / "plain_llama_bin"),
                          str(tmp_path / "out" / "dst"), str(marker)], cwd=tmp_path)
    try:
        for _ in range(600):
            if marker.exists() or p.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), "the conversion never got going"
        assert list((tmp_path / "out").glob(".dst.*/.stage/*.safetensors"))  # staged for real
        p.send_signal(sig)
        assert p.wait(30) == -sig
    finally:
        p.kill()
    return p.pid


def test_sigterm_leaves_nothing_behind(tmp_path):
    _killed_mid_conversion(tmp_path, signal.SIGTERM)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_killed_runs_leftovers_are_removed_by_the_next(tmp_path):
    pid = _killed_mid_conversion(tmp_path, signal.SIGKILL)
    left = list((tmp_path / "out").glob(".dst.*"))
    assert len(left) == 1 and f"-{pid}-" in left[0].name  # SIGKILL cannot be caught
    live = tmp_path / "out" / f".dst.convert-{socket.gethostname()}-{os.getpid()}-live"
    live.mkdir()  # a conversion still running (this process): kept
    convert(FIXTURES / "plain_llama_st", tmp_path / "out" / "dst")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [live.name, "dst"]


def test_force_replaces_only_a_model_directory(tmp_path):
    src = FIXTURES / "plain_llama_st"
    home = tmp_path / "home"  # `infini convert SRC ~ --force` must not empty a home directory
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    (tmp_path / "file.txt").write_text("keep me too")
    for dst in (home, tmp_path / "file.txt"):
        with pytest.raises(ConversionError, match="not a model directory"):
            convert(src, dst, force=True)
    assert (home / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "file.txt").read_text() == "keep me too"
    (tmp_path / "empty").mkdir()
    convert(src, tmp_path / "empty", force=True)  # an empty folder, then a model: replaced
    convert(src, tmp_path / "empty", force=True)
    assert (tmp_path / "empty" / "config.json").is_file()
