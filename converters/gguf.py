"""GGUF files (llama.cpp): a checked reader, dequantization and the mapping to mlx-lm.

The header is parsed here, without the ``gguf`` package, and every count, size
and offset is checked against the file before anything is allocated. F32, F16,
BF16, Q4_0, Q4_1 and Q8_0 tensors are dequantized with NumPy; other types
(K-quants, Q5_0, ...) need the optional ``gguf`` package
(``pip install "infini-mlx[gguf]"``). The tensors are dequantized one at a
time into a staged safetensors file that MLX then loads lazily, and the
tokenizer is rebuilt from the ``tokenizer.ggml.*`` metadata.
"""

import mmap
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from . import safetensors_io
from .errors import ConversionError
from .formats import Plan
from .gguf_tokenizer import write_tokenizer

MAGIC = b"GGUF"
MAX_DIMS = 4  # ggml tensors have at most 4 dimensions
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
          11: "<i8", 12: "<f8"}

# ggml tensor types dequantized here: id -> (name, elements per block, bytes per block)
NATIVE = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2),
}
# The other ggml types' names, for messages when the gguf package is missing.
OTHER = dict(enumerate(
    "F32 F16 Q4_0 Q4_1 - - Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K IQ2_XXS IQ2_XS "
    "IQ3_XXS IQ1_S IQ4_NL IQ3_S IQ2_S IQ4_XS I8 I16 I32 I64 F64 IQ1_M BF16".split()
))
GGUF_EXTRA = 'pip install "infini-mlx[gguf]"'


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF file: a ``.gguf`` name or the GGUF magic."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def _gguf_package():
    try:
        import gguf
    except ImportError:
        return None
    return gguf


def type_info(t: int) -> Optional[Tuple[str, int, int]]:
    """(name, block elements, block bytes) of a ggml type id, None if unknown."""
    if t in NATIVE:
        return NATIVE[t]
    gguf = _gguf_package()
    if gguf is None:
        return (OTHER.get(t, f"type {t}"), 0, 0)  # refused later, with the install hint
    try:
        q = gguf.GGMLQuantizationType(t)
        block, size = gguf.GGML_QUANT_SIZES[q]
    except (ValueError, KeyError):
        return None
    return (q.name, block, size)


@dataclass
class TensorInfo:
    name: str
    shape: Tuple[int, ...]  # NumPy order (ggml's ne reversed)
    type: int
    type_name: str
    start: int  # absolute offset in the file
    nbytes: int


