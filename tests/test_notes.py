"""Incremental notes: the merging rule, and a session's notes across interruptions and state files."""

import json
import math

import pytest
from books import book, model_dir
from infini_mlx.cli.main import app
from typer.testing import CliRunner

from infini_mlx import InfiniSession, StateFileError
from infini_mlx import notes as N
from infini_mlx.state import read_state, save_state

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def words(text: str) -> int:
    return len(text.split())


def numbers(text: str):
    return [int(w.strip(".")[1:]) for w in text.split() if w.startswith("w")]


@pytest.mark.parametrize("n", [1, 2, 5, 9, 30])
def test_notes_stay_within_budget_in_order(n):
    merged = []

    def merge(text):  # keeps the w-words, drops the rest
        merged.append(text)
        return " ".join(w for w in text.split() if w.startswith("w")) + "."

    notes = []
    for i in range(n):
        notes = N.add(notes, f"w{i} and more text.", 40, words, merge)
        assert words(N.join(notes)) <= 40
    assert numbers(N.join(notes)) == list(range(n))  # nothing the merges kept is lost or reordered
    assert bool(merged) == (n * 4 > 40)
    for text in merged:  # two neighbours, oldest first
        a, b = text.split("\n\n")
        assert numbers(a)[-1] + 1 == numbers(b)[0]


def test_fit_merges_neighbours_until_the_notes_fit():
    notes = [(0, f"a{i} b{i} c{i}.") for i in range(10)]
    words = lambda t: len(t.split())  # noqa: E731
    out = N.fit(notes, 12, words, lambda t: " ".join(t.split()[:2]) + ".")
    assert words(N.join(out)) <= 12 and len(out) < 10
    kept = [w for w in N.join(out).replace(".", "").split()]
    assert kept == sorted(kept, key=lambda w: int(w[1:]))  # oldest first still
    assert N.fit(notes, 1000, words, None) == notes


def test_trim_cuts_at_the_last_full_sentence():
    assert N.trim("Alice falls.  She grows\nand shrinks. Then the Ra") == "Alice falls. She grows and shrinks."
    assert N.trim("“Off with her head!” the Queen") == "“Off with her head!”"
    assert N.trim("no sentence ends here") == "no sentence ends here"
    assert N.trim("Hi. a long unfinished sentence goes on") == "Hi. a long unfinished sentence goes on"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    d = model_dir(tmp_path_factory.mktemp("untrained"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["infini"]["memory_trained"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_take_notes_writes_one_note_per_window(tiny, tmp_path):
    text = book(150, seed=2)
    s = InfiniSession.load(tiny)
    seen = []
    fed = s.take_notes(text, progress=lambda t, d, n: seen.append(t))
    windows = math.ceil(150 / s.note_window)
    assert fed == s.tokens_read == 150 and s.strategy == "notes"
    assert seen[:windows] == [min(150, (i + 1) * s.note_window) for i in range(windows)]
    budget = s.cache[0].segment_len // 2
    assert len(s.notes) == 1 or s._count(N.join(s.notes)) <= budget
    assert s.cache[0].offset == 0  # notes only: the memory was not fed
    with pytest.raises(ValueError, match="holds notes"):
        s.read(text)


def test_interrupted_notes_resume_to_the_same_notes(tiny, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(book(150, seed=3))
    whole = InfiniSession.load(tiny)
    whole.take_notes(path)

    state = tmp_path / "notes.state"
    s = InfiniSession.load(tiny)
    calls = []

    def stop_after_three(*a):
        calls.append(a)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        s.take_notes(path, progress=stop_after_three, checkpoint=state)
    again = InfiniSession.restore(state)
    assert not again.complete and again.tokens_read == 3 * again.note_window
    again.take_notes(path, checkpoint=state)
    assert again.notes == whole.notes and again.tokens_read == whole.tokens_read
    back = InfiniSession.restore(state)
    assert back.notes == whole.notes and back.complete
    assert back.summarize(max_tokens=5) == whole.summarize(max_tokens=5)


def test_summarize_takes_notes_by_default_when_the_memory_is_untrained(untrained, tiny, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(book(60, seed=4))
    r = cli("summarize", path, "--model", untrained, "-m", 4, "--json", "-o", tmp_path / "n.state")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["strategy"] == "notes" and out["tokens_seen"] == 60
    assert "never trained" not in r.stderr
    # The state answers at once, from the same notes.
    r2 = cli("summarize", tmp_path / "n.state", "-m", 4, "--json")
    assert json.loads(r2.stdout)["summary"] == out["summary"] and "never trained" not in r2.stderr
    r3 = cli("summarize", tmp_path / "n.state", "--strategy", "memory")
    assert r3.exit_code == 1 and "holds a reading into notes" in r3.stderr
    # A trained memory keeps the memory path; --strategy overrides either way.
    r4 = cli("summarize", path, "--model", tiny, "-m", 4, "--json")
    assert json.loads(r4.stdout)["strategy"] == "memory"
    r5 = cli("summarize", path, "--model", tiny, "-m", 4, "--json", "--strategy", "notes")
    assert json.loads(r5.stdout)["strategy"] == "notes"
    r6 = cli("summarize", path, "--model", untrained, "-m", 4, "--strategy", "memory")
    assert r6.exit_code == 0 and "never trained" in r6.stderr


def test_read_into_notes_then_query_them(untrained, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(book(40, seed=5))
    r = cli("read", path, "-o", tmp_path / "n.state", "--model", untrained, "--strategy", "notes")
    assert r.exit_code == 0 and "notes into" in r.stdout, r.output
    r = cli("query", tmp_path / "n.state", "t5?", "-m", 3, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["strategy"] == "notes"
    r = cli("read", path, "-o", tmp_path / "n.state", "--resume")
    assert "already holds all" in r.stdout


def test_corrupt_notes_are_refused_in_one_line(tiny, tmp_path):
    s = InfiniSession.load(tiny)
    s.take_notes(book(20, seed=6))
    bad = tmp_path / "bad.state"
    save_state(bad, s.cache, s.model, {**s.meta, "notes": "[[0, 3]"}, s.fingerprint)
    with pytest.raises(StateFileError, match="notes are unreadable"):
        InfiniSession.restore(bad)
    assert read_state(bad)[1]["strategy"] == "notes"
    r = cli("summarize", bad)
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "unreadable" in r.stderr
