"""InfiniSession: read a book once into a bounded memory, then ask it questions."""

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from . import notes as N
from . import reading
from .cache import InfiniCache
from .reading import InputError, check_text_file, fingerprint
from .state import StateFileError, load_state, model_fingerprint, read_state, save_state
from .streaming import prefill
from .tasks import plain_question
from .utils import ModelNotFoundError, load

# Cut out of a rendered chat template to find where the user's message goes.
_MARK = "\u2063INFINI_TEXT\u2063"
# The metadata a session keeps in its state files besides the core's own.
_KEYS = ("model", "prompt_format", "source", "source_size", "source_sha",
         "source_chunk", "source_pos", "source_skip", "head", "complete",
         "strategy", "notes", "notes_tokens")
STRATEGIES = ("memory", "notes")

Progress = Callable[[int, int, int], None]


class UntrainedMemoryWarning(UserWarning):
    """Reading with a memory that was never trained: only the last segment is seen."""


def _model_id(model: Optional[Union[str, Path]]) -> str:
    if model is None:
        return ""
    p = Path(model)
    return str(p.resolve()) if p.exists() else str(model)


def _as_path(source: Union[str, Path]) -> Optional[Path]:
    """A Path, or a str naming an existing file, is a file; any other str is text."""
    if isinstance(source, Path):
        return source
    if not any(c.isspace() for c in source):
        return Path(source)
    try:
        return Path(source) if "\n" not in source and Path(source).is_file() else None
    except OSError:  # e.g. a name too long
        return None


def _notes(path, meta) -> List[N.Note]:
    try:
        notes = json.loads(meta.get("notes", "[]"))
        assert all(isinstance(lvl, int) and isinstance(t, str) for lvl, t in notes)
        int(meta.get("notes_tokens", "0"))
    except Exception:
        raise StateFileError(f"{path}: the state's notes are unreadable (corrupt)") from None
    return [(lvl, t) for lvl, t in notes]


