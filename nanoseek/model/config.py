"""ModelConfig: every architectural choice of the transformer, validated, with named presets.

One dataclass covers the dense models (Llama, Qwen2.5, Qwen3), the MoE models
(Qwen2/3-MoE, DeepSeek-V3) and Multi-head Latent Attention, so the same
`Transformer` class builds all of them.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.errors import InputError, read_json, unknown
from nanoseek.model.attention import ATTENTIONS
from nanoseek.values import parse_value


@dataclass
class ModelConfig:
    # --- sizes ---
    vocab_size: int = 512
    """Number of token ids (embedding rows). Must cover the tokenizer's vocabulary."""
    d_model: int = 128
    """Residual stream width."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide n_heads. Equal to n_heads = plain MHA."""
    head_dim: int = 0
    """GQA per-head width; 0 means d_model // n_heads. (MLA's head widths are the qk_*/v_head_dim fields.)"""
    d_ff: int = 384
    """Hidden width of the dense SwiGLU MLP (dense models, and the first_k_dense layers of MoE models)."""
    max_seq_len: int = 512
    """Longest sequence (prompt + generation) the rotary tables and KV cache are sized for."""

    # --- attention details ---
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    rope_scaling: dict[str, Any] | None = None
    """Hugging Face style rope scaling ({"rope_type": "linear"|"dynamic"|"yarn"|"llama3", ...}) or None."""
    qk_norm: bool = False
    """RMSNorm on each query and key head before RoPE (Qwen3)."""
    qkv_bias: bool = False
    """Bias on the q, k, v projections (Qwen2 / Qwen2.5)."""
    attn_type: str = "gqa"
    """'gqa' (grouped-query attention) or 'mla' (DeepSeek Multi-head Latent Attention): a key of
    `attention.ATTENTIONS`, whose class reads and validates the attention fields."""
    q_lora_rank: int = 0
    """MLA: rank of the query down-projection; 0 = full-rank query projection."""
    kv_lora_rank: int = 64
    """MLA: width of the compressed key/value latent (what the engine caches, with one RoPE key)."""
    qk_nope_head_dim: int = 32
    """MLA: per-head query/key width without rotary embedding."""
    qk_rope_head_dim: int = 16
    """MLA: per-head query/key width carrying the decoupled rotary embedding (the key part is shared)."""
    v_head_dim: int = 32
    """MLA: per-head value width."""

    # --- norms, embeddings, init ---
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the token embedding with the LM head."""
    init_std: float = 0.02
    """Standard deviation of the normal init of linear and embedding weights."""

    # --- mixture of experts (n_routed_experts == 0 means dense) ---
    n_routed_experts: int = 0
    """Fine-grained routed experts per MoE layer; 0 builds a dense model."""
    n_shared_experts: int = 0
    """Always-on shared experts per MoE layer (fused into one SwiGLU of width n_shared * moe_d_ff)."""
    moe_d_ff: int = 64
    """Hidden width of each routed expert."""
    shared_d_ff: int = 0
    """Hidden width of the fused shared expert; 0 means n_shared_experts * moe_d_ff."""
    top_k: int = 2
    """Routed experts chosen per token."""
    score_func: str = "softmax"
    """Router scores: 'softmax' (Qwen-MoE, DeepSeek-V2) or 'sigmoid' (DeepSeek-V3)."""
    norm_topk_prob: bool = True
    """Renormalise the chosen experts' gate weights to sum to one."""
    routed_scaling_factor: float = 1.0
    """Multiplier on the routed experts' combined output (DeepSeek-V3 uses 2.5)."""
    n_groups: int = 1
    """Expert groups for group-limited routing; 1 disables it."""
    topk_groups: int = 1
    """Groups a token may route into (DeepSeek-V3: top groups by the sum of their best two scores)."""
    first_k_dense: int = 0
    """The first k layers use a dense MLP instead of MoE."""
    shared_expert_gate: bool = False
    """Qwen2-MoE: scale the shared expert's output by sigmoid(w . x)."""
    bias_update_rate: float = 1e-3
    """Auxiliary-loss-free balancing: after each optimizer step, bias += rate * sign(mean_load - load)."""
    aux_loss_coef: float = 0.0
    """Weight of DeepSeek-V3's sequence-wise balance loss; 0 disables it."""

    def __post_init__(self) -> None:
        self.validate()

    # --- derived sizes ---
    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def shared_hidden(self) -> int:
        return self.shared_d_ff or self.n_shared_experts * self.moe_d_ff

    def layer_is_moe(self, layer: int) -> bool:
        return self.is_moe and layer >= self.first_k_dense

    # --- validation ---
    def validate(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig.{name} = {getattr(self, name)!r}: must be {allowed}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1")
        need(self.head_dim >= 0, "head_dim", ">= 0 (0 = d_model // n_heads)")
        need(self.attn_type in ATTENTIONS, "attn_type", " or ".join(map(repr, ATTENTIONS)))
        ATTENTIONS[self.attn_type].check(self, need)  # the variant's own fields (GQA: head widths from d_model)
        need(self.rope_theta > 0, "rope_theta", "> 0")
        need(self.norm_eps > 0, "norm_eps", "> 0")
        need(self.init_std > 0, "init_std", "> 0")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            need(
                kind in ("default", "linear", "dynamic", "yarn", "llama3"),
                "rope_scaling",
                "None or a dict with rope_type in default|linear|dynamic|yarn|llama3",
            )
        need(self.n_routed_experts >= 0, "n_routed_experts", ">= 0 (0 = dense)")
        if self.is_moe:
            need(
                1 <= self.top_k <= self.n_routed_experts,
                "top_k",
                f"in [1, n_routed_experts={self.n_routed_experts}]",
            )
            need(self.moe_d_ff >= 1, "moe_d_ff", ">= 1")
            need(self.n_shared_experts >= 0, "n_shared_experts", ">= 0")
            need(self.score_func in ("softmax", "sigmoid"), "score_func", "'softmax' or 'sigmoid'")
            need(
                self.n_groups >= 1 and self.n_routed_experts % self.n_groups == 0,
                "n_groups",
                f"a divisor of n_routed_experts={self.n_routed_experts}",
            )
            need(1 <= self.topk_groups <= self.n_groups, "topk_groups", f"in [1, n_groups={self.n_groups}]")
            need(
                self.top_k <= self.topk_groups * (self.n_routed_experts // self.n_groups),
                "top_k",
                "<= the number of experts in the topk_groups allowed groups",
            )
            need(0 <= self.first_k_dense <= self.n_layers, "first_k_dense", f"in [0, n_layers={self.n_layers}]")
            need(self.routed_scaling_factor > 0, "routed_scaling_factor", "> 0")
            need(self.bias_update_rate >= 0, "bias_update_rate", ">= 0")
            need(self.aux_loss_coef >= 0, "aux_loss_coef", ">= 0")

    # --- (de)serialisation ---
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """A checkpoint's config.json: a JSON object with every field, each of its type (no defaults filled in:
        a missing field would build a model of another shape than the weights')."""
        d = read_json(path)
        hints = typing.get_type_hints(cls)
        absent = [f.name for f in dataclasses.fields(cls) if f.name not in d]
        if absent:
            raise InputError(f"{path}: missing field(s) {', '.join(absent)}")
        for name, value in d.items():
            if name not in hints:
                raise InputError(f"{path}: " + str(unknown("ModelConfig field", name, list(hints))))
            kind = hints[name]
            wants_str = kind is str or (typing.get_origin(kind) is not None and str in typing.get_args(kind))
            try:
                if isinstance(value, str) and not wants_str:
                    raise ValueError(f"{name}: expected {kind}, got {value!r}")
                d[name] = parse_value(value, kind, name)
            except ValueError as e:
                raise InputError(f"{path}: {e}") from None
        try:
            return cls(**d)
        except (ValueError, TypeError) as e:
            raise InputError(f"{path}: {e}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


_TINY = dict(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=512)
# ~100M-parameter shapes for one GPU; vocab 32768 as in the engine benchmark.
_SMALL = dict(
    vocab_size=32768,
    d_model=768,
    n_layers=12,
    n_heads=12,
    n_kv_heads=4,
    d_ff=2048,
    max_seq_len=2048,
    rope_theta=100000.0,
    qk_norm=True,
)

PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the demo: a few hundred thousand parameters.
    "tiny": dict(_TINY),
    "tiny-moe": dict(
        _TINY,
        n_routed_experts=8,
        n_shared_experts=1,
        moe_d_ff=96,
        top_k=2,
        first_k_dense=1,
        score_func="sigmoid",
        routed_scaling_factor=1.0,
    ),
    # One GPU, ~100M total parameters.
    "small": dict(_SMALL),
    "small-moe": dict(
        _SMALL,
        n_routed_experts=16,
        n_shared_experts=1,
        moe_d_ff=128,
        top_k=2,
        first_k_dense=1,
        score_func="sigmoid",
    ),
    # ~1B total / ~200M active: DeepSeek-V3 style fine-grained experts.
    "moe-1b": dict(
        _SMALL,
        d_model=1024,
        n_layers=12,
        n_heads=16,
        n_kv_heads=4,
        d_ff=4096,
        n_routed_experts=64,
        n_shared_experts=2,
        moe_d_ff=384,
        top_k=6,
        first_k_dense=1,
        score_func="sigmoid",
        routed_scaling_factor=2.5,
        n_groups=8,
        topk_groups=4,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise unknown("model preset", name, list(PRESETS))
    return ModelConfig(**{**PRESETS[name], **overrides})


def preset_names() -> list[str]:
    return list(PRESETS)


__all__ = ["PRESETS", "ModelConfig", "get_preset", "preset_names"]
