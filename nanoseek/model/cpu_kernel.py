"""Our CPU kernels, for the decode step on a CPU with AVX-512 BF16: a few rows times a bf16 weight (`few_rows.cpp`)
and attention over a bf16 KV cache (`decode_attention.cpp`); and on any CPU with AVX-512, rows times float32 weights
(`float32_rows.cpp`, and an MoE layer's routed experts, forward and backward, `float32_experts.cpp`: the last
paragraph; the attention is built into that library).

A decode step multiplies a few rows by every weight, so it is bound by how fast the weights stream from memory.
oneDNN's prepacked kernel reads them below the memory's rate at a few rows; this loop (one 64-byte load of a
packed weight feeds a vdpbf16ps per row) reads them at it: `small`'s 49 products a step, 1 / 2 / 4 / 8 rows, 1.4 /
1.9 / 1.3-1.4 / 1.1-1.5x faster than oneDNN's, and within 3% of it at 128-2048 rows, where both are bound by the
arithmetic (2 threads, the 2-core EPYC; docs/LOG.md, 2026-12-04, twenty-second session). Each output's sum runs along
the inputs in order, as oneDNN's does: the same float32 sums, rounded to bf16 once (equal to oneDNN's output but
for an occasional last bit, tested against float64). On a CPU with AMX the same packed weights feed AMX's tile
product instead (`nanoseek_amx_rows_bf16`: the layout is already the tile's), which reads `small`'s step in 7.0 ms
at 1-16 rows, at the memory's rate, where oneDNN's AMX kernel takes 8.2-9.4 and the AVX-512 BF16 loop 8.3-18.5
(docs/LOG.md, 2026-12-05, thirty-fifth session).

The decode attention computes each score once (inductor's fused loop recomputed it in every pass of the softmax,
with the query's RoPE inside), soft-maxes and sums the values in float32, and rounds once to bf16: the same sums as
the engine's other attention paths in another order (tested against float64). `engine.cache` calls it for a bf16
cache on a CPU where it is built (`attention_available`). It is a torch operation, `nanoseek::decode_attention`,
in the float32 library below (its functions compiled for AVX-512 BF16 there), so a compiled step calls it from C++:
as a Python operation its crossing cost ~11 us a call, 2-3% of tiny's 64-row decode.

The product is built at first use with the C++ compiler inductor also needs (`$CXX`, else g++; about two seconds) into
`$NANOSEEK_KERNEL_DIR` (default `~/.cache/nanoseek/kernels`), one library under a name that hashes the sources and
the flags, written atomically; loaded with ctypes (which releases the GIL during the call) after torch, so the
kernels' OpenMP threads are torch's own pool. Only on x86-64 Linux with AVX-512 BF16, and on a CPU with AMX the
product only through AMX, once Linux grants the process its tiles (`products_available`: the AVX-512 BF16 loop
alone is behind oneDNN's AMX kernel from 4 rows); `NANOSEEK_CPU_KERNEL=0` turns them off. A failed build or a
wrong answer in the check that follows it: one warning, and `model.linear` keeps oneDNN's prepacked kernel.

The float32 product (`float32_rows`) is a torch operation, `nanoseek::float32_rows`, built against torch's headers
(about ten seconds, once per source and torch version, into the same directory) and loaded into torch's operator
registry, so a compiled decode step calls it from its C++ wrapper, without a crossing into Python (~11 us a call,
which would eat most of what it saves at tiny's shapes). At 8-512 rows MKL's sgemm multiplies on one of two threads;
this kernel splits the outputs between the threads and packs each group's weights in L1 as it goes: tiny's products
at 64 rows 1.3-1.6x faster, at 8 rows 2.6x, equal from ~2,000 rows (docs/LOG.md, 2026-12-05, thirtieth session).
`model.linear` sends it a float32 model's products where no gradient is wanted and no autocast is on (decoding,
evaluation) up to FLOAT32_MAX_ROWS rows, on x86-64 Linux with AVX-512; NANOSEEK_CPU_KERNEL=0 turns it off too.
The same library's `float32_experts` (`float32_experts.cpp`) is a float32 MoE layer's routed experts in one call,
token copies sorted by expert inside, and with gradients one call forward and one backward (`MoE.uses_float32_kernel`
says where: decoding and evaluation, and eager or compiled training where float32 beats the padded bf16 bmm).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from nanoseek import precision


class Kernels(NamedTuple):
    """The built library's functions (ctypes)."""

    product: Callable[..., None]  # nanoseek_few_rows_bf16
    amx_product: Callable[..., None] | None  # nanoseek_amx_rows_bf16, on a CPU with AMX whose tiles Linux granted