class InfiniSession:
    """A model and what it has read, kept in a memory of fixed size.

    Reading streams text through the model one segment at a time, so the
    memory in use does not grow with the text's length. Questions are answered
    from a copy of that memory, so one reading can answer many questions.

    Args:
        model: An Infini model, e.g. from ``infini_mlx.load``.
        tokenizer: Its tokenizer (mlx-lm's ``TokenizerWrapper``).
        model_id: How to load the model again (a directory or a Hugging Face
            id; ``""`` for the embedded model), recorded in saved states.

    Attributes:
        question_segment: A question (or summary prompt) starts a segment of
            its own, the text's last partial segment folded into the memory
            first, so local attention sees the whole question wherever the
            text ended. True where the memory is trained; an untrained one
            leaves answers only the last segment of text to see, so there the
            question continues it.
    """

    def __init__(self, model: nn.Module, tokenizer, model_id: str = ""):
        self.model, self.tokenizer = model, tokenizer
        self.cache: List[InfiniCache] = model.make_cache()
        chat = getattr(tokenizer, "has_chat_template", False)
        self.meta: Dict[str, str] = {
            "model": model_id,
            "prompt_format": "chat" if chat else "plain",
        }
        self.response = None  # the last mlx-lm GenerationResponse
        self.checkpointed = 0  # tokens in the last checkpoint written
        self.path: Optional[Path] = None  # the state file last restored or saved
        self.notes: List[N.Note] = []  # with the notes strategy: what was read, in notes
        self._fingerprint = None
        self.question_segment = bool(model.infini_config.memory_trained)

    @classmethod
    def load(
        cls, model: Optional[Union[str, Path]] = None, segment_len: Optional[int] = None
    ) -> "InfiniSession":
        """Load a model into a new session.

        Args:
            model: A local directory or Hugging Face id; ``None`` for the
                embedded default model.
            segment_len: Tokens per segment, overriding the model's.
        """
        session = cls._open(model, segment_len)
        session._warn_if_untrained(model)
        return session

    @classmethod
    def _open(cls, model, segment_len) -> "InfiniSession":
        m, tok = load(model, infini={"segment_len": segment_len} if segment_len else None)
        return cls(m, tok, _model_id(model))

    def _warn_if_untrained(self, model):
        if not self.model.infini_config.memory_trained:
            warnings.warn(
                f"the memory of {model or 'the embedded model'} was never trained: "
                "answers see only the last segment",
                UntrainedMemoryWarning,
                stacklevel=3,
            )

    @classmethod
    def restore(
        cls,
        path: Union[str, Path],
        model: Optional[Union[str, Path]] = None,
        segment_len: Optional[int] = None,
    ) -> "InfiniSession":
        """Load a state file saved by ``save`` (or ``infini read``).

        Args:
            path: The state file.
            model: The model that wrote it; ``None`` for the one it records.
            segment_len: Defaults to the state's.

        Raises:
            StateFileError: The file is corrupt, truncated, or from another model.
        """
        _, meta = read_state(path)
        if segment_len is None:
            try:
                segment_len = int(json.loads(meta["infini"])["segment_len"])
            except Exception:
                raise StateFileError(f"{path}: unreadable infini config in state file") from None
        recorded = model is None and meta.get("model")
        model = meta["model"] if recorded else model
        try:
            session = cls._open(model, segment_len)
        except ModelNotFoundError as e:
            if not recorded:
                raise
            raise ModelNotFoundError(
                f"{e}; it is the model recorded in {path}: name the model to use"
            ) from None
        session.cache, saved = load_state(path, session.model, session.fingerprint)
        session.meta.update({k: saved[k] for k in _KEYS if k in saved})
        session.notes = _notes(path, session.meta)
        session.checkpointed = session.tokens_read
        session.path = Path(path).resolve()
        if session.strategy == "memory":  # notes see everything read
            session._warn_if_untrained(model)  # only once the state is known to fit
        return session

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @property
    def strategy(self) -> str:
        """How what was read is kept: ``"memory"`` (the model's memory) or ``"notes"``."""
        return self.meta.get("strategy", "memory")

    @property
    def tokens_read(self) -> int:
        """Tokens the memory holds (or the notes cover)."""
        if self.strategy == "notes":
            return int(self.meta.get("notes_tokens", "0"))
        return self.cache[0].offset

    @property
    def tokens_seen(self) -> int:
        """Tokens read that an answer can see: all of them, or with a memory
        that was never trained only those of the last, unfinished segment."""
        if self.model.infini_config.memory_trained or self.strategy == "notes":
            return self.tokens_read
        return self.cache[0].segment_pos

    @property
    def complete(self) -> bool:
        """False while the last reading was interrupted before its end."""
        return self.meta.get("complete", "1") == "1"

    def _template(self):
        msgs = [{"role": "user", "content": _MARK}]
        text = self.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True
        )
        head, mark, tail = text.partition(_MARK)
        if not mark:
            raise ValueError("the tokenizer's chat template drops the user's message")
        return head, tail

    def _head(self) -> List[int]:
        """What opens a reading: BOS, or a chat template up to the user's message."""
        text = self._template()[0] if self.meta["prompt_format"] == "chat" else ""
        bos = self.tokenizer.bos_token
        return self.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))

    def _start(self, source, checkpoint, overwrite, name, head=True):
        """Check a reading's source and record it; where it starts (a resumed one
        where it stopped): ``(path, size, start, skip, head, chunk, meta before)``."""
        if checkpoint is not None and not overwrite:
            self._check_new(checkpoint)
        path = _as_path(source)
        if path is not None:
            size, sha, name = check_text_file(path), fingerprint(path), name or str(path.resolve())
        else:
            if not source.strip():
                raise InputError("the text is empty: there is nothing to read")
            size, sha, name = len(source.encode("utf-8")), "", name or "<text>"
        m, before = self.meta, dict(self.meta)
        if m.get("complete") == "0" and m.get("source_sha") == sha and sha:
            start, skip = int(m["source_pos"]), int(m["source_skip"])
            ids, chunk = json.loads(m["head"]), int(m["source_chunk"])
        else:
            start, skip, chunk = 0, 0, reading.CHUNK
            ids = self._head() if head and self.tokens_read == 0 else []
        m.update(source=name, source_size=str(size), source_sha=sha, head=json.dumps(ids))
        m.update(source_chunk=str(chunk))
        m.update(complete="0", source_pos=str(start), source_skip=str(skip))
        return path, size, start, skip, ids, chunk, before

    def read(
        self,
        source: Union[str, Path],
        progress: Optional[Progress] = None,
        checkpoint: Optional[Union[str, Path]] = None,
        checkpoint_every: int = 16,
        name: Optional[str] = None,
        overwrite: bool = False,
    ) -> int:
        """Read a text file, or a text, into the memory; return the tokens read.

        The file is read and tokenized in pieces of 64 KiB and fed to the model
        one segment at a time. A reading that was interrupted (a session from
        ``restore`` of a checkpoint) continues where it stopped, so the result
        equals that of an uninterrupted reading.

        Args:
            source: A path (a ``Path``, or a str naming an existing file), or
                the text itself (a str containing whitespace).
            progress: Called as ``progress(tokens_read, bytes_done, bytes_total)``;
                ``bytes_done`` is estimated within a piece.
            checkpoint: Save the state to this file every ``checkpoint_every``
                segments and at the end (atomic writes).
            checkpoint_every: Segments between checkpoints.
            name: The source recorded in the state (default: the file's
                absolute path), e.g. ``"<stdin>"`` for a spooled copy.
            overwrite: Replace an existing ``checkpoint`` file other than the
                one this session was restored from.

        Raises:
            InputError: Missing file, directory, empty or binary file.
            FileExistsError: ``checkpoint`` exists and may not be replaced.
        """
        if self.strategy != "memory" and self.tokens_read:
            raise ValueError("this session holds notes, not a memory reading: take_notes continues it")
        path, size, start, skip, head, chunk, before = self._start(source, checkpoint, overwrite, name)
        m = self.meta
        at = [start, skip, 1]  # where the tokens handed to the model so far end; piece's tokens
        seg = self.cache[0].segment_len
        base = last = self.cache[0].offset // seg

        def tokens():
            for off, ids in reading.pieces(self.tokenizer, path or source, start, head, chunk):
                at[2] = max(len(ids), 1)
                for i in range(skip if off == start else 0, len(ids)):
                    at[:2] = off, i + 1
                    yield ids[i]

        def step(fed):
            nonlocal last
            # Only segment boundaries are recorded, so a resumed reading feeds
            # the model the very blocks an uninterrupted one does. A block may
            # complete several segments: checkpoint when it crosses a multiple.
            if self.cache[0].segment_pos == 0:
                done = self.cache[0].offset // seg
                m.update(source_pos=str(at[0]), source_skip=str(at[1]))
                crossed = (done - base) // checkpoint_every > (last - base) // checkpoint_every
                if checkpoint is not None and crossed:
                    self.save(checkpoint, overwrite=True)
                last = done
            if progress:
                # Into the piece too (a piece is about ``chunk`` bytes), not by 64 KiB steps.
                progress(self.tokens_read, at[0] + min(chunk, size - at[0]) * at[1] // at[2], size)

        first = self.tokens_read
        prefill(self.model, tokens(), self.cache, step, logits=False)
        return self._finish(first, start, skip, before, path, size, checkpoint, progress)

    def _finish(self, first, start, skip, before, path, size, checkpoint, progress) -> int:
        """End a reading (memory or notes): refuse an empty one, mark it complete,
        save it; the tokens read now."""
        fed = self.tokens_read - first
        if fed == 0 and start == 0 and skip == 0:
            self.meta = before
            raise InputError(f"{path or 'the text'} holds no text to read")
        self.meta.update(complete="1", source_pos=str(size), source_skip="0")
        if checkpoint is not None:
            self.save(checkpoint, overwrite=True)
        if progress:
            progress(self.tokens_read, size, size)
        return fed

    @property
    def note_window(self) -> int:
        """Tokens of text per note: a window, its prompt and its note fit one segment."""
        return max(16, min(1536, self.cache[0].segment_len - N.NOTE_TOKENS - 128))

    def take_notes(
        self,
        source: Union[str, Path],
        progress: Optional[Progress] = None,
        checkpoint: Optional[Union[str, Path]] = None,
        checkpoint_every: int = 1,
        name: Optional[str] = None,
        overwrite: bool = False,
    ) -> int:
        """Read a text file, or a text, into notes; return the tokens read.

        The summary strategy for a model whose memory was never trained: after
        each window of ``note_window`` tokens the model writes a short note on
        it, with a fresh cache (so exactly as the base model would); notes are
        merged when they outgrow half a segment (see ``infini_mlx.notes``), so
        memory stays flat in the text's length. ``summarize`` and ``ask`` then answer from the
        notes. Arguments as for ``read``; checkpoints come every
        ``checkpoint_every`` windows, and an interrupted reading continues
        where it stopped.
        """
        if self.strategy != "notes" and self.tokens_read:
            raise ValueError("this session holds a memory reading: notes need a new session")
        path, size, start, skip, _, chunk, before = self._start(
            source, checkpoint, overwrite, name, head=False
        )
        m = self.meta
        m["strategy"] = "notes"
        first, n, buf, windows, piece = self.tokens_read, self.note_window, [], 0, 1
        seg = self.cache[0].segment_len

        def note(off, pos):
            nonlocal buf, windows
            self._phase(progress, f"note {len(self.notes) + 1}")
            text = self.tokenizer.decode(buf)
            self.notes = N.add(self.notes, self._write(N.NOTE, text), seg // 2, self._count, self._merge)
            m.update(
                notes=json.dumps(self.notes), notes_tokens=str(self.tokens_read + len(buf)),
                source_pos=str(off), source_skip=str(pos),
            )
            buf, windows = [], windows + 1
            if checkpoint is not None and windows % checkpoint_every == 0:
                self.save(checkpoint, overwrite=True)
            if progress:  # into the piece too
                progress(self.tokens_read, off + min(chunk, size - off) * pos // piece, size)

        for off, ids in reading.pieces(self.tokenizer, path or source, start, (), chunk):
            piece = max(len(ids), 1)
            for i in range(skip if off == start else 0, len(ids)):
                buf.append(ids[i])
                if len(buf) == n:
                    note(off, i + 1)
        if buf:
            note(size, 0)
        return self._finish(first, start, skip, before, path, size, checkpoint, progress)

    @staticmethod
    def _phase(progress, text: str):
        if hasattr(progress, "phase"):
            progress.phase(text)

    def _count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _merge(self, text: str) -> str:
        return self._write(N.MERGE, text)

    def _write(self, instruction: str, text: str, max_tokens: int = N.NOTE_TOKENS) -> str:
        """What the model writes, greedily, from ``text`` alone and an instruction."""
        return "".join(self._stream_write(instruction, text, max_tokens=max_tokens))

    def _stream_write(
        self, instruction: str, text: str, max_tokens: int = N.NOTE_TOKENS, **kwargs
    ) -> Iterator[str]:
        # A fresh cache: the prompt is the text and the instruction, nothing else.
        if self.meta["prompt_format"] == "chat":
            head, tail = self._template()
            prompt = f"{head}{text}\n\n{instruction}{tail}"
        else:
            prompt = f"{text}\n\n{N.PLAIN.get(instruction, instruction)}"
        bos = self.tokenizer.bos_token
        ids = self.tokenizer.encode(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))
        procs = make_logits_processors(
            repetition_penalty=N.REPETITION_PENALTY, repetition_context_size=N.REPETITION_CONTEXT
        )
        yield from self._stream(ids, self.model.make_cache(), max_tokens, procs, **kwargs)

    def _check_new(self, path: Union[str, Path]):
        if Path(path).exists() and Path(path).resolve() != self.path:
            raise FileExistsError(f"{path} exists; overwrite=True replaces it")

    def save(self, path: Union[str, Path], overwrite: bool = False) -> None:
        """Save the memory and what was read to a state file (an atomic write).

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is False.
        """
        if not overwrite and Path(path).exists():
            raise FileExistsError(f"{path} exists; overwrite=True replaces it")
        save_state(path, self.cache, self.model, self.meta, self.fingerprint)
        self.checkpointed = self.tokens_read
        self.path = Path(path).resolve()

    def _fork(self) -> List[InfiniCache]:
        """A copy of the memory to answer from. Arrays are copied too, since
        a cache writes its pending keys and values in place."""
        out = []
        for c in self.cache:
            f = InfiniCache(c.segment_len, c.form)
            f.offset = c.offset
            f.state = tuple(None if a is None else mx.array(a) for a in c.state)
            out.append(f)
        return out

    def _generate(self, instruction: str, max_tokens: int = 256, **kwargs) -> Iterator[str]:
        if self.tokens_read == 0:
            raise ValueError("nothing has been read yet: read a text first")
        if self.meta["prompt_format"] == "chat":
            suffix = f"\n\n{instruction}{self._template()[1]}"
        else:
            suffix = f"\n\n{instruction}"
        prompt = self.tokenizer.encode(suffix, add_special_tokens=False)
        cache = self._fork()
        if self.question_segment:
            for c in cache:
                c.end_segment()
        yield from self._stream(prompt, cache, max_tokens, None, **kwargs)

    def _stream(
        self,
        prompt: List[int],
        cache: List[InfiniCache],
        max_tokens: int,
        logits_processors=None,
        temp: float = 0.0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        top_k: int = 0,
        seed: Optional[int] = None,
    ) -> Iterator[str]:
        if seed is not None:
            mx.random.seed(seed)
        sampler = make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
        started = False
        for r in stream_generate(
            self.model, self.tokenizer, prompt, max_tokens,
            sampler=sampler, logits_processors=logits_processors, prompt_cache=cache,
        ):
            self.response = r
            # The answer starts at its first word, not at the line break after "Answer:".
            text = r.text if started else r.text.lstrip()
            if text:
                started = True
                yield text

    def _from_notes(self, instruction: str, max_tokens: int = 256, **kwargs) -> Iterator[str]:
        if not self.notes:
            raise ValueError("nothing has been read yet: read a text first")
        # The notes, the instruction and the answer fit one segment.
        budget = max(64, self.cache[0].segment_len - max_tokens - 128)
        self.notes = N.fit(self.notes, budget, self._count, self._merge)
        self.meta["notes"] = json.dumps(self.notes)
        yield from self._stream_write(instruction, N.join(self.notes), max_tokens, **kwargs)

    def stream_ask(self, question: str, **kwargs) -> Iterator[str]:
        """Answer a question about what was read, yielding text as it is generated.

        The answer starts at its first non-blank text; a plain (non-chat)
        model's answer ends at its first line break.

        Args:
            question: The question.
            **kwargs: ``max_tokens`` (256), and mlx-lm's sampling options
                ``temp`` (0.0: greedy), ``top_p``, ``min_p``, ``top_k``, ``seed``.
        """
        plain = self.meta["prompt_format"] != "chat"
        if self.strategy == "notes":
            ask = plain_question(question) if plain else N.ANSWER.format(question=question)
            chunks = self._from_notes(ask, **kwargs)
        else:
            chunks = self._generate(plain_question(question) if plain else question, **kwargs)
        if not plain:
            yield from chunks
        # A plain model's answer is its first line: "Question: ...\nAnswer: ..." ends there.
        elif (yield from _first_line(chunks)) and self.response is not None:
            self.response = replace(self.response, finish_reason="stop")

    def stream_summarize(self, **kwargs) -> Iterator[str]:
        """Summarize what was read, yielding text as it is generated (see ``stream_ask``).

        After ``take_notes`` the summary is written from the notes.
        """
        if self.strategy == "notes":
            yield from self._from_notes(N.SUMMARY, **kwargs)
            return
        plain = self.meta["prompt_format"] != "chat"
        yield from self._generate("Summary:" if plain else "Summarize the text above.", **kwargs)

    def ask(self, question: str, **kwargs) -> str:
        """Answer a question about what was read (see ``stream_ask``)."""
        return "".join(self.stream_ask(question, **kwargs))

    def summarize(self, **kwargs) -> str:
        """Summarize what was read (see ``stream_ask`` for the options)."""
        return "".join(self.stream_summarize(**kwargs))


def _first_line(chunks: Iterator[str]):
    """The chunks up to the first line break (generation stops there); returns
    whether there was one."""
    for t in chunks:
        if "\n" in t:
            head = t.split("\n", 1)[0].rstrip()
            if head:
                yield head
            return True
        yield t
    return False
