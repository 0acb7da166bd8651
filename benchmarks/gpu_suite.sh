#!/usr/bin/env bash
# The one command a session lent a GPU runs: the CUDA-only tests, a grouped-GEMM correctness check, then the
# benchmarks behind the open GPU goals, each under a timeout, the whole inside DEADLINE seconds (default 540).
#
#   bash benchmarks/gpu_suite.sh                          # on the GPU machine; benchmarks/README.md has the call
#   PARTS="train_step rl_step" bash benchmarks/gpu_suite.sh   # some parts only (names below)
#   QUICK=1 PYTHON=.venv/bin/python bash benchmarks/gpu_suite.sh   # CPU smoke of the plumbing (--quick shapes)
#
# Parts, in this order (the most wanted first, so a deadline cuts the least wanted: the figures whose code changed
# since the H200 runs of 2026-12-04 in benchmarks/RESULTS.md first, those measured in full there last):
#   cuda_tests          pytest tests -k cuda (the tests that skip without CUDA)
#   moe_kernel_check    torch._grouped_mm path vs the float64 padded-bmm path: forward and gradients
#   train_step          benchmarks/train_step.py: small-moe, moe-1b, Qwen3-MoE 1.3B shape vs transformers (issue 3),
#                       each run's costliest kernels (--profile 12)
#   serve               benchmarks/serve.py --preset small: 1/8/32/128 streaming HTTP clients vs the engine alone
#   serve_gil           the same at 32 and 128 clients with a 0.5 ms GIL switch interval (serve.py's docstring)
#   serve_interval      the same at 32 and 128 clients with `--stream-interval 4` (4 decode steps an event)
#   rl_step             benchmarks/rl_step.py --preset small: 8 prompts x 8 samples x 256 tokens, vs TRL
#   train_step_compiled benchmarks/train_step.py --compile on moe-1b and the Qwen3-MoE shape, bf16
#   moe_layer           benchmarks/moe_layer.py at D=2048 F=1408 E=64 top-6, 16384 tokens (issue 2)
#   generate_small      benchmarks/generate.py --preset small: batch 1/128, 64 + 256 tokens, vs transformers
#   generate_small_moe  benchmarks/generate.py --preset small-moe
#
# Wheels in .whl/ (benchmarks/gpu_wheels.sh) are installed first into /tmp/site; nanoseek is imported from the
# checkout (PYTHONPATH), nothing is fetched. Under $OUT (./gpu_out when unset), 8 files at most:
#   suite.log       versions, GPU, one line per part (exit code, seconds); results.jsonl: one JSON line per part
#   tests.log moe_layer.log train_step.log generate.log rl_step.log serve.log: each part's stderr, then stdout
# stdout: one line per part, then a summary of the headline figures (the device call returns the last 12 kB).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
DEADLINE=${DEADLINE:-540}
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python3}
PARTS=${PARTS:-cuda_tests moe_kernel_check train_step serve serve_gil serve_interval rl_step train_step_compiled moe_layer generate_small generate_small_moe}
mkdir -p "$OUT"
rm -f "$OUT"/{suite,tests,moe_layer,train_step,generate,rl_step,serve}.log "$OUT/results.jsonl" # a local OUT is reused
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ -z "${QUICK:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# GEN / RL: the generate and rl_step parts' own flags. On the GPU, generation at batch 1 and 128 (the goals' sizes:
# each batch size costs transformers' static cache a compile); on the CPU smoke, no compiled decode or update
# (compiling them alone outlasts the parts' budgets on 2 cores).
if [ -n "${QUICK:-}" ]; then
    DEV=(--device cpu --quick)
    GEN=(--compile off)
    RL=(--compile off)
else
    DEV=(--device cuda)
    GEN=(--batch-sizes 1,128)
    RL=()
fi

