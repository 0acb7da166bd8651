"""The model's products with a weight matrix go through one call, `linear` (and the `Linear` layer that calls it):
the seam where a CPU's bf16 weights of a megabyte or more take a prepacked kernel, and where one row inside a
compiled graph takes product-sums that inductor fuses (the last paragraph).

On a CPU, F.linear over bf16 weights calls oneDNN, which reorders the weight into its blocked layout at every call.
A decode step reads every weight once, for a few rows, so the reorder doubles the bytes it moves: a 3 MiB weight
(the 100M `small` preset's MLP) multiplied one row at 22 GB/s, and at 45 GB/s prepacked; eight rows at 17 vs 37 GB/s
(docs/LOG.md, 2026-12-02, twelfth session). `linear` keeps one prepacked copy per weight, made at its first use and
made again when the weight changes (its version counter moves with an optimizer step or a `copy_`, its storage with
`.data =`), and multiplies with it: through our own kernel where it is built (`cpu_kernel`: AVX-512 BF16 where the CPU
has no AMX, at 1-8 rows streaming the weights 1.1-1.9x faster than oneDNN's prepacked kernel, equal at many; AMX
where it has, at 1-32 rows 1.1-1.2x faster than oneDNN's AMX kernel at reading `small`'s step, 64 and 512 rows
level, 128 1.14x slower), else through oneDNN's prepacked kernel (the same values as F.linear, tested). Only where
that pays and is safe:

* a CPU, torch built with oneDNN and its bf16 kernels supported by the processor; a bf16 weight (float32 ones fit
  the cache where the engine keeps them float32: `precision.inference_dtype`);
* no gradient wanted (the packed kernels have no backward): evaluation, decoding, the RL twin's rollouts;
* a weight of PACKED_MIN_BYTES or more: a smaller one fits in the cache, and the call's own cost inside a compiled
  decode step (the kernel is an opaque operation, a call into Python) outweighs the reorder it saves (measured when
  that call still went through custom_op's layers, ~30 us dearer; not measured again since);
* while the packed copies, each as large as its weight, take at most PACKED_MAX_MEMORY_FRACTION of the machine's
  memory; past that, weights keep F.linear.

One row of a bf16 product inside torch.compile on a CPU, known to be one row when the graph is built (the engine's
one-row decode graph for a lone sequence), is neither: it is written as elementwise products summed in float32
(`_summed_products`), which inductor turns into one loop per weight that streams the weight once, fused with the
step's other loops. oneDNN's kernel reads a weight at one row at ~17-22 GB/s on the 2-core EPYC, the loop at ~25:
`small`'s 49 products a step 11.1 -> 8.6 ms, its whole one-row decode 1.17-1.20x (docs/LOG.md, 2026-12-03,
nineteenth session). From two rows on the loop converts every weight once per row and loses (2 rows 1.4x slower).
The row itself is written out once before the loops (`REALIZE_ROW`), not recomputed inside each of them. Where our
AMX product is in use, the one-row graph calls it instead: it reads the weights at the memory's rate, which the
loops do not (`small`'s one-row decode 80 -> 92 tok/s on a 2-core Xeon; docs/LOG.md, 2026-12-05, thirty-fifth session).

A float32 model's products where no gradient is wanted and no autocast is on (the engine's decode steps for models
that fit the cache, evaluation) go through `cpu_kernel.float32_rows` where it is built (x86-64 Linux, AVX-512): MKL's
sgemm multiplies a decode step's 8-512 rows on one of two threads, this kernel on both (tiny's products at 64 rows
1.3-1.6x faster), and `linears` passes it the q/k/v or gate/up weights together, one call for their outputs side by
side, without a stacked copy (the kernel reads each weight where it lies).
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from nanoseek import precision
from nanoseek.model import cpu_kernel

PACKED_MIN_BYTES = 1 << 20
"""Inside a compiled decode step (bf16, 1/8/64 rows, us per product against F.linear's): a 0.5 MiB weight 0.87-0.91x,
1.5 MiB 1.20-1.36x, 3 MiB 1.15-2.23x, 8 MiB 1.14-1.65x (docs/LOG.md, 2026-12-02, twelfth session)."""
PACKED_MAX_MEMORY_FRACTION = 0.25

USE_PACKED = True
"""Set to False to keep F.linear everywhere (benchmarks compare both)."""

SUMMED_ONE_ROW = True
"""Set to False to keep the library products in a compiled one-row step too (`_one_row_in_graph`)."""

REALIZE_ROW = True
"""Set to False to let inductor recompute the row inside every product-sum's loop (`_summed_products`)."""

FLOAT32_ROWS = True
"""Set to False to keep F.linear for float32 products (`_float32_rows`; benchmarks compare both)."""

_AVAILABLE = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and torch.ops.mkldnn._is_mkldnn_bf16_supported()
)