ENV = "NANOSEEK_CPU_KERNEL"
DIR_ENV = "NANOSEEK_KERNEL_DIR"
SOURCES = (Path(__file__).with_name("few_rows.cpp"),)
USE = True
"""Set to False for oneDNN's prepacked kernel (weights packed for ours are packed again for it at their next product;
benchmarks and tests compare both)."""
AMX = True
"""Set to False to keep oneDNN's kernel for `model.linear` on a CPU with AMX (and the AVX-512 BF16 loop for direct
calls of `product`), as before the AMX product (benchmarks compare both)."""
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]

_lock = threading.Lock()
_kernels: Kernels | None = None  # the loaded library's functions; None until tried
_failure: str | None = None

FLOAT32_SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("float32_rows.cpp", "float32_experts.cpp", "chunk_attention.cpp", "decode_attention.cpp")
)
FLOAT32_FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-w"]
FLOAT32_MAX_ROWS = 1024
"""Rows up to which `model.linear` takes `float32_rows` (when the rows are known; a compiled decode step's rows are
the engine's slots). 64 x 128 x 768: 1.5x MKL; 1,024 rows 1.10x; 4,096 rows 0.96x (2 threads, the 2-core EPYC)."""
_float32_state: str | None = None  # "ok" once loaded and checked, else why not; None until tried


def fits(weight: Tensor) -> bool:
    """Whether a [N, K] weight has the kernel's shape (`fits_shape`)."""
    return weight.dim() == 2 and fits_shape(*weight.shape)


def fits_shape(n: int, k: int) -> bool:
    """N outputs a multiple of 16 (whole packed blocks), K inputs even (whole pairs; on a CPU with AMX a multiple of
    32, whole tiles: AVX-512 BF16 alone is 1.7-4x slower than oneDNN's AMX kernel from 8 rows)."""
    return n % 16 == 0 and k % (32 if _has_amx() and AMX else 2) == 0


