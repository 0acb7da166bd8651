"""The engine's KV cache: preallocated, one row ("slot") per running sequence, every layer in one tensor.

It implements the model's `AttentionCache` (`attend`). Layout: k [n_layers, n_slots, kv_heads,
max_seq_len, k_dim] and v likewise with v_dim, the sizes the model's attention variant declares
(`Transformer.cache_layout()`; GQA: n_kv_heads key/value heads of attn_head_dim). A variant whose
value is the first v_dim numbers of its key (`values_in_keys`; MLA's absorbed form: one kv "head",
key [latent, rope key], value the latent) has no v stored at all: values are read as a view of k.
A slot's heads are contiguous [max_seq_len, dim] blocks, so the decode batch reads
`k[layer, :B, :, :L]` as a strided view: no gather, no copy.

The model calls `attend(layer, q, k, v, scale)` with the new tokens' q/k/v; what the cache
does with them depends on the mode the engine set just before the forward:

* `prefill(slots)`: batch row b is a prompt, right-padded, written to slot `slots[b]`
  from position 0. Attention is plain causal attention over the chunk itself (padding
  sits after every real token, so it never leaks into them).
* `decode(positions, kv_len)`: batch row b IS slot b; its new tokens go to
  `positions[b]` and attend to the slot's keys 0..position (keys up to kv_len are read,
  the rest masked). Rows of free slots get position 0: they write junk into their own
  free slot and are ignored. Fixed shapes given (B, kv_len): what a CUDA graph needs.
  With `slots`, row b is slot slots[b] instead (a gather of its keys): the engine appends tokens
  to kept sequences this way (right-padded rows, the padding written past each row's real end).

GQA in decode without repeating k/v: the rep = n_heads // n_kv_heads query heads sharing
a kv head are folded into the query-length axis ([B, Hkv, rep*T, d] against [B, Hkv, L, d]).

Decode attention, by where it runs: a bf16 cache on a CPU where nanoseek's kernel is built
(`model.cpu_kernel.decode_attention`, eager and compiled alike, an opaque operation to the graph), else in a
compiled CPU step products and sums inductor fuses (`_summed_attention`), else eagerly two matmuls for many rows
(`matmul_attention`) or SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nanoseek import precision
from nanoseek.model import cpu_kernel
from nanoseek.model.transformer import Transformer

CPU_MANY_ROWS = 256
"""A CPU cache of this many slots x query heads that nanoseek's kernel does not read decodes eagerly with plain matmul
attention (`KVCache.matmul_attention`; a compiled step sums instead, `_summed_attention`). Decided per cache, not per
step. Matmul attention, measured when the compiled step used it too: tiny at 512 rows 9.3 ms against SDPA's 12.6, at
64 rows 1.47 against 1.78; at 8 and 2 rows SDPA's kernel was 7-12% faster (docs/LOG.md, 2026-12-02).

A bf16 CPU cache attends through the kernel wherever it applies (`KVCache.kernel_attention`), at any number of rows:
as a C++ operation, against the compiled step's summed attention over a float32 cache, whole decode calls alternated
in one process, tiny at 1 / 8 / 16 / 32 sequences 1.06x / 1.10x / 1.15x / 1.23x, tiny-moe at 16 / 32 1.08x / 1.13x,
`small` (bf16) at 8 1.06x, with the same greedy tokens (docs/LOG.md, 2026-12-05, thirty-third session); as a Python
operation (~20 us a call more) it had lost below 256 rows."""

KERNEL_ATTENTION = True
"""Set to False to keep the engine's own attention paths where the CPU kernel would apply (benchmarks compare both)."""


