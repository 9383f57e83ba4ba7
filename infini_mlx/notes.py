"""Incremental notes: whole-book summaries with any instruct model, in bounded memory.

A model whose memory was never trained sees only its last segment. So the book
is cut into windows that fit one segment; after each, the model writes a short
note on it; when the notes outgrow a token budget, the shortest pair of
neighbours is merged into one note, until they fit, so what is kept never
grows with the book; a last pass writes the summary from the notes, in order
(BooookScore's incremental updating and hierarchical merging, Chang et al. 2024).
"""

import re
from typing import Callable, List, Tuple

# (level, text): a note on one window is level 0; a merge is one above the higher of its two.
Note = Tuple[int, str]

NOTE = "Summarize the passage above in two or three sentences. Name the characters."
# Small models (SmolLM2-135M) keep names and events when asked to shorten, not to combine.
MERGE = "Shorten the text above to three sentences. Keep the names of the characters and the main events."
SUMMARY = (
    "Above are notes on consecutive parts of a book, in order. Write a summary of the "
    "whole book in one paragraph: name the main characters and tell the main events."
)
ANSWER = "Above are notes on consecutive parts of a book, in order. From them, answer: {question}"
# Plain (non-chat) models are asked as they were trained, after a blank line.
PLAIN = {NOTE: "Summary of this part:", MERGE: "Summary of these notes:", SUMMARY: "Summary:"}

NOTE_TOKENS = 96  # most tokens of a note or a merge
# Small models loop without it; a loop spans a sentence, so the context is long.
REPETITION_PENALTY, REPETITION_CONTEXT = 1.2, 64

_END = re.compile(r"[.!?][\"'”’)]?(?=\s|$)")


def trim(text: str) -> str:
    """A note cut at its last full sentence (a note may stop at its token limit)."""
    text = " ".join(text.split())
    ends = [m.end() for m in _END.finditer(text)]
    return text[: ends[-1]] if ends and ends[-1] > len(text) // 3 else text


def join(notes: List[Note]) -> str:
    """Notes as the model reads them: one paragraph each, in order."""
    return "\n\n".join(text for _, text in notes)


def add(notes: List[Note], text: str, budget: int, count: Callable[[str], int],
        merge: Callable[[str], str]) -> List[Note]:
    """Append a window's note, then merge until the notes take at most ``budget`` tokens."""
    return fit(notes + [(0, trim(text))], budget, count, merge)


def fit(notes: List[Note], budget: int, count: Callable[[str], int],
        merge: Callable[[str], str]) -> List[Note]:
    """Merge the oldest neighbours until the notes take at most ``budget`` tokens."""
    while len(notes) > 1 and count(join(notes)) > budget:
        # The pair of neighbours with the fewest tokens, oldest first.
        i = min(range(len(notes) - 1), key=lambda i: count(join(notes[i: i + 2])))
        lvl = max(notes[i][0], notes[i + 1][0]) + 1
        notes = notes[:i] + [(lvl, trim(merge(join(notes[i: i + 2]))))] + notes[i + 2:]
    return notes