def pack(weight: Tensor) -> Tensor:
    """The weight [N, K] laid out [N/16, K/2, 16, 2] for the kernel (a copy, as large as the weight)."""
    N, K = weight.shape
    return weight.detach().contiguous().view(N // 16, 16, K // 2, 2).permute(0, 2, 1, 3).contiguous()


def product(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., K] (bf16) times the packed weight's [N, K] transposed, plus bias [N] (bf16): [..., N] bf16. Through AMX
    where the CPU has it (and Linux granted its tiles) and K is a multiple of 32, else the AVX-512 BF16 loop."""
    if products_through_amx() and packed.shape[1] % 16 == 0:  # K / 2 pairs
        return _product(_kernels.amx_product, x, packed, bias)
    return _product(_kernels.product, x, packed, bias)


def _product(function: Callable[..., None], x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    N, K = packed.shape[0] * 16, packed.shape[1] * 2
    if x.dtype != torch.bfloat16 or x.shape[-1] != K:  # the kernel reads raw memory: a wrong input is not an error
        raise ValueError(f"cpu_kernel.product: x must be bf16 [..., {K}], got {x.dtype} {tuple(x.shape)}")
    flat = x.dim() == 2 and x.is_contiguous()  # the decode step's rows: no reshape, no view (~1 us each)
    rows = x if flat else x.reshape(-1, K).contiguous()
    out = torch.empty((rows.shape[0], N), dtype=torch.bfloat16)
    if rows.shape[0]:
        bias_ptr = None if bias is None else bias.contiguous().data_ptr()
        threads = torch.get_num_threads()
        function(rows.data_ptr(), rows.shape[0], packed.data_ptr(), bias_ptr, out.data_ptr(), N, K, threads)
    return out if flat else out.view(*x.shape[:-1], N)


def decode_attention(
    q: Tensor, keys: Tensor, values: Tensor, positions: Tensor, slots: Tensor | None, kv_len: int, scale: float
) -> Tensor:
    """Attention of q [B, Hkv, R, dk] (R = the query heads sharing a kv head x the step's T tokens, head-major)
    over a bf16 cache layer's keys [n_slots, Hkv, max_seq_len, dk] and values [..., dv] (a view of the keys is
    fine): batch row b reads cache row slots[b] (b without slots), and its query row r, the token t = r % T at
    positions[b, t], sees keys 0..min(positions[b, t], kv_len - 1). -> [B, Hkv, R, dv] bf16. Shapes, dtypes and
    layouts are checked (ValueError); the slot indices are not (a reduction per call): the engine's own.
    `attention_available()` must be True."""
    return torch.ops.nanoseek.decode_attention.default(q, keys, values, positions, slots, kv_len, scale)


def available() -> bool:
    """Whether the few-rows product is on and built (building it now if not yet tried): False where it does not
    apply, is turned off, or failed once (warned)."""
    global _kernels, _failure
    if not USE:
        return False
    if _kernels is not None:
        return True
    if _failure is not None or not _applies():
        return False
    with _lock:
        if _kernels is None and _failure is None:
            try:
                kernels = _load(_build())
                _apart(lambda: _check(kernels))
                _kernels = kernels  # only checked kernels are ever seen by another thread
            except (OSError, RuntimeError, subprocess.SubprocessError, AssertionError) as e:
                _failure = f"{type(e).__name__}: {str(e).strip()[:300]}"
                warnings.warn(
                    f"nanoseek's CPU kernel is off, products stay oneDNN's: {_failure}",
                    stacklevel=2,
                )
    return _kernels is not None


def _apart(check: Callable[[], None]) -> None:
    """Run a build's check in a thread of its own and raise what it raised. The first use of a kernel can come
    anywhere: in the engine's inference mode, under autocast, inside an activation-checkpointed forward, whose
    saved-tensor hooks and dispatch mode would record the check's operations as the layer's (a recompute then
    replayed them, or waited on the lock the check holds: torchrun ranks failed and hung). That state is per thread;
    a new thread starts with none of it."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            check()
        except BaseException as e:  # raised again below, in the caller's thread
            failure.append(e)

    thread = threading.Thread(target=run, name="nanoseek-kernel-check")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _applies_at_all() -> bool:
    """NANOSEEK_CPU_KERNEL, read: 1 (the default) or 0."""
    setting = os.environ.get(ENV, "1").strip()
    if setting not in ("0", "1"):
        raise ValueError(f"{ENV}={setting!r}: must be 1 (use nanoseek's CPU kernel where it applies) or 0 (never)")
    return setting == "1"


def _applies() -> bool:
    x86_linux = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
    return _applies_at_all() and x86_linux and precision.cpu_bf16_instructions() in ("AVX-512 BF16", "AMX")


def products_available() -> bool:
    """Whether `model.linear` packs bf16 weights for our product (`available()`; on a CPU with AMX, only where the
    AMX product is on and Linux granted its tiles: the AVX-512 BF16 loop alone is ahead of oneDNN's AMX kernel at 1-2
    rows only and 1.7-4x behind from 8, docs/LOG.md, 2026-12-05, thirty-first session; a packed copy serves every
    batch size)."""
    return available() and (not _has_amx() or products_through_amx())


def products_through_amx() -> bool:
    """Whether our bf16 products run through AMX (`products_available()` on a CPU with AMX), read without building
    the library (False until it is built), so a graph being traced may ask."""
    return USE and AMX and _kernels is not None and _kernels.amx_product is not None


def products_name() -> str:
    """Which of our products `model.linear` takes for bf16 weights: "AMX" or "AVX-512 BF16" (`products_available()`
    must be True)."""
    return "AMX" if products_through_amx() else "AVX-512 BF16"


def attention_available() -> bool:
    """Whether `decode_attention` applies: a CPU with AVX-512 BF16 (or AMX) where the product would (`_applies`), and
    the float32 library, which holds the attention, built and checked (building it now if not yet tried)."""
    return USE and _applies() and float32_available()


@functools.cache
def _has_amx() -> bool:  # read once: every eager bf16 product asks `products_available`
    return precision.cpu_bf16_instructions() == "AMX"


def _compiler() -> str:
    name = os.environ.get("CXX") or "g++"
    path = shutil.which(name)
    if path is None:
        raise OSError(f"no C++ compiler {name!r} on PATH (set CXX)")
    return path


def _build(
    sources: tuple[Path, ...] = SOURCES, flags: list[str] = FLAGS, name: str = "kernels", links: tuple[str, ...] = ()
) -> Path:
    """The shared library, compiled now unless a build of these sources with these flags (and libraries to link,
    named after the sources, as the linker wants them) is already there."""
    compiler = _compiler()
    headers = sorted(Path(__file__).parent.glob("*.h"))  # what the sources include: a change rebuilds
    text = b"".join(path.read_bytes() for path in (*sources, *headers))
    tag = hashlib.sha256(text + " ".join([compiler, *flags, "--link", *links]).encode()).hexdigest()[:16]
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanoseek" / "kernels"
    directory = Path(os.environ.get(DIR_ENV) or default)
    library = directory / f"{name}-{tag}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=directory, prefix=f".{name}-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *flags, *map(str, sources), *links, "-o", partial], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            raise RuntimeError(f"{compiler} failed: {last[0][:300]}")
        os.replace(partial, library)  # another process building the same file wrote the same bytes
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