class GGUFFile:
    """The metadata and tensor table of a GGUF file (v2 or v3), checked against its size.

    Raises:
        ConversionError: for a file that is not GGUF, truncated, or whose
            counts, shapes or offsets do not fit in it.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        if self.size < 24:
            raise ConversionError(f"{path}: not a GGUF file (truncated: {self.size} bytes)")
        with open(self.path, "rb") as f:
            if f.read(4) != MAGIC:
                raise ConversionError(f"{path}: not a GGUF file (no GGUF magic)")
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._pos = 4
            self._parse()
        finally:
            self._buf.close()
            del self._buf

    # -- the header -----------------------------------------------------------------
    def _fail(self, why: str):
        raise ConversionError(f"{self.path}: {why}")

    def _take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.size - self._pos:
            self._fail(f"truncated or corrupt GGUF file ({what} runs past the end)")
        b = self._buf[self._pos: self._pos + n]
        self._pos += n
        return b

    def _scalar(self, fmt: str, what: str):
        v = struct.unpack(fmt, self._take(struct.calcsize(fmt), what))[0]
        # float32 values as their shortest decimal (1e-05, not 9.999999747378752e-06)
        return float(str(np.float32(v))) if fmt == "<f" else v

    def _string(self, what: str) -> str:
        n = self._scalar("<Q", what)
        try:
            return self._take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            self._fail(f"{what} is not valid UTF-8")

    def _value(self, vtype: int, what: str, in_array: bool = False):
        if vtype in _SCALARS:
            return self._scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self._string(what)
        if vtype == _ARRAY and not in_array:
            etype, count = self._scalar("<I", what), self._scalar("<Q", what)
            if etype in _NUMPY:
                item = np.dtype(_NUMPY[etype]).itemsize
                if count > (self.size - self._pos) // item:
                    self._fail(f"truncated or corrupt GGUF file ({what}: {count} items past the end)")
                return np.frombuffer(self._take(count * item, what), _NUMPY[etype]).tolist()
            if etype == _STRING:
                if count > (self.size - self._pos) // 8:  # each string has an 8-byte length
                    self._fail(f"truncated or corrupt GGUF file ({what}: {count} strings past the end)")
                return [self._string(what) for _ in range(count)]
            self._fail(f"{what}: unsupported array element type {etype}")
        self._fail(f"{what}: unknown value type {vtype}")

    def _parse(self):
        version = self._scalar("<I", "version")
        if version not in (2, 3):
            self._fail(f"GGUF version {version} is not supported (2 or 3; big-endian files neither)")
        self.version = version
        n_tensors, n_kv = self._scalar("<Q", "tensor count"), self._scalar("<Q", "metadata count")
        # Each entry takes at least 13 (metadata) or 24 (tensor) bytes: bound the loops first.
        if n_kv > (self.size - self._pos) // 13 or n_tensors > (self.size - self._pos) // 24:
            self._fail(f"corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata entries "
                       f"in {self.size} bytes)")
        self.metadata: Dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string("metadata key")
            if key in self.metadata:
                self._fail(f"metadata key {key!r} appears twice")
            self.metadata[key] = self._value(self._scalar("<I", key), key)

        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align < 1 or align > 1 << 20 or align & (align - 1):
            self._fail(f"invalid general.alignment {align!r}")
        raw = []
        for _ in range(n_tensors):
            name = self._string("tensor name")
            n_dims = self._scalar("<I", name)
            if not 1 <= n_dims <= MAX_DIMS:
                self._fail(f"tensor {name}: {n_dims} dimensions (1 to {MAX_DIMS} expected)")
            ne = [self._scalar("<Q", name) for _ in range(n_dims)]
            raw.append((name, ne, self._scalar("<I", name), self._scalar("<Q", name)))
        data_start = -(-self._pos // align) * align

        self.tensors: Dict[str, TensorInfo] = {}
        for name, ne, t, offset in raw:
            if name in self.tensors:
                self._fail(f"tensor {name} appears twice")
            info = type_info(t)
            if info is None:
                self._fail(f"tensor {name}: unknown ggml type {t}")
            tname, block, size = info
            if any(d < 1 for d in ne):
                self._fail(f"tensor {name}: empty dimension in shape {ne}")
            count = 1
            for d in ne:
                count *= d
            if block and ne[0] % block:
                self._fail(f"tensor {name}: row of {ne[0]} is not a whole number of {tname} blocks")
            nbytes = count // block * size if block else 0
            if offset % align:
                self._fail(f"tensor {name}: offset {offset} is not aligned to {align}")
            if data_start + offset + nbytes > self.size:
                self._fail(f"tensor {name} (shape {list(reversed(ne))}, {tname}) "
                           "ends past the end of the file")
            self.tensors[name] = TensorInfo(name, tuple(reversed(ne)), t, tname,
                                            data_start + offset, nbytes)
        spans = sorted((i.start, i.start + i.nbytes, i.name) for i in self.tensors.values())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                self._fail(f"tensors {a} and {b} overlap")

    # -- the data -------------------------------------------------------------------
    def read(self, name: str) -> np.ndarray:
        """One tensor as float32 (F16 and BF16 stay 16-bit: F16 as float16, BF16 as its uint16 bits)."""
        info = self.tensors[name]
        with open(self.path, "rb") as f:
            f.seek(info.start)
            raw = np.frombuffer(f.read(info.nbytes), np.uint8)
        if raw.size != info.nbytes:
            self._fail(f"tensor {name}: truncated (the file changed while being read)")
        if info.type in (0, 1, 30) or len(info.shape) < 2:
            return dequantize(raw, info.type, info.shape)
        # Row by row in chunks of ~16M values: the temporaries stay small beside the result.
        rows = raw.reshape(-1, info.shape[-1] // _block(info.type) * _block_bytes(info.type))
        out = np.empty((rows.shape[0], info.shape[-1]), np.float32)
        step = max(1, (1 << 24) // info.shape[-1])
        for i in range(0, rows.shape[0], step):
            out[i: i + step] = dequantize(rows[i: i + step].reshape(-1), info.type,
                                          (min(step, rows.shape[0] - i), info.shape[-1]))
        return out.reshape(info.shape)


def _block(t: int) -> int:
    return type_info(t)[1]


def _block_bytes(t: int) -> int:
    return type_info(t)[2]


def dequantize(raw: np.ndarray, t: int, shape: Tuple[int, ...]) -> np.ndarray:
    """The values of a ggml tensor's bytes, in float32 for the quantized types.

    Scales are float16 widened to float32 before they multiply, as ggml and
    gguf-python do, so results match theirs bit for bit.
    """
    if t == 0:
        return raw.view("<f4").reshape(shape)
    if t == 1:
        return raw.view("<f2").reshape(shape)
    if t == 30:
        return raw.view("<u2").reshape(shape)
    if t in NATIVE:
        _, block, size = NATIVE[t]
        b = raw.reshape(-1, size)
        d = b[:, :2].copy().view("<f2").astype(np.float32)
        if t == 8:  # Q8_0: d, then 32 int8
            return (b[:, 2:].view(np.int8).astype(np.float32) * d).reshape(shape)
        qs = b[:, 4:] if t == 3 else b[:, 2:]
        # Element i of a block is in the low nibble of byte i, element 16 + i in its high nibble.
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
        if t == 2:  # Q4_0: d, 16 bytes; w = d * (q - 8)
            return (d * (q.astype(np.int8) - np.int8(8)).astype(np.float32)).reshape(shape)
        m = b[:, 2:4].copy().view("<f2").astype(np.float32)  # Q4_1: d, m, 16 bytes; w = d*q + m
        return (d * q.astype(np.float32) + m).reshape(shape)
    gguf = _gguf_package()
    if gguf is None:
        raise ConversionError(f"dequantizing ggml type {t} needs the gguf package ({GGUF_EXTRA})")
    q = gguf.GGMLQuantizationType(t)
    block, size = gguf.GGML_QUANT_SIZES[q]
    rows = raw.reshape(*shape[:-1], shape[-1] // block * size)
    try:
        w = gguf.quants.dequantize(rows, q)
    except NotImplementedError:
        raise ConversionError(f"the gguf package cannot dequantize {q.name} tensors") from None
    return np.ascontiguousarray(w, dtype=np.float32).reshape(shape)


# -- architectures ----------------------------------------------------------------------
def _get(meta: dict, key: str, default: Any = KeyError):
    if key in meta:
        return meta[key]
    if default is KeyError:
        raise ConversionError(f"metadata {key} is missing")
    return default


def _int(meta: dict, key: str, default: Any = KeyError) -> int:
    v = _get(meta, key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 1 << 31:
        raise ConversionError(f"metadata {key} is {v!r}: expected a positive integer")
    return v


def _float(meta: dict, key: str, default: Any = KeyError) -> float:
    v = _get(meta, key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
        raise ConversionError(f"metadata {key} is {v!r}: expected a positive number")
    return float(v)


def _common_config(meta: dict, arch: str, model_type: str) -> dict:
    a = f"{arch}."
    heads = _int(meta, a + "attention.head_count")
    hidden = _int(meta, a + "embedding_length")
    config = {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": _int(meta, a + "block_count"),
        "intermediate_size": _int(meta, a + "feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _int(meta, a + "attention.head_count_kv", heads),
        "head_dim": _int(meta, a + "attention.key_length", max(hidden // heads, 1)),
        "rms_norm_eps": _float(meta, a + "attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": _int(meta, a + "context_length", 4096),
        "rope_theta": _float(meta, a + "rope.freq_base", 10000.0),
    }
    if heads % config["num_key_value_heads"]:
        raise ConversionError(f"{heads} heads cannot share {config['num_key_value_heads']} KV heads")
    if _int(meta, a + "attention.value_length", config["head_dim"]) != config["head_dim"]:
        raise ConversionError("key and value head sizes differ: not supported")
    rope_dims = _int(meta, a + "rope.dimension_count", config["head_dim"])
    if rope_dims != config["head_dim"]:
        raise ConversionError(f"RoPE on {rope_dims} of {config['head_dim']} dimensions: not supported")
    scaling = _get(meta, a + "rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": _float(meta, a + "rope.scaling.factor")}
    elif scaling != "none":
        raise ConversionError(f"RoPE scaling {scaling!r} is not supported (only linear)")
    return config


# GGUF tensor names (the part after blk.N.) -> Hugging Face names
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 2/3 norm around both the attention and the MLP: ffn_norm is the MLP's pre-norm.
_GEMMA2_LAYER = dict(
    _LAYER, ffn_norm="pre_feedforward_layernorm", post_attention_norm="post_attention_layernorm",
    post_ffw_norm="post_feedforward_layernorm",
)
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass
class Arch:
    """How one GGUF architecture maps onto an mlx-lm model."""

    model_type: str
    permuted_qk: bool  # llama.cpp permutes Q/K rows for its interleaved RoPE
    norm_offset: float = 0.0  # llama.cpp stores Gemma's norm weights as 1 + w
    extra: Optional[Callable[[dict, dict, List[str]], None]] = None
    layer: Dict[str, str] = field(default_factory=lambda: _LAYER)


def _qwen2(meta: dict, config: dict, notes: List[str]) -> None:
    del config["head_dim"]  # mlx-lm's Qwen2 derives it


def _gemma(meta: dict, config: dict, notes: List[str]) -> None:
    config.pop("max_position_embeddings")
    if config["model_type"] == "gemma":
        notes.append("llama.cpp's Gemma MLP uses tanh-approximated GELU; mlx-lm's Gemma uses "
                     "exact GELU (~1e-3 apart)")


def _attn_scalar(config: dict, big_layers: int, notes: List[str]) -> None:
    # Not in the metadata: llama.cpp scales queries by head_dim, except for the 27B models
    # (recognised by their layer count), which use hidden_size / heads.
    if config["num_hidden_layers"] == big_layers:
        config["query_pre_attn_scalar"] = config["hidden_size"] // config["num_attention_heads"]
    else:
        config["query_pre_attn_scalar"] = config["head_dim"]
    notes.append(f"query_pre_attn_scalar={config['query_pre_attn_scalar']} (not in GGUF metadata: "
                 "chosen as llama.cpp does)")


def _gemma2(meta: dict, config: dict, notes: List[str]) -> None:
    _gemma(meta, config, notes)
    _attn_scalar(config, 46, notes)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        config[key] = _float(meta, f"gemma2.{key}")
    notes.append("mlx-lm's Gemma 2 attends globally in every layer (the model's 4096-token "
                 "sliding window is not applied)")


def _gemma3(meta: dict, config: dict, notes: List[str]) -> None:
    _attn_scalar(config, 62, notes)
    config["sliding_window"] = _int(meta, "gemma3.attention.sliding_window")
    pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # one flag per layer: sliding or not
        full = [i for i, sliding in enumerate(pattern) if not sliding]
        if not full or any((i + 1) % (full[0] + 1) for i in full):
            raise ConversionError("gemma3 sliding window pattern is not periodic: not supported")
        pattern = full[0] + 1
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
        raise ConversionError(f"metadata gemma3.attention.sliding_window_pattern is {pattern!r}")
    config["sliding_window_pattern"] = pattern
    config["rope_local_base_freq"] = _float(meta, "gemma3.rope.freq_base_swa", 10000.0)


ARCHS = {
    "llama": Arch("llama", permuted_qk=True),
    "qwen2": Arch("qwen2", permuted_qk=False, extra=_qwen2),
    "qwen3": Arch("qwen3", permuted_qk=False),
    "gemma": Arch("gemma", permuted_qk=False, norm_offset=1.0, extra=_gemma),
    "gemma2": Arch("gemma2", permuted_qk=False, norm_offset=1.0, extra=_gemma2, layer=_GEMMA2_LAYER),
    "gemma3": Arch("gemma3_text", permuted_qk=False, norm_offset=1.0, extra=_gemma3,
                   layer=_GEMMA2_LAYER),
}


def hf_name(name: str, layer: Dict[str, str] = _LAYER) -> Optional[str]:
    """The Hugging Face name of a GGUF tensor name, None if it has none."""
    stem, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in _TOP:
        return f"{_TOP[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in layer:
        return f"model.layers.{int(parts[1])}.{layer[parts[2]]}.{kind}"
    return None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: within each head it interleaves the two rotary halves
    (row 2i + j holds Hugging Face row j * half + i); put the halves back one after the other."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _default_dtype() -> str:
    # MLX's CPU backend (Linux) runs float32 matmuls fastest; Metal prefers float16.
    return "float16" if sys.platform == "darwin" else "float32"


def plan_gguf(src: Path, stage: Optional[Path]) -> Plan:
    """A GGUF file's config, (lazy) weights and tokenizer; the tokenizer files go to ``stage``."""
    if src.is_dir():
        raise ConversionError(f"{src}: the gguf format reads a .gguf file, not a directory")
    g = GGUFFile(src)
    meta = g.metadata
    arch_name = meta.get("general.architecture")
    if arch_name not in ARCHS:
        raise ConversionError(
            f"GGUF architecture {arch_name!r} is not supported (supported: {', '.join(ARCHS)})"
        )
    arch = ARCHS[arch_name]
    notes: List[str] = []
    config = _common_config(meta, arch_name, arch.model_type)
    if arch.extra:
        arch.extra(meta, config, notes)

    unknown = sorted(n for n in g.tensors if hf_name(n, arch.layer) is None)
    if "rope_freqs.weight" in unknown:
        raise ConversionError("rope_freqs.weight (Llama 3.1-style RoPE scaling) is not supported")
    if unknown:
        raise ConversionError(f"unexpected tensor {unknown[0]} ({len(unknown)} not in a {arch_name} model)")
    if "token_embd.weight" not in g.tensors:
        raise ConversionError("missing tensor token_embd.weight")
    missing_types = sorted({i.type_name for i in g.tensors.values() if i.type not in NATIVE})
    if missing_types and _gguf_package() is None:
        raise ConversionError(
            f"{', '.join(missing_types)} tensors need the gguf package to dequantize ({GGUF_EXTRA})"
        )

    config["vocab_size"] = g.tensors["token_embd.weight"].shape[0]
    config["tie_word_embeddings"] = "output.weight" not in g.tensors
    if arch.model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in g.tensors
    for key, hf in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            config[hf] = int(meta[f"tokenizer.ggml.{key}_token_id"])
    config["torch_dtype"] = _default_dtype()

    _check_shapes(config, {hf_name(n, arch.layer): (n, i.shape) for n, i in g.tensors.items()})
    if stage is None:  # the shape-only pass of convert(): stand-ins, nothing read or written
        weights = {
            hf_name(n, arch.layer): mx.broadcast_to(mx.zeros((), mx.float32), i.shape)
            for n, i in g.tensors.items()
        }
        return Plan("gguf", config, {}, weights, None, "", g.size, notes=notes)
    stage.mkdir(parents=True, exist_ok=True)
    notes.append(write_tokenizer(meta, stage))  # before the (long) dequantization: it may refuse
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    items, mapped = [], []
    for name in g.tensors:
        target = hf_name(name, arch.layer)
        heads = None
        if arch.permuted_qk and target.endswith(("q_proj.weight", "q_proj.bias")):
            heads = H
        elif arch.permuted_qk and target.endswith(("k_proj.weight", "k_proj.bias")):
            heads = Hkv
        offset = arch.norm_offset if arch.norm_offset and name.endswith("norm.weight") else 0.0
        items.append((target, _item(g, name, heads, offset)))
    staged = stage / "gguf.safetensors"
    safetensors_io.write(staged, items, metadata={"format": "pt"})
    weights, _ = safetensors_io.load(staged)

    counts: Dict[str, int] = {}
    for info in g.tensors.values():
        counts[info.type_name] = counts.get(info.type_name, 0) + 1
    kinds = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    found = f"{len(g.tensors)} tensors in a GGUF v{g.version} file ({kinds}), architecture {arch_name}"
    if meta.get("general.name"):
        found += f" ({meta['general.name']})"
    quantized = sorted(k for k in counts if k not in ("F32", "F16", "BF16"))
    if quantized:
        mapped.append(f"{', '.join(quantized)} tensors dequantized to float32")
    if arch.permuted_qk:
        mapped.append(f"{config['num_hidden_layers']} x blk.N.attn_q/attn_k: llama.cpp's rotary row "
                      "order undone")
    if arch.norm_offset:
        mapped.append("norm weights stored as 1 + w by llama.cpp: 1 subtracted")
    mapped.append("blk.N.* / token_embd / output_norm / output -> Hugging Face names")

    notes.append("no Infini gates in the file: new gates start at gate_init")
    return Plan("gguf", config, {}, weights, None, found, g.size, mapped=mapped, notes=notes)


def _check_shapes(config: dict, found: Dict[str, Tuple[str, Tuple[int, ...]]]) -> None:
    """Every tensor against the shape the metadata implies, before anything is dequantized."""
    try:
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))  # parameters stay lazy: nothing computed
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"the metadata does not describe a {config['model_type']} model: {e}") from None
    for k, v in tree_flatten(model.parameters()):
        if k in found and tuple(found[k][1]) != tuple(v.shape):
            name, shape = found[k]
            raise ConversionError(
                f"shape mismatch: {name} is {list(shape)}, the metadata implies {list(v.shape)}"
            )


def _item(g: GGUFFile, name: str, heads: Optional[int], offset: float) -> safetensors_io.Item:
    info = g.tensors[name]
    code = {1: "F16", 30: "BF16"}.get(info.type, "F32")

    if offset:
        code = "F32"

    def data() -> np.ndarray:
        w = g.read(name)
        if heads:
            w = _unpermute(w, heads)
        if offset:
            if info.type == 30:  # bfloat16 bits -> float32
                w = (w.astype(np.uint32) << 16).view(np.float32)
            w = w.astype(np.float32) - np.float32(offset)
        return w

    return code, info.shape, data

