"""The attention variants, and everything that differs between them, behind one seam.

A variant is one class here, registered in `ATTENTIONS` under the `ModelConfig.attn_type` that
selects it. Besides being the module, the class answers from the config alone what the rest of
nanoseek asks about attention; nothing outside this file branches on `attn_type`:

* `check(cfg, need)`: validation of the config fields it reads (from `ModelConfig.validate`);
* `rope_dim(cfg)`: the rotary width; `head_dims(cfg)`: per-head query/key and value widths (FLOPs);
* `cache_layout(cfg)`: what the engine's KV cache stores per layer and token (`CacheLayout`; the
  engine allocates `n_layers x slots x max_seq_len` of it, `Transformer.kv_bytes_per_token` counts it);
* Hugging Face interop (used by `nanoseek.interop`): `hf_families`, the transformers model types
  with this attention; `config_from_hf` / `config_to_hf`, its config.json fields; `hf_mismatch`, why
  a family's attention is not this model's; `hf_tensors` / `hf_zero_tensors`, its tensors' names and
  layouts in a checkpoint.

Adding a variant: its fields in `ModelConfig`, one class here implementing these, one entry in
`ATTENTIONS` (and, for a new transformers architecture, its name in `interop.hf_config.ARCHITECTURES`).

Incremental decoding: a variant hands the new tokens' queries, keys and values to an
`AttentionCache` (`attend(layer, q, k, v, scale) -> out`); the cache stores them in the layout
the variant declared and attends over everything it holds. The engine owns the cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from nanoseek.model.chunk_attention import attention
from nanoseek.model.linear import Linear, linears
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope

if TYPE_CHECKING:  # annotations only: config.py imports this module to validate
    from nanoseek.model.config import ModelConfig

Need = Callable[[bool, str, str], None]  # ModelConfig.validate's need(ok, field, what it must be)


class AttentionCache(Protocol):
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Store k/v of the new tokens and attend. q: [B, H, T, dk], k: [B, Hkv, T, dk],
        v: [B, Hkv, T, dv] -> [B, H, T, dv]."""
        ...


class HFFields(Protocol):
    """A config.json as `interop.hf_config` hands it over: reads and refusals that name the field."""

    def get(self, name: str, default: Any = None) -> Any: ...
    def required(self, name: str, nullable: bool = False) -> Any: ...
    def refuse(self, name: str, value: Any, why: str) -> Exception: ...


@dataclass(frozen=True)
class CacheLayout:
    """What a variant's `attend` calls hand the cache, per layer and token: `kv_heads` keys of `k_dim`
    and values of `v_dim`; with `values_in_keys` a value is its key's first v_dim numbers (not stored)."""

    kv_heads: int
    k_dim: int
    v_dim: int
    values_in_keys: bool = False

    @property
    def elements_per_token(self) -> int:
        return self.kv_heads * (self.k_dim + (0 if self.values_in_keys else self.v_dim))


@dataclass(frozen=True)
class HFTensor:
    """One of the variant's tensors: `ours` under a block's `attn.`, `theirs` under a transformers
    layer's `self_attn.`; with `rows`, ours = theirs[rows] (a row permutation)."""

    ours: str
    theirs: str
    rows: Tensor | None = None


class Attention(nn.Module):
    """The interface of a variant (see the module doc); forward(x, cos, sin, doc_ids, cache) -> [B, T, D].
    The Hugging Face methods are called only for the families in `hf_families` (none: no HF export)."""

    hf_families: tuple[str, ...] = ()  # transformers model types with this attention, in export preference

    @staticmethod
    def check(cfg: ModelConfig, need: Need) -> None:
        raise NotImplementedError

    @staticmethod
    def rope_dim(cfg: ModelConfig) -> int:
        raise NotImplementedError

    @staticmethod
    def head_dims(cfg: ModelConfig) -> tuple[int, int]:
        raise NotImplementedError

    @staticmethod
    def cache_layout(cfg: ModelConfig) -> CacheLayout:
        raise NotImplementedError

    @staticmethod
    def config_from_hf(hf: HFFields, family: str) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def config_to_hf(cfg: ModelConfig, family: str) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def hf_mismatch(cfg: ModelConfig, family: str) -> str | None:
        raise NotImplementedError

    @staticmethod
    def hf_tensors(cfg: ModelConfig, family: str, hf_config: dict[str, Any]) -> list[HFTensor]:
        raise NotImplementedError

    @staticmethod
    def hf_zero_tensors(cfg: ModelConfig, family: str) -> list[tuple[str, tuple[int, ...]]]:
        """Tensors under `self_attn.` that a checkpoint has and we do not: loading requires them zero."""
        return []