def packing_available() -> bool:
    """Whether this torch and processor have oneDNN's prepacked bf16 product (False after it once failed)."""
    return _AVAILABLE


_packed: WeakIdKeyDictionary = WeakIdKeyDictionary()  # first weight -> (key, kernel, packed copy, its bytes)
_lock = threading.Lock()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), through a prepacked copy of the weight where that pays, or inside a compiled one-row
    step as a product-sum inductor fuses (see the module docstring).

    Under bf16 autocast x is cast as autocast would; the result is bf16 either way."""
    biases = [] if bias is None else [bias]
    if _one_row_in_graph(x, [weight], biases):
        return _summed_products(x, [weight], biases)[0]
    if _packable(x, [weight], biases):
        return _packed_linear(x.to(weight.dtype), [weight], biases)
    if _float32_rows(x, [weight], biases):
        return cpu_kernel.float32_rows(x, [weight], biases)
    if weight.dtype == torch.float32 and precision.too_little_for_bf16(x, weight.numel()):  # a small training product
        with torch.autocast("cpu", enabled=False):
            return F.linear(x.float(), weight, bias)
    return F.linear(x, weight, bias)


def linears(x: Tensor, layers: Sequence[nn.Module]) -> list[Tensor]:
    """Each layer applied to x. Where the packed kernel applies to `Linear` layers' weights stacked together (the
    attention's q/k/v, the MLP's gate/up), one product with their packed stack, split: one call instead of several,
    and the narrow key/value projections (under PACKED_MIN_BYTES alone) packed too (`small`, one process, interleaved:
    one row 145 -> 163 tok/s, eight rows 743 -> 805; docs/LOG.md, 2026-12-02, twelfth session)."""
    if all(type(m) is Linear for m in layers) and len({m.bias is None for m in layers}) == 1:
        weights = [m.weight for m in layers]
        biases = [m.bias for m in layers if m.bias is not None]
        if _one_row_in_graph(x, weights, biases):
            return _summed_products(x, weights, biases)
        if _packable(x, weights, biases):
            out = _packed_linear(x.to(weights[0].dtype), weights, biases)
            return list(out.split([w.shape[0] for w in weights], dim=-1))
        if _float32_rows(x, weights, biases):
            # Each output a tensor of its own, not a view of the stack: an elementwise operation over a view can round
            # unlike the same operation over a tensor (torch's SiLU does), and stacking should not change the numbers.
            out = cpu_kernel.float32_rows(x, weights, biases)
            return [part.contiguous() for part in out.split([w.shape[0] for w in weights], dim=-1)]
    return [m(x) for m in layers]


def describe_packing(model: nn.Module) -> str:
    """A phrase for the precision line a command prints at its start: what `linear` does with this model's weights
    on a CPU; '' when the model has no bf16 `Linear` weight of PACKED_MIN_BYTES or more, or oneDNN's bf16 kernels
    are missing (or USE_PACKED is off)."""
    # CPU weights only: products on another device never pack (`_bf16_inference` reads x's device at each call).
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.weight.device.type == "cpu"]
    if not any(_weights_packable([m.weight]) for m in linears):
        return ""
    size = f"{PACKED_MIN_BYTES >> 20} MiB"
    kernel = f"nanoseek's {cpu_kernel.products_name()} kernel" if cpu_kernel.products_available() else "oneDNN's kernel"
    return f"bf16 weights of {size} or more (and q/k/v, gate/up stacked) multiply prepacked, through {kernel}"


class Linear(nn.Linear):
    """nn.Linear whose product is `linear`: the model's projections (same parameters, names and checkpoints)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def _weights_packable(weights: list[Tensor]) -> bool:
    """What the weights alone decide: packing on and available, 2-D bf16 weights of PACKED_MIN_BYTES together."""
    return (
        USE_PACKED
        and _AVAILABLE
        and all(w.dtype == torch.bfloat16 and w.dim() == 2 for w in weights)
        and sum(w.numel() * w.element_size() for w in weights) >= PACKED_MIN_BYTES
    )


