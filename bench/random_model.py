"""A random-weight llama with a BPE tokenizer trained on the training books.

It stands in for a real model where only speed and memory matter (its answers
are noise): `python bench/random_model.py DIR` writes an mlx-lm model directory
that `infini --model DIR` and `infini_mlx.load(DIR)` take.
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import _get_classes, save_config, save_model

from infini_mlx.data import BOOKS_DIR as BOOKS

# Training books only: frankenstein and crime_and_punishment are held out.
TOKENIZER_BOOKS = ["alice_in_wonderland_pg11.txt", "pride_and_prejudice_pg1342.txt"]


def train_tokenizer(path: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(BOOKS / b) for b in TOKENIZER_BOOKS], trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "model_max_length": 1 << 30,
    }))


def make(path: Path, hidden=64, layers=2, heads=4, vocab_size=8192, segment_len=128, seed=0):
    """Write the model directory; the defaults make a 1.2M-parameter model
    (mostly embeddings) that reads about 15,000 tokens/s on 2 busy CPU cores."""
    config = dict(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=hidden * 8 // 3,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        rms_norm_eps=1e-5,
        vocab_size=vocab_size,
        tie_word_embeddings=False,
        eos_token_id=0,
        infini={"segment_len": segment_len},
    )
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(config, config_path=path / "config.json")
    train_tokenizer(path, vocab_size)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--segment-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    make(a.path, a.hidden, a.layers, vocab_size=a.vocab_size, segment_len=a.segment_len, seed=a.seed)
    print(f"wrote {a.path}")
