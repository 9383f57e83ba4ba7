"""Long-context tasks as token streams: passkey retrieval and multi-key needles.

Prompts are built from token pieces, never from one giant string, so a
1M-token prompt can be generated lazily; tests check that the pieces equal
the tokenizer's encoding of the whole text.
"""

import itertools
from dataclasses import dataclass
from typing import Iterator, List, Sequence

import numpy as np

# The passkey format of Landmark Attention (Mohtashami & Jaggi, 2023), which the
# Infini-attention paper uses unchanged.
TASK = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there."
)
GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
MAX_PASSKEY = 50000  # the original code draws randint(1, 50000)


def plain_question(question: str) -> str:
    """How ``InfiniSession`` asks a plain (non-chat) model (after a blank line)."""
    return f"Question: {question}\nAnswer:"


def info_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


# Multi-key needles: "The special code for <name> is <value>."
NEEDLE_NAMES = (
    "apple anchor badger candle copper dragon ember falcon garden harbor island "
    "jasmine kettle lantern marble meadow nickel orchid pepper quartz raven saddle "
    "silver thistle tiger velvet walnut willow zebra amber beacon cedar"
).split()


def fact_line(name: str, value: int) -> str:
    return f"The special code for {name} is {value}."


def needle_question(name: str) -> str:
    return f"What is the special code for {name}? The special code for {name} is"


class Pieces:
    """Token pieces of a SentencePiece-style tokenizer.

    ``line(s)`` are the tokens of ``s`` right after a newline (no leading
    space), ``word(s)`` those of ``" " + s`` inside a line.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        # "\n" alone encodes as [dummy-prefix "▁", "<0x0A>"]; inside text only the latter.
        self._nl_prefix = self.enc("\n")
        self.nl = self._nl_prefix[-1:]
        self.names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer.vocab))))
        self.digits = [i for i, t in enumerate(self.names) if t in set("0123456789")]
        self.first_garbage = self.line(GARBAGE)
        self.garbage = self.word(GARBAGE)

    def enc(self, s: str) -> List[int]:
        return self.tok.encode(s, add_special_tokens=False)

    def line(self, s: str) -> List[int]:
        ids = self.enc("\n" + s)
        if ids[: len(self._nl_prefix)] != self._nl_prefix:
            raise ValueError("tokenizer does not split a leading newline as expected")
        return ids[len(self._nl_prefix) :]

    def word(self, s: str) -> List[int]:
        return self.enc(" " + s)

    def filler(self, n: int) -> Iterator[int]:
        """The first ``n`` tokens of ``" ".join([GARBAGE] * many)``."""
        stream = itertools.chain(self.first_garbage, itertools.cycle(self.garbage))
        return itertools.islice(stream, n)


@dataclass
class Prompt:
    """A prompt of exactly ``length`` tokens; ``tokens()`` streams it."""

    parts: Sequence  # lists of ids, or ("filler", n) / ("hay", start, n) markers
    answer: int
    length: int
    pieces: Pieces
    hay: np.ndarray = None
    facts: tuple = ()  # a needle prompt's values, in the order its text holds them

    def tokens(self) -> Iterator[int]:
        for p in self.parts:
            if isinstance(p, tuple) and p[0] == "filler":
                yield from self.pieces.filler(p[1])
            elif isinstance(p, tuple):
                yield from (int(t) for t in self.hay[p[1] : p[1] + p[2]])
            else:
                yield from p

    def array(self) -> np.ndarray:
        return np.fromiter(self.tokens(), dtype=np.int32, count=self.length)


def passkey_prompt(pieces: Pieces, length: int, depth: float, key: int) -> Prompt:
    """The passkey prompt at ``length`` tokens with the key line at ``depth`` in [0, 1].

    Text: TASK, filler prefix, info line, filler suffix, QUESTION, joined by
    newlines; both fillers are prefixes of the repeated garbage, as in Landmark.
    """
    head = pieces.bos + pieces.enc(TASK)
    info = pieces.line(info_line(key))
    q = pieces.line(QUESTION)
    nl = pieces.nl
    n = length - len(head) - len(info) - len(q) - 4 * len(nl)
    if n < 0:
        raise ValueError(f"length {length} is too short for the passkey prompt")
    n1 = int(round(depth * n))
    parts = [head, nl, ("filler", n1), nl, info, nl, ("filler", n - n1), nl, q]
    return Prompt(parts, key, length, pieces)


def needle_prompt(
    pieces: Pieces,
    hay: np.ndarray,
    length: int,
    facts: Sequence[tuple],
    depths: Sequence[float],
    ask: int,
    start: int,
) -> Prompt:
    """Book text from ``hay[start:]`` with fact lines inserted at ``depths``.

    Every fact is its own line; the last line asks for ``facts[ask]``'s code.
    """
    name, value = facts[ask]
    lines = [pieces.line(fact_line(*f)) for f in facts]
    q = pieces.line(needle_question(name))
    nl = pieces.nl
    n = length - len(pieces.bos) - sum(len(l) + 2 * len(nl) for l in lines) - len(q) - len(nl)
    if n < 0:
        raise ValueError(f"length {length} is too short for {len(facts)} facts")
    cuts = sorted(int(round(d * n)) for d in depths)
    order = sorted(range(len(facts)), key=lambda i: depths[i])
    parts, pos = [pieces.bos], 0
    for c, i in zip(cuts, order):
        parts += [("hay", start + pos, c - pos), nl, lines[i], nl]
        pos = c
    parts += [("hay", start + pos, n - pos), nl, q]
    return Prompt(parts, value, length, pieces, hay, tuple(facts[i][1] for i in order))
