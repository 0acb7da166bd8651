"""The transformer: embedding, pre-norm blocks of attention + (dense MLP | MoE), final norm, LM head.

Attention is grouped-query (GQA, with optional QK-norm and qkv bias) or DeepSeek's
Multi-head Latent Attention (MLA). Three ways to call the model:

* training on packed rows: `model(ids, positions, doc_ids)` — `doc_ids` stops
  attention across documents, `positions` restart at each document;
* plain causal: `model(ids)`;
* incremental decoding: `model(ids, positions, cache=cache)` where `cache` is any
  object with `attend(layer, q, k, v, scale) -> out` (see `KVCache`): the model hands
  it the new tokens' queries, keys and values, the cache stores k/v in whatever layout
  it likes and attends over everything it holds. The engine owns the cache.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.moe import MoE, SwiGLU, moe_layers
from nanoseek.model.rope import apply_rope, dynamic_inv_freq, rope_cos_sin, rope_frequencies


class KVCache(Protocol):
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Store k/v of the new tokens and attend. q: [B, H, T, dk], k: [B, Hkv, T, dk],
        v: [B, Hkv, T, dv] -> [B, H, T, dv]."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 (as the reference implementations do), scale in the input dtype:
        # weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype). F.rms_norm without a weight is that
        # normalisation (float32 inside, x's dtype out; float64 stays float64), one fused kernel on CUDA
        # instead of eight (a decode step has 2 * n_layers + 1 of them, or 4 * n_layers + 1 with QK-norm).
        # .to: autocast may run rms_norm in float32.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, doc_ids: Tensor | None) -> Tensor:
    """Causal attention over one chunk, blocked across documents when doc_ids [B, T] is given."""
    if k.shape[1] != q.shape[1]:  # GQA: share each kv head across n_heads // n_kv_heads query heads
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = causal & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)


class GQAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads = layer, cfg.n_heads, cfg.n_kv_heads
        self.head_dim = hd = cfg.attn_head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.scale = hd**-0.5

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, doc_ids: Tensor | None, cache: KVCache | None) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            out = cache.attend(self.layer, q, k, v, self.scale)
        else:
            out = attention(q, k, v, self.scale, doc_ids)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class MLAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3): low-rank q and kv, decoupled RoPE key shared by heads.

    Without a cache (training, full forwards) keys and values are decompressed per head. With the
    engine's cache, attention runs in the absorbed form (DeepSeek-V2, section 2.1.2): W_uk is folded
    into the query and W_uv applied after attention, so a token's cache entry is its normalised
    latent and its one RoPE key, [kv_lora_rank + rope] per layer instead of n_heads x (nope + rope +
    v): multi-query attention over [latent, k_pe] whose values are the latent itself.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads = layer, cfg.n_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_dim = self.nope + self.rope
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.d_model, cfg.n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.d_model, cfg.kv_lora_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.v_dim, cfg.d_model, bias=False)
        self.scale = qk_dim**-0.5
        rs = cfg.rope_scaling or {}
        # YaRN also sharpens the softmax (DeepSeek-V3); no-op for factor <= 1, as in transformers.
        if rs.get("mscale_all_dim") and float(rs["factor"]) > 1:
            mscale = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1.0
            self.scale *= mscale * mscale

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, doc_ids: Tensor | None, cache: KVCache | None) -> Tensor:
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

    def _absorbed(self, q_nope: Tensor, q_pe: Tensor, latent: Tensor, k_pe: Tensor, cache: KVCache) -> Tensor:
        """q_nope . (W_uk c) = (q_nope W_uk) . c, and attn (W_uv c) = W_uv (attn c): attend in latent space."""
        B, T, H, _ = q_nope.shape
        w = self.wkv_b.weight.view(H, self.nope + self.v_dim, self.kv_lora_rank)
        q_latent = torch.einsum("bthn,hnr->bhtr", q_nope, w[:, : self.nope])
        q = torch.cat([q_latent, q_pe.transpose(1, 2).to(q_latent.dtype)], dim=-1)  # [B, H, T, r + rope]
        k = torch.cat([latent, k_pe.squeeze(2).to(latent.dtype)], dim=-1).unsqueeze(1)  # [B, 1, T, r + rope]
        out = cache.attend(self.layer, q, k, latent.unsqueeze(1), self.scale)  # [B, H, T, r]
        out = torch.einsum("bhtr,hvr->bthv", out, w[:, self.nope :])
        return self.wo(out.reshape(B, T, H * self.v_dim))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = (MLAttention if cfg.attn_type == "mla" else GQAttention)(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.layer_is_moe(layer) else SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, doc_ids: Tensor | None, cache: KVCache | None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, doc_ids, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rope_dim = cfg.qk_rope_head_dim if cfg.attn_type == "mla" else cfg.attn_head_dim
        inv_freq, self.rope_attention_scaling = rope_frequencies(
            cfg.rope_theta, self.rope_dim, cfg.rope_scaling, cfg.max_seq_len
        )
        # Kept out of the state dict and out of .to(dtype): a bf16 copy of the frequencies would be wrong.
        self._inv_freq = {torch.device("cpu"): inv_freq}
        self.reset_parameters()

    # --- init ---
    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual outputs: keep the stream's variance flat
        for name, p in self.named_parameters():
            if p.dim() == 1:
                if name.endswith("bias"):
                    p.zero_()
                else:
                    p.fill_(1.0)  # norm weights
            elif name.endswith(("wo.weight", "w2.weight", ".w2")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)
        for m in moe_layers(self):
            m.router.e_score_correction_bias.zero_()

    def materialize_buffers(self, device: str | torch.device) -> None:
        """Zero the non-persistent buffers left on the meta device by a meta-device build."""
        for module in self.modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf.is_meta:
                    module.register_buffer(
                        name,
                        torch.zeros(buf.shape, dtype=buf.dtype, device=device),
                        persistent=name not in module._non_persistent_buffers_set,
                    )

    # --- forward ---
    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cfg, device = self.cfg, positions.device
        rs = cfg.rope_scaling or {}
        if rs.get("rope_type", rs.get("type")) == "dynamic":
            seq_len = int(positions.max()) + 1  # host read, only for this rarely used variant
            inv_freq = dynamic_inv_freq(cfg.rope_theta, self.rope_dim, rs, cfg.max_seq_len, seq_len)
        else:
            if device not in self._inv_freq:
                self._inv_freq[device] = self._inv_freq[torch.device("cpu")].to(device)
            inv_freq = self._inv_freq[device]
        return rope_cos_sin(positions, inv_freq, self.rope_attention_scaling, dtype)

    def hidden_states(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        doc_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Final-normed hidden states [B, T, D]."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids)
        cos, sin = self._rope(positions, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, doc_ids, cache)
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        doc_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Logits [B, T, vocab]."""
        return self.logits(self.hidden_states(input_ids, positions, doc_ids, cache))

    def loss(
        self,
        input_ids: Tensor,
        targets: Tensor,
        positions: Tensor | None = None,
        doc_ids: Tensor | None = None,
        reduction: str = "mean",
    ) -> tuple[Tensor, Tensor]:
        """(cross-entropy over targets != -100, MoE auxiliary loss or 0). Logits in float32 for the loss."""
        logits = self(input_ids, positions, doc_ids)
        ce = F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction=reduction
        )
        return ce, self.aux_loss()

    def aux_loss(self) -> Tensor:
        losses = [m.aux_loss for m in moe_layers(self) if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.embed.weight.device)

    # --- accounting ---
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters touched per token: routed experts count top_k / n_routed_experts of their size."""
        inactive = 0
        for m in moe_layers(self):
            expert_params = m.w1.numel() + m.w2.numel() + m.w3.numel()
            inactive += expert_params * (self.cfg.n_routed_experts - self.cfg.top_k) // self.cfg.n_routed_experts
        return self.num_params() - inactive

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), attention included.

        6 x (active matmul parameters, the LM head counted even when tied, the embedding
        lookup not) + 6 x layers x heads x (qk_dim + v_dim) x seq_len for the attention
        scores and weighted sum — the full-square convention of PaLM / nanochat.
        """
        cfg = self.cfg
        matmul_params = self.num_active_params() - self.embed.weight.numel()
        if self.lm_head is None:
            matmul_params += self.embed.weight.numel()
        if cfg.attn_type == "mla":
            qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        else:
            qk = v = cfg.attn_head_dim
        return 6 * matmul_params + 6 * cfg.n_layers * cfg.n_heads * (qk + v) * seq_len

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Bytes of KV cache one token occupies across all layers (bf16 by default).

        MLA caches the absorbed form: one latent and one RoPE key per token and layer.
        """
        cfg = self.cfg
        if cfg.attn_type == "mla":
            per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        else:
            per_layer = 2 * cfg.n_kv_heads * cfg.attn_head_dim
        return cfg.n_layers * per_layer * bytes_per_element