def _load(library: Path) -> Kernels:
    loaded = ctypes.CDLL(str(library))
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    product = loaded.nanoseek_few_rows_bf16
    amx: Callable[..., None] | None = None
    if _has_amx() and loaded.nanoseek_amx_request() == 0:  # else the tile instructions would fault
        amx = loaded.nanoseek_amx_rows_bf16
    for function in (product, amx):
        if function is not None:
            function.argtypes = [pointer, i64, pointer, pointer, pointer, i64, i64, ctypes.c_int]
            function.restype = None
    return Kernels(product, amx)


def _check(kernels: Kernels) -> None:
    """Every row count the product specialises (1-9) against float64, and the AMX product where there is one (1-9
    rows, a full chunk of 16 and tails past it): a build that miscomputes is not used."""
    g = torch.Generator().manual_seed(0)
    # Odd sizes: a lone last block of 16 outputs (and for AMX four blocks and one: 80 outputs, 2 tiles of inputs).
    cases = [(kernels.product, 48, 36, range(1, 10))]
    if kernels.amx_product is not None:
        cases.append((kernels.amx_product, 80, 64, [*range(1, 10), 16, 17, 33]))
    for function, n, k, row_counts in cases:
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        b = torch.randn(n, generator=g).to(torch.bfloat16)
        x = torch.randn(max(row_counts), k, generator=g).to(torch.bfloat16)
        packed = pack(w)
        for m in row_counts:
            want = x[:m].double() @ w.double().T + b.double()
            got = _product(function, x[:m], packed, b).double()
            err = (got - want).abs().max().item()
            if not err <= 2**-7 * want.abs().max().item() + 1e-3:
                raise AssertionError(f"the built kernel's product at {m} rows is off by {err:.3g}")


def float32_fits(weights: list[Tensor], k: int) -> bool:
    """Whether `float32_rows` takes these weights for rows of k inputs: 2-D float32 [16n, k], k a multiple of 16."""
    return k % 16 == 0 and all(w.dim() == 2 and w.shape[1] == k and w.shape[0] % 16 == 0 for w in weights)


