"""The GPU suite's plumbing, on CPU: each benchmark it calls runs (`QUICK=1`: tiny shapes), and its summary and
`benchmarks/results_md.py` read the figures where the benchmarks write them.

A GPU session has 15 minutes of device time; the first one (2026-12-04) lost a part to an import the image lacked
and would have lost the summary to a key `serve.py` had stopped writing. This runs the parts whose figures the
summary reads, each on its smallest shape (about a minute on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PARTS = "moe_layer train_step generate_small rl_step serve serve_gil serve_interval"


@pytest.mark.slow
def test_every_part_runs_and_the_summaries_read_its_figures(tmp_path):
    env = dict(os.environ, QUICK="1", PYTHON=sys.executable, OUT=str(tmp_path), PARTS=PARTS, DEADLINE="400")
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    parts = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [p["part"] for p in parts] == PARTS.split()
    for p in parts:
        assert p["rc"] == 0, (p, (tmp_path / "suite.log").read_text()[-2000:])
        assert p["result"] and "last_line" not in p["result"], p  # each ended with its JSON line

    summary = run.stdout.split("==== summary", 1)
    assert len(summary) == 2 and "Traceback" not in run.stdout + run.stderr, run.stdout[-3000:] + run.stderr[-2000:]
    serve = next(p["result"] for p in parts if p["part"] == "serve")
    for r in serve["runs"]:  # the summary's serve lines carry serve.py's own figures
        assert f"{r['after']['tokens_per_s']:,.0f} tok/s over HTTP" in summary[1]

    spec = importlib.util.spec_from_file_location("results_md", ROOT / "benchmarks" / "results_md.py")
    results_md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results_md)
    section = results_md.section(tmp_path)
    for heading in ("**MoE layer**", "**Training step**", "**Generation**", "**RL step**", "**Serving**"):
        assert heading in section, section


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_counts_each_kernel_once():
    """On CUDA the profiler lists an operator (aten::mm) with the device time of the kernels it launched, the
    kernels themselves, GPU user annotations spanning kernels, and CUPTI's overhead records. The first H200
    run summed them all and reported kernels "filling" 200% of a step; only kernels, copies and memsets count."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(i, name, start, end, device_type=DeviceType.CUDA, **kw):
        return FunctionEvent(i, name, 0, start, end, use_device="cuda", device_type=device_type, **kw)

    mm = event(0, "aten::mm", 0, 5, device_type=DeviceType.CPU)
    mm.append_kernel("sm90_gemm", 0, 30)
    events = [
        mm,
        event(1, "sm90_gemm", 10, 40),  # the kernel mm launched: 30 us
        event(2, "Memcpy HtoD (Pageable -> Device)", 40, 48),  # 8 us
        event(3, "Optimizer.step#AdamW.step", 0, 48, is_user_annotation=True),
        event(4, "Command Buffer Full", 0, 20),
    ]
    train_step = load_benchmark("train_step")
    work = [e for e in events if train_step.is_device_work(e)]  # key_averages' entries carry the same fields
    assert sorted(e.key for e in work) == ["Memcpy HtoD (Pageable -> Device)", "sm90_gemm"]
    assert sum(e.self_device_time_total for e in work) == 38
    assert sum(e.self_device_time_total for e in events) == 38 + 30 + 48 + 20  # what the first run summed
