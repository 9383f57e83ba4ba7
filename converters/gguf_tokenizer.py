"""A Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) rebuilt from a GGUF
file's ``tokenizer.ggml.*`` metadata with the ``tokenizers`` package (no torch).

Two tokenizer models are read: ``gpt2`` (byte-level BPE with merges; the
pre-tokenizer named by ``tokenizer.ggml.pre``) and ``llama`` (SentencePiece BPE
with scores and byte fallback: merges are derived from the scores, as
transformers does for SentencePiece models).
"""

import json
from pathlib import Path
from typing import Dict, List, Tuple

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from .errors import ConversionError


class Unsupported(ConversionError):
    """A tokenizer this module does not rebuild (the conversion goes on without it)."""


NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The split patterns of the Hugging Face tokenizers llama.cpp names these pre-tokenizers after.
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(split: str = None):
    if split is None:  # GPT-2's own pattern, inside ByteLevel
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


# tokenizer.ggml.pre -> (pre-tokenizer, normalizer, ignore_merges)
PRE = {
    "gpt-2": lambda: (_byte_level(), None, False),
    "smollm": lambda: (pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), _byte_level()]), None, False),
    "qwen2": lambda: (_byte_level(_QWEN2), normalizers.NFC(), False),
    "llama-bpe": lambda: (_byte_level(_LLAMA3), None, True),
    "llama3": lambda: (_byte_level(_LLAMA3), None, True),
}


def _ids(meta: dict, tokens: List[str]) -> Dict[str, str]:
    """bos/eos/unk/pad token strings named by the metadata."""
    out = {}
    for key in ("bos", "eos", "unknown", "padding"):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int) and 0 <= i < len(tokens):
            out[key] = tokens[i]
    return out


def _gpt2(meta: dict, tokens: List[str]) -> Tuple[Tokenizer, str]:
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE:
        raise Unsupported(
            f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(PRE)}): "
            "pass --tokenizer DIR with the original tokenizer files"
        )
    merges = []
    for m in meta.get("tokenizer.ggml.merges") or []:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ConversionError(f"malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((left, right))
    pre_tok, norm, ignore_merges = PRE[pre]()
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = pre_tok
    if norm is not None:
        tok.normalizer = norm
    tok.decoder = decoders.ByteLevel()
    return tok, f"byte-level BPE, {pre} pre-tokenizer, {len(merges)} merges"


def _spm_merges(tokens: List[str], scores: List[float], types: List[int]) -> List[Tuple[str, str]]:
    """The BPE merges a SentencePiece BPE model implies: every split of a piece into two
    pieces of the vocabulary, the pieces with the highest scores merged first."""
    rank = {t: i for i, t in reversed(list(enumerate(tokens)))}
    found = []
    for i, piece in enumerate(tokens):
        if types[i] not in (NORMAL, USER_DEFINED) or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in rank and right in rank:
                found.append((-scores[i], i, rank[left], rank[right], left, right))
    found.sort()
    return [(f[4], f[5]) for f in found]


def _llama(meta: dict, tokens: List[str]) -> Tuple[Tokenizer, str]:
    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * n
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * n
    if len(scores) != n or len(types) != n:
        raise ConversionError("tokenizer.ggml.scores / token_type do not match tokenizer.ggml.tokens")
    named = _ids(meta, tokens)
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    tok = Tokenizer(models.BPE(vocab, _spm_merges(tokens, scores, types), unk_token=named.get("unknown"),
                               fuse_unk=True, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    what = "SentencePiece BPE with byte fallback" + (", space prefix" if prefix else "")
    return tok, what


def build_tokenizer(meta: dict) -> Tuple[Tokenizer, dict, str]:
    """The tokenizer, its tokenizer_config.json and a description, from GGUF metadata."""
    tokens = meta.get("tokenizer.ggml.tokens")
    kind = meta.get("tokenizer.ggml.model")
    if len(set(tokens)) != len(tokens):
        raise ConversionError("tokenizer.ggml.tokens holds the same token twice")
    if kind == "gpt2":
        tok, what = _gpt2(meta, tokens)
    elif kind == "llama":
        tok, what = _llama(meta, tokens)
    else:
        raise Unsupported(
            f"GGUF tokenizer model {kind!r} is not supported (gpt2, llama): "
            "pass --tokenizer DIR with the original tokenizer files"
        )
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    special = [AddedToken(t, special=True, normalized=False)
               for t, k in zip(tokens, types) if k == CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types) if k == USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)

    named = _ids(meta, tokens)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and "bos" in named
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and "eos" in named
    if add_bos or add_eos:
        ends = [(k, named[k]) for k, on in (("bos", add_bos), ("eos", add_eos)) if on]
        bos = [named["bos"]] if add_bos else []
        eos = [named["eos"]] if add_eos else []
        single = [*bos, "$A:0", *eos]
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=[*single, *bos, "$B:1", *eos],
            special_tokens=[(t, tokens.index(t)) for _, t in ends],
        )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
    }
    for key, hf in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                    ("padding", "pad_token")):
        if key in named:
            config[hf] = named[key]
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    what = f"{len(tokens)} tokens, {what}" + (", chat template" if template else "")
    return tok, config, what


def _check(meta: dict) -> None:
    tokens = meta["tokenizer.ggml.tokens"]
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ConversionError("tokenizer.ggml.tokens is not a list of strings")
    for key, kind in (("merges", str), ("token_type", int), ("scores", (int, float))):
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, kind) for x in v)):
            raise ConversionError(f"tokenizer.ggml.{key} is not a list of {getattr(kind, '__name__', 'numbers')}")
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and len(types) != len(tokens):
        raise ConversionError("tokenizer.ggml.token_type does not match tokenizer.ggml.tokens")


def write_tokenizer(meta: dict, out: Path) -> str:
    """Write tokenizer.json and tokenizer_config.json into ``out``; a note saying what was done.

    Raises:
        ConversionError: for malformed tokenizer metadata. A tokenizer model or
            pre-tokenizer not handled here is no error: the note says so.
    """
    if not meta.get("tokenizer.ggml.tokens"):
        return "no tokenizer in the GGUF metadata: add tokenizer files (or pass --tokenizer DIR)"
    _check(meta)
    try:
        tok, config, what = build_tokenizer(meta)
    except Unsupported as e:
        return f"tokenizer not rebuilt: {e}"
    except ConversionError:
        raise
    except Exception as e:  # tokenizers' own errors, e.g. a merge of unknown tokens
        raise ConversionError(f"cannot rebuild the tokenizer: {str(e).splitlines()[0]}") from None
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return f"tokenizer rebuilt from the GGUF metadata ({what})"
