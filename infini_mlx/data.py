"""Training text: the public-domain books, unwrapped into paragraphs."""

import os
import re
from pathlib import Path
from typing import List

# The project's book collection sits beside the checkout (../shared/data/books);
# INFINI_BOOKS points elsewhere.
BOOKS_DIR = Path(
    os.environ.get("INFINI_BOOKS", Path(__file__).resolve().parents[2] / "shared" / "data" / "books")
)
TRAIN_BOOKS = (
    "alice_in_wonderland_pg11.txt",
    "pride_and_prejudice_pg1342.txt",
    "moby_dick_pg2701.txt",
    "count_of_monte_cristo_pg1184.txt",
    "war_and_peace_pg2600.txt",
)
# Never used to train the tokenizer or the model: perplexity only.
HELD_OUT_BOOKS = ("frankenstein_pg84.txt", "crime_and_punishment_pg2554.txt")

_ASCII = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": "--"})


def book_text(path: Path) -> str:
    """A book as one paragraph per line: hard line wraps joined, typographic quotes made ASCII."""
    text = Path(path).read_text(encoding="utf-8").translate(_ASCII)
    paras = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n".join(p for p in paras if p)


def book_tokens(tokenizer, books_dir: Path, names) -> List[int]:
    """All named books tokenized and concatenated, each starting with BOS."""
    ids: List[int] = []
    for name in names:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer.encode(book_text(Path(books_dir) / name), add_special_tokens=False))
    return ids
