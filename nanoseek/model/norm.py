"""RMSNorm, shared by the blocks and the attention variants."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
