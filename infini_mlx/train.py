"""Segment-recurrent training of Infini models: language modelling plus retrieval tasks.

``model(tokens)`` without a cache runs every layer segment by segment with the
memory carried across segments, so autodiff through it backpropagates through
the memory (as the paper trains). Gates get their own optimizer (larger
learning rate, no weight decay). A run directory holds ``checkpoint/``: the
model (a loadable infini-mlx directory), the optimizer state, and the step,
data RNG and log, so a run resumes exactly where it stopped.
"""

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import _get_classes, load_tokenizer

from .attention import is_new_parameter
from .config import InfiniConfig
from .data import BOOKS_DIR, HELD_OUT_BOOKS, TRAIN_BOOKS, book_tokens
from .finetune import LORA_FILE, add_lora, freeze_base, lora_fused, lora_weights, trainable_count
from .tasks import (
    MAX_PASSKEY,
    NEEDLE_NAMES,
    Pieces,
    fact_line,
    info_line,
    needle_prompt,
    needle_question,
    passkey_prompt,
    plain_question,
)
from .upcycle import upcycle
from .utils import GATES_FILE, load, save

CKPT = "checkpoint"
# Gates of an untrained memory start here when training: sigmoid(0) = 0.5 gives the
# memory gradients from the first step (the default gate_init, -12, almost none).
TRAIN_GATE_INIT = 0.0


