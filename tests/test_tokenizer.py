"""The tokenizer script: SentencePiece with split digits, loadable by mlx-lm."""

import importlib.util
from pathlib import Path

import pytest
from mlx_lm.utils import load_tokenizer

SCRIPT = Path(__file__).parents[1] / "scripts" / "train_tokenizer.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_tokenizer", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_script_trains_a_tokenizer_mlx_lm_loads(tmp_path, books_dir):
    mod = _script()
    mod.train_tokenizer(books_dir, tmp_path, vocab_size=600, books=["alice_in_wonderland_pg11.txt"])
    tok = load_tokenizer(tmp_path)
    assert len(tok.vocab) == 600
    text = "In 1865 Alice paid 31415 coins.\nÉmile said 7."
    ids = tok.encode(text, add_special_tokens=False)
    # Rare digits may come as byte tokens; either way each token holds one digit.
    strings = [tok.decode([i]).strip() for i in ids]
    digits = [s for s in strings if any(c.isdigit() for c in s)]
    assert digits == list("1865") + list("31415") + ["7"], strings
    assert tok.decode(ids) == text  # byte fallback: nothing is lost
    assert tok.encode("hi")[0] == tok.bos_token_id


def test_script_refuses_held_out_books(tmp_path, books_dir):
    with pytest.raises(ValueError, match="held-out"):
        _script().train_tokenizer(books_dir, tmp_path, books=["frankenstein_pg84.txt"])
