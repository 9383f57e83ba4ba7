"""Train the default model's SentencePiece tokenizer on the five training books.

Digits are split one per token and unknown characters fall back to bytes (as
Llama's tokenizer does). The result is written as a Hugging Face tokenizer
(tokenizer.json + tokenizer_config.json), which mlx-lm's loader reads.

    python scripts/train_tokenizer.py --out /work/runs/tokenizer
"""

import argparse
import tempfile
from pathlib import Path

import sentencepiece as spm

from infini_mlx.data import BOOKS_DIR, HELD_OUT_BOOKS, TRAIN_BOOKS, book_text

# Named so they survive any vocabulary size; <unk>/<s>/</s> get ids 0/1/2 as in Llama.
SPECIAL = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)


def train_tokenizer(books_dir: Path, out: Path, vocab_size: int = 4096, books=TRAIN_BOOKS) -> Path:
    """Train SentencePiece (BPE) on the training books; save a HF tokenizer in ``out``."""
    if set(books) & set(HELD_OUT_BOOKS):
        raise ValueError("the held-out books are for evaluation only")
    from tokenizers.models import BPE
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(book_text(books_dir / b) for b in books))
        prefix = str(Path(tmp) / "spm")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            split_digits=True,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            max_sentence_length=1 << 16,
            num_threads=2,
            minloglevel=2,
            **SPECIAL,
        )
        # transformers 5 builds Llama tokenizers from vocab + merges, not from the .model file.
        kw = SentencePieceExtractor(prefix + ".model").extract(BPE)
        tok = LlamaTokenizer(
            vocab=kw["vocab"], merges=kw["merges"], legacy=False, add_bos_token=True
        )
        tok.save_pretrained(str(out))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--books", type=Path, default=BOOKS_DIR)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    a = p.parse_args()
    print(train_tokenizer(a.books, a.out, a.vocab_size))


if __name__ == "__main__":
    main()