@dataclass
class TrainArgs:
    """Everything that defines a run; saved with every checkpoint.

    Args:
        out: Run directory (checkpoint, log).
        init: Model to fine-tune (anything ``infini_mlx.load`` takes); ``None``
            trains a new Llama-style model of the ``arch`` below from scratch.
        tokenizer: Tokenizer directory for a new model.
        books, book_names: Where the training books are, and which to use.
        arch: mlx-lm Llama config overrides for a new model.
        infini: The ``"infini"`` block of a new model (or overrides for ``init``).
            Its ``gate_init`` (default 0) is where the gates of a memory that
            was never trained start.
        steps: Train until this many optimizer steps in total.
        batch_size: Sequences per step.
        segments: (min, max) segments per sequence at the start of training.
        segments_final: (min, max) at the end of ``curriculum_steps``.
        curriculum_steps: Steps over which the segment range widens linearly.
        mix: Probability of each task: ``lm`` (book text), ``passkey`` (the
            paper's format), ``needle`` (4 facts in book text, all asked),
            ``copy`` (passkey lines back to back: fixed-offset copying),
            ``induct`` (book spans each repeated once: content-matched copying),
            ``recall`` (book text whose end repeats an earlier segment),
            ``repeat`` (a segment of passkey lines repeated segments later:
            dense targets that only the memory can answer), ``qa`` (a passkey
            line hidden in book text, asked as ``infini query`` asks).
        answer_weight: Loss weight of answer tokens (other tokens weigh 1).
        loss_positions: Score only this many target positions per sequence:
            every answer token plus a random sample of the rest (0: all). The
            softmax over the vocabulary is most of a small model's step on CPU.
        lr, gate_lr: Learning rates of the body (AdamW) and the gates (Adam).
        memory_lr: Learning rate of the memory's other new parameters
            (convolutions, write strengths, read-out norm; Adam, no decay);
            ``None``: ``lr``. A parameter switched on in a trained model (e.g.
            ``write_conv``'s taps, which start as the identity) moves at most
            about the learning rate per step.
        conv_lr: Learning rate of the memory's convolution taps alone
            (``q_conv1d``, ``k_conv1d``, ``v_conv1d``, ``b_conv1d``; Adam, no
            decay); ``None``: ``memory_lr``.
        weight_decay: AdamW weight decay (never applied to the gates).
        warmup: Linear warm-up steps.
        decay_steps: Cosine decay to 10% over this many steps (0: constant).
        grad_clip: Clip the global gradient norm (0: off).
        checkpoint_every: Steps between checkpoints.
        eval_every: Steps between retrieval evaluations (0: off).
        eval_segments: Segment counts at which retrieval is evaluated.
        eval_passkey: Prompt lengths (tokens) at which each evaluation also
            runs greedy passkey retrieval, as ``infini passkey`` does
            (``eval_trials`` prompts per depth, start/middle/end): unlike the
            teacher-forced probes, it still separates checkpoints at 128K.
        eval_trials: Prompts per depth of ``eval_passkey``.
        write_penalty: Add this times the mean write strength beta of the
            normalised memory (over layers, heads and tokens) to the loss: the
            model learns to write only what it will be asked (with
            ``write_gate="clip"``, to write exactly nothing elsewhere).
        write_leak: With ``write_gate="clip"``, the clip's backward slope where
            it writes nothing, as a fraction of its slope inside, so a token or
            a layer that stopped writing can learn to write again; the forward
            pass and ``write_penalty`` are unchanged.
        key_overlap: Add this times the mean squared cosine between the keys
            of two different written tokens of a sequence, each pair weighted
            by the product of their write strengths (``key_overlap``; no
            gradient through the strengths), pooled over rows and heads per
            layer and averaged over layers: with the delta rule, writing
            under key k_j erases the share (k_i . k_j)^2 of what was stored
            under k_i, so facts written under alike keys overwrite one
            another. Acts on ``write_penalty_layers``; needs the normalised
            memory.
        write_penalty_layers, write_leak_layers: The layers (from 0)
            ``write_penalty`` and ``write_leak`` act on; ``None``: every layer.
            A layer spared the penalty and given the leak can learn to write
            again while the others stay sparse. The penalty is the mean over
            the layers named, so one layer of four weighs four times as much
            as it does among all four.
        key_digits: How training keys (passkeys, needle values) are drawn:
            ``"paper"``, uniformly from 1-50,000 as the evaluation does (80%
            have 5 digits), ``"uniform"``: first a length of 1-5 digits,
            then a key of that length, so a key's end is not guessable from
            its length, or ``"mixed"``: each key drawn one way or the other
            with probability 1/2.
        needle_facts: Most facts in a ``needle`` sequence (fewer where it is
            short); the evaluation asks one of 4.
        needle_shared: Probability that a needle sequence's values share
            their first digits (from one to all but the last) with one drawn
            value: the next digit then depends on the name, not on the digits
            before it, so the memory must key every digit by the name.
        first_fact_weight: Multiplies the answer weight of the fact a needle
            sequence writes first (1.0: all alike): a delta-rule memory's later
            writes erase earlier facts, and this tilts the loss toward keeping them.
        carry_state: Probability that a batch starts from the memory the
            previous batch ended with (no gradient through it) instead of an
            empty one: the model learns to read past earlier documents. Resuming
            starts the first batch empty.
        carry_ask: With a carried memory, the probability that a row ends
            by asking one of the facts of the last needle that row's memory
            holds (written one or more batches before): the only loss that
            reaches the writes of text read after a fact, so the model learns
            to keep facts through long stretches of prose (a deviation from
            the paper's training). Needs ``carry_state``.
        carry_ask_chain: ``carry_ask`` asks any fact written since the
            memory was last empty (a name written again: its newest value),
            not only the last needle's: facts held over longer stretches of
            text, among more others, as in the multi-key needle evaluation.
        chain_new_names: With ``carry_ask_chain``, a needle's names are ones
            its row's memory does not hold yet (while enough are left), so no
            name is written again and no question rewards a write that erases
            a like key's older fact, as in the evaluation, whose names differ.
        carry_ask_key: Of the rows ``carry_ask`` asks, the share that asks
            the pass key instead of a fact, as ``infini query`` asks it
            ("Question: What is the pass key?"), where the row's memory holds
            one (the newest key a passkey or qa row wrote one or more batches
            before; such a row writes no new key): the prose question over a
            key written tens of thousands of tokens back, as in the prose check.
        answer_shift: The share of rows that go on after their last answer
            with 1 to ``segment_len - 1`` tokens of book text (weighted as
            text; fewer where the row is short, none in rows of 2 segments),
            so a question and its answer fall anywhere in a segment, a
            boundary cutting them too, not always at a segment's end.
        qa_distractors: ``qa`` rows also hold this many numbers that are not
            the key, each a needle's fact line or a chapter heading ("Chapter
            17") at a random place in the book text: the question must find
            the key line, not any written digit.
        qa_sentence: ``qa`` puts the key line after a sentence of the book
            (a ".", "!" or "?" followed by a word), as people write it and as
            ``bench/prose_passkey.py`` does, not after any token.
        seed: Seeds the initial weights and the data stream.
        freeze_base: Train only the parameters Infini adds (gates and the
            memory's own: convolutions, write strengths, read-out norm) of
            ``init``; its base weights stay as they are.
        lora_rank: With a rank above 0, also train mlx-lm LoRA adapters of that
            rank on the attention projections (the base stays frozen). Saved
            models hold them fused; the checkpoint keeps them apart, and a
            resumed run reads its base from ``init`` again.
        lora_scale: mlx-lm's LoRA scale.
    """

    out: str
    init: Optional[str] = None
    tokenizer: Optional[str] = None
    books: str = str(BOOKS_DIR)
    book_names: List[str] = field(default_factory=lambda: list(TRAIN_BOOKS))
    arch: Dict[str, Any] = field(default_factory=dict)
    infini: Dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 8
    segments: List[int] = field(default_factory=lambda: [1, 4])
    segments_final: Optional[List[int]] = None
    curriculum_steps: int = 0
    mix: Dict[str, float] = field(
        default_factory=lambda: {"lm": 0.5, "passkey": 0.25, "needle": 0.25}
    )
    answer_weight: float = 10.0
    loss_positions: int = 0
    lr: float = 1e-3
    gate_lr: float = 1e-2
    memory_lr: Optional[float] = None
    conv_lr: Optional[float] = None
    weight_decay: float = 0.01
    warmup: int = 50
    decay_steps: int = 0
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    eval_every: int = 0
    eval_segments: List[int] = field(default_factory=lambda: [2, 8, 32])
    eval_passkey: List[int] = field(default_factory=list)
    eval_trials: int = 4
    carry_state: float = 0.0
    carry_ask: float = 0.0
    carry_ask_chain: bool = False
    carry_ask_key: float = 0.0
    chain_new_names: bool = False
    write_penalty: float = 0.0
    write_leak: float = 0.0
    key_overlap: float = 0.0
    write_penalty_layers: Optional[List[int]] = None
    write_leak_layers: Optional[List[int]] = None
    key_digits: str = "paper"
    needle_facts: int = 4
    needle_shared: float = 0.0
    first_fact_weight: float = 1.0
    qa_sentence: bool = False
    qa_distractors: int = 0
    answer_shift: float = 0.0
    seed: int = 0
    freeze_base: bool = False
    lora_rank: int = 0
    lora_scale: float = 20.0

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainArgs":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