{
    echo "gpu_suite $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') deadline ${DEADLINE}s"
    echo "parts: $PARTS"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1
    "$PY" - <<'EOF' 2>&1
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "transformers", "trl", "datasets", "accelerate", "pyarrow", "math_verify", "nanoseek"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} ({m.__file__})")
    except Exception as e:
        print(f"{name}: {type(e).__name__}: {e}")
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda {torch.version.cuda}: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
          f"capability {p.major}.{p.minor}, grouped_mm {hasattr(torch, '_grouped_mm')}")
EOF
} > "$OUT/suite.log"
cat "$OUT/suite.log"

# run_part NAME BUDGET_S LOG COMMAND...: COMMAND's stderr goes to $OUT/LOG as it runs, its stdout after it ends
# (killed by its timeout too); its last stdout line (the benchmarks' JSON) goes into results.jsonl with the exit
# code and the seconds taken.
run_part() {
    local name=$1 budget=$2 log=$OUT/$3
    shift 3
    local left=$((DEADLINE - (SECONDS - START)))
    local t=$((budget < left ? budget : left)) t0=$SECONDS rc
    local tmp
    tmp=$(mktemp)
    if ((t < 30)); then
        rc=skipped
        echo "==== $name: skipped, ${left}s left of the deadline" >>"$log"
    else
        echo "==== $name (timeout ${t}s): $*" >>"$log"
        timeout -k 10 "$t" "$@" >"$tmp" 2>>"$log"
        rc=$?
        { echo "---- $name stdout"; cat "$tmp"; } >>"$log"
    fi
    local secs=$((SECONDS - t0))
    "$PY" - "$name" "$rc" "$secs" "$tmp" >>"$OUT/results.jsonl" <<'EOF'
import json, sys
name, rc, secs, path = sys.argv[1:]
lines = [ln for ln in open(path, errors="replace").read().splitlines() if ln.strip()]
try:
    result = json.loads(lines[-1])
except (IndexError, ValueError):
    result = {"last_line": lines[-1][:500]} if lines else None
rc = int(rc) if rc.lstrip("-").isdigit() else rc
print(json.dumps(dict(part=name, rc=rc, seconds=int(secs), timed_out=rc in (124, 137), result=result)))
EOF
    rm -f "$tmp"
    local line="$name: rc=$rc, ${secs}s$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo ' (TIMED OUT)')"
    echo "$line" | tee -a "$OUT/suite.log"
}

KERNEL_CHECK=$(mktemp --suffix=.py)
cat >"$KERNEL_CHECK" <<'EOF'
"""Grouped-GEMM experts (torch._grouped_mm, bf16) vs the padded-bmm path in float64, same rows and counts."""
import json, sys
import torch
from nanoseek.model import ModelConfig
from nanoseek.model import moe as moe_mod

if not torch.cuda.is_available():
    print(json.dumps(dict(check="moe_kernel", skipped="no CUDA")))
    sys.exit(0)
torch.manual_seed(0)
rows, ok = [], True
# (rows, experts, d_model, d_ff, empty experts): the issue's layer, and a ragged case with empty groups.
for M, E, D, F, empty in [(16384 * 6, 64, 2048, 1408, 0), (333, 64, 256, 128, 20)]:
    cfg = ModelConfig(vocab_size=8, d_model=D, n_heads=8, n_kv_heads=8, n_routed_experts=E, moe_d_ff=F, top_k=2)
    layer = moe_mod.MoE(cfg).cuda()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    probs = torch.rand(E, device="cuda")
    probs[torch.randperm(E, device="cuda")[:empty]] = 0
    ids = torch.multinomial(probs, M, replacement=True).sort().values
    counts = moe_mod.count_per_expert(ids, E)
    x = torch.randn(M, D, device="cuda")
    g = torch.randn(M, D, device="cuda")

    def run(dtype, kernel):
        moe_mod.USE_GROUPED_MM_KERNEL = kernel
        layer.zero_grad(set_to_none=True)
        m = layer.to(dtype)
        xi = x.to(dtype).requires_grad_()
        out = m.experts(xi, counts)
        (out.double() * g.double()).sum().backward()
        used = moe_mod._kernel_ok(xi)
        return used, [t.double() for t in (out, xi.grad, m.w1.grad, m.w3.grad, m.w2.grad)]

    _, ref = run(torch.float64, False)
    used, fast = run(torch.bfloat16, True)
    moe_mod.USE_GROUPED_MM_KERNEL = True
    errs = {k: ((a - b).norm() / b.norm()).item() for k, a, b in zip(("out", "dx", "dw1", "dw3", "dw2"), fast, ref)}
    good = used and all(e < 2e-2 for e in errs.values()) and all(torch.isfinite(t).all() for t in fast)
    ok &= bool(good)
    rows.append(dict(rows=M, experts=E, d_model=D, d_ff=F, empty_experts=int((counts == 0).sum()),
                     kernel_used=used, rel_err={k: float(f"{v:.2e}") for k, v in errs.items()}, ok=bool(good)))
    print(f"M={M} E={E} D={D} F={F}: kernel {used}, rel err {rows[-1]['rel_err']} -> {'ok' if good else 'FAIL'}")
