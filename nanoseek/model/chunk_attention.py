"""Causal attention over a chunk of tokens (prefill and training): SDPA, or on CPU plain matmuls over blocks.

Both attention variants (`attention.py`) call `attention` with their heads laid out [B, H, T, d]; doc_ids keeps
packed documents apart. On CPU, SDPA's kernels compute every score of a masked T x T chunk and its backward pass
is slow at training's lengths, so packed rows and short causal chunks with gradients take `blocked_attention`:
one block of query rows at a time over the keys it can see. Decoding does not come here (the engine's cache
attends: `engine/cache.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nanoseek import precision
from nanoseek.model import cpu_kernel

KERNEL = True
"""Set to False to keep a CPU chunk with gradients off `cpu_kernel.chunk_attention` (benchmarks and tests compare)."""

BLOCK = 64
"""Query rows per block of `blocked_attention`; at 64 the tiny preset's packed step on CPU was fastest (32 and
128 slower; docs/LOG.md, 2026-12-02)."""

BLOCKED_MAX_AREA = 0.75
"""Packed rows take `blocked_attention` when its blocks cover at most this fraction of the T x T scores (SDPA's
masked CPU kernel computes all of them): at ~0.5 it took half the time, computing everything ~1.5x."""

BLOCKED_MAX_CAUSAL_LEN = 256
"""A causal chunk (no doc_ids) with gradients takes `blocked_attention` up to this length: forward + backward
of [B, 4, T, 32] bf16 took 0.16x SDPA's time at T = 48, 0.28x at 80, 0.74x at 256, 1.07x at 512, 1.7x at 1024."""

KEY_MULTIPLE = 32
"""`causal_matmul_attention` pads its keys to a multiple of this: inductor's fused softmax over rows of another
length runs the last keys of each row through a scalar loop with a scalar exp (its `_tail_vec_worthwhile` judges a
masked vector tail not worth it). Forward + backward of [16, 4, T, 32] compiled under bf16 autocast, padded against
not: T = 70 1.15x, 88 1.27x, 100 1.22x, 150 1.40x, 250 1.50x faster (2 threads, AMX; docs/LOG.md, 2026-12-05,
thirty-second session)."""

BLOCKED_MAX_BYTES = 1 << 25
"""... and when one layer's float32 scores in the blocks (kept for the backward pass) fit in 32 MiB; SDPA's
kernels keep none, which is what long sequences need."""


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, doc_ids: Tensor | None) -> Tensor:
    """Causal attention over one chunk, blocked across documents when doc_ids [B, T] is given. GQA: each of k's
    and v's heads serves n_heads // n_kv_heads consecutive heads of q."""
    # On CPU, SDPA's flash kernel computes every one of the T x T scores under a mask, and its backward pass
    # costs ~0.1-0.2 ms per (row, head) at the lengths training runs on CPU (5-8x its forward). With gradients our
    # kernel computes only the scores each query sees, forward and backward, eager or compiled (CUDA keeps SDPA's
    # kernels). Without it, plain matmuls over the blocks that can attend; under torch.compile the blocks'
    # data-dependent shapes would break the graph, so a short chunk with gradients takes one block of the whole
    # chunk there, whose mask and softmax inductor fuses.
    if q.device.type == "cpu" and _kernel_trains(q, v, doc_ids):
        return cpu_kernel.chunk_attention(q, k, v, scale, doc_ids)
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        starts = cpu_block_starts(q, doc_ids, BLOCK)
        if starts is not None:
            return blocked_attention(q, k, v, scale, doc_ids, starts, BLOCK)
    elif q.device.type == "cpu" and q.requires_grad and fits_one_block(q):
        return causal_matmul_attention(q, k, v, scale, doc_ids)
    if k.shape[1] != q.shape[1]:  # SDPA gets k and v repeated to every query head (GQA)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = causal & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)


def _kernel_trains(q: Tensor, v: Tensor, doc_ids: Tensor | None) -> bool:
    """Whether a CPU chunk with gradients takes `cpu_kernel.chunk_attention` (the library built and checked)."""
    if not (KERNEL and torch.is_grad_enabled() and q.requires_grad):
        return False
    return cpu_kernel.chunk_attention_fits(q, v, doc_ids) and cpu_kernel.float32_ready()


