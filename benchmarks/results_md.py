"""The GPU suite's output as a RESULTS.md section: every figure beside its goal and its peer.

    python benchmarks/results_md.py gpu_out            # prints markdown; paste it into RESULTS.md

Reads OUT/suite.log (date, commit, GPU, versions) and OUT/results.jsonl (one line per part). A goal
that a figure misses says by how much; a part that failed or was skipped says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The open GPU goals, from the issues.
MOE_LAYER_TFLOPS = 200.0  # issue 2: the MoE layer at D=2048, F=1408, E=64, top-6
MOE_1B_MFU = 0.30  # issue 3: moe-1b training MFU on an H100
GEN_B128, GEN_B1 = 100_000.0, 500.0  # issue 4: engine output tokens/s, small preset
RL_VS_TRL = 10.0  # issue 5: completion tokens/s per step vs TRL


def verdict(value: float | None, goal: float) -> str:
    if value is None:
        return "not measured"
    return "meets the goal" if value >= goal else f"misses by {100 * (1 - value / goal):.0f}%"


def section(out: Path) -> str:
    log = (out / "suite.log").read_text().splitlines()
    parts = {p["part"]: p for p in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    head = log[0].split()  # gpu_suite DATE commit SHA deadline ...
    gpu = next((ln for ln in log if ln.startswith("cuda ")), "no CUDA device")
    lines = [f"## {head[1][:10]}: {gpu}", "", f"`bash benchmarks/gpu_suite.sh` at commit {head[3]}.", ""]
    lines += [f"- {ln}" for ln in log if ln.split(" ")[0] in ("torch", "transformers", "trl", "triton")]
    lines.append("")

    def result(name: str) -> dict | None:
        p = parts.get(name)
        if p is None:
            return None
        r = p["result"]
        if p["timed_out"] and r and r.get("complete") is False:  # cut, but its JSON line so far has figures
            lines.append(f"**{name}**: cut by its timeout after {p['seconds']} s; the figures it had reached:\n")
            return r
        if p["rc"] != 0 or not r or "last_line" in r:
            lines.append(f"**{name}**: rc={p['rc']} after {p['seconds']} s; {json.dumps(r)[:300]}\n")
            return None
        return r

    if r := result("moe_layer"):
        g = r["results"]["grouped"]
        lines += [
            f"**MoE layer** (fwd + bwd, {r['tokens']} tokens, D={r['d_model']}, F={r['d_ff']}, E={r['experts']}, "
            f"top-{r['top_k']}, {r['dtype']}): grouped GEMM {g['tflops']:.1f} TFLOP/s ({g['tokens_per_s']:,.0f} "
            f"tok/s), {r['speedup_vs_loop']:.1f}x the loop over experts; goal {MOE_LAYER_TFLOPS:.0f} TFLOP/s: "
            f"{verdict(g['tflops'], MOE_LAYER_TFLOPS)}.",
            "",
        ]
    for name in ("train_step", "train_step_compiled"):
        if r := result(name):
            lines += [
                f"**Training step** ({name}; seq {r['seq_len']} x batch {r['batch_size']}, peak "
                f"{r['peak_tflops']} TFLOP/s):",
                "",
                "| model | impl | precision | tokens/s | MFU | peak memory (GiB) |",
                "|---|---|---|---|---|---|",
            ]
            for row in r["results"]:
                if "error" in row:
                    lines.append(f"| {row['model']} | {row['impl']} | {row['precision']} | {row['error'][:80]} | | |")
                    continue
                mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "-"
                lines.append(
                    f"| {row['model']} | {row['impl']} | {row['precision']} | {row['tokens_per_s']:,.0f} | {mfu} "
                    f"| {row.get('peak_mem_gb')} |"
                )
            mfus = [x["mfu"] for x in r["results"] if x.get("model") == "moe-1b" and x.get("mfu") is not None]
            lines += ["", f"moe-1b MFU goal {100 * MOE_1B_MFU:.0f}%: {verdict(max(mfus, default=None), MOE_1B_MFU)}."]
            # Issue 3: peak memory no more than transformers' on the Qwen3-MoE shape and batch.
            mem = {
                (x["impl"], x["precision"]): x.get("peak_mem_gb")
                for x in r["results"]
                if x.get("model") == "qwen3-moe-1.3b" and "error" not in x
            }
            for (impl, precision), ours in mem.items():
                theirs = mem.get(("transformers", precision))
                if impl == "nanoseek" and ours is not None and theirs is not None:
                    ok = "meets the goal" if ours <= theirs else f"misses: {ours / theirs:.2f}x theirs"
                    lines.append(f"Peak memory, Qwen3-MoE shape, {precision}: {ours} vs {theirs} GiB: {ok}.")
            for row in r["results"]:  # train_step.py --profile: where one step's time went
                if prof := row.get("profile"):
                    busy = f", kernels fill {100 * prof['device_busy']:.0f}% of a step" if "device_busy" in prof else ""
                    top = "; ".join(f"{e['name'][:60]} {100 * e['share']:.0f}%" for e in prof["top"][:5])
                    lines.append(f"Profile, {row['model']} {row['impl']} {row['precision']}{busy}: {top}.")
            lines.append("")
    for name in ("generate_small", "generate_small_moe"):
        if r := result(name):
            by: dict[str, dict[int, float]] = {}
            for row in r["results"]:
                by.setdefault(row["impl"], {})[row["batch"]] = row["tokens_per_s"]
            batches = r["batch_sizes"]
            lines += [
                f"**Generation** ({r['preset']}, {r['prompt_len']} + {r['new_tokens']} tokens, output tokens/s):",
                "",
                "| impl | " + " | ".join(f"batch {b}" for b in batches) + " |",
                "|---|" + "---|" * len(batches),
            ]
            for impl, d in by.items():
                lines.append(f"| {impl} | " + " | ".join(f"{d.get(b, float('nan')):,.0f}" for b in batches) + " |")
            ours = by.get("nanoseek", {})
            if name == "generate_small":
                lines += [
                    "",
                    f"Goals: batch 128 >= {GEN_B128:,.0f}: {verdict(ours.get(128), GEN_B128)}; "
                    f"batch 1 >= {GEN_B1:,.0f}: {verdict(ours.get(1), GEN_B1)}.",
                ]
            lines.append("")
    if r := result("rl_step"):
        n, t = r["nanoseek"], r.get("trl", {})
        line = (
            f"**RL step** ({r['preset']}, {r['prompts']} prompts x {r['samples']} samples, {r['max_new_tokens']} "
            f"tokens): nanoseek {n['seconds_per_step']:.2f} s/step, {n['completion_tokens_per_s']:,.0f} "
            "completion tok/s"
        )
        if "completion_tokens_per_s" in t:
            ratio = n["completion_tokens_per_s"] / t["completion_tokens_per_s"]
            line += (
                f"; TRL {t.get('version', '')} {t['seconds_per_step']:.2f} s/step, "
                f"{t['completion_tokens_per_s']:,.0f} tok/s -> {ratio:.1f}x; goal {RL_VS_TRL:.0f}x: "
                f"{verdict(ratio, RL_VS_TRL)}."
            )
        else:
            line += f"; TRL not measured ({t.get('skipped', '?')})."
        lines += [line, ""]
    for name in ("serve", "serve_gil", "serve_interval"):
        if not (r := result(name)):
            continue
        lines += [
            f"**Serving** ({name}: {r['preset']}, {r['new_tokens']} new tokens per streamed request, GIL switch "
            f"interval {r.get('switch_interval_ms', 5):g} ms, stream interval {r.get('stream_interval', 1)}):",
            "",
            "| clients | tokens/s over HTTP | engine alone | TTFT p50 (ms) | inter-token p50 (ms) "
            "| server CPU/token (ms) |",
            "|---|---|---|---|---|---|",
        ]
        for run in r["runs"]:  # "after": the server at this checkout (serve.py's --before adds "before")
            a = run["after"]
            lines.append(
                f"| {run['clients']} | {a['tokens_per_s']:,.0f} | {run['engine_batch_tokens_per_s']:,.0f} "
                f"| {a['ttft_p50_ms']:.0f} | {a['itl_p50_ms']:.1f} | {a['cpu_ms_per_token']:.3f} |"
            )
        lines.append("")
    if r := result("cuda_tests"):
        lines += [f"CUDA tests: {json.dumps(r)[:200]}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(section(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_out")))