def _packable(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> bool:
    return _weights_packable(weights) and _bf16_inference(x, weights, biases)


def _bf16_inference(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> bool:
    """A CPU product of bf16 2-D weights (and biases) that wants no gradient, on x that is bf16 or that bf16 autocast
    casts: what both of `linear`'s own paths require."""
    if x.device.type != "cpu" or any(w.dtype != torch.bfloat16 or w.dim() != 2 for w in weights):
        return False
    if any(w.shape[1] != x.shape[-1] for w in weights) or any(b.dtype != torch.bfloat16 for b in biases):
        return False
    if _wants_grad(x, weights, biases):
        return False
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16 or (autocast_bf16 and x.is_floating_point())


def _wants_grad(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> bool:
    """Whether autograd would record this product (the packed kernels and `float32_rows` have no backward)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights, *biases))


def _float32_rows(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> bool:
    """A CPU product of float32 x by float32 weights (and biases) that wants no gradient, under no autocast, of at
    most FLOAT32_MAX_ROWS rows (rows unknown until the call, a compiled step's, count as few) and shapes the kernel
    takes: `cpu_kernel.float32_rows`, where it is built."""
    if not FLOAT32_ROWS or x.device.type != "cpu" or _wants_grad(x, weights, biases):  # every training product asks
        return False
    if torch.is_autocast_enabled("cpu") or any(t.dtype != torch.float32 for t in (x, *weights, *biases)):
        return False
    rows = math.prod(x.shape[:-1])
    if isinstance(rows, int) and rows > cpu_kernel.FLOAT32_MAX_ROWS:
        return False
    if not cpu_kernel.float32_fits(weights, x.shape[-1]):
        return False
    return cpu_kernel.float32_ready()


def _one_row_in_graph(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> bool:
    """A bf16 product of one row, known to be one row when the graph is built (the engine's one-row decode graph),
    inside torch.compile on a CPU: `_summed_products` there, unless our AMX product is in use, which reads the
    weights at the memory's rate and beats the fused loops (`small`'s one-row decode 1.15-1.23x)."""
    if not (SUMMED_ONE_ROW and torch.compiler.is_compiling()) or cpu_kernel.products_through_amx():
        return False
    rows = x.shape[:-1]
    one_row = all(isinstance(n, int) for n in rows) and math.prod(rows) == 1
    return one_row and _bf16_inference(x, weights, biases)


def _summed_products(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> list[Tensor]:
    """x times each weight (plus its bias) as elementwise products summed in float32, for inductor to fuse into one
    loop per weight that streams it once: x rounded to bf16 first, as a bf16 product rounds it, the sums in float32
    and the result rounded to bf16, as oneDNN's kernel does (up to the order of the sums)."""
    x32 = x.to(torch.bfloat16).float()
    if REALIZE_ROW:
        # Inductor would inline x's producers (the RMSNorm's scale: a division and a square root that -fmath-errno
        # keeps inside the loop; the residual sums) into each product's loop, once per 32 weights of every output.
        # A strided view of it makes inductor write the row out once: `small`'s one-row decode 1.20x, its output
        # layer's loop 40% -> 24% of the step's samples (docs/LOG.md, 2026-12-03, twentieth session).
        x32 = torch.as_strided(x32, x32.shape, x32.stride())
    x32 = x32[..., None, :]
    out = []
    for i, w in enumerate(weights):
        y = (x32 * w.float()).sum(-1)
        out.append((y + biases[i].float() if biases else y).to(torch.bfloat16))
    return out


def _machine_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _packed_weights(weights: list[Tensor]) -> tuple[str, Tensor] | None:
    """(kernel, the prepacked copy of the weights stacked), made now if there is none or a weight changed: "ours"
    (`cpu_kernel`, where it is built and the stack has its shape) or "onednn"; None past the memory budget or for
    inference tensors (no version counter to tell a change by)."""
    global _AVAILABLE
    if any(w.is_inference() for w in weights):
        return None
    key = tuple((id(w), w._version, w.data_ptr()) for w in weights)
    rows = sum(w.shape[0] for w in weights)
    ours = cpu_kernel.fits_shape(rows, weights[0].shape[1]) and cpu_kernel.products_available()
    kernel = "ours" if ours else "onednn"
    hit = _packed.get(weights[0])  # every product of a decode step asks: the hit needs no lock (one dict read)
    if hit is not None and hit[0] == key and hit[1] == kernel:
        return kernel, hit[2]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    with _lock:
        hit = _packed.get(weights[0])
        if hit is not None and hit[0] == key and hit[1] == kernel:
            return kernel, hit[2]
        held = sum(entry[-1] for entry in _packed.values()) - (hit[-1] if hit is not None else 0)
        if held + nbytes > PACKED_MAX_MEMORY_FRACTION * _machine_bytes():
            return None
        stacked = weights[0].detach() if len(weights) == 1 else torch.cat([w.detach() for w in weights])
        if kernel == "ours":
            packed = cpu_kernel.pack(stacked)
        else:
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(stacked, None)
            except RuntimeError as e:  # an unsupported build or processor: F.linear from now on
                _AVAILABLE = False
                warnings.warn(f"oneDNN's prepacked bf16 linear failed ({e}); using F.linear", stacklevel=3)
                return None
        _packed[weights[0]] = (key, kernel, packed, nbytes)
        return kernel, packed


# An operation of our own, opaque to torch.compile: the packed copy lives outside the graph, in this module's table,
# and the graph only passes the weights it belongs to. Defined with torch.library.define/impl, a plain CPU kernel,
# not torch.library.custom_op, whose Python layers (autograd, argument checks) cost ~14 us a call eagerly and ~30
# from a compiled graph: `small`'s 49 products a step at one row 16.2 -> 14.2 ms (docs/LOG.md, 2026-12-03). Inference
# only: `_packable` never sends a tensor that wants a gradient.
torch.library.define("nanoseek::packed_linear", "(Tensor x, Tensor[] weights, Tensor[] biases) -> Tensor")


def _packed_linear_cpu(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> Tensor:
    """x times the weights stacked (plus the biases stacked, if any), through their prepacked copy."""
    hit = _packed_weights(weights)
    if hit is None:  # each weight on its own (stacking them here would copy them at every call)
        products = [F.linear(x, w, biases[i] if biases else None) for i, w in enumerate(weights)]
        return products[0] if len(products) == 1 else torch.cat(products, dim=-1)
    kernel, packed = hit
    bias = None if not biases else biases[0] if len(biases) == 1 else torch.cat(biases)
    if kernel == "ours":
        return cpu_kernel.product(x, packed, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


torch.library.impl("nanoseek::packed_linear", "cpu", _packed_linear_cpu)


@torch.library.register_fake("nanoseek::packed_linear")
def _(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> Tensor:
    return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in weights))


_packed_linear = torch.ops.nanoseek.packed_linear.default