def float32_rows(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> Tensor:
    """x [..., K] (float32) times each weight [N_i, K] transposed, plus its bias (one per weight, or none), side by
    side: [..., sum N_i] float32. `float32_available()` must be True."""
    return torch.ops.nanoseek.float32_rows.default(x, weights, biases)


def float32_experts(x: Tensor, ids: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """Routed SwiGLU experts, float32: x [N, D], ids and weights [N, k] (ids int64) -> [N, D], token t's output the
    sum over j, in order, of weights[t, j] * (silu(x[t] w1[e]^T) * (x[t] w3[e]^T)) w2[e]^T with e = ids[t, j];
    w1, w3 [E, F, D], w2 [E, D, F], D and F multiples of 16. `float32_available()` must be True. Where gradients are
    wanted (grad mode on and an input requiring one), the training operation keeps what its backward operation reads
    and the gradients of x, weights, w1, w3 and w2 come from that (once differentiable; eager and compiled: the
    formula is registered with the operation, as the training attention's)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, w1, w3, w2)):
        return torch.ops.nanoseek.float32_experts_train.default(x, ids, weights, w1, w3, w2)[0]
    return torch.ops.nanoseek.float32_experts.default(x, ids, weights, w1, w3, w2)


def _float32_experts_setup(ctx, inputs: tuple, output: tuple) -> None:
    # The gate and up pre-activations and each copy's output ([N * k, F] twice and [N * k, D]): the backward
    # recomputes the sort and the hidden rows from them.
    ctx.save_for_backward(*inputs, *output[1:])


def _float32_experts_backward(ctx, grad: Tensor, *_kept_grads: Tensor | None) -> tuple[Tensor | None, ...]:
    # Only the layer's output feeds the loss; what the forward kept for this backward has no gradient of its own.
    dx, dweights, dw1, dw3, dw2 = torch.ops.nanoseek.float32_experts_backward.default(grad, *ctx.saved_tensors)
    return dx, None, dweights, dw1, dw3, dw2


def chunk_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, doc_ids: Tensor | None) -> Tensor:
    """Causal attention of q [B, H, T, d] over k [B, Hkv, T, d] and v [B, Hkv, T, dv] (each kv head serving H / Hkv
    consecutive query heads; d and dv multiples of 16), query i seeing key j <= i of its own document where doc_ids
    [B, T] (int64) is given: [B, H, T, dv] in q's dtype, computed in float32, differentiable (eager and compiled:
    the backward is an operation of its own). `float32_available()` must be True."""
    out, _ = torch.ops.nanoseek.chunk_attention.default(q.float(), k.float(), v.float(), doc_ids, scale)
    return out.to(q.dtype)


def chunk_attention_fits(q: Tensor, v: Tensor, doc_ids: Tensor | None) -> bool:
    """Whether `chunk_attention` takes these heads: float32 or bf16 (float64 keeps the reference paths), widths in
    multiples of 16, document ids (if any) int64."""
    if doc_ids is not None and doc_ids.dtype != torch.int64:
        return False
    return q.dtype in (torch.float32, torch.bfloat16) and q.shape[-1] % 16 == 0 and v.shape[-1] % 16 == 0


def _chunk_attention_setup(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, doc_ids, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, *output, *([] if doc_ids is None else [doc_ids]))


def _chunk_attention_backward(ctx, grad: Tensor, _grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
    q, k, v, out, lse, *doc_ids = ctx.saved_tensors
    doc = doc_ids[0] if doc_ids else None
    dq, dk, dv = torch.ops.nanoseek.chunk_attention_backward.default(grad, q, k, v, doc, out, lse, ctx.scale)
    return dq, dk, dv, None, None


def float32_available() -> bool:
    """Whether `float32_rows` is built, loaded and checked (building it now if not yet tried): False where it does
    not apply (not x86-64 Linux with AVX-512, NANOSEEK_CPU_KERNEL=0, USE off) or failed once (warned)."""
    global _float32_state
    if not USE:
        return False
    if _float32_state is not None:
        return _float32_state == "ok"
    x86_linux = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
    if not (_applies_at_all() and x86_linux and torch.backends.cpu.get_cpu_capability().startswith("AVX512")):
        return False
    with _lock:
        if _float32_state is None:
            try:
                flags, links = _float32_flags()
                _load_float32(_build(FLOAT32_SOURCES, flags, "float32-rows", links))
                _apart(_check_float32)
                _float32_state = "ok"
            except (OSError, RuntimeError, subprocess.SubprocessError, AssertionError) as e:
                _float32_state = f"{type(e).__name__}: {str(e).strip()[:300]}"
                warnings.warn(
                    f"nanoseek's float32 CPU kernel is off, float32 products stay MKL's and the decode attention "
                    f"the engine's own: {_float32_state}",
                    stacklevel=2,
                )
    return _float32_state == "ok"


def float32_ready() -> bool:
    """Whether a caller may send work to the float32 library now: `float32_available()`, building it if not yet
    tried, except while Dynamo traces, where a build may not run (the engine and `moe.compile_model` build it before
    they compile): then `float32_built()`."""
    return float32_built() if torch.compiler.is_compiling() else float32_available()


def float32_built() -> bool:
    """Whether `float32_rows` has been built, loaded and checked in this process (`float32_available` tries)."""
    return USE and _float32_state == "ok"


def _float32_flags() -> tuple[list[str], tuple[str, ...]]:
    """(flags, libraries): FLOAT32_FLAGS and what building against this torch takes (its headers, ABI and
    libraries; its version, so an upgrade builds anew)."""
    from torch.utils import cpp_extension

    lib = Path(torch.__file__).parent / "lib"
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    links = [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch", "-ltorch_cpu"]
    return [*FLOAT32_FLAGS, abi, f"-DNANOSEEK_TORCH={torch.__version__}", *includes], tuple(links)


_float32_registered = False  # the operation's shape function, registered once a library defining it is loaded


def _load_float32(library: Path) -> None:
    global _float32_registered
    if not hasattr(torch.ops.nanoseek, "float32_rows"):
        torch.ops.load_library(str(library))
    if not _float32_registered:

        @torch.library.register_fake("nanoseek::float32_rows")
        def _(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> Tensor:
            return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in weights))

        @torch.library.register_fake("nanoseek::float32_experts")
        def _(x: Tensor, ids: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
            return x.new_empty(x.shape)

        @torch.library.register_fake("nanoseek::chunk_attention")
        def _(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
            return q.new_empty(*q.shape[:3], v.shape[-1]), q.new_empty(q.shape[:3])

        @torch.library.register_fake("nanoseek::chunk_attention_backward")
        def _(grad, q: Tensor, k: Tensor, v: Tensor, doc_ids, out, lse, scale: float) -> tuple[Tensor, Tensor, Tensor]:
            return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

        torch.library.register_autograd(
            "nanoseek::chunk_attention", _chunk_attention_backward, setup_context=_chunk_attention_setup
        )

        @torch.library.register_fake("nanoseek::float32_experts_train")
        def _(x: Tensor, ids: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor):
            copies = ids.numel()
            return (
                x.new_empty(x.shape),
                x.new_empty(copies, w1.shape[1]),
                x.new_empty(copies, w1.shape[1]),
                x.new_empty(copies, x.shape[1]),
            )

        @torch.library.register_fake("nanoseek::float32_experts_backward")
        def _(grad, x: Tensor, ids, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, gate, up, ys):
            return tuple(t.new_empty(t.shape) for t in (x, weights, w1, w3, w2))

        torch.library.register_autograd(
            "nanoseek::float32_experts_train", _float32_experts_backward, setup_context=_float32_experts_setup
        )

        @torch.library.register_fake("nanoseek::decode_attention")
        def _(q: Tensor, keys: Tensor, values: Tensor, positions: Tensor, slots: Tensor | None, kv_len, scale: float):
            return q.new_empty(*q.shape[:3], values.shape[-1])

        _float32_registered = True


def _check_float32() -> None:
    """1-17 rows (chunks of 8 and every tail), three weights of 16, 32 and 48 outputs (a lone last block of 16), with
    and without biases, the experts and their gradients, the training attention and its gradients, and on a CPU with
    AVX-512 BF16 the decode attention at every masked edge, against float64: a build that miscomputes is not used."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(17, 48, generator=g)
    weights = [torch.randn(n, 48, generator=g) for n in (16, 32, 48)]
    biases = [torch.randn(w.shape[0], generator=g) for w in weights]
    for bias in ([], biases):
        want = torch.cat([x.double() @ w.double().T for w in weights], dim=-1)
        if bias:
            want = want + torch.cat(bias).double()
        for m in range(1, 18):
            err = (float32_rows(x[:m], weights, bias).double() - want[:m]).abs().max().item()
            if not err <= 1e-4:
                raise AssertionError(f"the built float32 kernel's product at {m} rows is off by {err:.3g}")
    # experts: 19 tokens x 2 choices among 5 experts (one unchosen), 20 copies for one expert (chunks of 8 and a tail)
    w1, w3 = (torch.randn(5, 32, 48, generator=g) / 7 for _ in range(2))
    w2 = torch.randn(5, 48, 32, generator=g) / 6
    ids = torch.cat([torch.full((19, 1), 3), torch.randint(0, 4, (19, 1), generator=g)], dim=1)
    x, weights = torch.randn(19, 48, generator=g), torch.rand(19, 2, generator=g)
    got = float32_experts(x, ids, weights, w1, w3, w2).double()
    err = (got - experts_float64(x, ids, weights, w1, w3, w2)).abs().max().item()
    if not err <= 1e-4:
        raise AssertionError(f"the built float32 kernel's experts are off by {err:.3g}")
    _check_experts_gradients(x, ids, weights, w1, w3, w2)
    _check_chunk_attention(g)
    if not _applies():
        return
    # The attention: a partial last chunk of the key (40 = 32 + 8) and of the value (24), 37 keys read (a partial
    # last block of 16), rows reading other slots, 3 query heads x 2 tokens, one position past the keys read.
    keys = torch.randn(4, 2, 40, 40, generator=g).to(torch.bfloat16)
    values = torch.randn(4, 2, 40, 24, generator=g).to(torch.bfloat16)
    q = torch.randn(3, 2, 6, 40, generator=g).to(torch.bfloat16)
    positions, slots = torch.tensor([[3, 4], [20, 36], [38, 39]]), torch.tensor([2, 0, 3])
    got = decode_attention(q, keys, values, positions, slots, 37, 0.125).double()
    k, v = keys[slots, :, :37].double(), values[slots, :, :37].double()
    seen = torch.arange(37)[None, None, :] <= positions.repeat(1, 3)[:, :, None]  # [B, R, L]
    scores = (q.double() @ k.transpose(-1, -2) * 0.125).masked_fill(~seen[:, None], float("-inf"))
    err = (got - scores.softmax(-1) @ v).abs().max().item()
    if not err <= 2**-7:
        raise AssertionError(f"the built kernel's attention is off by {err:.3g}")


def _check_experts_gradients(x: Tensor, ids: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> None:
    """The experts' gradients (the training operations) against autograd through `experts_float64`."""
    with torch.enable_grad():
        leaves = [t.clone().requires_grad_() for t in (x, weights, w1, w3, w2)]
        wide = [t.detach().double().requires_grad_() for t in leaves]
        grad = torch.linspace(-1, 1, x.numel()).view_as(x)
        float32_experts(leaves[0], ids, *leaves[1:]).backward(grad)
        experts_float64(wide[0], ids, *wide[1:]).backward(grad.double())
        for name, got, want in zip(("x", "weights", "w1", "w3", "w2"), leaves, wide, strict=True):
            err = (got.grad.double() - want.grad).abs().max().item()
            if not err <= 1e-4:
                raise AssertionError(f"the built float32 kernel's experts' gradient of {name} is off by {err:.3g}")


def _check_chunk_attention(g: torch.Generator) -> None:
    """The training attention, forward and gradients, against `chunk_attention_float64`: 37 tokens (a partial last
    block of 16 keys), two kv heads serving two query heads each, values wider than keys; one row of packed
    documents, one whose ids go back (every earlier key tested)."""
    q, k = torch.randn(2, 4, 37, 16, generator=g), torch.randn(2, 2, 37, 16, generator=g)
    v, grad = torch.randn(2, 2, 37, 32, generator=g), torch.randn(2, 4, 37, 32, generator=g)
    doc_ids = torch.tensor([[0] * 5 + [1] * 20 + [2] * 12, [0, 1, 0, 2] * 9 + [1]])
    with torch.enable_grad():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        wide = [t.detach().double().requires_grad_() for t in leaves]
        out = chunk_attention(*leaves, 0.3, doc_ids)
        want = chunk_attention_float64(*wide, 0.3, doc_ids)
        out.backward(grad)
        want.backward(grad.double())
        errors = [(out.detach().double() - want.detach()).abs().max().item()]
        errors += [(a.grad.double() - b.grad).abs().max().item() for a, b in zip(leaves, wide, strict=True)]
    if not max(errors) <= 1e-4:
        raise AssertionError(f"the built float32 kernel's training attention is off by {max(errors):.3g}")


def chunk_attention_float64(q: Tensor, k: Tensor, v: Tensor, scale: float, doc_ids: Tensor | None) -> Tensor:
    """`chunk_attention` in float64 over the whole T x T scores under an explicit mask (the reference it is checked
    against)."""
    rep = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(rep, dim=1) for t in (k, v))
    T = q.shape[2]
    seen = torch.ones(T, T, dtype=torch.bool).tril()
    if doc_ids is not None:
        seen = (seen & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]
    scores = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
    return scores.softmax(-1) @ v


def experts_float64(x: Tensor, ids: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """`float32_experts` in float64, one token and choice at a time (the reference it is checked against)."""
    x, weights, w1, w3, w2 = (t.double() for t in (x, weights, w1, w3, w2))
    out = torch.zeros_like(x)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            out[t] += weights[t, j] * ((torch.nn.functional.silu(w1[e] @ x[t]) * (w3[e] @ x[t])) @ w2[e].T)
    return out


__all__ = [
    "ENV",
    "FLOAT32_MAX_ROWS",
    "USE",
    "Kernels",
    "attention_available",
    "available",
    "chunk_attention",
    "chunk_attention_fits",
    "chunk_attention_float64",
    "decode_attention",
    "experts_float64",
    "fits",
    "fits_shape",
    "float32_available",
    "float32_built",
    "float32_experts",
    "float32_fits",
    "float32_ready",
    "float32_rows",
    "pack",
    "product",
    "products_available",
]
