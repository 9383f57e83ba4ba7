"""The `"infini"` block of a model's config.json: every choice that changes the math."""

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional

FORMAT_VERSION = 1
# sigmoid(-12) = 6.1e-6: new gates give an untrained memory (almost) no weight.
UNTRAINED_GATE_INIT = -12.0

_CHOICES = {
    "update": ("linear", "delta"),
    "first_segment": ("zero", "eps"),
    "rope_mode": ("segment", "absolute"),
    "gqa_memory": ("interleave", "tile"),
    "gate_weights": ("memory", "local"),
    "gate_act": ("sigmoid", "tanh", "hard_sigmoid", "tanh_abs"),
    "feature_map": ("elu1", "relu"),
    "memory": ("paper", "normalized"),
    "write_gate": ("sigmoid", "clip"),
}


@dataclass
class InfiniConfig:
    """Semantics of an Infini-attention model, stored as `"infini"` in config.json.

    Args:
        segment_len: Tokens per segment N. Local attention sees only the current
            segment; everything before it is read from the compressive memory.
        update: Memory update rule: ``"linear"`` (Eq. 8) or ``"delta"`` (Eq. 9).
        gate_init: Initial gate logit beta of new gates. The default, -12,
            gives the memory the weight sigmoid(-12) = 6.1e-6, so a model
            upcycled with a memory that was never trained computes, inside a
            segment, what its base model does. Training starts an untrained
            memory's gates at 0 (sigmoid 0.5) instead.
        first_segment: How an empty memory is read. ``"zero"``: M_0 = 0,
            z_0 = 0 and the 0/0 retrieval is defined as 0, so the first segment
            reads nothing. ``"eps"``: the denominator is ``sigma(Q) z + eps``
            for every segment (some public checkpoints were trained so).
        eps: The epsilon of ``first_segment="eps"``.
        rope_mode: Positions of the local path's RoPE: ``"segment"`` restarts
            at 0 in every segment (default), ``"absolute"`` counts from the
            start of the input (some checkpoints were trained so).
        memory_rope: Apply RoPE to the Q/K that read and write the memory.
            The paper does not; one public checkpoint (jlamprou) did.
        gqa_memory: Which query heads share a KV head's memory: ``"interleave"``
            (query head h reads KV head h // group, as attention shares KV heads)
            or ``"tile"`` (h % n_kv_heads, as Beomi's Llama did).
        gate_weights: Which output sigmoid(beta) weights: ``"memory"`` (Eq. 10)
            or ``"local"`` (lucidrains' convention).
        gate_act: The function that turns beta into that weight: ``"sigmoid"``
            (Eq. 10), or nanotron's ``"tanh"``, ``"hard_sigmoid"``
            (clip(0.2 beta + 0.5, 0, 1)) or ``"tanh_abs"`` (|tanh beta|).
        feature_map: sigma applied to the memory's Q and K: ``"elu1"``
            (ELU + 1, the paper's) or ``"relu"`` (a deviation: exact zeros let
            a query ignore every key outside its support, so what it reads does
            not fade as filler accumulates in z; a query whose support no key
            touches reads 0, like an empty memory).
        memory: The memory's form. ``"paper"``: (M, z) with Eqs. 7-9 as set by
            ``update``, ``feature_map``, ``first_segment`` and ``eps``.
            ``"normalized"`` (a deviation, after DeltaNet): no z; q and k go
            through SiLU and an L2 norm, each token writes with its own
            strength beta_t = sigmoid(b_proj x_t) by the delta rule, token by
            token (S <- S + beta_t k_t^T (v_t - k_t S)), and the read-out q S
            passes an RMSNorm (``o_norm``). Reads still see the memory as it
            was when the segment began; the options above it ignores.
        conv_size: Width of a causal depthwise convolution over time applied
            to the q, k and v that read and write the memory (0: none). Keys
            then carry the tokens just before them, which ordered recall
            needs. Local attention does not see it. Starts as the identity.
        write_gate: How the normalised memory turns ``b_proj x_t`` into the
            write strength beta_t: ``"sigmoid"`` (DeltaNet's), or ``"clip"``,
            clip(0.5 + b / 4, 0, 1), the sigmoid's tangent at 0 (a deviation:
            a token can write exactly nothing, so filler read for a million
            tokens need not erase what a key wrote).
        write_conv: Pass the write strengths' logits ``b_proj x_t`` through a
            causal convolution of ``conv_size`` taps per KV head
            (``b_conv1d``, identity at first) before ``write_gate``, so
            whether a token writes can depend on the tokens just before it
            (a deviation: the "." that ends a key may write while the "." of
            filler does not). Needs the normalised memory and ``conv_size``.
        qk_gate: Multiply the convolved q and k of the memory, channel by
            channel, by 1 + a second convolution of the same inputs
            (``q_gate_conv1d``/``k_gate_conv1d``, zero at first, so a model
            fine-tuned with it starts as it was), before SiLU and the L2 norm
            (a deviation: a key can then bind the token it is written at to
            one further back, such as a fact's name, instead of adding them).
            It reads the same last inputs as ``conv_size``'s convolution, so
            the streaming state does not change. Needs ``conv_size``.
        qk_expand: Widen the memory's keys and queries to twice the head
            size: each head's convolved k (q) followed by k times a second
            convolution of the same inputs (``k_gate_conv1d``, zero at first,
            so the new half of every key is 0 and the model starts as it
            was; ``q_gate_conv1d`` starts as 0.001 times the identity), before SiLU and
            the L2 norm (a deviation: a memory of 2 D x D per head, whose
            new half keys a token by products of the tokens before it).
            Same streaming inputs; the memory's state doubles. Needs the
            normalised memory and ``conv_size``; not with ``qk_gate``.
        write_scale: Multiply every write strength beta_t by this, in (0, 1]
            (a deviation, for the normalised memory): the delta rule then
            moves a key's stored value only that share of the way to the new
            one, so a later write under a like key erases less of an
            earlier fact; the read-out's RMSNorm makes the memory's overall
            scale irrelevant. 1: DeltaNet's rule.
        memory_trained: Whether the memory was trained (the trainer records
            ``True`` once it has taken a step). ``None``: not recorded;
            ``infini_mlx.load`` then decides from the saved gates (see
            ``infini_mlx.utils.memory_trained``). Not part of the math.
    """

    segment_len: int = 2048
    update: str = "delta"
    gate_init: float = UNTRAINED_GATE_INIT
    first_segment: str = "zero"
    eps: float = 1e-6
    rope_mode: str = "segment"
    memory_rope: bool = False
    gqa_memory: str = "interleave"
    gate_weights: str = "memory"
    gate_act: str = "sigmoid"
    feature_map: str = "elu1"
    memory: str = "paper"
    conv_size: int = 0
    write_gate: str = "sigmoid"
    write_conv: bool = False
    write_scale: float = 1.0
    qk_gate: bool = False
    qk_expand: bool = False
    memory_trained: Optional[bool] = None

    def __post_init__(self):
        if int(self.segment_len) < 1:
            raise ValueError(f"segment_len must be >= 1, got {self.segment_len}")
        self.segment_len = int(self.segment_len)
        if int(self.conv_size) < 0:
            raise ValueError(f"conv_size must be >= 0, got {self.conv_size}")
        self.conv_size = int(self.conv_size)
        if not (self.memory_trained is None or isinstance(self.memory_trained, bool)):
            raise ValueError(f"infini.memory_trained must be true or false, got {self.memory_trained!r}")
        if self.memory_rope and (self.conv_size or self.memory == "normalized"):
            raise ValueError("memory_rope goes with the paper's memory and no convolution only")
        if not isinstance(self.write_conv, bool):
            raise ValueError(f"infini.write_conv must be true or false, got {self.write_conv!r}")
        if self.write_conv and (self.memory != "normalized" or not self.conv_size):
            raise ValueError("write_conv needs the normalized memory and a conv_size")
        if not isinstance(self.qk_gate, bool):
            raise ValueError(f"infini.qk_gate must be true or false, got {self.qk_gate!r}")
        if self.qk_gate and not self.conv_size:
            raise ValueError("qk_gate needs a conv_size")
        if not isinstance(self.qk_expand, bool):
            raise ValueError(f"infini.qk_expand must be true or false, got {self.qk_expand!r}")
        if self.qk_expand and (self.qk_gate or not self.conv_size or self.memory != "normalized"):
            raise ValueError("qk_expand needs the normalized memory and a conv_size, and not qk_gate")
        if isinstance(self.write_scale, bool) or not isinstance(self.write_scale, (int, float)) or not 0 < self.write_scale <= 1:
            raise ValueError(f"infini.write_scale must be a number in (0, 1], got {self.write_scale!r}")
        self.write_scale = float(self.write_scale)
        if self.write_scale != 1.0 and self.memory != "normalized":
            raise ValueError("write_scale needs the normalized memory")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"infini.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "InfiniConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"version"}
        if unknown:
            raise ValueError(f"unknown keys in the infini config: {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        if d["memory_trained"] is None:  # not recorded: decided from the gates when loaded
            del d["memory_trained"]
        return {"version": FORMAT_VERSION, **d}

    def replace(self, **overrides) -> "InfiniConfig":
        return InfiniConfig.from_dict({**asdict(self), **overrides})