def bf16_for_the_kernel(device: torch.device | str) -> bool:
    """Whether an engine on `device` makes a float32 model's cache bf16 so that it attends through nanoseek's CPU
    kernel (`precision.kv_cache_dtype`): KERNEL_ATTENTION, a CPU whose bf16 rules are on (`precision.cpu_bf16`: not
    NANOSEEK_CPU_BF16=0), and the kernel available there."""
    cpu = torch.device(device).type == "cpu"
    return KERNEL_ATTENTION and cpu and precision.cpu_bf16() and cpu_kernel.attention_available()


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        max_seq_len: int,
        n_kv_heads: int,
        k_dim: int,
        v_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        values_in_keys: bool = False,
        matmul_attention: bool = False,
        kernel_attention: bool = False,
    ) -> None:
        if values_in_keys and v_dim > k_dim:
            raise ValueError(f"values_in_keys needs v_dim <= k_dim, got {v_dim} > {k_dim}")
        self.n_slots, self.max_seq_len, self.dtype, self.v_dim = n_slots, max_seq_len, dtype, v_dim
        # Eager decode steps attend with two batched matmuls and a float32 softmax instead of SDPA, whose CPU kernel
        # pays ~2 us per (row, kv head): the faster choice for many rows (CPU_MANY_ROWS).
        self.matmul_attention = matmul_attention
        # Decode steps attend through nanoseek's CPU kernel (`cpu_kernel.decode_attention`; a bf16 cache only).
        if kernel_attention and not (dtype == torch.bfloat16 and torch.device(device).type == "cpu"):
            raise ValueError(f"kernel_attention needs a bf16 cache on a CPU, got {dtype} on {device}")
        self.kernel_attention = kernel_attention
        # Zeros, not empty: masked keys must hold finite numbers (0 x NaN would poison the output).
        self.k = torch.zeros(n_layers, n_slots, n_kv_heads, max_seq_len, k_dim, dtype=dtype, device=device)
        self.v = (
            None
            if values_in_keys
            else torch.zeros(n_layers, n_slots, n_kv_heads, max_seq_len, v_dim, dtype=dtype, device=device)
        )
        self._rows = torch.arange(n_slots, device=device)[:, None]  # [n_slots, 1]
        self._layers = torch.arange(n_layers, device=device)
        self._key_pos = torch.arange(_aligned(max_seq_len), device=device)
        self._mode: str | None = None
        self._slots: Tensor | None = None
        self._positions: Tensor | None = None
        self._kv_len = 0
        self._mask: Tensor | None = None

    # --- sizing: the model's attention variant says what a token's entry holds (`CacheLayout`) ---
    @staticmethod
    def bytes_per_slot(model: Transformer, max_seq_len: int, dtype: torch.dtype) -> int:
        return model.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size()) * max_seq_len

    @classmethod
    def for_model(
        cls, model: Transformer, n_slots: int, max_seq_len: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        layout = model.cache_layout()
        many_rows = torch.device(device).type == "cpu" and n_slots * model.cfg.n_heads >= CPU_MANY_ROWS
        kernel = dtype == torch.bfloat16 and KERNEL_ATTENTION and torch.device(device).type == "cpu"
        kernel = kernel and cpu_kernel.attention_available()
        return cls(
            model.cfg.n_layers,
            n_slots,
            max_seq_len,
            layout.kv_heads,
            layout.k_dim,
            layout.v_dim,
            dtype,
            device,
            layout.values_in_keys,
            matmul_attention=many_rows,
            kernel_attention=kernel,
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)

    # --- modes (set by the engine before each forward) ---
    def prefill(self, slots: Tensor) -> KVCache:
        """Next forward: row b is a (right-padded) prompt starting at position 0 of slot slots[b]."""
        self._mode, self._slots = "prefill", slots
        return self

    def decode(self, positions: Tensor, kv_len: int, slots: Tensor | None = None) -> KVCache:
        """Next forward: row b is slot b (or slots[b]), its tokens at positions[b] ([B, T]); read keys [0, kv_len)."""
        if not 0 < kv_len <= self.max_seq_len:
            raise ValueError(f"kv_len {kv_len} outside [1, {self.max_seq_len}]")
        self._mode, self._positions, self._kv_len, self._mask = "decode", positions, kv_len, None
        self._slots = slots
        return self

    def copy_slots(self, src: Tensor, dst: Tensor, length: int) -> None:
        """Copy the first `length` positions of slot src[i] into slot dst[i] (slot indices on the cache's
        device), all pairs in one gather/scatter: the n samples of the prompts of a prefill chunk
        (positions past a prompt's end hold junk that decoding overwrites before reading)."""
        if dst.numel():
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            if self.v is not None:
                self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    # --- the model's hook ---
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """q: [B, H, T, dk], k: [B, Hkv, T, dk], v: [B, Hkv, T, dv] (new tokens) -> [B, H, T, dv]."""
        B, H, T, dk = q.shape
        Hkv, rep = k.shape[1], H // k.shape[1]
        out_dtype = q.dtype
        K = self.k[layer]
        V = self.v[layer] if self.v is not None else None
        if self._mode == "prefill":  # attention over the chunk's own k/v, in q's dtype (the cache's may be lower)
            K[self._slots, :, :T] = k.to(self.dtype)
            if V is not None:
                V[self._slots, :, :T] = v.to(self.dtype)
            k, v = k.to(out_dtype), v.to(out_dtype)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=rep > 1)
        if self._mode != "decode":
            raise RuntimeError("KVCache.attend called without prefill(...) or decode(...) set up")
        k, v = k.to(self.dtype), v.to(self.dtype)
        pos, L = self._positions, self._kv_len
        rows = self._rows[:B] if self._slots is None else self._slots[:, None]
        at_layer = self._layers[layer : layer + 1]
        # Written through the whole tensor, not the layer's view: a compiled decode step then updates
        # the cache in place (writing into a view of a graph input makes it copy the layer).
        self.k[at_layer, rows, :, pos] = k.transpose(1, 2)  # index [B, T] -> value [B, T, Hkv, dk]
        if V is not None:
            self.v[at_layer, rows, :, pos] = v.transpose(1, 2)
        # q in the cache's dtype: with a float32 q over a bf16 cache inductor's loops ran 1.5x slower (tiny, 64 rows;
        # docs/LOG.md, 2026-12-02, tenth session), and the kernel reads bf16.
        q = q.to(self.dtype).reshape(B, Hkv, rep * T, dk)
        if self.kernel_attention:  # the layer's whole cache and the positions: the kernel reads the keys in place
            values = V if V is not None else K[..., : self.v_dim]
            out = cpu_kernel.decode_attention(q, K, values, pos, self._slots, L, scale)  # a C++ operation
            return out.reshape(B, H, T, -1).to(out_dtype)
        keys = K[:B, :, :L] if self._slots is None else K[self._slots, :, :L]  # a view [B, Hkv, L, dk] (or a gather)
        if V is not None:
            values = V[:B, :, :L] if self._slots is None else V[self._slots, :, :L]
        else:
            values = keys[..., : self.v_dim]
        if self._mask is None:  # the same for every layer: built once per forward
            # Additive, in the attention dtype (SDPA would convert a boolean mask again at every layer),
            # rows padded to a multiple of 16 keys (the memory-efficient kernel copies unaligned masks).
            Lp = _aligned(L)
            blocked = self._key_pos[:Lp] > pos[:, :, None]  # [B, T, Lp]: key position > query position
            bias = torch.zeros(blocked.shape, dtype=self.dtype, device=q.device).masked_fill_(blocked, float("-inf"))
            self._mask = bias[:, None, None].expand(B, 1, rep, T, Lp).reshape(B, 1, rep * T, Lp)[..., :L]
        if torch.compiler.is_compiling() and q.device.type == "cpu":  # the compiled CPU step (engine/compiled.py)
            out = _summed_attention(q, keys, values, scale, self._mask)
        elif self.matmul_attention:
            acc = torch.promote_types(q.dtype, torch.float32)
            scores = (q @ keys.transpose(-1, -2)).to(acc) * scale + self._mask
            out = scores.softmax(-1).to(values.dtype) @ values
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self._mask, scale=scale)
        return out.reshape(B, H, T, -1).to(out_dtype)


