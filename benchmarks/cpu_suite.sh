#!/usr/bin/env bash
# Issue 23's side by side on a CPU: nanoseek against transformers and TRL, the seven commands one after another
# (never two at once: on a small machine they would share its cores), then one line per figure beside its goal.
#
#   bash benchmarks/cpu_suite.sh                        # ~30 minutes on the 2-core dev machine; OUT=cpu_out
#   PARTS="generate_small" bash benchmarks/cpu_suite.sh # some parts only (names below)
#   THREADS=4 bash benchmarks/cpu_suite.sh              # torch threads per command (default: the cores, at most 2)
#
# Needs the peers: `.venv/bin/pip install -e ".[bench]"` (transformers, TRL).
# Parts (each a JSON line in OUT/NAME.json, its stderr in OUT/NAME.log):
#   generate_tiny        generate.py --preset tiny --batch-sizes 1,64 --new-tokens 256
#   generate_tiny_moe    generate.py --preset tiny-moe --batch-sizes 1,32 --new-tokens 64
#   generate_small       generate.py --preset small --batch-sizes 1,8 --new-tokens 64
#   rl_step              rl_step.py --preset tiny: 8 prompts x 8 samples x 64 tokens, 4 rounds, vs TRL
#   train_step           train_step.py --quick (eager, 6 rounds), vs transformers' Qwen3-MoE
#   train_step_compiled  the same with --compile on both sides
#   decode_floor         decode_floor.py --preset small: how far `small` is from its weight products alone
# Every ratio is a median over rounds taken within one process (the VM's speed drifts ~2x within the hour; a ratio
# of two processes' figures minutes apart moves with it). Goals (issue 23): generation >= 3x the best transformers
# setting at every batch size; the GRPO step >= 3x TRL; the training step >= 1.5x transformers.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-cpu_out}
PY=${PYTHON:-.venv/bin/python}
THREADS=${THREADS:-$(($(nproc) < 2 ? $(nproc) : 2))}
PARTS=${PARTS:-generate_tiny generate_tiny_moe generate_small rl_step train_step train_step_compiled decode_floor}
mkdir -p "$OUT"
"$PY" -c "import transformers, trl" 2>/dev/null || { echo 'cpu_suite: the peers are missing: .venv/bin/pip install -e ".[bench]"'; exit 2; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

command_of() {
    case $1 in
        generate_tiny) echo benchmarks/generate.py --preset tiny --batch-sizes 1,64 --new-tokens 256 ;;
        generate_tiny_moe) echo benchmarks/generate.py --preset tiny-moe --batch-sizes 1,32 --new-tokens 64 ;;
        generate_small) echo benchmarks/generate.py --preset small --batch-sizes 1,8 --new-tokens 64 ;;
        rl_step) echo benchmarks/rl_step.py --preset tiny --prompts 8 --samples 8 --max-new-tokens 64 --rounds 4 ;;
        train_step) echo benchmarks/train_step.py --quick ;;
        train_step_compiled) echo benchmarks/train_step.py --quick --compile ;;
        decode_floor) echo benchmarks/decode_floor.py --preset small --batch-sizes 1,8 --new-tokens 64 --rounds 7 ;;  # CPU only
        *) return 1 ;;
    esac
}

for part in $PARTS; do  # every name checked before anything runs
    command_of "$part" >/dev/null || { echo "cpu_suite: unknown part: $part"; exit 2; }
done

{
    echo "cpu_suite $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') threads $THREADS"
    lscpu 2>/dev/null | grep -E '^(Model name|CPU\(s\))'
    "$PY" -c "import torch, transformers, trl; from nanoseek.precision import cpu_bf16_instructions as bf16
print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)
print('bf16 instructions:', bf16() or 'none')" 2>&1
    echo "other processes using the CPU now: $(ps -eo pcpu=,comm= | awk '$1 > 5' | wc -l)"
} | tee "$OUT/suite.log"

for part in $PARTS; do
    cmd=$(command_of "$part")
    start=$SECONDS
    args=(--threads "$THREADS")
    [ "$part" = decode_floor ] || args=(--device cpu "${args[@]}")
    # shellcheck disable=SC2086  # the command is words on purpose
    "$PY" $cmd "${args[@]}" >"$OUT/$part.out" 2>"$OUT/$part.log"
    rc=$?
    tail -n 1 "$OUT/$part.out" >"$OUT/$part.json"
    echo "$part: exit $rc, $((SECONDS - start)) s: $cmd ${args[*]}" | tee -a "$OUT/suite.log"
done

"$PY" - "$OUT" $PARTS <<'EOF' | tee -a "$OUT/suite.log"
import json, sys
from pathlib import Path

out, parts = Path(sys.argv[1]), sys.argv[2:]


def row(figure: str, value: float | None, goal: float, rounds=None) -> None:
    if value is None:
        print(f"{figure}: not measured")
        return
    verdict = "met" if value >= goal else f"missed by {goal - value:.2f}x"
    extra = f" (rounds {', '.join(f'{r:.2f}' for r in rounds)})" if rounds else ""
    print(f"{figure}: {value:.2f}x, goal {goal:g}x, {verdict}{extra}")


for part in parts:
    try:
        r = json.loads((out / f"{part}.json").read_text())
    except (OSError, ValueError):
        print(f"{part}: no result (see {out}/{part}.log)")
        continue
    if part.startswith("generate"):
        for b, v in r.get("vs_best_transformers", {}).items():
            row(f"{part} batch {b}", v, 3.0, r.get("vs_best_transformers_rounds", {}).get(b))
    elif part == "rl_step":
        row("rl_step (TRL / nanoseek seconds per step)", r.get("trl_over_nanoseek"), 3.0,
            r.get("trl_over_nanoseek_rounds"))
    elif part.startswith("train_step"):
        for precision, v in r.get("speedup_vs_transformers", {}).items():
            row(f"{part} {precision}", v, 1.5, r.get("speedup_rounds", {}).get(precision))
    elif part == "decode_floor":
        for b, s in r.get("summary", {}).items():
            print(f"decode_floor batch {b}: nanoseek / peer {s['nanoseek_over_peer']['median']:.2f}x, floor / peer "
                  f"{s['floor_over_peer']['median']:.2f}x, nanoseek / floor {s['nanoseek_over_floor']['median']:.2f}, "
                  f"read floor / peer {s['read_floor_over_peer']['median']:.2f}x")
EOF