print(json.dumps(dict(check="moe_kernel", ok=ok, cases=rows)))
sys.exit(0 if ok else 1)
EOF

for part in $PARTS; do
    case $part in
    cuda_tests) # a test module whose imports fail there is reported, and the CUDA tests still run
        run_part "$part" 120 tests.log "$PY" -m pytest -p no:cacheprovider -rs --continue-on-collection-errors \
            tests -k cuda
        ;;
    moe_kernel_check) run_part "$part" 60 tests.log "$PY" "$KERNEL_CHECK" ;;
    moe_layer)
        args=(--tokens 16384 --d-model 2048 --d-ff 1408 --experts 64 --top-k 6)
        [ -n "${QUICK:-}" ] && args=()
        run_part "$part" 90 moe_layer.log "$PY" benchmarks/moe_layer.py "${DEV[@]}" "${args[@]}"
        ;;
    train_step) run_part "$part" 180 train_step.log "$PY" benchmarks/train_step.py "${DEV[@]}" --profile 12 ;;
    generate_small)
        run_part "$part" 200 generate.log "$PY" benchmarks/generate.py "${DEV[@]}" "${GEN[@]}" --preset small
        ;;
    rl_step) run_part "$part" 150 rl_step.log "$PY" benchmarks/rl_step.py "${DEV[@]}" "${RL[@]}" --preset small ;;
    generate_small_moe)
        run_part "$part" 150 generate.log "$PY" benchmarks/generate.py "${DEV[@]}" "${GEN[@]}" --preset small-moe
        ;;
    train_step_compiled)
        run_part "$part" 150 train_step.log "$PY" benchmarks/train_step.py "${DEV[@]}" --compile \
            --presets moe-1b,qwen3-moe-1.3b --precisions bf16 --warmup 3
        ;;
    serve) run_part "$part" 90 serve.log "$PY" benchmarks/serve.py "${DEV[@]}" --preset small ;;
    serve_gil)
        run_part "$part" 60 serve.log "$PY" benchmarks/serve.py "${DEV[@]}" --preset small --clients 32,128 \
            --switch-interval 0.5
        ;;
    serve_interval)
        run_part "$part" 60 serve.log "$PY" benchmarks/serve.py "${DEV[@]}" --preset small --clients 32,128 \
            --stream-interval 4
        ;;
    *) echo "unknown part $part (see the header of $0)" | tee -a "$OUT/suite.log" ;;
    esac
done
echo "total $((SECONDS - START))s" | tee -a "$OUT/suite.log"

# The headline figures, last, so the device call's output tail carries them.
"$PY" - "$OUT/results.jsonl" <<'EOF'
import json, sys