DEFAULT_ARCH = dict(
    model_type="llama",
    hidden_size=256,
    num_hidden_layers=4,
    intermediate_size=768,
    num_attention_heads=4,
    num_key_value_heads=4,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    max_position_embeddings=1 << 20,
)


def new_model(arch: Dict[str, Any], infini: InfiniConfig, vocab_size: int, seed: int):
    """A randomly initialised Llama-style Infini model (float32) and its config."""
    config = {**DEFAULT_ARCH, **arch, "vocab_size": vocab_size}
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    upcycle(model, config["model_type"], infini)
    mx.eval(model.parameters())
    return model, config


def start_gates(model: nn.Module, value: float):
    """Set every gate to ``value`` (and the recorded ``gate_init``) before training."""
    for layer in model.layers:
        layer.self_attn.gate = mx.full(layer.self_attn.gate.shape, value, mx.float32)
    model.infini_config.gate_init = value


# ---- data ----

TASKS = ("lm", "passkey", "needle", "copy", "induct", "recall", "repeat", "qa")


class Batches:
    """The training stream: LM windows, passkey prompts and multi-key needles.

    Every batch is drawn from ``rng`` alone, so saving ``rng``'s state is
    enough to resume the stream exactly.
    """

    def __init__(self, tokenizer, books: np.ndarray, args: TrainArgs, segment_len: int):
        self.pieces = Pieces(tokenizer)
        # The question as ``infini query`` asks it (qa rows, carry_ask_key).
        self.qa_question = self.pieces.enc("\n\n" + plain_question("What is the pass key?"))
        self.books = books
        self.args = args
        self.N = segment_len
        self.rng = np.random.default_rng(args.seed)
        unknown = set(args.mix) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks in the mix: {sorted(unknown)}; known: {TASKS}")
        if args.key_digits not in ("paper", "uniform", "mixed"):
            raise ValueError(f"key_digits must be 'paper', 'uniform' or 'mixed', got {args.key_digits!r}")
        if args.carry_ask and not args.carry_state:
            raise ValueError("carry_ask asks what a carried memory holds: it needs carry_state")
        if args.carry_ask_key and not args.carry_ask:
            raise ValueError("carry_ask_key is a share of carry_ask's questions: it needs carry_ask")
        if args.chain_new_names and not args.carry_ask_chain:
            raise ValueError("chain_new_names draws a chain's needle names: it needs carry_ask_chain")
        # Per row: the facts its memory holds, name -> value (carry_ask).
        self.held: List[Optional[Dict[str, int]]] = [None] * args.batch_size
        self.held_key: List[Optional[int]] = [None] * args.batch_size  # carry_ask_key
        self._key = None  # the key the last passkey or qa row wrote
        self._facts, self._avoid, self._ask = None, set(), None
        tasks = [t for t, p in args.mix.items() if p > 0]
        p = np.array([args.mix[t] for t in tasks], dtype=np.float64)
        self.tasks, self.p = tasks, p / p.sum()
        if args.qa_sentence:
            # Positions in books of a word right after ".", "!" or "?".
            names = self.pieces.names
            ends = [i for i, t in enumerate(names) if t in (".", "!", "?")]
            word = np.array([t.startswith("\u2581") for t in names])
            after = np.isin(books[:-1], ends) & word[books[1:]]
            self.sentence_starts = np.flatnonzero(after) + 1

    def segment_range(self, step: int):
        a = self.args
        lo, hi = a.segments
        if a.segments_final and a.curriculum_steps:
            f = min(1.0, step / a.curriculum_steps)
            lo = round(lo + f * (a.segments_final[0] - lo))
            hi = round(hi + f * (a.segments_final[1] - hi))
        return lo, hi

    def key(self) -> int:
        """A passkey or needle value, drawn as ``args.key_digits`` says."""
        mode = self.args.key_digits
        if mode == "uniform" or (mode == "mixed" and self.rng.random() < 0.5):
            n = int(self.rng.integers(1, 6))
            return int(self.rng.integers(10 ** (n - 1), min(10**n - 1, MAX_PASSKEY) + 1))
        return int(self.rng.integers(1, MAX_PASSKEY + 1))

    def needle_values(self, n: int) -> List[int]:
        """``n`` distinct needle values; with ``needle_shared``, of one length and one prefix."""
        if self.rng.random() >= self.args.needle_shared:
            return [self.key() for _ in range(n)]
        first = str(self.key())
        while len(first) < 2:
            first = str(self.key())
        k = int(self.rng.integers(1, len(first)))  # digits shared
        out = {first: None}  # a dict, not a set: its order does not depend on the hash seed
        for _ in range(100 * n):
            if len(out) == n:
                break
            tail = self.rng.integers(0, 10, len(first) - k)
            out[first[:k] + "".join(map(str, tail))] = None
        vals = [int(v) for v in out]
        vals += [self.key() for _ in range(n - len(vals))]  # too few tails (e.g. one free digit)
        return [vals[i] for i in self.rng.permutation(n)]

    def answer(self, value: int) -> List[int]:
        return self.pieces.word(f"{value}.")

    # Each task returns (tokens, loss weights of the T - 1 targets, length of the
    # final answer). Weight answer_weight marks what must be recalled.
    def lm(self, T: int):
        i = self.rng.integers(0, len(self.books) - T)
        return self.books[i : i + T], np.ones(T - 1, np.float32), 0

    def _sample(self, chunks):
        """Concatenate (ids, is_answer) chunks into tokens and target weights;
        ``is_answer`` may be a number: the answer weight times it."""
        toks = np.concatenate([np.asarray(c, np.int32) for c, _ in chunks])
        w = np.concatenate(
            [np.full(len(c), self.args.answer_weight * (1.0 if a is True else a) if a is not False else 1.0, np.float32) for c, a in chunks]
        )
        return toks, w[1:], len(chunks[-1][0])

    def passkey(self, T: int, depth: Optional[float] = None):
        key = self._key = self.key()
        depth = self.rng.random() if depth is None else depth
        ans = self.answer(key)
        toks, w, n = self._sample([(passkey_prompt(self.pieces, T - len(ans), depth, key).array(), False), (ans, True)])
        # The key's second mention in its own line is a copy too: weigh it as an answer.
        digits = np.isin(toks[1:], self.pieces.digits)
        second = np.cumsum(digits) > len(str(key))
        w[digits & second] = self.args.answer_weight
        return toks, w, n

    def qa(self, T: int):
        """A passkey line hidden in book text, then the question as ``infini query`` asks it."""
        key = self._key = self.key()
        info = self.pieces.word(info_line(key))
        q = self.qa_question
        ans = self.answer(key)
        extra = [self._number_line() for _ in range(self.args.qa_distractors)]
        n = T - len(info) - len(q) - len(ans) - sum(map(len, extra))
        i = int(self.rng.integers(0, len(self.books) - n))
        cut = i + int(self.rng.integers(0, n + 1))
        if self.args.qa_sentence:  # the window's first sentence start from there on, else its last one
            lo, s, hi = np.searchsorted(self.sentence_starts, [i + 1, cut, i + n + 1])
            if lo < hi:
                cut = int(self.sentence_starts[s if s < hi else hi - 1])
        hay = self.books[i : i + n]
        # Lines inserted into the book text at their offsets (the key line first at a tie).
        lines = [(cut - i, info)]
        if extra:
            lines += [(int(a), e) for a, e in zip(self.rng.integers(0, n + 1, len(extra)), extra)]
        chunks, at = [], 0
        for a, line in sorted(lines, key=lambda x: x[0]):
            chunks += [(hay[at:a], False), (line, False)]
            at = a
        return self._sample(chunks + [(hay[at:], False), (q, False), (ans, True)])

    def _number_line(self) -> List[int]:
        """A number that is not the key: a needle's fact line or a chapter heading."""
        if self.rng.random() < 0.5:
            name = NEEDLE_NAMES[int(self.rng.integers(0, len(NEEDLE_NAMES)))]
            return self.pieces.word(fact_line(name, self.key()))
        return self.pieces.nl + self.pieces.line(f"Chapter {int(self.rng.integers(1, 61))}") + self.pieces.nl

    def needle(self, T: int):
        """Facts in book text, then every fact asked and answered, in random order."""
        r = self.rng
        n_facts = max(1, min(self.args.needle_facts, (T - 40) // 45))  # fewer facts in short sequences
        # A name asked at the end must keep its earlier value; chain_new_names also avoids the held ones.
        free = [i for i, s in enumerate(NEEDLE_NAMES) if s not in self._avoid]
        if len(free) < n_facts:
            free = [i for i, s in enumerate(NEEDLE_NAMES) if s != self._ask]
        names = r.choice(free, n_facts, replace=False)
        facts = list(zip((NEEDLE_NAMES[i] for i in names), self.needle_values(n_facts)))
        self._facts = facts
        order = r.permutation(n_facts)
        start = int(r.integers(0, len(self.books) - T))
        depths = r.random(n_facts)
        first = int(np.argmin(depths))  # the fact written first

        def answer(i):
            return self.answer(facts[i][1]), (self.args.first_fact_weight if i == first else True)

        more = []
        for i in order[1:]:
            more += [(self.pieces.nl + self.pieces.line(needle_question(facts[i][0])), False), answer(i)]
        head = answer(order[0])
        n = T - len(head[0]) - sum(len(c) for c, _ in more)
        prompt = needle_prompt(self.pieces, self.books, n, facts, depths, int(order[0]), start)
        return self._sample([(prompt.array(), False), head] + more)

    def copy(self, T: int):
        """Passkey lines back to back: every key's second mention is a copy target."""
        toks, marks = [], []
        while len(toks) < T:
            key = self.key()
            line = self.pieces.line(info_line(key)) + self.pieces.nl
            is_digit = np.isin(line, self.pieces.digits)
            toks += line
            marks += list(is_digit & (np.cumsum(is_digit) > len(str(key))))
        toks = np.array(toks[:T], np.int32)
        w = np.where(np.array(marks[1:T]), self.args.answer_weight, 1.0).astype(np.float32)
        return toks, w, 0

    def induct(self, T: int):
        """Book spans each followed by a repeat: dense content-matched (induction) copying."""
        toks, w = [], []
        while len(toks) < T:
            R = int(self.rng.integers(4, self.N // 2))
            i = int(self.rng.integers(0, len(self.books) - R))
            span = list(self.books[i : i + R])
            toks += span + span
            w += [1.0] * (R + 1) + [self.args.answer_weight] * (R - 1)
        return np.array(toks[:T], np.int32), np.array(w[1:T], np.float32), 0

    def recall(self, T: int):
        """Book text whose last half-segment repeats a span of an earlier segment."""
        S = self.N // 2
        i = int(self.rng.integers(0, len(self.books) - T))
        toks = self.books[i : i + T].copy()
        if T - S - self.N < S:
            return toks, np.ones(T - 1, np.float32), 0
        src = int(self.rng.integers(0, T - S - self.N))
        toks[T - S :] = toks[src : src + S]
        w = np.ones(T - 1, np.float32)
        w[T - S :] = self.args.answer_weight  # targets from the second repeated token on
        return toks, w, S - 1

    def repeat(self, T: int):
        """A segment of passkey lines, filler, then the same lines in a later segment.

        Local attention never sees the first copy from the second, so every
        digit of the repeat must come from the memory.
        """
        N, lines = self.N, []
        block = list(self.pieces.bos)
        while True:
            line = self.pieces.line(info_line(self.key())) + self.pieces.nl
            if len(block) + len(line) > N:
                break
            block += line
            lines += line
        n_seg = (T - 1) // N
        if n_seg < 2 or not lines:
            return self.passkey(T)
        at = int(self.rng.integers(1, n_seg)) * N  # the repeat starts a later segment
        filler = list(self.pieces.filler(T))
        toks = block + filler[: at - len(block)] + lines
        toks = np.array((toks + filler[len(toks) :])[:T], np.int32)
        w = np.ones(T - 1, np.float32)
        rep = np.zeros(T, bool)
        rep[at : at + len(lines)] = np.isin(toks[at : at + len(lines)], self.pieces.digits)
        w[rep[1:]] = self.args.answer_weight
        return toks, w, 0

    def next(self, step: int, carried: bool = False):
        """A batch; ``carried``: it starts from the last batch's memory (for ``carry_ask``)."""
        lo, hi = self.segment_range(step)
        T = int(self.rng.integers(lo, hi + 1)) * self.N + 1
        if not self.args.carry_ask:
            rows = []
            for _ in range(self.args.batch_size):
                task, tail = self.rng.choice(self.tasks, p=self.p), self._tail(T)
                rows.append(self._text_after(*getattr(self, task)(T - tail), tail))
        else:
            rows = [self._row(r, T, carried) for r in range(self.args.batch_size)]
        toks = np.stack([r[0] for r in rows])
        w = np.stack([r[1] for r in rows])
        x, y = toks[:, :-1], toks[:, 1:]
        P = self.args.loss_positions
        if not P or P >= T - 1:
            return mx.array(x), mx.array(y), mx.array(w), None
        idx = np.stack([self._positions(row) for row in w])
        y, w = np.take_along_axis(y, idx, 1), np.take_along_axis(w, idx, 1)
        return mx.array(x), mx.array(y), mx.array(w), mx.array(idx)

    def _row(self, r: int, T: int, carried: bool):
        """Row ``r``'s sample, ending, sometimes, with a question on a fact its memory holds."""
        task = self.rng.choice(self.tasks, p=self.p)
        held = self.held[r] if carried else None
        key = self.held_key[r] if carried and self.args.carry_ask_key else None
        ask, name = [], None
        if (held or key is not None) and self.rng.random() < self.args.carry_ask:
            if key is not None and (not held or self.rng.random() < self.args.carry_ask_key):
                ask = [(self.qa_question, False), (self.answer(key), True)]
                if task in ("passkey", "qa"):  # a new key would answer instead: another task
                    rest = [i for i, t in enumerate(self.tasks) if t not in ("passkey", "qa")]
                    task = self.tasks[self.rng.choice(rest, p=self.p[rest] / self.p[rest].sum())] if rest else "lm"
            else:
                name, value = list(held.items())[int(self.rng.integers(len(held)))]
                ask = [(self.pieces.nl + self.pieces.line(needle_question(name)), False), (self.answer(value), True)]
        self._ask = name
        self._avoid = {name} if ask else set()
        if held and self.args.carry_ask_chain and self.args.chain_new_names:
            self._avoid |= set(held)
        self._facts, self._key = None, None
        room = T - sum(len(c) for c, _ in ask)
        tail = self._tail(room)
        toks, w, n = getattr(self, task)(room - tail)
        self._ask, self._avoid = None, set()
        self.held_key[r] = self._key if self._key is not None else (self.held_key[r] if carried else None)
        if self._facts and self.args.carry_ask_chain:
            self.held[r] = {**(held or {}), **dict(self._facts)}
        else:
            self.held[r] = dict(self._facts) if self._facts else held
        if ask:
            t2, w2, n = self._sample(ask)
            # The first question token is a target of the task's last token.
            toks, w = np.concatenate([toks, t2]), np.concatenate([w, [1.0], w2]).astype(np.float32)
        return self._text_after(toks, w, n, tail)

    def _tail(self, room: int) -> int:
        """Tokens of book text after a row's last answer (``answer_shift``); the task keeps two
        segments at least of the ``room`` tokens it shares with them (a passkey prompt needs ~70)."""
        if not self.args.answer_shift or self.rng.random() >= self.args.answer_shift:
            return 0
        hi = min(self.N, room - 2 * self.N)
        return int(self.rng.integers(1, hi)) if hi > 1 else 0

    def _text_after(self, toks, w, n, tail: int):
        if not tail:
            return toks, w, n
        i = int(self.rng.integers(0, len(self.books) - tail))
        return np.concatenate([toks, self.books[i : i + tail]]), np.concatenate([w, np.ones(tail, np.float32)]), n

    def _positions(self, w: np.ndarray) -> np.ndarray:
        """``loss_positions`` targets of a row: its answers first, then random others."""
        P = self.args.loss_positions
        answers = np.flatnonzero(w > 1)[:P]
        rest = np.flatnonzero(w <= 1)
        extra = self.rng.choice(rest, P - len(answers), replace=False)
        return np.sort(np.concatenate([answers, extra]))


# ---- optimisation ----


def is_gate(path: str, _=None) -> bool:
    return path.endswith("self_attn.gate")


def is_conv(path: str, _=None) -> bool:
    return is_new_parameter(path) and "_conv1d." in path


def make_optimizer(args: TrainArgs):
    def schedule(lr):
        rest = (
            optim.cosine_decay(lr, args.decay_steps, lr * 0.1)
            if args.decay_steps
            else (lambda _: mx.array(lr))
        )
        if not args.warmup:
            return rest
        warm = optim.linear_schedule(lr * 0.01, lr, args.warmup)
        return optim.join_schedules([warm, rest], [args.warmup])

    # Gates: their own rate; the memory's other new parameters (convolutions, write
    # strengths, read-out norm): memory_lr (default: the body's) without decay, which would pull
    # the convolutions away from their identity start; the rest: AdamW. A conv_lr adds one
    # optimizer only when set, so older checkpoints' optimizer states still load.
    memory = [optim.Adam(learning_rate=schedule(args.memory_lr or args.lr))]
    filters = [is_gate, is_new_parameter]
    if args.conv_lr is not None:
        memory.insert(0, optim.Adam(learning_rate=schedule(args.conv_lr)))
        filters.insert(1, is_conv)
    return optim.MultiOptimizer(
        [
            optim.Adam(learning_rate=schedule(args.gate_lr)),
            *memory,
            optim.AdamW(learning_rate=schedule(args.lr), weight_decay=args.weight_decay),
        ],
        filters,
    )


# Families whose logits are exactly lm_head (or the tied embedding) of model.model's output.
SUBSAMPLED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def logits_at(model, x, idx, cache=None):
    """Logits at positions ``idx`` (B, P) only: the body runs on all of ``x``."""
    h = model.model(x, cache=cache)
    h = mx.take_along_axis(h, idx[..., None], axis=1)
    if getattr(model, "lm_head", None) is not None:
        return model.lm_head(h)
    return model.model.embed_tokens.as_linear(h)


def weighted_loss(model, x, y, w, idx=None, cache=None, write_penalty=0.0, key_overlap_weight=0.0):
    """Token cross-entropy weighted by ``w``, normalised by the total weight.

    With ``idx``, ``y`` and ``w`` hold only the targets at those positions;
    ``cache`` (one ``InfiniCache`` per layer) is the memory to start from.
    With ``write_penalty``, the caches' ``write_log`` lists collect the write
    strengths, and their mean times ``write_penalty`` is added; with
    ``key_overlap_weight``, their ``key_log`` lists, and ``mean_key_overlap``
    times it is added.
    """
    logits = model(x, cache=cache) if idx is None else logits_at(model, x, idx, cache)
    ce = nn.losses.cross_entropy(logits, y)
    loss = (ce * w).sum() / w.sum()
    if write_penalty:
        loss = loss + write_penalty * mean_write_strength(cache)
    if key_overlap_weight:
        loss = loss + key_overlap_weight * mean_key_overlap(cache)
    return loss


def logged_cache(model, layers: Optional[List[int]] = None):
    """A fresh cache per layer whose ``write_log`` collects the write strengths (for ``write_penalty``).

    With ``layers``, only those layers' caches log (and so are penalised).
    """
    cache = model.make_cache()
    for i, c in enumerate(cache):
        if layers is None or i in layers:
            c.write_log = []
    return cache


def step_cache(model, args: TrainArgs):
    """A training step's fresh caches: logging where ``write_penalty`` and ``key_overlap`` act,
    leaking where ``write_leak`` does."""
    cache = logged_cache(model, args.write_penalty_layers) if args.write_penalty else model.make_cache()
    for i, c in enumerate(cache):
        if args.write_leak_layers is None or i in args.write_leak_layers:
            c.write_leak = args.write_leak
        if args.key_overlap and (args.write_penalty_layers is None or i in args.write_penalty_layers):
            c.key_log = []
    return cache


def key_overlap(k: mx.array, beta: mx.array):
    """Write-weighted squared cosines of two different written tokens' keys.

    Args:
        k: Unit keys, shape (B, H, N, D).
        beta: Write strengths, shape (B, H, N).

    Returns:
        ``(num, den)``, each of shape (B, H): sum_{i != j} b_i b_j (k_i . k_j)^2
        and sum_{i != j} b_i b_j; their ratio is the weighted mean.
    """
    # sum_{i,j} b_i b_j (k_i . k_j)^2 = ||K^T diag(b) K||_F^2: (D, D), not (N, N); i == j adds b_i^2.
    A = (k * beta[..., None]).swapaxes(-1, -2) @ k
    b2 = (beta * beta).sum(-1)
    return (A * A).sum((-2, -1)) - b2, beta.sum(-1) ** 2 - b2


def mean_key_overlap(cache, eps: float = 1e-6) -> mx.array:
    """Per logging layer, the weighted mean of ``key_overlap`` over all its rows and heads
    (pooled, so rows that write little weigh little); averaged over layers."""
    per_layer = []
    for c in cache:
        if c.key_log:
            k = mx.concatenate([k for k, _ in c.key_log], axis=2).astype(mx.float32)
            b = mx.concatenate([b for _, b in c.key_log], axis=2).astype(mx.float32)
            # The strengths only weigh the pairs: a penalty through them lowered the writes of
            # facts' first digits instead of moving their keys apart (stages 53-54).
            num, den = key_overlap(k, mx.stop_gradient(b))
            per_layer.append(num.sum() / (den.sum() + eps))
    return mx.stack(per_layer).mean()


def mean_write_strength(cache) -> mx.array:
    """Mean of the write strengths the caches' ``write_log`` lists collected."""
    return mx.stack([b.mean() for c in cache if c.write_log is not None for b in c.write_log]).mean()


def clip_by_norm(grads, max_norm: float):
    if not max_norm:
        return grads
    grads, _ = optim.clip_grad_norm(grads, max_norm)
    return grads


# ---- checkpoints ----


def save_checkpoint(run: Path, model, tokenizer, config, opt, trainer: Dict[str, Any]):
    """Write ``run/checkpoint`` atomically: model dir, optimizer.safetensors, trainer.json.

    LoRA adapters are fused into the saved model and kept unfused in ``LORA_FILE``.
    """
    tmp = run / f".{CKPT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora = lora_weights(model)
    if lora:
        mx.save_safetensors(str(tmp / LORA_FILE), lora)
    with lora_fused(model):
        save(tmp / "model", model, tokenizer, config)
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(opt.state)))
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
    final = run / CKPT
    old = run / f".{CKPT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_optimizer_state(opt, path: Path):
    state = tree_unflatten(list(mx.load(str(path)).items()))
    opt.state = state


# ---- retrieval probe during training ----


def probe_retrieval(model, batches: Batches, segments: List[int], trials: int = 8) -> Dict[str, float]:
    """Teacher-forced exact match of passkey and needle answers at several segment counts.

    Uses its own RNG so the training stream is untouched, and the evaluation's
    keys (``key_digits="paper"``, no ``needle_shared``) whatever the training draws.
    """
    from .passkey import teacher_forced_match

    saved, saved_args = batches.rng, batches.args
    batches.rng = np.random.default_rng(12345)
    batches.args = replace(saved_args, key_digits="paper", needle_shared=0.0)
    out = {}
    try:
        for n in segments:
            T = n * batches.N + 1
            for task in ("passkey", "needle"):
                if batches.args.mix.get(task, 0) <= 0:
                    continue
                rows = [getattr(batches, task)(T) for _ in range(trials)]
                ok = teacher_forced_match(model, [r[0] for r in rows], [r[2] for r in rows])
                out[f"{task}@{n}"] = float(np.mean(ok))
    finally:
        batches.rng, batches.args = saved, saved_args
    return out


def greedy_passkey(model, tokenizer, lengths: List[int], trials: int) -> Dict[str, float]:
    """Greedy passkey exact match per length (start/middle/end pooled), as ``infini passkey`` measures."""
    from .passkey import DEPTHS, format_length, passkey_eval

    if not lengths:
        return {}
    rows = passkey_eval(model, tokenizer, lengths, DEPTHS, trials=trials, seed=12345, batch=3 * trials)
    return {
        f"greedy@{format_length(r['length'])}": float(np.mean([c["accuracy"] for c in r["cells"].values()]))
        for r in rows
    }


# ---- the loop ----

# Arguments a resumed run takes from its new call (they change neither the stream nor the model).
EVAL_ARGS = ("eval_every", "eval_segments", "eval_passkey", "eval_trials")


def train(args: TrainArgs, log: Callable[[str], None] = print) -> Path:
    """Train (or resume) the run in ``args.out``; return its checkpoint directory.

    If ``args.out/checkpoint`` exists the run resumes from it: weights,
    optimizer state, step and data RNG; the saved arguments are kept except
    ``steps`` (and the other knobs that do not change the stream or the
    model's shape: ``checkpoint_every`` and the evaluation's).
    """
    run = Path(args.out)
    ckpt = run / CKPT
    if (args.freeze_base or args.lora_rank) and not args.init:
        raise ValueError("freeze_base and lora_rank fine-tune a loaded model: give init")
    if not ckpt.exists() and not args.init:
        # Checked before anything is written, so a bad call leaves no run directory.
        if not args.tokenizer:
            raise ValueError("a new model needs --tokenizer")
        if not any((Path(args.tokenizer) / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
            raise ValueError(f"{args.tokenizer}: no tokenizer.json or tokenizer.model there")
    run.mkdir(parents=True, exist_ok=True)
    # seconds: wall clock between steps (pauses included); cpu_seconds: process CPU time.
    trainer: Dict[str, Any] = {"step": 0, "seconds": 0.0, "cpu_seconds": 0.0, "tokens": 0, "log": []}
    if ckpt.exists():
        trainer = json.loads((ckpt / "trainer.json").read_text())
        saved = TrainArgs.from_dict(trainer["args"])
        for k in ("steps", "checkpoint_every", *EVAL_ARGS):
            setattr(saved, k, getattr(args, k))
        args = saved
        if args.lora_rank:
            # The saved model holds the adapters fused: start again from the frozen base.
            infini = json.loads((ckpt / "model" / "config.json").read_text())["infini"]
            model, tokenizer, config = load(args.init, infini=infini, return_config=True)
            model.load_weights(list(mx.load(str(ckpt / "model" / GATES_FILE)).items()), strict=False)
        else:
            model, tokenizer, config = load(ckpt / "model", return_config=True)
        log(f"resuming {run} at step {trainer['step']}")
    elif args.init:
        model, tokenizer, config = load(args.init, infini=args.infini or None, return_config=True)
    else:
        tokenizer = load_tokenizer(Path(args.tokenizer))
        infini = InfiniConfig.from_dict(args.infini)
        model, config = new_model(args.arch, infini, len(tokenizer.vocab), args.seed)
    if not ckpt.exists() and not model.infini_config.memory_trained:
        start_gates(model, args.infini.get("gate_init", TRAIN_GATE_INIT))
    cfg = model.infini_config
    config["infini"] = cfg.to_dict()
    for name in ("write_penalty", "key_overlap"):
        if getattr(args, name) and cfg.memory != "normalized":
            raise ValueError(f"{name} needs the normalised memory (infini.memory = normalized)")
    if args.write_leak and (cfg.memory != "normalized" or cfg.write_gate != "clip"):
        raise ValueError("write_leak needs the clip write gate (infini.write_gate = clip)")
    n_layers = len(model.layers)
    for name in ("write_penalty_layers", "write_leak_layers"):
        bad = [i for i in getattr(args, name) or [] if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"{name}: the model has layers 0-{n_layers - 1}, not {bad}")
    if args.loss_positions and config["model_type"] not in SUBSAMPLED_TYPES:
        raise ValueError(f"loss_positions works for {', '.join(SUBSAMPLED_TYPES)} models only")
    if args.freeze_base or args.lora_rank:
        freeze_base(model)
    if args.lora_rank:
        mx.random.seed(args.seed)
        add_lora(model, args.lora_rank, args.lora_scale)
        if ckpt.exists():
            model.load_weights(list(mx.load(str(ckpt / LORA_FILE)).items()), strict=False)
    model.train()
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    n_train = trainable_count(model)
    seg = model.infini_config.segment_len

    books = _cached_book_tokens(tokenizer, Path(args.books), args.book_names, run)
    batches = Batches(tokenizer, books, args, seg)
    opt = make_optimizer(args)
    if ckpt.exists():
        batches.rng.bit_generator.state = trainer["rng"]
        opt.init(model.trainable_parameters())
        load_optimizer_state(opt, ckpt / "optimizer.safetensors")
    trainer["args"] = asdict(args)
    trained = "" if n_train == n_params else f" ({n_train:,} trained)"
    log(f"{n_params / 1e6:.2f}M parameters{trained}, segment_len {seg}, {json.dumps(args.mix)}")

    loss_and_grad = nn.value_and_grad(model, weighted_loss)

    def step_fn(x, y, w, idx, cache):
        loss, grads = loss_and_grad(model, x, y, w, idx, cache, args.write_penalty, args.key_overlap)
        opt.update(model, clip_by_norm(grads, args.grad_clip))
        return loss

    carried = None  # the memory the last batch ended with

    def checkpoint():
        trainer["rng"] = batches.rng.bit_generator.state
        if trainer["step"]:
            model.infini_config.memory_trained = True
        save_checkpoint(run, model, tokenizer, config, opt, trainer)

    t_last, c_last = time.time(), time.process_time()
    while trainer["step"] < args.steps:
        step = trainer["step"]
        go_on = False
        if args.carry_ask:  # drawn first: the batch may ask what the carried memory holds
            go_on = batches.rng.random() < args.carry_state and carried is not None
        x, y, w, idx = batches.next(step, carried=go_on)
        if args.carry_state and not args.carry_ask:  # (after the batch, as runs before carry_ask drew it)
            go_on = batches.rng.random() < args.carry_state
        cache = None
        if args.carry_state or args.write_penalty or args.write_leak or args.key_overlap:
            cache = step_cache(model, args)
        if args.carry_state:
            go_on = go_on and carried is not None and carried[0][0].shape[0] == x.shape[0]
            if go_on:
                for c, (M, z) in zip(cache, carried):
                    c.M, c.z = M, z
        loss = step_fn(x, y, w, idx, cache)
        if args.carry_state:
            carried = [(mx.stop_gradient(c.M), None if c.z is None else mx.stop_gradient(c.z)) for c in cache]
        mx.eval(loss, model.parameters(), opt.state, carried)
        now, cpu = time.time(), time.process_time()
        trainer["seconds"] += now - t_last
        trainer["cpu_seconds"] = trainer.get("cpu_seconds", 0.0) + cpu - c_last
        t_last, c_last = now, cpu
        trainer["step"] = step + 1
        trainer["tokens"] += x.size
        rec = {"step": step + 1, "loss": loss.item(), "len": x.shape[1], "s": round(trainer["seconds"], 1)}
        if args.write_penalty:
            rec["beta"] = round(mean_write_strength(cache).item(), 4)
        if args.key_overlap:
            rec["overlap"] = round(mean_key_overlap(cache).item(), 4)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            model.eval()
            rec["probe"] = probe_retrieval(model, batches, args.eval_segments)
            rec["probe"].update(greedy_passkey(model, tokenizer, args.eval_passkey, args.eval_trials))
            model.train()
            t_last, c_last = time.time(), time.process_time()
        trainer["log"].append(rec)
        log(json.dumps(rec))
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            checkpoint()
            t_last, c_last = time.time(), time.process_time()
    if not ckpt.exists():
        checkpoint()
    return ckpt


def _cached_book_tokens(tokenizer, books_dir: Path, names, run: Path) -> np.ndarray:
    cache = run / "train_tokens.npy"
    if cache.exists():
        return np.load(cache)
    if set(names) & set(HELD_OUT_BOOKS):
        raise ValueError("the held-out books are for evaluation only")
    ids = np.array(book_tokens(tokenizer, books_dir, names), dtype=np.int32)
    np.save(cache, ids)
    return ids
