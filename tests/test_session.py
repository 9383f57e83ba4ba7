"""InfiniSession: reading in pieces, asking from a copy, saving, resuming, chat templates."""

import dataclasses
import io
import warnings
from pathlib import Path
from typing import Optional

import mlx.core as mx
import pytest
from books import book, greedy, model_dir, reference_cache, same_state

import infini_mlx
import infini_mlx.reading as reading
from infini_mlx import InfiniSession, InputError, UntrainedMemoryWarning, load_state

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = (
    "{% for m in messages %}t3 t4 {{ m['content'] }} t5 t6{% endfor %}"
    "{% if add_generation_prompt %} t7{% endif %}"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("chat"), chat_template=TEMPLATE)


def test_chunks_end_on_line_starts_and_resume_anywhere():
    data = ("é" * 50 + "\n\n" + "word " * 30 + "x" * 70 + "\n").encode() * 5
    got = list(reading.chunks(io.BytesIO(data), 0, size=64))
    assert b"".join(c for _, c in got) == data
    for off, c in got:
        assert c.decode("utf-8")  # never a character cut in two
        # Reading from any offset it yielded gives the same pieces from there.
        assert list(reading.chunks(io.BytesIO(data), off, size=64)) == [p for p in got if p[0] >= off]
    ends = {off + len(c) for off, c in got[:-1]}
    assert any(data[e - 1 : e] == b"\n" for e in ends)
    assert not any(data[e - 1 : e + 1] == b"\n\n" for e in ends)  # blank lines kept whole


def test_read_in_pieces_equals_one_prefill_of_the_whole_text(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "CHUNK", 100)  # many pieces, many cuts
    text = book(700, seed=1)
    (tmp_path / "b.txt").write_text(text)
    session = InfiniSession.load(tiny)
    assert session.read(tmp_path / "b.txt") == len(text.split())

    model, tok = infini_mlx.load(tiny)
    ref = reference_cache(model, tok.encode(text))
    assert same_state(session.cache, ref)
    assert session.complete and session.meta["source"] == str((tmp_path / "b.txt").resolve())


def test_progress_moves_with_the_tokens_not_by_pieces(tiny, tmp_path):
    path = tmp_path / "b.txt"
    path.write_text(book(40000, seed=1))  # three pieces of 64 KiB
    calls = []
    InfiniSession.load(tiny).read(path, progress=lambda *a: calls.append(a))
    total_tokens = calls[-1][0]
    assert calls[-1][1:] == (path.stat().st_size,) * 2
    for tokens, done, size in calls:
        assert abs(done / size - tokens / total_tokens) < 0.02, (tokens, done)


def test_questions_are_answered_from_a_copy(tiny):
    text = book(300, seed=2)
    session = InfiniSession.load(tiny)
    session.read(text)  # a str with whitespace is the text itself
    before = [tuple(None if a is None else mx.array(a) for a in c.state) for c in session.cache]

    model, tok = infini_mlx.load(tiny)
    q = "t5 t9 t11"
    prompt = tok.encode(f"\n\nQuestion: {q}\nAnswer:", add_special_tokens=False)
    cache = reference_cache(model, tok.encode(text))
    assert cache[0].segment_pos != 0  # the text ends inside a segment; the question starts a new one
    for c in cache:
        c.end_segment()
    ref = greedy(model, cache, prompt, 12, tok.eos_token_ids)
    expected = [f"t{t}" for t in ref]

    assert session.ask(q, max_tokens=12).split() == expected
    assert "".join(session.stream_ask(q, max_tokens=12)).split() == expected  # asked again
    session.summarize(max_tokens=5, temp=1.0, seed=0)
    assert session.response.prompt_tokens == len(tok.encode("\n\nSummary:", add_special_tokens=False))
    for c, saved in zip(session.cache, before):  # reading state untouched
        assert c.offset == len(text.split())
        assert all((a is None and b is None) or mx.array_equal(a, b) for a, b in zip(c.state, saved))