def _summed_attention(q: Tensor, keys: Tensor, values: Tensor, scale: float, mask: Tensor) -> Tensor:
    """Decode attention as products and sums, for the compiled CPU step: inductor fuses them into loops over
    the cache (scores, softmax, weighted sum). Two batched matmuls of [rows, dk] x [dk, L] per kv head cost a
    library call each and, in bf16, a copy of the strided cache view; SDPA's kernel pays per (row, head).
    Alone in a compiled function (docs/LOG.md, 2026-12-02, eighth session; 2 threads): tiny's shape at 64 rows 70 us
    against 93 (matmuls) and 299 (SDPA), at 280 keys 197 against 437 and 433; small's at 8 rows and 1,000
    keys 404 against 1,072 and 673; at one row within 10% of SDPA. Scores and the weighted sum accumulate
    in float32 (the matmuls rounded both to bf16). Eagerly it would build [B, Hkv, rows, L, dk] products:
    only for graphs."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = (q[:, :, :, None, :].to(acc) * keys[:, :, None, :, :].to(acc)).sum(-1) * scale + mask
    return (scores.softmax(-1)[..., None] * values[:, :, None, :, :].to(acc)).sum(-2).to(values.dtype)


def _aligned(n: int, multiple: int = 16) -> int:
    return -(-n // multiple) * multiple


__all__ = ["KVCache"]
