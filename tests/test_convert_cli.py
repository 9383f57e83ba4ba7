"""The Typer command behind `infini convert`, driven through a local app."""

from convert_helpers import FIXTURES
from infini_mlx.cli.main import app
from typer.testing import CliRunner


def test_help_documents_the_formats():
    out = CliRunner().invoke(app, ["convert", "--help"]).output
    for word in ("hf", "beomi", "gemma-2B-10M", "jlamprou", "nanotron", "--from", "--quantize",
                 "--q-bits", "--q-group-size", "--force", "--segment-len"):
        assert word in out, word


def test_convert_prints_the_summary(tmp_path):
    r = CliRunner().invoke(app, ["convert", str(FIXTURES / "beomi_llama"), str(tmp_path / "out"),
                                 "--segment-len", "8"])
    assert r.exit_code == 0, r.output
    assert "format:     beomi" in r.stdout and "segment_len=8" in r.stdout
    assert (tmp_path / "out" / "infini.safetensors").exists()

    r = CliRunner().invoke(app, ["convert", str(FIXTURES / "beomi_llama"), str(tmp_path / "out")])
    assert r.exit_code == 1 and r.stderr.strip().endswith("exists (use --force to replace it)")
    r = CliRunner().invoke(app, ["convert", str(FIXTURES / "beomi_llama"), str(tmp_path / "out"),
                                 "--force", "--from", "gemma-2b-10m"])
    assert r.exit_code == 0 and "format:     beomi" in r.stdout
    # Forcing the wrong format: its gates are tensors a plain model does not have.
    r = CliRunner().invoke(app, ["convert", str(FIXTURES / "beomi_llama"), str(tmp_path / "out2"),
                                 "--from", "hf"])
    assert r.exit_code == 1 and "unexpected tensor model.layers.0.self_attn.gate" in r.stderr


def test_errors_are_one_line_without_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (
        [str(FIXTURES / "malicious"), "out"],
        [str(tmp_path / "nowhere"), "out"],
        [str(FIXTURES / "plain_llama_st"), "out", "--from", "gguf"],
    ):
        r = CliRunner().invoke(app, ["convert", *args])
        assert r.exit_code == 1, args
        assert r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
        assert "Traceback" not in r.output
    assert "posix.system" in CliRunner().invoke(app, ["convert", str(FIXTURES / "malicious"), "out"]).stderr
    assert not (tmp_path / "out").exists()


def test_convert_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert "Traceback" not in r.output
