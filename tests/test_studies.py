"""The studies: their arithmetic against closed forms, REINFORCE's settings against the unclipped loss written
out, and each study's --quick mode end to end through the CLI (a rerun trains nothing)."""

from __future__ import annotations

import json
import math
import shutil
import statistics

import pytest
import torch

from nanoseek.cli import main
from nanoseek.config import RunConfig
from nanoseek.config_toml import apply_override
from nanoseek.model import Transformer
from nanoseek.model.config import get_preset
from nanoseek.studies import common, moe_vs_dense, r1_zero, rl_ablation
from nanoseek.train import grpo

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- arithmetic
def test_flops_to_reach_interpolates_between_the_evaluations_around_the_target():
    curve = [(10, 100.0, 3.0), (20, 200.0, 2.0), (30, 300.0, 1.0)]
    # 2.5 lies halfway from 3.0 (100 FLOPs) to 2.0 (200): 150.
    assert moe_vs_dense.flops_to_reach(curve, 2.5) == pytest.approx(150.0)
    assert moe_vs_dense.flops_to_reach(curve, 1.0) == pytest.approx(300.0)
    assert moe_vs_dense.flops_to_reach(curve, 5.0) == 100.0  # reached at the first evaluation
    assert moe_vs_dense.flops_to_reach(curve, 0.5) is None


def test_reach_fractions_pair_runs_by_seed():
    dense = [
        dict(seed=0, final_val_loss=2.0, val=[(1, 50.0, 3.0), (2, 100.0, 2.0)]),
        dict(seed=1, final_val_loss=1.5, val=[(1, 50.0, 3.0), (2, 100.0, 1.5)]),
    ]
    moe = [
        dict(seed=1, val=[(1, 40.0, 2.0), (2, 80.0, 1.0)]),  # reaches 1.5 halfway: 60 of dense's 100
        dict(seed=0, val=[(1, 40.0, 2.5), (2, 80.0, 2.1)]),  # never reaches 2.0
    ]
    assert moe_vs_dense.reach_fractions(dense, moe)["fractions"] == {1: pytest.approx(0.6), 0: None}


def test_significance_is_the_difference_beyond_two_standard_errors():
    a, b = [0.50, 0.54, 0.52], [0.40, 0.43, 0.41]
    diff, se, sig = common.significant(a, b)
    reference_se = math.sqrt(statistics.variance(a) / 3 + statistics.variance(b) / 3)
    assert diff == pytest.approx(statistics.mean(a) - statistics.mean(b))
    assert se == pytest.approx(reference_se) and sig == (abs(diff) > 2 * reference_se) and sig
    assert not common.significant([0.5, 0.6, 0.4], [0.45, 0.55, 0.5])[2]
    assert not common.significant([0.9], [0.1])[2]  # no spread to judge by
    assert rl_ablation.versus([0.9], [0.1, 0.2], False) == "+0.8 (one seed: no error)"
    assert rl_ablation.versus(a, b, False) == f"{diff:+.1f} ± {reference_se:.1f} (significant)"
    # Paired by seed: only the seeds both have; the differences' spread, not the two means'.
    diffs = [0.50 - 0.40, 0.54 - 0.43]  # seeds 0 and 1; seed 2 only on one side
    pd, pse, psig, n = common.paired({0: 0.50, 1: 0.54, 2: 0.52}, {1: 0.43, 0: 0.40, 5: 0.1})
    assert n == 2 and pd == pytest.approx(statistics.mean(diffs))
    assert pse == pytest.approx(statistics.stdev(diffs) / math.sqrt(2)) and psig == (abs(pd) > 2 * pse)
    matched = common.paired(dict(enumerate([0.50, 0.54, 0.52])), dict(enumerate([0.41, 0.44, 0.42])))
    assert matched[1] < reference_se and matched[2]  # the seeds' shared part cancels: a tighter error
    assert rl_ablation.versus_paired({0: 0.9}, {0: 0.1}, False) == "+0.8 (one seed: no error)"
    assert common.mean_sd_text([2.0, 4.0]) == f"3.0 ± {statistics.stdev([2.0, 4.0]):.1f}"
    assert common.mean_sd_text([2.0]) == "2.0"  # one seed: its spread is unknown, not 0


