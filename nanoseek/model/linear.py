"""The model's products with a weight matrix go through one call, `linear` (and the `Linear` layer that calls it):
the seam where a CPU's bf16 weights of a megabyte or more take oneDNN's prepacked kernel.

On a CPU, F.linear over bf16 weights calls oneDNN, which reorders the weight into its blocked layout at every call.
A decode step reads every weight once, for a few rows, so the reorder doubles the bytes it moves: a 3 MiB weight
(the 100M `small` preset's MLP) multiplied one row at 22 GB/s, and at 45 GB/s prepacked; eight rows at 17 vs 37 GB/s
(docs/LOG.md, 2026-12-02, twelfth session). `linear` keeps one prepacked copy per weight, made at its first use and
made again when the weight changes (its version counter moves with an optimizer step or a `copy_`, its storage with
`.data =`), and multiplies with it. The result is oneDNN's product either way (the same values, tested). Only where
that pays and is safe:

* a CPU, torch built with oneDNN and its bf16 kernels supported by the processor; a bf16 weight (float32 ones fit
  the cache where the engine keeps them float32: `precision.inference_dtype`);
* no gradient wanted (the packed kernel has no backward): evaluation, decoding, the RL twin's rollouts;
* a weight of PACKED_MIN_BYTES or more: a smaller one fits in the cache, and the call's own cost inside a compiled
  decode step (~10 us: the kernel is an opaque custom operation) outweighs the reorder it saves;
* while the packed copies, each as large as its weight, take at most PACKED_MAX_MEMORY_FRACTION of the machine's
  memory; past that, weights keep F.linear.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

PACKED_MIN_BYTES = 1 << 20
"""Inside a compiled decode step (bf16, 1/8/64 rows, us per product against F.linear's): a 0.5 MiB weight 0.87-0.91x,
1.5 MiB 1.20-1.36x, 3 MiB 1.15-2.23x, 8 MiB 1.14-1.65x (docs/LOG.md, 2026-12-02, twelfth session)."""
PACKED_MAX_MEMORY_FRACTION = 0.25

USE_PACKED = True
"""Set to False to keep F.linear everywhere (benchmarks compare both)."""

_AVAILABLE = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and torch.ops.mkldnn._is_mkldnn_bf16_supported()
)
_packed: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> (version, data_ptr, packed copy)
_lock = threading.Lock()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), through a prepacked copy of the weight where that pays (see the module docstring).

    Under bf16 autocast x is cast as autocast would; the result is bf16 either way."""
    if _packable(x, weight, bias):
        return _packed_linear(x.to(weight.dtype), weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose product is `linear`: the model's projections (same parameters, names and checkpoints)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def _packable(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if not (USE_PACKED and _AVAILABLE and x.device.type == "cpu" and weight.dtype == torch.bfloat16):
        return False
    if weight.dim() != 2 or weight.numel() * weight.element_size() < PACKED_MIN_BYTES:
        return False
    wants_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and wants_grad:
        return False
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16 or (autocast_bf16 and x.is_floating_point())


def _machine_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _packed_weight(weight: Tensor) -> Tensor | None:
    """The prepacked copy of `weight`, made now if it has none or it changed; None past the memory budget or for an
    inference tensor (no version counter to tell a change by)."""
    global _AVAILABLE
    if weight.is_inference():
        return None
    key = (weight._version, weight.data_ptr())
    with _lock:
        hit = _packed.get(weight)
        if hit is not None and hit[:2] == key:
            return hit[2]
        if hit is None:
            held = sum(w.numel() * w.element_size() for w in _packed.keys())
            if held + weight.numel() * weight.element_size() > PACKED_MAX_MEMORY_FRACTION * _machine_bytes():
                return None
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        except RuntimeError as e:  # an unsupported build or processor: F.linear from now on
            _AVAILABLE = False
            warnings.warn(f"oneDNN's prepacked bf16 linear failed ({e}); using F.linear", stacklevel=3)
            return None
        _packed[weight] = (*key, packed)
        return packed


@torch.library.custom_op("nanoseek::packed_linear", mutates_args=())
def _packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear through the weight's prepacked copy; an opaque operation to torch.compile (the packed copy lives
    outside the graph, in this module's table, and the graph only passes the weight it belongs to)."""
    packed = _packed_weight(weight)
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@_packed_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
