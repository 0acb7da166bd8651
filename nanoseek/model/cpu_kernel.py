"""Our one CPU kernel: a few rows times a bf16 weight with AVX-512 BF16 (`few_rows.cpp`), for the decode step.

A decode step multiplies a few rows by every weight, so it is bound by how fast the weights stream from memory.
oneDNN's prepacked kernel reads them below the memory's rate at a few rows; this loop (one 64-byte load of a
packed weight feeds a vdpbf16ps per row) reads them at it: `small`'s 49 products a step, 1 / 2 / 4 / 8 rows, 1.4 /
1.9 / 1.3-1.4 / 1.1-1.5x faster than oneDNN's, and within 3% of it at 128-2048 rows, where both are bound by the
arithmetic (2 threads, the 2-core EPYC; docs/LOG.md, 2026-12-04, twenty-second session). Each output's sum runs along
the inputs in order, as oneDNN's does: the same float32 sums, rounded to bf16 once (equal to oneDNN's output but
for an occasional last bit, tested against float64).

Built at first use with the C++ compiler inductor also needs (`$CXX`, else g++; about a second) into
`$NANOSEEK_KERNEL_DIR` (default `~/.cache/nanoseek/kernels`), under a name that hashes the source and the flags,
written atomically; loaded with ctypes (which releases the GIL during the call) after torch, so the kernel's OpenMP
threads are torch's own pool. Only on x86-64 Linux with AVX-512 BF16 and without AMX (where oneDNN's AMX kernels
were not measured against it); `NANOSEEK_CPU_KERNEL=0` turns it off. A failed build or a wrong answer in the check
that follows it: one warning, and `model.linear` keeps oneDNN's prepacked kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from nanoseek import precision

ENV = "NANOSEEK_CPU_KERNEL"
DIR_ENV = "NANOSEEK_KERNEL_DIR"
SOURCE = Path(__file__).with_name("few_rows.cpp")
USE = True
"""Set to False for oneDNN's prepacked kernel (weights packed for ours are packed again for it at their next product;
benchmarks and tests compare both)."""
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]

_lock = threading.Lock()
_function = None  # the loaded kernel; None until tried
_failure: str | None = None


def fits(weight: Tensor) -> bool:
    """Whether a [N, K] weight has the kernel's shape (`fits_shape`)."""
    return weight.dim() == 2 and fits_shape(*weight.shape)


def fits_shape(n: int, k: int) -> bool:
    """N outputs a multiple of 16 (whole packed blocks), K inputs even (whole pairs)."""
    return n % 16 == 0 and k % 2 == 0


def pack(weight: Tensor) -> Tensor:
    """The weight [N, K] laid out [N/16, K/2, 16, 2] for the kernel (a copy, as large as the weight)."""
    N, K = weight.shape
    return weight.detach().contiguous().view(N // 16, 16, K // 2, 2).permute(0, 2, 1, 3).contiguous()


def product(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., K] (bf16) times the packed weight's [N, K] transposed, plus bias [N] (bf16): [..., N] bf16."""
    return _product(_function, x, packed, bias)


def _product(function, x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
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


def available() -> bool:
    """Whether the kernel is on and built (building it now if it has not been tried): False where it does not
    apply, is turned off, or failed once (warned)."""
    global _function, _failure
    if not USE:
        return False
    if _function is not None:
        return True
    if _failure is not None or not _applies():
        return False
    with _lock:
        if _function is None and _failure is None:
            try:
                function = _load(_build())
                _check(function)
                _function = function  # only a checked kernel is ever seen by another thread
            except (OSError, RuntimeError, subprocess.SubprocessError, AssertionError) as e:
                _failure = f"{type(e).__name__}: {str(e).strip()[:300]}"
                warnings.warn(f"nanoseek's CPU kernel is off, products stay oneDNN's: {_failure}", stacklevel=2)
    return _function is not None


def _applies() -> bool:
    setting = os.environ.get(ENV, "1").strip()
    if setting not in ("0", "1"):
        raise ValueError(f"{ENV}={setting!r}: must be 1 (use nanoseek's CPU kernel where it applies) or 0 (never)")
    x86_linux = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
    return setting == "1" and x86_linux and precision.cpu_bf16_instructions() == "AVX-512 BF16"


def _compiler() -> str:
    name = os.environ.get("CXX") or "g++"
    path = shutil.which(name)
    if path is None:
        raise OSError(f"no C++ compiler {name!r} on PATH (set CXX)")
    return path


def _build() -> Path:
    """The shared library, compiled now unless a build of this source with these flags is already there."""
    compiler = _compiler()
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanoseek" / "kernels"
    directory = Path(os.environ.get(DIR_ENV) or default)
    library = directory / f"few_rows-{tag}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=directory, prefix=".few_rows-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", partial], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            raise RuntimeError(f"{compiler} failed: {last[0][:300]}")
        os.replace(partial, library)  # another process building the same file wrote the same bytes
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


def _load(library: Path):
    function = ctypes.CDLL(str(library)).nanoseek_few_rows_bf16
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, i64, pointer, pointer, pointer, i64, i64, ctypes.c_int]
    function.restype = None
    return function


def _check(function) -> None:
    """One product of every row count the kernel specialises (1-9) against float64, on odd sizes (a lone last
    block of 16 outputs): a build that miscomputes is not used."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 36, generator=g).to(torch.bfloat16)
    b = torch.randn(48, generator=g).to(torch.bfloat16)
    x = torch.randn(9, 36, generator=g).to(torch.bfloat16)
    packed = pack(w)
    for m in range(1, 10):
        want = x[:m].double() @ w.double().T + b.double()
        got = _product(function, x[:m], packed, b).double()
        err = (got - want).abs().max().item()
        if not err <= 2**-7 * want.abs().max().item() + 1e-3:
            raise AssertionError(f"the built kernel's product at {m} rows is off by {err:.3g}")


__all__ = ["ENV", "USE", "available", "fits", "fits_shape", "pack", "product"]
