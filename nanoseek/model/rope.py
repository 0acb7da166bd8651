"""Rotary position embedding: frequencies (with the Hugging Face scaling variants) and rotation.

We use the "rotate half" layout (pairs are (i, i + d/2)) that Llama, Qwen and the
Hugging Face DeepSeek-V3 port use after their weight permutation; checkpoints stored
with interleaved pairs are permuted once at load time, not at every step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def _default(base: float, dim: int) -> Tensor:
    # Always on the CPU in float64, also under a meta-device build; moved to the device on use.
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(base: float, dim: int, scaling: dict[str, Any] | None, max_position: int) -> tuple[Tensor, float]:
    """Inverse frequencies [dim/2] (float64) and the attention scaling factor applied to cos/sin.

    `scaling` is a Hugging Face `rope_scaling` dict or None; `max_position` is the
    model's max_position_embeddings (used when the dict has no original length).
    """
    inv_freq = _default(base, dim)
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", "dynamic"):
        # 'dynamic' only departs from the default beyond the original context; see dynamic_base().
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    original = int(scaling.get("original_max_position_embeddings") or max_position)
    if kind == "llama3":
        low_ff, high_ff = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        low_wavelen, high_wavelen = original / low_ff, original / high_ff
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        attn = scaling.get("attention_factor")
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if attn is None:
            attn = (
                _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
                if mscale and mscale_all
                else _yarn_mscale(factor)
            )
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
        return inv_freq, float(attn)
    raise ValueError(f"rope_scaling.rope_type = {kind!r} is not supported (default|linear|dynamic|yarn|llama3)")


def dynamic_inv_freq(base: float, dim: int, scaling: dict[str, Any], max_position: int, seq_len: int) -> Tensor:
    """Dynamic NTK scaling: the base grows once the sequence exceeds the original context."""
    original = int(scaling.get("original_max_position_embeddings") or max_position)
    if seq_len <= original:
        return _default(base, dim)
    factor = float(scaling["factor"])
    base = base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
    return _default(base, dim)


def _half_cos_sin(
    positions: Tensor, inv_freq: Tensor, attention_scaling: float, work: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos, sin [..., dim/2] (x attention_scaling) of integer positions [...], computed in `work`."""
    angles = positions.to(work)[..., None] * inv_freq.to(device=positions.device, dtype=work)
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling


def _rotate_half_layout(cos: Tensor, sin: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """[..., dim/2] -> [..., dim] in `dtype`: pair (i, i + dim/2) shares frequency i."""
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([sin, sin], dim=-1).to(dtype)


def rope_cos_sin(
    positions: Tensor, inv_freq: Tensor, attention_scaling: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [B, T, dim] for integer positions [B, T]."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return _rotate_half_layout(*_half_cos_sin(positions, inv_freq, attention_scaling, work), dtype)


def rope_table(inv_freq: Tensor, attention_scaling: float, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """float32 cos, sin [length, dim] of positions 0..length-1, the values `rope_cos_sin` computes for them.

    A table, not cos/sin of each step's positions: inside a compiled graph inductor recomputes the cos and sin
    in every kernel that reads them (each layer's q and k), which cost the tiny preset's decode step a quarter
    of its time (docs/LOG.md, 2026-12-02, eighth session); a lookup is a load. Full width, each half-width value
    twice: from a [length, dim/2] table the lookup's index is `i % (dim/2)`, which inductor's C++ loops read one
    number at a time, and it reads them once per key where the rotated query is recomputed inside the decode
    attention's loop (docs/LOG.md, 2026-12-03, sixteenth session)."""
    cos, sin = _half_cos_sin(torch.arange(length, device=device), inv_freq, attention_scaling, torch.float32)
    return _rotate_half_layout(cos, sin, torch.float32)


def rope_lookup(positions: Tensor, cos: Tensor, sin: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [B, T, dim] for integer positions [B, T] from `rope_table`'s [length, dim]."""
    return cos[positions].to(dtype), sin[positions].to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, T, H, dim]; cos/sin: [B, T, dim]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