print("\n==== summary (full figures: results.jsonl; logs: *.log)")
for line in open(sys.argv[1]):
    p = json.loads(line)
    name, r = p["part"], p["result"] or {}
    head = f"{name} [rc={p['rc']}, {p['seconds']}s]"
    if "last_line" in r or not r:
        print(f"{head}: {r.get('last_line', 'no output')}")
    elif name == "moe_kernel_check":
        print(f"{head}: ok={r.get('ok')} " + " ".join(f"{c['rows']}x{c['d_model']}:{max(c['rel_err'].values())}"
                                                       for c in r.get("cases", [])) + (r.get("skipped") or ""))
    elif name == "moe_layer":
        res = r["results"]
        print(f"{head}: " + ", ".join(f"{k} {v['tflops']:.1f} TFLOP/s {v['tokens_per_s']:,.0f} tok/s"
                                      for k, v in res.items()) + f"; grouped/loop {r['speedup_vs_loop']:.1f}x")
    elif name.startswith("train_step"):
        print(f"{head}: {r['device']}, seq {r['seq_len']} x batch {r['batch_size']}, peak {r['peak_tflops']} TFLOP/s")
        for row in r["results"]:
            tag = f"  {row['model']:<15} {row['impl']:<12} {row['precision']:<4}"
            if "error" in row:
                print(f"{tag} {row['error'][:150]}")
                continue
            mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "-"
            kern = {True: " grouped", False: " padded"}.get(row.get("moe_grouped_kernel"), "")
            mem = f"{row['peak_mem_gb']} GiB" if row.get("peak_mem_gb") is not None else "-"
            print(f"{tag} {row['tokens_per_s']:>10,.0f} tok/s  MFU {mfu:>6}  {mem}{kern}"
                  + (" NON-FINITE" if not row["finite"] else ""))
            if prof := row.get("profile"):  # --profile: how busy the GPU was, the three costliest kernels
                busy = f"busy {100 * prof['device_busy']:.0f}%; " if "device_busy" in prof else ""
                print("      " + busy + "; ".join(f"{e['name'][:50]} {100 * e['share']:.0f}%" for e in prof["top"][:3]))
        if r.get("speedup_vs_transformers"):
            print(f"  nanoseek/transformers on the Qwen3-MoE shape: {r['speedup_vs_transformers']}")
    elif name.startswith("generate"):
        rows = r["results"]
        by = {}
        for row in rows:
            by.setdefault(row["impl"], {})[row["batch"]] = row["tokens_per_s"]
        print(f"{head}: {r['preset']} {r['device']}, tok/s by batch")
        for impl, d in by.items():
            print(f"  {impl:<22} " + "  ".join(f"b{b}: {v:,.0f}" for b, v in d.items()))
    elif name == "rl_step":
        n, t = r.get("nanoseek", {}), r.get("trl", {})
        line = f"{head}: nanoseek {n.get('seconds_per_step', float('nan')):.2f} s/step"
        if "seconds_per_step" in t:
            line += f", TRL {t['version']} {t['seconds_per_step']:.2f} s/step -> {t['seconds_per_step'] / n['seconds_per_step']:.1f}x"
        else:
            line += f", TRL: {t.get('skipped', '?')}"
        print(line)
    elif name.startswith("serve"):
        print(f"{head}: {r['preset']} {r['device']}, {r['new_tokens']} new tokens per request, GIL switch "
              f"interval {r.get('switch_interval_ms', 5):g} ms, stream interval {r.get('stream_interval', 1)}")
        for run in r["runs"]:  # "after": the server at this checkout (serve.py's --before adds "before")
            a = run["after"]
            print(f"  {run['clients']:>3} clients: {a['tokens_per_s']:,.0f} tok/s over HTTP "
                  f"(engine alone {run['engine_batch_tokens_per_s']:,.0f}), TTFT p50 {a['ttft_p50_ms']:.0f} ms, "
                  f"ITL p50 {a['itl_p50_ms']:.1f} ms, {a['failures']:.0f} failures")
    else:
        print(f"{head}: {json.dumps(r)[:300]}")
EOF