def test_pointwise_mean_sd_matches_curves_by_step_not_by_position():
    # Seed b has no point at step 2 (say, no trained sample there): step 3 must not be averaged with step 2.
    a, b = [(1, 1.0), (2, 3.0), (3, 5.0)], [(1, 2.0), (3, 7.0)]
    xs, stats = common.pointwise_mean_sd([a, b])
    assert xs == [1, 2, 3]
    assert [m for m, _ in stats] == [pytest.approx(1.5), 3.0, pytest.approx(6.0)]
    assert [sd for _, sd in stats] == [pytest.approx(statistics.stdev([1.0, 2.0])), 0.0, pytest.approx(math.sqrt(2))]


def test_level_averages_each_seeds_ends_over_the_seeds_that_have_points():
    a = [(s, float(s)) for s in range(1, 13)]  # last 10: 3..12, mean 7.5; first 10: 1..10, mean 5.5
    b = [(1, 1.0), (2, 3.0)]
    assert common.level([dict(x=a), dict(x=b)], "x", "{:.2f}") == f"{(7.5 + 2.0) / 2:.2f}"
    assert common.level([dict(x=a), dict(x=b)], "x", "{:.2f}", first=True) == f"{(5.5 + 2.0) / 2:.2f}"
    assert common.level([dict(x=a), dict(x=[])], "x", "{:.2f}") == "7.50"  # no point: not a zero
    assert common.level([dict(x=[])], "x", "{:.2f}") == "-"


def test_pass1_on_the_sample_grid_interpolates_between_evaluations_and_ends_at_the_budget():
    # Evaluations before RL, after step 2 (300 completions) and after step 4, which overshot the 400 budget.
    curve = {"samples": [(1, 100), (2, 300), (3, 420), (4, 520)], "pass@1": [(0, 0.2), (2, 0.5), (4, 0.6)]}
    grid = rl_ablation.on_sample_grid(curve, 400, points=4)
    # x in thousands: 0, 100, 200, 300, 400 completions; 100 and 200 on the line from (0, 0.2) to (300, 0.5).
    assert [x for x, _ in grid] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert [y for _, y in grid] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6])


def test_moe_models_match_the_dense_model_in_active_width_and_the_wide_one_in_total_size():
    scale = moe_vs_dense.TINY
    models = moe_vs_dense.models(scale)
    for name in ("moe", *moe_vs_dense.ABLATIONS):
        m = models[name]
        assert m["top_k"] * m["moe_d_ff"] + m["n_shared_experts"] * m["moe_d_ff"] == scale.shape["d_ff"], name
    build = lambda name: Transformer(get_preset("tiny", **{**scale.shape, **models[name]}))
    dense, moe, wide = build("dense"), build("moe"), build("dense-wide")
    routers = sum(m.router.weight.numel() for m in moe.modules() if hasattr(m, "router"))
    assert moe.num_active_params() - routers == dense.num_params()
    assert moe.num_params() - routers == wide.num_params()


# ----------------------------------------------------------------------------- REINFORCE as settings
def _settings(method: str) -> RunConfig:
    cfg = RunConfig()
    for item in rl_ablation.METHODS[method]:
        apply_override(cfg, item)
    return cfg