def test_a_question_starts_a_segment_where_the_memory_is_trained(tiny, tmp_path, monkeypatch):
    from tiny import save_base

    import infini_mlx.session as S

    seen = []

    def spy(model, tokenizer, prompt, max_tokens, prompt_cache=None, **kwargs):
        seen.append([(c.offset, c.segment_pos) for c in prompt_cache])
        return iter(())

    monkeypatch.setattr(S, "stream_generate", spy)
    save_base(tmp_path / "plain", "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedMemoryWarning)
        plain = InfiniSession.load(tmp_path / "plain", segment_len=8)
    for session in (InfiniSession.load(tiny), plain):
        session.read(book(21, seed=2))
        session.ask("t5")
        session.summarize()
        assert session.question_segment == (session is not plain)
        n = session.cache[0].segment_len
        # Trained: the question and the summary prompt start a segment (21 words, segments of
        # SEGMENT); untrained: they go on in the text's last segment, the only text they see.
        expect = [(-(-21 // n) * n, 0)] if session is not plain else [(21, 5)]
        assert seen == [expect * len(session.cache)] * 2, seen
        assert all(c.offset == 21 for c in session.cache)  # the reading itself is untouched
        seen.clear()

def test_a_plain_models_answer_ends_at_its_line_break(tiny, monkeypatch):
    session = InfiniSession.load(tiny)
    session.read(book(50, seed=2))
    asked = []

    def generate(instruction, **kwargs):
        asked.append(instruction)
        yield from ["27", "992", "\nWhat is", " the special"]

    monkeypatch.setattr(session, "_generate", generate)
    assert session.ask("What is the pass key?") == "27992"
    assert asked == ["Question: What is the pass key?\nAnswer:"]
    session.meta["prompt_format"] = "chat"  # a chat model's answer runs to its end of turn
    assert session.ask("Why?") == "27992\nWhat is the special"


def test_save_and_restore(tiny, tmp_path):
    session = InfiniSession.load(tiny)
    session.read(book(203, seed=3))  # ends inside a segment: pending keys are saved too
    session.save(tmp_path / "s.state")
    restored = InfiniSession.restore(tmp_path / "s.state")  # the model it records
    assert same_state(session.cache, restored.cache)
    assert restored.ask("t4", max_tokens=6) == session.ask("t4", max_tokens=6)


def test_save_overwrites_only_when_asked(tiny, tmp_path):
    path = tmp_path / "s.state"
    path.write_bytes(b"keep me")
    session = InfiniSession.load(tiny)
    session.read(book(40, seed=3))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        session.save(path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        InfiniSession.load(tiny).read(book(40, seed=3), checkpoint=path)
    assert path.read_bytes() == b"keep me"
    session.save(path, overwrite=True)
    assert InfiniSession.restore(path).tokens_read == 40


def test_answers_start_at_their_first_word(tiny, monkeypatch):
    # A plain prompt ends with "Answer:": models often go on with a line break.
    @dataclasses.dataclass
    class Response:
        text: str
        finish_reason: Optional[str] = None

    def stream(*args, **kwargs):
        for text in ["\n", " ", "\n Alice", " went", "\n"]:
            yield Response(text)

    session = InfiniSession.load(tiny)
    session.read(book(40, seed=3))
    monkeypatch.setattr(infini_mlx.session, "stream_generate", stream)
    assert session.ask("Who?") == "Alice went"  # and ends at its line break
    assert session.response.finish_reason == "stop"  # as mlx-lm says of an answer that ended
    assert list(session.stream_summarize()) == ["Alice", " went", "\n"]
    assert session.response.finish_reason is None


def test_interrupted_read_resumes_to_the_uninterrupted_state(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "CHUNK", 128)
    text = book(2700, seed=4)
    path, ckpt = tmp_path / "b.txt", tmp_path / "b.state"
    path.write_text(text)

    def stop(tokens, done, total):
        if tokens > 1500:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        InfiniSession.load(tiny).read(path, progress=stop, checkpoint=ckpt, checkpoint_every=3)
    monkeypatch.setattr(reading, "CHUNK", 1000)  # the checkpoint's piece size still rules
    partial = InfiniSession.restore(ckpt)
    assert not partial.complete and 0 < partial.tokens_read < 2700
    assert partial.tokens_read % 8 == 0  # checkpoints lie on segment boundaries
    partial.read(path, checkpoint=ckpt)

    model, tok = infini_mlx.load(tiny)
    ref = reference_cache(model, tok.encode(text))
    assert same_state(partial.cache, ref)
    cache, meta = load_state(ckpt, model)
    assert same_state(cache, ref) and meta["complete"] == "1"


def test_chat_template_wraps_the_book_and_the_question(chat):
    text = book(100, seed=5)
    session = InfiniSession.load(chat)
    assert session.meta["prompt_format"] == "chat"
    session.read(text)

    model, tok = infini_mlx.load(chat)
    # The template opens the user's turn ("t3 t4 "), the book and question follow.
    cache = reference_cache(model, [3, 4] + tok.encode(text))
    assert same_state(session.cache, cache)
    for c in cache:  # the question starts a segment of its own (a trained memory)
        c.end_segment()
    prompt = tok.encode("\n\nt9 t10", add_special_tokens=False) + [5, 6, 7]
    expected = [f"t{t}" for t in greedy(model, cache, prompt, 8, tok.eos_token_ids)]
    assert session.ask("t9 t10", max_tokens=8).split() == expected
    assert session.response.prompt_tokens == len(prompt)


def test_bad_text_is_refused_or_decoded_with_a_warning(tiny, tmp_path):
    session = InfiniSession.load(tiny)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bin.dat").write_bytes(b"t5 t6\x00\x01\x02")
    (tmp_path / "blank.txt").write_text("  \n\n \n")
    for bad, match in [
        (tmp_path / "missing.txt", "no such file"),
        ("missing.txt", "no such file"),  # a str without whitespace is a path
        (tmp_path, "directory"),
        (tmp_path / "empty.txt", "empty"),
        (tmp_path / "bin.dat", "binary"),
        ("   \n ", "empty"),
        (tmp_path / "blank.txt", "holds no text"),
    ]:
        with pytest.raises(InputError, match=match):
            session.read(bad)
    assert session.tokens_read == 0 and "source" not in session.meta
    (tmp_path / "latin1.txt").write_bytes("t5 caf\u00e9 t6\n".encode("latin-1"))
    with pytest.warns(UnicodeWarning, match="not valid UTF-8"):
        assert session.read(tmp_path / "latin1.txt") == 3


def test_readme_api_example_runs_verbatim_from_the_repo_root(tiny, monkeypatch):
    # The example uses the embedded model, which the tiny one stands in for.
    monkeypatch.setattr(infini_mlx.utils, "DEFAULT_MODEL", tiny)
    monkeypatch.chdir(REPO)
    readme = (REPO / "README.md").read_text()
    example = readme.split("<!-- api-example -->")[1].split("```python\n")[1].split("```")[0]
    state = REPO / "alice.state"
    kept = state.read_bytes() if state.exists() else None  # a reader's own, from the CLI examples
    try:
        exec(compile(example, "README.md", "exec"), {"__name__": "__main__"})
        restored = InfiniSession.restore(state)
        assert restored.complete and restored.meta["source"] == str(REPO / "examples" / "alice.txt")
    finally:
        if kept is None:
            state.unlink(missing_ok=True)
        else:
            state.write_bytes(kept)


def test_untrained_memory_is_warned_of_once_and_answers_see_the_last_segment(tiny, tmp_path):
    from tiny import save_base

    save_base(tmp_path / "plain", "llama")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        session = InfiniSession.load(tiny)  # stands in for a trained model
        assert session.tokens_seen == 0 and not seen
        plain = InfiniSession.load(tmp_path / "plain", segment_len=8)
    (w,) = seen
    assert issubclass(w.category, UntrainedMemoryWarning) and str(w.message) == (
        f"the memory of {tmp_path / 'plain'} was never trained: answers see only the last segment"
    )
    plain.read(book(21, seed=2))
    session.read(book(21, seed=2))
    assert (plain.tokens_read, plain.tokens_seen) == (21, 5)  # 16 of the 21 words in the memory
    assert session.tokens_seen == 21
    plain.save(tmp_path / "plain.state")
    with pytest.warns(UntrainedMemoryWarning, match="never trained"):
        InfiniSession.restore(tmp_path / "plain.state")
