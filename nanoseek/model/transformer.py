"""The transformer: embedding, pre-norm blocks of attention + (dense MLP | MoE), final norm, LM head.

Attention is one of the variants of `attention.py` (grouped-query or DeepSeek's Multi-head
Latent Attention), picked by `cfg.attn_type`. Three ways to call the model:

* training on packed rows: `model(ids, positions, doc_ids)` — `doc_ids` stops
  attention across documents, `positions` restart at each document;
* plain causal: `model(ids)`;
* incremental decoding: `model(ids, positions, cache=cache)` where `cache` is any
  object with `attend(layer, q, k, v, scale) -> out` (see `AttentionCache`): the model hands
  it the new tokens' queries, keys and values, the cache stores them in the variant's
  `cache_layout()` and attends over everything it holds. The engine owns the cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanoseek.model.attention import AttentionCache, CacheLayout, attention_class
from nanoseek.model.config import ModelConfig
from nanoseek.model.linear import Linear, linear
from nanoseek.model.moe import MoE, SwiGLU, moe_layers
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import dynamic_inv_freq, rope_cos_sin, rope_frequencies, rope_lookup, rope_table


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = attention_class(cfg)(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.layer_is_moe(layer) else SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, doc_ids: Tensor | None, cache: AttentionCache | None
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, doc_ids, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rope_dim = attention_class(cfg).rope_dim(cfg)
        inv_freq, self.rope_attention_scaling = rope_frequencies(
            cfg.rope_theta, self.rope_dim, cfg.rope_scaling, cfg.max_seq_len
        )
        # On the CPU in float64, kept out of the state dict and out of .to(dtype): a bf16 copy would be wrong.
        self._inv_freq = inv_freq
        # float32 cos/sin of positions 0..max_seq_len-1 by device (`rope_table`), the CPU's built here: built on
        # first use inside a compiled graph, a table would be a graph output, and the next call would recompile.
        cpu = torch.device("cpu")
        self._rope_tables = {cpu: rope_table(inv_freq, self.rope_attention_scaling, cfg.max_seq_len, cpu)}
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
            return rope_cos_sin(positions, inv_freq, self.rope_attention_scaling, dtype)
        if dtype == torch.float64:  # reference runs: computed in float64, not looked up in the float32 table
            return rope_cos_sin(positions, self._inv_freq, self.rope_attention_scaling, dtype)
        return rope_lookup(positions, *self.rope_table(device, positions.shape[-1]), dtype)

    def rope_table(self, device: torch.device, length: int = 0) -> tuple[Tensor, Tensor]:
        """float32 cos/sin [n, rope_dim] of positions 0..n-1 on `device`, n >= max(max_seq_len, length):
        another device's built on first use, any built again for a longer context or sequence. Call it
        eagerly after changing the context (`train.run.with_context`): built inside a compiled graph, the
        table would be that graph's output and the next call would recompile."""
        length = max(self.cfg.max_seq_len, length)
        table = self._rope_tables.get(device)
        if table is None or table[0].shape[0] < length:
            table = rope_table(self._inv_freq, self.rope_attention_scaling, length, device)
            self._rope_tables[device] = table
        return table

    def hidden_states(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        doc_ids: Tensor | None = None,
        cache: AttentionCache | None = None,
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

    @property
    def output_weight(self) -> Tensor:
        """The [vocab, d_model] matrix the logits are taken with (the embedding when tied)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: Tensor) -> Tensor:
        return linear(hidden, self.output_weight)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        doc_ids: Tensor | None = None,
        cache: AttentionCache | None = None,
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
        # The walk over every module (~0.1 ms of a CPU training step) only where a layer can have made one.
        losses = [m.aux_loss for m in moe_layers(self) if m.aux_loss is not None] if self.cfg.aux_loss_coef > 0 else []
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
        qk, v = attention_class(cfg).head_dims(cfg)
        return 6 * matmul_params + 6 * cfg.n_layers * cfg.n_heads * (qk + v) * seq_len

    def cache_layout(self) -> CacheLayout:
        """What the engine's KV cache holds per layer and token (the attention variant's layout)."""
        return attention_class(self.cfg).cache_layout(self.cfg)

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Bytes of KV cache one token occupies across all layers (bf16 by default)."""
        return self.cfg.n_layers * self.cache_layout().elements_per_token * bytes_per_element