def test_reinforce_settings_give_the_unclipped_importance_weighted_loss():
    torch.manual_seed(0)
    n, t = 4, 5
    logp = torch.randn(n, t, dtype=torch.float64, requires_grad=True)
    old = (logp.detach() + 2.0 * torch.randn(n, t, dtype=torch.float64)).clamp(max=0.0)  # ratios far from 1
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    mask = torch.ones(n, t, dtype=torch.float64)
    norm = grpo.AggregationNorm(total_tokens=n * t, n_sequences=n, max_new_tokens=t)

    def loss_of(method: str) -> torch.Tensor:
        r = _settings(method).rl
        kw = dict(epsilon_low=r.epsilon_low, epsilon_high=r.epsilon_high, loss_agg=r.loss_agg)
        return grpo.policy_loss(logp, old, adv, mask, norm, **kw).loss

    # REINFORCE written out: -(1/n) sum_i A_i sum_t ratio_it, over max_new_tokens (the dr-grpo constant).
    naive = sum(-adv[i] * torch.exp(logp[i, j] - old[i, j]) for i in range(n) for j in range(t)) / (n * t)
    assert loss_of("reinforce").item() == pytest.approx(naive.item(), rel=1e-12)
    (grad,) = torch.autograd.grad(loss_of("reinforce"), logp)
    (naive_grad,) = torch.autograd.grad(naive, logp)
    assert torch.allclose(grad, naive_grad)
    assert loss_of("dr_grpo").item() != pytest.approx(naive.item())  # the same but clipped: it differs here
    assert _settings("reinforce").rl.scale_rewards == "none"  # the group mean alone as the baseline


# ----------------------------------------------------------------------------- the studies end to end
def _forbid_training(monkeypatch, module) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    for name in ("pretrain", "rl"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, fail)


