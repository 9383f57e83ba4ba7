"""The `infini` command through Typer's CliRunner, and as a real subprocess."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from books import book, greedy, model_dir, reference_cache, same_state
from infini_mlx.cli.main import app
from infini_mlx.cli.progress import ReadProgress
from mlx.utils import tree_flatten
from typer.testing import CliRunner

import infini_mlx
from infini_mlx import InfiniSession, load_state
from infini_mlx.state import read_state

runner = CliRunner()
WORDS = 600


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def shelf(tiny, tmp_path_factory):
    """A book and the state `infini read` wrote of it."""
    d = tmp_path_factory.mktemp("shelf")
    (d / "book.txt").write_text(book(WORDS, seed=1))
    r = cli("read", d / "book.txt", "-o", d / "book.state", "--model", tiny)
    assert r.exit_code == 0, r.output
    return d


def test_help_reads_well():
    r = cli("--help")
    assert r.exit_code == 0
    for name in ["read", "query", "summarize", "info", "convert", "passkey", "train"]:
        assert name in r.stdout
        sub = cli(name, "--help")
        assert sub.exit_code == 0 and "Usage: infini " + name in " ".join(sub.stdout.split())
    assert "--resume" in cli("read", "--help").stdout
    assert "--top-p" in cli("summarize", "--help").stdout


@pytest.mark.parametrize("name", ["", "read", "query", "summarize", "info", "convert", "passkey", "train"])
def test_help_shows_no_markup_leftovers(name):
    out = cli(*[name] * bool(name), "--help").stdout
    assert "<bool>" not in out and "%%" not in out
    usage = next(line for line in out.splitlines() if "Usage:" in line).strip()
    assert "{" not in usage and "}" not in usage, usage
    if name == "read":
        assert usage == "Usage: infini read [OPTIONS] FILE"
    if name == "train":
        assert "Cosine decay to 10%" in out


def test_read_writes_the_state_of_one_prefill(tiny, shelf):
    model, tok = infini_mlx.load(tiny)
    text = (shelf / "book.txt").read_text()
    cache, meta = load_state(shelf / "book.state", model)
    assert same_state(cache, reference_cache(model, tok.encode(text)))
    assert meta["complete"] == "1" and meta["model"] == str(tiny.resolve())

    r = cli("read", shelf / "book.txt", "-o", shelf / "again.state", "--model", tiny, "--json")
    assert r.exit_code == 0 and r.stderr == ""  # no progress bar off a terminal
    out = json.loads(r.stdout)
    assert out["tokens_read"] == WORDS and out["tokens_this_run"] == WORDS

    r = cli("read", shelf / "book.txt", "-o", shelf / "again.state", "--resume")
    assert r.exit_code == 0 and "already holds all" in r.stdout


def test_query_and_summarize_answer_from_the_book(tiny, shelf):
    model, tok = infini_mlx.load(tiny)
    book_ids = tok.encode((shelf / "book.txt").read_text())
    q = "t5 t6 t7"
    prompt = tok.encode(f"\n\nQuestion: {q}\nAnswer:", add_special_tokens=False)
    expected = [f"t{t}" for t in greedy(model, reference_cache(model, book_ids), prompt, 10, tok.eos_token_ids)]

    for source in ["book.state", "book.txt"]:  # a state, or the book read first
        r = cli("query", shelf / source, q, "-m", 10, "--json", "--model", tiny)
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert out["answer"].split() == expected
        assert out["tokens_read"] == len(book_ids) and out["prompt_tokens"] == len(prompt)
    r = cli("query", shelf / "book.state", q, "-m", 10)  # streamed text
    assert r.exit_code == 0 and r.stdout.split() == expected

    prompt = tok.encode("\n\nSummary:", add_special_tokens=False)
    expected = [f"t{t}" for t in greedy(model, reference_cache(model, book_ids), prompt, 7, tok.eos_token_ids)]
    r = cli("summarize", shelf / "book.state", "--max-tokens", 7, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["summary"].split() == expected
    r = cli("summarize", shelf / "book.state", "-m", 7, "--temp", 0.8, "--top-p", 0.9, "--seed", 3)
    assert r.exit_code == 0 and len(r.stdout.split()) <= 7


def test_flags_mean_one_thing_everywhere(tiny):
    # -m is --max-tokens wherever it exists, as in mlx_lm.generate; --model has no short form.
    for name in ["read", "query", "summarize", "info", "convert", "passkey", "train"]:
        for line in cli(name, "--help").stdout.splitlines():
            assert not ("--model" in line and " -m " in line), (name, line)
    assert cli("passkey", "-m", tiny).exit_code == 2 and cli("train", "run", "-m", tiny).exit_code == 2
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.startswith(f"infini-mlx {infini_mlx.__version__} (mlx ")


def test_question_by_prompt_and_book_from_stdin(tiny, shelf, tmp_path):
    q = "t5 t6 t7"
    want = cli("query", shelf / "book.state", q, "-m", 5, "--json").stdout
    r = cli("query", shelf / "book.state", "-p", q, "-m", 5, "--json")
    assert r.exit_code == 0, r.output

    def untimed(out):
        return {k: v for k, v in json.loads(out).items() if not k.endswith("_tps")}

    assert untimed(r.stdout) == untimed(want)
    for args, message in [(["-p", q, q], "give the question once"), ([], "no question")]:
        r = cli("query", shelf / "book.state", *args)
        assert r.exit_code == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.output

    text = (shelf / "book.txt").read_text()
    state = tmp_path / "s.state"
    r = runner.invoke(app, ["read", "-", "-o", str(state), "--model", str(tiny)], input=text)
    assert r.exit_code == 0 and "of <stdin> into" in r.stdout, r.output
    model, _ = infini_mlx.load(tiny)
    assert same_state(load_state(state, model)[0], load_state(shelf / "book.state", model)[0])
    assert read_state(state)[1]["source"] == "<stdin>"
    r = runner.invoke(app, ["query", "-", "-p", q, "-m", "5", "--json", "--model", str(tiny)], input=text)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["answer"] == json.loads(want)["answer"]
    r = runner.invoke(app, ["summarize", "-", "--model", str(tiny)], input="")
    assert r.exit_code == 1 and r.stderr == "error: <stdin> is empty: there is nothing to read\n"
    assert list(tmp_path.iterdir()) == [state]


def test_answers_are_followed_by_statistics_on_stderr(tiny, shelf):
    r = cli("query", shelf / "book.state", "t5 t6", "-m", 4)
    assert r.exit_code == 0, r.output
    rule, prompt, generation, memory = r.stderr.splitlines()
    assert rule == "=" * 10 and re.fullmatch(r"Prompt: 4 tokens, [\d.]+ tokens-per-sec", prompt)
    assert re.fullmatch(r"Generation: 4 tokens, [\d.]+ tokens-per-sec", generation)
    assert re.fullmatch(r"Peak memory: \d+\.\d{3} GB", memory)
    assert not r.stdout.startswith("\n") and len(r.stdout.split()) == 4
    out = json.loads(cli("summarize", shelf / "book.state", "-m", 4, "--json").stdout)
    assert out["generation_tokens"] == 4 and out["generation_tps"] > 0 and out["peak_memory_gb"] > 0


def test_untrained_memory_is_warned_of_once_and_answers_say_what_they_saw(tmp_path):
    from tiny import save_base

    plain = tmp_path / "plain"
    save_base(plain, "llama")  # a plain mlx-lm model: upcycled, its memory never trained
    (tmp_path / "b.txt").write_text(book(21, seed=2))
    r = cli("read", tmp_path / "b.txt", "-o", tmp_path / "b.state", "--model", plain, "--segment-len", 8)
    assert r.exit_code == 0, r.output
    warning = f"warning: the memory of {plain} was never trained: answers see only the last segment"
    assert r.stderr.splitlines() == [warning]
    r = cli("query", tmp_path / "b.state", "t5", "-m", 3)
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert lines[0] == warning.replace(str(plain), str(plain.resolve())) and r.stderr.count("warning") == 1
    assert lines[-1] == (
        "Memory: never trained, so the answer saw only the last segment: 5 of the 21 tokens read"
    )
    r = cli("summarize", tmp_path / "b.state", "-m", 3, "--json")
    out = json.loads(r.stdout)
    assert (out["memory_trained"], out["tokens_seen"], out["tokens_read"]) == (False, 5, 21)

    info = cli("info", plain).stdout
    assert "trained    no: the memory was never trained; answers see only the last segment" in info
    assert "gates      none: new gates start at gate_init=-12.0" in info
    assert json.loads(cli("info", plain, "--json").stdout)["memory_trained"] is False
    assert "trained    yes" in cli("info").stdout  # the embedded model


def test_query_on_a_state_does_not_read_the_book(tiny, shelf, tmp_path, monkeypatch):
    shutil.copy(shelf / "book.state", tmp_path / "book.state")
    shutil.copy(shelf / "book.txt", tmp_path / "book.txt")
    cli("read", tmp_path / "book.txt", "-o", tmp_path / "x.state", "--model", tiny)
    (tmp_path / "book.txt").unlink()

    def no_reading(*args, **kwargs):
        raise AssertionError("the book was read again")

    monkeypatch.setattr(InfiniSession, "read", no_reading)
    r = cli("query", tmp_path / "book.state", "t5", "-m", 3, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    # Only the question went through the model: "\n\nQuestion: t5\nAnswer:" is 3 tokens.
    assert out["prompt_tokens"] == 3 and out["tokens_read"] == WORDS


def test_info_on_a_model_and_a_state(tiny, shelf):
    model, _ = infini_mlx.load(tiny)
    cache = reference_cache(model, list(range(2, 2 + 8)))  # one folded segment: only M, z left
    memory = sum(a.nbytes for c in cache for a in c.state if a is not None)
    cache = reference_cache(model, list(range(2, 2 + 15)))  # the largest pending segment
    segment = sum(a.nbytes for c in cache for a in c.state if a is not None) - memory

    r = cli("info", tiny, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["memory_bytes"] == memory and d["segment_bytes"] == segment
    assert d["layers"] == 2 and d["segment_len"] == 8
    base = [v.size for k, v in tree_flatten(model.parameters()) if not k.endswith(".gate")]
    assert d["stored_parameters"] == sum(base) and not d["gates"]

    r = cli("info", shelf / "book.state", "--json")
    d = json.loads(r.stdout)
    assert d["tokens_read"] == WORDS and d["complete"] and d["model"] == str(tiny.resolve())
    arrays = read_state(shelf / "book.state")[0]
    assert d["state_bytes"] == sum(a.nbytes for a in arrays.values())
    assert d["memory_bytes"] == memory and WORDS % 8 == 0  # a whole number of segments
    human = cli("info", shelf / "book.state").stdout
    assert f"{WORDS} tokens: all of" in human and "segment_len=8" in human


@pytest.mark.parametrize("width", [60, 80, 120])
def test_progress_bar_fits_the_terminal(width, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(width))
    out = io.StringIO()
    bar = ReadProgress("a_book_with_a_long_name.txt", stream=out, enabled=True)
    for tokens, done in [(0, 0), (22016, 400), (54409, 1000)]:
        time.sleep(0.11)  # updates come at most every 0.1 s
        bar(tokens, done, 1000)
    bar.close()
    frames = re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue()))
    frames = [f.rstrip() for f in frames if f.strip()]
    assert len(frames) >= 3 and all(len(f) <= width for f in frames), frames
    for f in frames:  # the share read, tokens, tokens/s, memory, elapsed and time left
        assert re.search(r"\d+% +[\d,]+ tok +[\d,]+ tok/s +[\d,]+ MiB +\d:\d\d:\d\d +eta \S+$", f), f
    (middle,) = [f for f in frames if "22,016 tok" in f]
    assert " 40% " in middle and "100%" in frames[-1]
    if width >= 120:
        assert middle.startswith("a_book_with_a_long_name") and "━" in middle
    out = io.StringIO()  # a phase shows beside the name
    bar = ReadProgress("book.txt", stream=out, enabled=True)
    bar.phase("note 1")
    bar(0, 0, 1000)
    time.sleep(0.11)
    bar.phase("note 2")
    bar(1536, 500, 1000)
    bar.close()
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    if width >= 120:  # narrower terminals drop the name first
        assert "book.txt: note 1" in shown and "book.txt: note 2" in shown
    quiet = io.StringIO()  # not a terminal
    bar = ReadProgress("book.txt", stream=quiet)
    bar(100, 100, 100)
    bar.close()
    assert quiet.getvalue() == ""


@pytest.fixture(scope="module")
def bad(tiny, shelf, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_bytes(b"")
    (d / "binary.txt").write_bytes(b"t5 t6 \x00\x01\x02\x03")
    (d / "dir").mkdir()
    data = (shelf / "book.state").read_bytes()
    (d / "truncated.state").write_bytes(data[: len(data) // 2])
    (d / "corrupt.state").write_bytes(b"not a state file at all")
    (d / "exists.state").write_bytes(b"keep me")
    shutil.copy(shelf / "book.state", d / "book.state")
    # A state of the same shapes from another model: other weights.
    from tiny import save_base

    other = d / "other-model"
    save_base(other, "llama", seed=1, infini={"segment_len": 8})
    (d / "other.txt").write_text(book(50, seed=2))
    assert cli("read", d / "other.txt", "-o", d / "other.state", "--model", other).exit_code == 0
    # A state whose recorded model has gone.
    gone = d / "gone-model"
    shutil.copytree(other, gone)
    assert cli("read", d / "other.txt", "-o", d / "orphan.state", "--model", gone).exit_code == 0
    shutil.rmtree(gone)
    return d


BAD = [
    (["read", "{d}/missing.txt", "-o", "{d}/out.state"], "no such file"),
    (["read", "{d}/dir", "-o", "{d}/out.state"], "directory"),
    (["read", "{d}/empty.txt", "-o", "{d}/out.state"], "empty"),
    (["read", "{d}/binary.txt", "-o", "{d}/out.state"], "binary"),
    (["read", "{book}", "-o", "{d}/exists.state"], "--force overwrites it"),
    (["read", "{book}", "-o", "{d}/exists.state", "--resume", "--force"], "exclude each other"),
    (["read", "{book}", "-o", "{d}/nodir/out.state"], "no such directory"),
    (["read", "{book}", "-o", "{d}/dir"], "is a directory"),
    (["read", "{book}", "-o", "{book}", "--force"], "is the input file"),
    (["read", "{book}", "-o", "{d}/exists.state", "--resume"], "corrupt or truncated"),
    (["read", "{book}", "-o", "{d}/other.state", "--resume", "--model", "{tiny}"], "another model"),
    (["read", "{book}", "-o", "{d}/book.state", "--resume", "--model", "{d}/other-model"], "another model"),
    (["read", "{d}/other.txt", "-o", "{d}/book.state", "--resume"], "not of"),
    (["read", "{book}", "-o", "{d}/out.state", "--model", "nobody/no-such-model"], "no-such-model"),
    (["read", "{book}", "-o", "{d}/out.state", "--model", "{d}/dir"], "not a model directory"),
    (["query", "{d}/missing.txt", "q"], "no such file"),
    (["query", "{d}/dir", "q"], "directory"),
    (["query", "{d}/empty.txt", "q"], "empty"),
    (["query", "{d}/binary.txt", "q"], "binary"),
    (["query", "{d}/truncated.state", "q"], "corrupt or truncated"),
    (["query", "{d}/corrupt.state", "q"], "corrupt or truncated"),
    (["query", "{d}/book.state", "q", "--model", "{d}/other-model"], "another model"),
    (["query", "{d}/book.state", "q", "--segment-len", "16"], "segment_len"),
    (["query", "{d}/orphan.state", "q"], "the model recorded in"),
    (["query", "{d}/book.state", " "], "question is empty"),
    (["summarize", "{d}/truncated.state"], "corrupt or truncated"),
    (["summarize", "{d}/binary.txt"], "binary"),
    (["info", "{d}/corrupt.state"], "corrupt or truncated"),
    (["info", "nobody/no-such-model"], "no-such-model"),
    (["info", "{d}/missing.state"], "missing.state: no such state file or model directory"),
    (["info", "missing.state"], "missing.state: no such state file or model directory"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a[:2]) + ": " + m for a, m in BAD])
def test_bad_input_gets_one_clear_line(tiny, bad, shelf, args, message):
    args = [a.format(d=bad, book=shelf / "book.txt", tiny=tiny) for a in args]
    before = {p.name: p.read_bytes() for p in bad.iterdir() if p.is_file()}
    r = cli(*args)
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    after = {p.name: p.read_bytes() for p in bad.iterdir() if p.is_file()}
    assert after == before  # nothing overwritten, nothing left behind


INVALID = [
    (["query", "{state}", "q", "--temp", "-1"], "'--temp': Input should be greater than or equal to 0"),
    (["query", "{state}", "q", "--top-p", "5"], "'--top-p': Input should be less than or equal to 1"),
    (["summarize", "{state}", "--min-p", "2"], "'--min-p'"),
    (["summarize", "{state}", "--top-k", "-3"], "'--top-k'"),
    (["summarize", "{state}", "--seed", "-1"], "'--seed'"),
    (["query", "{state}", "q", "-m", "99999999999999999999999"], "'-m': Input should be less than or equal to 1000000"),
    (["passkey", "--lengths", "2x"], "'--lengths': '2x' is not a length"),
    (["passkey", "--lengths", "4k,0"], "'--lengths': '0'"),
    (["passkey", "--lengths", "inf"], "'--lengths': 'inf'"),
    (["passkey", "--trials", "5,x"], "'--trials'"),
    (["passkey", "--trials", "0"], "'--trials'"),
    (["passkey", "--depths", "1.5"], "'--depths'"),
    (["passkey", "--depths", "start,deep"], "'--depths'"),
    (["passkey", "--depths", "sweep:x"], "'--depths'"),
    (["passkey", "--needle", "3q"], "'--needle'"),
    (["passkey", "--batch", "0"], "'--batch'"),
    (["train", "{d}/run", "--segments", "4"], "'--segments'"),
    (["train", "{d}/run", "--segments", "4,2"], "'--segments'"),
    (["train", "{d}/run", "--arch", "{{bad"], "'--arch'"),
    (["train", "{d}/run", "--infini", "[1]"], "'--infini'"),
    (["train", "{d}/run", "--mix", "lm=x"], "'--mix'"),
    (["train", "{d}/run", "--lr", "-1"], "'--lr'"),
    (["train", "{d}/run", "--steps", "0"], "'--steps'"),
    (["train", "{d}/run", "--eval-segments", "2,x"], "'--eval-segments'"),
    (["convert", "{d}/src", "{d}/dst", "--segment-len", "0"], "'--segment-len'"),
]


@pytest.mark.parametrize("args,message", INVALID, ids=[" ".join(a[-2:]) for a, _ in INVALID])
def test_invalid_values_are_refused_before_any_work(shelf, tmp_path, args, message):
    args = [a.format(state=shelf / "book.state", d=tmp_path) for a in args]
    r = cli(*args)
    assert r.exit_code == 2, r.output
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line, line
    assert line.endswith(f"(see infini {args[0]} --help)")
    assert list(tmp_path.iterdir()) == []


def test_missing_embedded_model_gets_one_clear_line(shelf, tmp_path, monkeypatch):
    monkeypatch.setattr(infini_mlx.utils, "DEFAULT_MODEL", tmp_path / "not-installed")
    for args in [["info"], ["read", shelf / "book.txt", "-o", tmp_path / "s.state"]]:
        r = cli(*args)
        assert r.exit_code == 1
        assert r.stderr.startswith("error: the embedded default model is not installed (--model")
        assert len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_force_overwrites_and_bad_utf8_is_read_with_a_warning(tiny, tmp_path):
    (tmp_path / "out.state").write_bytes(b"old")
    (tmp_path / "latin1.txt").write_bytes("t5 caf\u00e9 t6\nt7\n".encode("latin-1"))
    r = cli("read", tmp_path / "latin1.txt", "-o", tmp_path / "out.state", "--force", "--model", tiny)
    assert r.exit_code == 0, r.output
    (warning,) = r.stderr.strip().splitlines()
    assert warning.startswith("warning: ") and "not valid UTF-8" in warning
    assert read_state(tmp_path / "out.state")[1]["tokens_read"] == "4"  # café became one word


def _wait_for_checkpoint(proc, state, above):
    """Tokens in ``state`` once a checkpoint beyond ``above`` tokens is written."""
    while True:
        if proc.poll() is not None:
            pytest.fail(f"infini read ended (rc {proc.returncode}) before it could be stopped")
        try:
            n = int(read_state(state)[1]["tokens_read"])
            if n > above:
                return n
        except Exception:
            pass
        time.sleep(0.02)


def _exe():
    exe = Path(sys.executable).parent / "infini"
    return str(exe) if exe.exists() else shutil.which("infini")


def test_interrupt_kill_and_resume_as_a_real_subprocess(tiny, tmp_path):
    exe = _exe()
    text = book(12000, seed=7)
    path, state = tmp_path / "book.txt", tmp_path / "book.state"
    path.write_text(text)
    cmd = [exe, "read", str(path), "-o", str(state), "--model", str(tiny),
           "--segment-len", "32", "--checkpoint-every", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    model, tok = infini_mlx.load(tiny, infini={"segment_len": 32})

    # Ctrl-C: a clean exit, and the last checkpoint stays valid.
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(p, state, 0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted: ")
    cache, meta = load_state(state, model)
    assert meta["complete"] == "0" and cache[0].offset % 32 == 0
    assert sorted(f.name for f in tmp_path.iterdir()) == ["book.state", "book.txt"]
    stopped = cache[0].offset

    # SIGKILL in the middle of a resumed reading.
    p = subprocess.Popen(cmd + ["--resume"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = _wait_for_checkpoint(p, state, stopped)
    p.kill()
    p.wait(timeout=60)
    assert read_state(state)[1]["complete"] == "0"

    r = subprocess.run(cmd + ["--resume", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["resumed_at"] >= killed and out["tokens_read"] == 12000

    final, meta = load_state(state, model)
    assert meta["complete"] == "1"
    assert same_state(final, reference_cache(model, tok.encode(text)))


def test_train_and_passkey_errors_are_one_line(tmp_path):
    r = cli("passkey", "--model", tmp_path / "nothing-here", "--lengths", "1k", "--trials", "1")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    r = cli("train", tmp_path / "run", "--mix", "lm=1,bogus=1", "--tokenizer", tmp_path)
    assert r.exit_code != 0 and "unknown task 'bogus'" in r.output and "Traceback" not in r.output
    r = cli("train", tmp_path / "run", "--tokenizer", tmp_path)
    assert r.exit_code == 1 and "no tokenizer.json" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_ctrl_c_while_starting_is_one_line():
    # Imports (MLX, mlx-lm, transformers) take a second: interrupt once MLX is in.
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    p = subprocess.Popen([_exe(), "info"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if line.split("|")[-1].strip() == "mlx.core":
            break
    p.send_signal(signal.SIGINT)
    err = p.stderr.read()
    p.wait(timeout=60)
    assert "Traceback" not in err, err
    # On a loaded machine the signal can land after the imports, inside click: "Aborted!".
    last = err.strip().splitlines()[-1]
    assert (p.returncode, last) in ((130, "interrupted"), (1, "Aborted!")), (p.returncode, err)


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["info", "--json"]])
def test_a_reader_that_went_away_is_no_error(args):
    read, write = os.pipe()
    os.close(read)  # `infini ... | head` after head has quit
    r = subprocess.run([_exe(), *args], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert r.stderr == "" and r.returncode == 1


OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def _mlx_sgemm(cmd, tmp_path, **extra):
    """The library MLX's cblas_sgemm is bound to in ``cmd``, run without LD_PRELOAD; and stderr."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(tmp_path / "ld"), **extra)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for log in tmp_path.glob("ld.*"):
        for line in log.read_text(errors="replace").splitlines():
            if "libmlx.so" in line.split(" to ")[0] and "`cblas_sgemm'" in line:
                return line.split(" to ")[1].split()[0], r.stderr
    pytest.fail("MLX's cblas_sgemm binding not found")


@pytest.mark.skipif(not Path(OPENBLAS).exists(), reason="Linux with libopenblas0-pthread only")
def test_openblas_is_loaded_without_ld_preload(tmp_path):
    # The README's first commands, as copied: `infini ...` and `pytest` (conftest imports infini_mlx).
    for i, cmd in enumerate([[_exe(), "info"], [sys.executable, "-c", "import infini_mlx"]]):
        (tmp_path / str(i)).mkdir()
        lib, err = _mlx_sgemm(cmd, tmp_path / str(i))
        assert "libopenblas" in lib and "openblas" not in err
    (tmp_path / "off").mkdir()
    lib, err = _mlx_sgemm([_exe(), "info"], tmp_path / "off", INFINI_OPENBLAS="0")
    assert "libopenblas" not in lib and err == ""


def test_missing_openblas_is_one_note(tmp_path):
    r = subprocess.run([_exe(), "info"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "LD_PRELOAD": "", "INFINI_OPENBLAS": str(tmp_path / "none.so")})
    assert r.returncode == 0
    if sys.platform == "linux":
        (note,) = r.stderr.strip().splitlines()
        assert note.startswith("note: ") and "apt-get install libopenblas0-pthread" in note
