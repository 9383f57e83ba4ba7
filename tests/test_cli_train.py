"""`infini train` through Typer: trains, checkpoints, resumes, exports a loadable model."""

import json

import typer
from typer.testing import CliRunner

import infini_mlx


def test_train_command(tmp_path, tokenizer_dir, books_dir):
    from infini_mlx.cli.train import train

    app = typer.Typer()
    app.command()(train)
    app.command("noop")(lambda: None)
    run = tmp_path / "run"
    base = [
        "train", str(run), "--tokenizer", str(tokenizer_dir),
        "--arch", '{"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2}',
        "--infini", '{"segment_len": 64, "feature_map": "relu"}',
        "--batch-size", "2", "--segments", "2,3", "--mix", "lm=1,passkey=1,needle=1",
        "--books", "alice_in_wonderland_pg11.txt", "--books-dir", str(books_dir),
    ]
    r = CliRunner().invoke(app, base + ["--steps", "2"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, base + ["--steps", "3", "--eval-passkey", "x"])
    assert r.exit_code != 0 and "'x' is not a length" in r.output
    r = CliRunner().invoke(app, base + ["--steps", "3", "--memory-lr", "0"])
    assert r.exit_code != 0 and "--memory-lr" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, base + ["--steps", "3", "--key-digits", "x"])
    assert r.exit_code != 0 and "--key-digits" in r.output and "Traceback" not in r.output
    # A resumed run takes its evaluation from the new call: greedy passkey at 256 tokens at step 3.
    more = ["--eval-every", "3", "--eval-segments", "2", "--eval-passkey", "256", "--eval-trials", "1"]
    r = CliRunner().invoke(app, base + ["--steps", "3", "--export", str(tmp_path / "m")] + more)
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output
    trainer = json.loads((run / "checkpoint" / "trainer.json").read_text())
    assert trainer["step"] == 3 and len(trainer["log"]) == 3
    probe = trainer["log"][-1]["probe"]
    assert probe["greedy@256"] in (0.0, 1 / 3, 2 / 3, 1.0) and "passkey@2" in probe
    model, _ = infini_mlx.load(tmp_path / "m")
    assert model.infini_config.feature_map == "relu" and model.infini_config.segment_len == 64