def test_moe_vs_dense_quick_end_to_end_and_rerun_skips(tmp_path, capsys, monkeypatch):
    out = tmp_path / "moe"
    assert main(["study", "moe-vs-dense", "--quick", "--quiet", "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert capsys.readouterr().out.strip() == table.strip()
    results = json.loads((out / "results.json").read_text())
    scale = moe_vs_dense.QUICK
    runs = {(r["model"], r["lr_mult"], r["seed"]) for r in results["runs"]}
    for model in moe_vs_dense.MAIN:
        best = results["best_lr"][model]
        assert {(model, m, 0) for m in scale.lr_multipliers} | {(model, best, s) for s in scale.seeds} <= runs
        assert f"| {model} |" in table
    for name in moe_vs_dense.ABLATIONS:
        assert (name, results["best_lr"]["moe"], 0) in runs and f"| {name} |" in table
    # The best lr is the sweep's lowest final validation loss (seed 0).
    for model in moe_vs_dense.MAIN:
        sweep = [r for r in results["runs"] if r["model"] == model and r["seed"] == 0]
        assert results["best_lr"][model] == min(sweep, key=lambda r: r["final_val_loss"])["lr_mult"]
    # FLOPs are the model's own accounting times the tokens seen, and the final point is the summary's loss.
    for r in results["runs"]:
        run_dir = out / "runs" / moe_vs_dense.run_name(r["model"], r["lr_mult"], r["seed"])
        summary = json.loads((run_dir / "summary.json").read_text())
        step, flops, loss = r["val"][-1]
        assert (step, loss) == (scale.steps, pytest.approx(summary["val_loss"]))
        assert flops == r["flops_per_token"] * summary["tokens"]
    assert set(results["headline"]) == {"moe vs dense", "moe vs dense-wide"}
    for png in ("val_loss_vs_flops", "lr_sweep", "ablations", "router_balance"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 0 and f"(plots/{png}.png)" in table
    _forbid_training(monkeypatch, moe_vs_dense)
    assert main(["study", "moe-vs-dense", "--quick", "--quiet", "--out", str(out)]) == 0
    assert (out / "table.md").read_text() == table
    # Another budget in the same directory is refused in one line.
    assert main(["study", "moe-vs-dense", "--quick", "--steps", "3", "--out", str(out)]) == 2
    assert "holds a study of another scale (steps differ)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def rl_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies") / "rl"
    assert main(["study", "rl-ablation", "--quick", "--quiet", "--out", str(out)]) == 0
    return out


def test_rl_ablation_quick_end_to_end_and_rerun_skips(rl_study, monkeypatch):
    table = (rl_study / "table.md").read_text()
    for method in rl_ablation.METHODS:
        assert f"| {method} |" in table
        for seed in rl_ablation.RL_QUICK.seeds:
            run_dir = rl_study / "runs" / f"{method}-s{seed}"
            config = (run_dir / "config.toml").read_text()
            assert "num_iterations = 2" in config and f"seed = {seed}" in config
            summary = json.loads((run_dir / "summary.json").read_text())
            curves = common.rl_curves(run_dir)
            # Every run stops at the budget in samples: the others after their 2 steps, DAPO (whose dynamic sampling
            # generates more per step) at the first step that reaches it.
            budget, totals = rl_ablation.RL_QUICK.samples, [t for _, t in curves["samples"]]
            assert summary["finished"] and totals[-1] >= budget and all(t < budget for t in totals[:-1])
            assert summary["steps"] == (len(totals) if method == "dapo" else 2)
            # pass@1 before RL, at every eval_every step and after the last: the summary's figures.
            assert [s for s, _ in curves["pass@1"]] == list(range(summary["steps"] + 1))
            assert (
                curves["pass@1"][0][1] == summary["before"]["all"]
                and curves["pass@1"][-1][1] == summary["after"]["all"]
            )
    results = json.loads((rl_study / "results.json").read_text())
    grpo_samples = results["curves"]["grpo"][0]["samples"][-1][1]
    assert grpo_samples == results["samples_budget"] == 2 * 2 * 2
    assert results["curves"]["dapo"][0]["samples"][-1][1] >= grpo_samples
    for png in ("pass1_by_samples", "entropy", "length"):
        assert (rl_study / "plots" / f"{png}.png").exists()
    _forbid_training(monkeypatch, rl_ablation)
    assert rl_ablation.run_study(rl_study, quick=True, quiet=True).read_text() == table


def test_rl_ablation_report_counts_only_finished_runs(rl_study, tmp_path):
    # A run without its summary (interrupted) has no final evaluation yet: the report leaves it out.
    out = tmp_path / "rl"
    shutil.copytree(rl_study, out)
    (out / "runs" / "dapo-s1" / "summary.json").unlink()
    table = rl_ablation.report(out, rl_ablation.RL_QUICK).read_text()
    cells = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    rows = {row[0]: row for row in cells}
    assert rows["dapo"][1] == "1" and rows["grpo"][1] == str(len(rl_ablation.RL_QUICK.seeds))
    results = json.loads((out / "results.json").read_text())
    assert len(results["curves"]["dapo"]) == 1 and len(results["curves"]["grpo"]) == 2


def test_r1_zero_quick_from_the_pretrained_and_the_sft_model(rl_study, tmp_path):
    out = tmp_path / "r1"
    assert main(["study", "r1-zero", "--quick", "--quiet", "--out", str(out), "--base", str(rl_study / "base")]) == 0
    table = (out / "table.md").read_text()
    for start in r1_zero.STARTS:
        assert f"| {start} |" in table
        config = (out / "runs" / f"{start}-s0" / "config.toml").read_text()
        assert 'rewards = "task=1,format=0.2"' in config
        assert common.rl_curves(out / "runs" / f"{start}-s0")["format"]  # the format reward is logged
    assert (out / "plots" / "length.png").exists()


def test_study_cli_refuses_a_base_that_is_not_there(tmp_path, capsys):
    assert main(["study", "r1-zero", "--quick", "--out", str(tmp_path / "x"), "--base", str(tmp_path)]) == 2
    assert "pretrain: no such run directory (--base)" in capsys.readouterr().err


def test_study_refuses_a_base_whose_sft_run_is_unfinished(rl_study, tmp_path, capsys):
    # An unfinished run directory loads as its latest checkpoint: the study must not start from it.
    base = tmp_path / "base"
    shutil.copytree(rl_study / "base", base)
    (base / "sft" / "summary.json").unlink()
    assert main(["study", "rl-ablation", "--quick", "--out", str(tmp_path / "x"), "--base", str(base)]) == 2
    assert f"{base / 'sft'}: an unfinished run (no summary.json)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