def cpu_block_starts(q: Tensor, doc_ids: Tensor | None, block: int) -> list[int] | None:
    """For each block of `block` query positions, the first key position any of its queries sees (with doc_ids,
    the start of the document of the block's first token, the earliest over the batch; else 0), or None where
    `blocked_attention` would not pay on CPU: a causal chunk without gradients (SDPA's forward is fast) or longer
    than BLOCKED_MAX_CAUSAL_LEN, doc_ids not non-decreasing along each row (not packed), the blocks covering more
    than BLOCKED_MAX_AREA of a packed chunk's scores, or more than BLOCKED_MAX_BYTES of them. (Every layer asks
    again for the same doc_ids: a few tens of microseconds, against milliseconds of attention.)"""
    B, H, T = q.shape[:3]
    if doc_ids is None:
        if T > BLOCKED_MAX_CAUSAL_LEN or not (torch.is_grad_enabled() and q.requires_grad):
            return None
        starts = [0] * -(-T // block)
    else:
        if not bool((doc_ids[:, 1:] >= doc_ids[:, :-1]).all()):
            return None
        doc_ids = doc_ids.contiguous()
        starts = torch.searchsorted(doc_ids, doc_ids[:, ::block].contiguous()).amin(0).tolist()
    area = sum((min(s + block, T) - s) * (min(s + block, T) - lo) for s, lo in zip(range(0, T, block), starts))
    if doc_ids is not None and area > BLOCKED_MAX_AREA * T * T:
        return None
    return starts if 4 * B * H * area <= BLOCKED_MAX_BYTES else None


def fits_one_block(q: Tensor) -> bool:
    """Whether a causal chunk is short and small enough for `causal_matmul_attention` (the compiled CPU path):
    at most BLOCKED_MAX_CAUSAL_LEN tokens and BLOCKED_MAX_BYTES of float32 scores."""
    B, H, T = q.shape[:3]
    return T <= BLOCKED_MAX_CAUSAL_LEN and 4 * B * H * T * T <= BLOCKED_MAX_BYTES


def causal_matmul_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, doc_ids: Tensor | None = None) -> Tensor:
    """`blocked_attention` of a causal chunk (within documents, with doc_ids) as one block, with no Python loop over
    its length, so torch.compile keeps the length dynamic (a loop over range(T) would specialise the graph to one
    length). The keys are padded with zeros to a multiple of KEY_MULTIPLE, hidden from every query like the later
    keys: the same result."""
    T = q.shape[2]
    padded = -(-T // KEY_MULTIPLE) * KEY_MULTIPLE
    k, v = (F.pad(t, (0, 0, 0, padded - T)) for t in (k, v))
    hidden = torch.arange(T, device=q.device)[:, None] < torch.arange(padded, device=q.device)
    if doc_ids is not None:  # the padded keys' documents do not matter: they are hidden already
        hidden = (hidden | (doc_ids[:, :, None] != F.pad(doc_ids, (0, padded - T))[:, None, :]))[:, None]
    return _masked_attention(q, k, v, scale, hidden)


def blocked_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, doc_ids: Tensor | None, starts: list[int], block: int
) -> Tensor:
    """Causal attention (within documents, with doc_ids), one block of `block` queries at a time over the keys
    from its start in `starts` (`cpu_block_starts`)."""
    T = q.shape[2]
    pos = torch.arange(T, device=q.device)
    out = []
    for s, lo in zip(range(0, T, block), starts):
        e = min(s + block, T)
        hidden = pos[s:e, None] < pos[None, lo:e]
        if doc_ids is not None:
            hidden = (hidden | (doc_ids[:, s:e, None] != doc_ids[:, None, lo:e]))[:, None]
        out.append(_masked_attention(q[:, :, s:e], k[:, :, lo:e], v[:, :, lo:e], scale, hidden))
    return torch.cat(out, dim=2)


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, hidden: Tensor) -> Tensor:
    """softmax(q k^T * scale) v over the keys not `hidden` from each query ([Tq, Tk], or [B, 1, Tq, Tk] per row):
    the scores are taken in q's dtype and the softmax in float32 (float64 for a float64 model), as transformers'
    eager attention does. GQA without copies of k and v: the query heads that share a kv head are one block of
    rows against it (their mask broadcast over them). Repeating k and v, and summing their gradients back, made
    the --quick training shape's attention 0.97 ms forward and backward against 0.80 (docs/LOG.md, 2026-12-05)."""
    B, H, Tq, _ = q.shape
    n_kv, Tk = k.shape[1], k.shape[2]
    if q.dtype != torch.float64 and precision.too_little_for_bf16(q, Tk * q.shape[-1]):
        with torch.autocast("cpu", enabled=False):  # a small training attention: float32 (precision.py)
            return _masked_attention(q.float(), k.float(), v.float(), scale, hidden)
    rep = H // n_kv
    rows = q.reshape(B, n_kv, rep * Tq, q.shape[-1])
    scores = (rows @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    scores = scores.view(B, n_kv, rep, Tq, Tk).masked_fill(hidden.unsqueeze(-3), float("-inf"))
    probs = scores.softmax(-1).to(v.dtype).view(B, n_kv, rep * Tq, Tk)
    return (probs @ v).view(B, H, Tq, v.shape[-1])