# ----------------------------------------------------------------------------- GQA


class GQAttention(Attention):
    """Grouped-query attention (Llama, Qwen): n_kv_heads key/value heads shared by n_heads query heads,
    optional bias on q/k/v (Qwen2) and RMSNorm on each query and key head (Qwen3)."""

    hf_families = ("qwen3", "qwen2", "llama", "qwen3_moe", "qwen2_moe")
    _QK_NORM_FAMILIES = ("qwen3", "qwen3_moe")
    _O_PROJ_BIAS_FAMILIES = ("llama", "qwen3", "qwen3_moe")  # their `attention_bias` biases o_proj too

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads = layer, cfg.n_heads, cfg.n_kv_heads
        self.head_dim = hd = cfg.attn_head_dim
        self.wq = Linear(cfg.d_model, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.wk = Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = Linear(cfg.n_heads * hd, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.scale = hd**-0.5

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, doc_ids: Tensor | None, cache: AttentionCache | None
    ) -> Tensor:
        B, T, _ = x.shape
        q, k, v = linears(x, (self.wq, self.wk, self.wv))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k, v = k.view(B, T, self.n_kv_heads, self.head_dim), v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            out = cache.attend(self.layer, q, k, v, self.scale)
        else:
            out = attention(q, k, v, self.scale, doc_ids)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    @staticmethod
    def check(cfg: ModelConfig, need: Need) -> None:
        need(cfg.head_dim > 0 or cfg.d_model % cfg.n_heads == 0, "d_model", "divisible by n_heads")
        need(cfg.n_heads % cfg.n_kv_heads == 0, "n_kv_heads", f"a divisor of n_heads={cfg.n_heads}")
        need(cfg.attn_head_dim % 2 == 0, "head_dim", "even (rotary pairs)")

    @staticmethod
    def rope_dim(cfg: ModelConfig) -> int:
        return cfg.attn_head_dim

    @staticmethod
    def head_dims(cfg: ModelConfig) -> tuple[int, int]:
        return cfg.attn_head_dim, cfg.attn_head_dim

    @staticmethod
    def cache_layout(cfg: ModelConfig) -> CacheLayout:
        return CacheLayout(cfg.n_kv_heads, cfg.attn_head_dim, cfg.attn_head_dim)

    @staticmethod
    def config_from_hf(hf: HFFields, family: str) -> dict[str, Any]:
        d_model, n_heads = int(hf.required("hidden_size")), int(hf.required("num_attention_heads"))
        head_dim = int(hf.get("head_dim") or (128 if family == "qwen3" else d_model // n_heads))
        if family == "qwen2":
            qkv_bias = True  # Qwen2Attention hard-codes bias on q, k, v
        elif family == "qwen2_moe":
            qkv_bias = bool(hf.get("qkv_bias", True))
        else:
            # Llama / Qwen3 `attention_bias` adds a bias to o_proj too; we load it only when that
            # o_proj bias is all zeros (`hf_zero_tensors`, checked against the weights at load time).
            qkv_bias = bool(hf.get("attention_bias", False))
        return dict(
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=0 if head_dim * n_heads == d_model else head_dim,
            qk_norm=family in GQAttention._QK_NORM_FAMILIES,
            qkv_bias=qkv_bias,
        )

    @staticmethod
    def config_to_hf(cfg: ModelConfig, family: str) -> dict[str, Any]:
        hf: dict[str, Any] = {"num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.attn_head_dim}
        if family in GQAttention._O_PROJ_BIAS_FAMILIES:
            hf["attention_bias"] = cfg.qkv_bias  # o_proj.bias is written as zeros
        if family == "qwen2_moe":
            hf["qkv_bias"] = cfg.qkv_bias
        return hf

    @staticmethod
    def hf_mismatch(cfg: ModelConfig, family: str) -> str | None:
        if cfg.qk_norm != (family in GQAttention._QK_NORM_FAMILIES):
            return "QK-norm " + ("missing" if cfg.qk_norm else "not in the model")
        if family == "qwen2" and not cfg.qkv_bias:
            return "Qwen2 has q/k/v biases"
        return None

    @staticmethod
    def hf_tensors(cfg: ModelConfig, family: str, hf_config: dict[str, Any]) -> list[HFTensor]:
        out = []
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out.append(HFTensor(f"{ours}.weight", f"{theirs}.weight"))
            if cfg.qkv_bias and ours != "wo":
                out.append(HFTensor(f"{ours}.bias", f"{theirs}.bias"))
        if cfg.qk_norm:
            out += [HFTensor(f"{n}.weight", f"{n}.weight") for n in ("q_norm", "k_norm")]
        return out

    @staticmethod
    def hf_zero_tensors(cfg: ModelConfig, family: str) -> list[tuple[str, tuple[int, ...]]]:
        return [("o_proj.bias", (cfg.d_model,))] if cfg.qkv_bias and family in GQAttention._O_PROJ_BIAS_FAMILIES else []


# ----------------------------------------------------------------------------- MLA


class MLAttention(Attention):
    """Multi-head Latent Attention (DeepSeek-V2/V3): low-rank q and kv, decoupled RoPE key shared by heads.

    Without a cache (training, full forwards) keys and values are decompressed per head. With the
    engine's cache, attention runs in the absorbed form (DeepSeek-V2, section 2.1.2): W_uk is folded
    into the query and W_uv applied after attention, so a token's cache entry is its normalised
    latent and its one RoPE key, [kv_lora_rank + rope] per layer instead of n_heads x (nope + rope +
    v): multi-query attention over [latent, k_pe] whose values are the latent itself.

    Head widths are explicit (nope, rope, v), so d_model need not be a multiple of n_heads.
    Checkpoints: DeepSeek's rotary dimensions come in interleaved pairs (x0, x1), (x2, x3), ... when
    `rope_interleave` is set. Rotating interleaved pairs of a vector equals rotating the "rotate half"
    pairs (i, i + d/2) of the same vector with its rows reordered to [x0, x2, x4, ..., x1, x3, ...],
    and q.k is unchanged when q and k are reordered alike. So the rope rows of q_b_proj/q_proj (per
    head) and of kv_a_proj_with_mqa are permuted once at load time and back at export.
    """

    hf_families = ("deepseek_v3",)

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads = layer, cfg.n_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_dim = self.nope + self.rope
        if cfg.q_lora_rank > 0:
            self.wq_a = Linear(cfg.d_model, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = Linear(cfg.q_lora_rank, cfg.n_heads * qk_dim, bias=False)
        else:
            self.wq = Linear(cfg.d_model, cfg.n_heads * qk_dim, bias=False)
        self.wkv_a = Linear(cfg.d_model, cfg.kv_lora_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = Linear(cfg.kv_lora_rank, cfg.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = Linear(cfg.n_heads * self.v_dim, cfg.d_model, bias=False)
        self.scale = qk_dim**-0.5
        rs = cfg.rope_scaling or {}
        # YaRN also sharpens the softmax (DeepSeek-V3); no-op for factor <= 1, as in transformers.
        if rs.get("mscale_all_dim") and float(rs["factor"]) > 1:
            mscale = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1.0
            self.scale *= mscale * mscale

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, doc_ids: Tensor | None, cache: AttentionCache | None
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q = q.view(B, T, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_norm(latent)
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin)  # [B, T, 1, rope]: one RoPE key for all heads
        if cache is not None:
            return self._absorbed(q_nope, q_pe, latent, k_pe, cache)
        kv = self.wkv_b(latent).view(B, T, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe.expand(B, T, self.n_heads, self.rope)], dim=-1).transpose(1, 2)
        out = attention(q, k, v.transpose(1, 2), self.scale, doc_ids)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def _absorbed(self, q_nope: Tensor, q_pe: Tensor, latent: Tensor, k_pe: Tensor, cache: AttentionCache) -> Tensor:
        """q_nope . (W_uk c) = (q_nope W_uk) . c, and attn (W_uv c) = W_uv (attn c): attend in latent space."""
        B, T, H, _ = q_nope.shape
        w = self.wkv_b.weight.view(H, self.nope + self.v_dim, self.kv_lora_rank)
        q_latent = torch.einsum("bthn,hnr->bhtr", q_nope, w[:, : self.nope])
        q = torch.cat([q_latent, q_pe.transpose(1, 2).to(q_latent.dtype)], dim=-1)  # [B, H, T, r + rope]
        k = torch.cat([latent, k_pe.squeeze(2).to(latent.dtype)], dim=-1).unsqueeze(1)  # [B, 1, T, r + rope]
        out = cache.attend(self.layer, q, k, latent.unsqueeze(1), self.scale)  # [B, H, T, r]
        out = torch.einsum("bhtr,hvr->bthv", out, w[:, self.nope :])
        return self.wo(out.reshape(B, T, H * self.v_dim))

    @staticmethod
    def check(cfg: ModelConfig, need: Need) -> None:
        need(cfg.kv_lora_rank >= 1, "kv_lora_rank", ">= 1 for MLA")
        need(cfg.q_lora_rank >= 0, "q_lora_rank", ">= 0 (0 = no query compression)")
        need(cfg.qk_rope_head_dim >= 2 and cfg.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "even, >= 2")
        need(cfg.qk_nope_head_dim >= 0, "qk_nope_head_dim", ">= 0")
        need(cfg.v_head_dim >= 1, "v_head_dim", ">= 1")

    @staticmethod
    def rope_dim(cfg: ModelConfig) -> int:
        return cfg.qk_rope_head_dim

    @staticmethod
    def head_dims(cfg: ModelConfig) -> tuple[int, int]:
        return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim

    @staticmethod
    def cache_layout(cfg: ModelConfig) -> CacheLayout:
        """The absorbed form: one kv "head" whose key is [latent, rope key] and whose value is the latent."""
        return CacheLayout(1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank, values_in_keys=True)

    @staticmethod
    def config_from_hf(hf: HFFields, family: str) -> dict[str, Any]:
        if hf.get("attention_bias"):
            raise hf.refuse("attention_bias", True, "MLA projections without bias only")
        return dict(
            n_kv_heads=int(hf.required("num_attention_heads")),  # num_key_value_heads is not used by MLA
            q_lora_rank=int(hf.required("q_lora_rank", nullable=True) or 0),  # null: full-rank q_proj
            kv_lora_rank=int(hf.required("kv_lora_rank")),
            qk_nope_head_dim=int(hf.required("qk_nope_head_dim")),
            qk_rope_head_dim=int(hf.required("qk_rope_head_dim")),
            v_head_dim=int(hf.required("v_head_dim")),
        )

    @staticmethod
    def config_to_hf(cfg: ModelConfig, family: str) -> dict[str, Any]:
        return dict(
            num_key_value_heads=cfg.n_heads,
            q_lora_rank=cfg.q_lora_rank or None,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim,
            attention_bias=False,
            rope_interleave=True,  # exported in DeepSeek's own interleaved rotary layout (see the class doc)
        )

    @staticmethod
    def hf_mismatch(cfg: ModelConfig, family: str) -> str | None:
        return "MLA with qkv_bias/qk_norm" if cfg.qkv_bias or cfg.qk_norm else None

    @staticmethod
    def hf_tensors(cfg: ModelConfig, family: str, hf_config: dict[str, Any]) -> list[HFTensor]:
        if cfg.q_lora_rank:
            names = [("wq_a", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("wq_b", "q_b_proj")]
        else:
            names = [("wq", "q_proj")]
        names += [
            ("wkv_a", "kv_a_proj_with_mqa"),
            ("kv_norm", "kv_a_layernorm"),
            ("wkv_b", "kv_b_proj"),
            ("wo", "o_proj"),
        ]
        rows: dict[str, Tensor] = {}
        if hf_config.get("rope_interleave", True):
            nope, rope, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
            per_head = torch.cat([torch.arange(nope), nope + _rotate_half_order(rope)])
            q_rows = (torch.arange(cfg.n_heads)[:, None] * (nope + rope) + per_head).flatten()
            rows = {"wq": q_rows, "wq_b": q_rows, "wkv_a": torch.cat([torch.arange(r), r + _rotate_half_order(rope)])}
        return [HFTensor(f"{ours}.weight", f"{theirs}.weight", rows.get(ours)) for ours, theirs in names]


def _rotate_half_order(rope: int) -> Tensor:
    """Interleaved pairs -> rotate-half order: [0, 2, 4, ..., 1, 3, 5, ...]."""
    return torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])


ATTENTIONS: dict[str, type[Attention]] = {"gqa": GQAttention, "mla": MLAttention}


def attention_class(cfg: ModelConfig) -> type[Attention]:
    return ATTENTIONS[cfg.attn_type]


def attention_for_hf_family(family: str) -> tuple[str, type[Attention]]:
    """(attn_type, class) of the variant a transformers model type uses."""
    for name, cls in ATTENTIONS.items():
        if family in cls.hf_families:
            return name, cls
    raise ValueError(f"no attention variant lists the transformers model type {family!r} in its hf_families")


__all__ = [
    "ATTENTIONS",
    "Attention",
    "AttentionCache",
    "CacheLayout",
    "GQAttention",
    "HFTensor",
    "MLAttention",
    "attention",
    "attention_class",
    "attention_for_hf_family",
]
