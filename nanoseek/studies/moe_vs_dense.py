"""MoE vs dense at equal compute: does a DeepSeekMoE-style model reach a dense model's validation loss for a
fraction of its training FLOPs?

    nanoseek study moe-vs-dense                                  # tiny scale, CPU: 20-26 runs of 307k tokens
    nanoseek study moe-vs-dense --out runs/studies/moe-vs-dense  # (the default OUT); a rerun skips finished runs
    nanoseek study moe-vs-dense --quick --out /tmp/moe           # seconds: every step of the study, toy sizes

Every run is `nanoseek pretrain` (`train.stages.pretrain`) on the built-in task corpus, with one shared
tokenizer, the same tokens per run and the same optimizer (Muon + AdamW, cosine schedule); a seed fixes
the data and the initialisation, so the models of one seed see the same documents in the same order.
Training FLOPs are the models' own accounting (`Transformer.flops_per_token`) times the tokens seen.

The runs, in order (each phase rewrites OUT/table.md, so an unfinished study still reports what it has):
1. a learning-rate sweep (x0.5, x1, x2 of both peak lrs) of `dense` and `moe` (equal active parameters), seed 0;
2. seeds 1 and 2 of both at their best lr;
3. ablations of `moe` at its best lr, seed 0: no shared expert, coarse experts, the auxiliary loss instead of
   aux-loss-free balancing, a 10x faster balancing rate, and no balancing at all;
4. `dense-wide` (the dense model with the MoE's total parameters): its sweep and seeds.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.config import RunConfig
from nanoseek.loading import latest_checkpoint
from nanoseek.model import ModelConfig, Transformer
from nanoseek.plots import figure, read_metrics
from nanoseek.studies.common import claim_directory, markdown_table, mean_sd, run_once, significant, write_json
from nanoseek.tasks.corpus import pretrain_texts
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.stages import pretrain


@dataclass(frozen=True)
class Scale:
    """The sizes of one study: the dense model's shape and the training budget of every run."""

    name: str
    shape: dict[str, int]
    """d_model, n_layers, n_heads, n_kv_heads, d_ff of the dense model; a fine expert is d_ff / 4 wide."""
    steps: int
    batch_size: int
    seq_len: int
    eval_every: int
    eval_batches: int
    examples: int
    """Documents of the built-in task corpus generated per seed (more than the run reads)."""
    vocab_size: int
    lr_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep_extensions: int = 2
    """How many times a sweep whose best lr is at an end of the grid is extended by one more 2x step."""
    base_lr: dict[str, float] = field(default_factory=lambda: {"lr": 3e-3, "muon_lr": 0.02})
    """The pretraining defaults (TrainConfig) the multipliers scale."""

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len


TINY = Scale(
    name="tiny",
    shape=dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384),
    steps=150,
    batch_size=16,
    seq_len=128,
    eval_every=10,
    eval_batches=4,
    examples=20000,
    vocab_size=512,
)
QUICK = Scale(
    name="quick",
    shape=dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64),
    steps=4,
    batch_size=2,
    seq_len=32,
    eval_every=2,
    eval_batches=1,
    examples=100,
    vocab_size=300,
    lr_multipliers=(0.5, 1.0),
    seeds=(0, 1),
    sweep_extensions=1,
)

MAIN = ("dense", "moe", "dense-wide")
PAIRS = (("moe", "dense", "equal active parameters"), ("moe", "dense-wide", "equal total parameters"))
"""(challenger, reference, how they are matched): the headline comparisons."""
ABLATIONS = ("moe-no-shared", "moe-coarse", "moe-aux-loss", "moe-fast-balancing", "moe-unbalanced")


def models(scale: Scale) -> dict[str, dict[str, Any]]:
    """Model name -> its ModelConfig fields beyond the dense shape. Every MoE model has the dense model's
    active FFN width (4 fine experts' worth, d_ff) in every layer; DeepSeek-V3's sigmoid router and
    aux-loss-free balancing unless the name says otherwise."""
    d_ff = scale.shape["d_ff"]
    fine = d_ff // 4
    moe = dict(n_routed_experts=16, n_shared_experts=1, moe_d_ff=fine, top_k=3, score_func="sigmoid", first_k_dense=0)
    return {
        "dense": {},
        "moe": moe,  # 1 shared + 3 of 16 routed: active 4 x fine = d_ff, total 17 x fine
        "dense-wide": dict(d_ff=17 * fine),  # the MoE's total parameters (but for its routers), all active
        "moe-no-shared": moe | dict(n_shared_experts=0, top_k=4),  # 4 of 16 routed
        "moe-coarse": moe | dict(n_routed_experts=4, n_shared_experts=0, moe_d_ff=d_ff, top_k=1),  # = no-shared's
        "moe-aux-loss": moe | dict(bias_update_rate=0.0, aux_loss_coef=0.01),  # DeepSeekMoE's expert-level factor
        # DeepSeek-V3's rate (1e-3) moves a bias by at most 0.15 in 150 steps: ten times faster.
        "moe-fast-balancing": moe | dict(bias_update_rate=1e-2),
        "moe-unbalanced": moe | dict(bias_update_rate=0.0),
    }


def run_config(scale: Scale, model: dict[str, Any], lr_mult: float, seed: int) -> RunConfig:
    cfg = RunConfig(preset="tiny", model={**scale.shape, **model})
    t = cfg.train
    t.steps, t.batch_size, t.seq_len, t.seed = scale.steps, scale.batch_size, scale.seq_len, seed
    t.lr, t.muon_lr = scale.base_lr["lr"] * lr_mult, scale.base_lr["muon_lr"] * lr_mult
    t.warmup_steps = max(1, scale.steps // 15)
    t.eval_every, t.eval_batches = scale.eval_every, scale.eval_batches
    t.checkpoint_every, t.keep_checkpoints, t.log_every, t.print_every = 50, 1, 5, 0
    cfg.data.builtin_examples, cfg.data.vocab_size = scale.examples, scale.vocab_size
    cfg.check()
    return cfg


def run_name(model: str, lr_mult: float, seed: int) -> str:
    return f"{model}-lr{lr_mult:g}-s{seed}"


class Study:
    """OUT/runs/NAME (one pretraining run each), OUT/tokenizer (shared), OUT/results.json, table.md, plots/."""

    def __init__(self, out: Path, scale: Scale, quiet: bool) -> None:
        self.out, self.scale, self.quiet = out, scale, quiet
        self.models = models(scale)
        path = out / "tokenizer"
        if not (path / "tokenizer.json").exists():
            Tokenizer.train(pretrain_texts(scale.examples, seed=0), scale.vocab_size).save(path)

    def train(self, model: str, lr_mult: float, seed: int) -> None:
        run_dir = self.out / "runs" / run_name(model, lr_mult, seed)
        if not (run_dir / "tokenizer" / "tokenizer.json").exists():
            shutil.copytree(self.out / "tokenizer", run_dir / "tokenizer", dirs_exist_ok=True)
        run_once(pretrain, run_config(self.scale, self.models[model], lr_mult, seed), run_dir, quiet=self.quiet)

    def result(self, model: str, lr_mult: float, seed: int) -> dict[str, Any] | None:
        """A finished run's curves: validation loss against training FLOPs, worst-layer router max-violation."""
        run_dir = self.out / "runs" / run_name(model, lr_mult, seed)
        if not (run_dir / "summary.json").exists():
            return None
        # The model as the run built it (its checkpoint's config), on the meta device: no weights are needed.
        with torch.device("meta"):
            net = Transformer(ModelConfig.load(latest_checkpoint(run_dir) / "config.json"))
        per_token = net.flops_per_token(self.scale.seq_len)
        tokens_per_step = self.scale.batch_size * self.scale.seq_len
        records = read_metrics(run_dir)
        val = [(r["step"], r["step"] * tokens_per_step * per_token, r["val_loss"]) for r in records if "val_loss" in r]
        balance = [(r["step"], max(r["max_violation"])) for r in records if r.get("max_violation")]
        return dict(
            model=model,
            lr_mult=lr_mult,
            seed=seed,
            params=net.num_params(),
            active_params=net.num_active_params(),
            flops_per_token=per_token,
            tokens=self.scale.tokens,
            final_val_loss=val[-1][2],
            val=val,
            max_violation=balance,
        )

    def multipliers(self, model: str) -> list[float]:
        """The sweep of a model: the scale's lr multipliers and any it was extended by (`sweep`), ascending."""
        extended = {float(d.name[len(model) + 3 : -3]) for d in (self.out / "runs").glob(f"{model}-lr*-s0")}
        return sorted(set(self.scale.lr_multipliers) | extended)

    def best_lr(self, model: str) -> float | None:
        """The multiplier with the lowest final validation loss on seed 0 (None until the sweep is done)."""
        done = [r for m in self.multipliers(model) if (r := self.result(model, m, 0)) is not None]
        if len(done) < len(self.multipliers(model)):
            return None
        return min(done, key=lambda r: r["final_val_loss"])["lr_mult"]

    def sweep(self, model: str) -> None:
        """Seed 0 at each lr multiplier; while the best is at an end of the sweep, one more step of 2x beyond
        it (at most scale.sweep_extensions times): a model is compared at an lr that is not cut off by the grid."""
        for m in self.multipliers(model):
            self.train(model, m, 0)
        while len(self.multipliers(model)) - len(self.scale.lr_multipliers) < self.scale.sweep_extensions:
            best, mults = self.best_lr(model), self.multipliers(model)
            if best not in (mults[0], mults[-1]):
                return
            self.train(model, best * 2 if best == mults[-1] else best / 2, 0)

    def run(self) -> Path:
        s = self.scale
        phases: list[tuple[tuple[str, ...], str]] = [
            (("dense", "moe"), "sweep"),
            (("dense", "moe"), "seeds"),
            (ABLATIONS, "ablations"),
            (("dense-wide",), "sweep"),
            (("dense-wide",), "seeds"),
        ]
        for names, phase in phases:
            for name in names:
                if phase == "sweep":
                    self.sweep(name)
                elif phase == "seeds":
                    for seed in s.seeds[1:]:
                        self.train(name, self.best_lr(name), seed)
                else:
                    self.train(name, self.best_lr("moe"), 0)
            table = self.report()
        return table

    # ------------------------------------------------------------------------- the report
    def report(self) -> Path:
        s = self.scale
        sweep = {
            name: {m: r for m in self.multipliers(name) if (r := self.result(name, m, 0)) is not None} for name in MAIN
        }
        best = {name: self.best_lr(name) for name in MAIN}
        seeds = {
            name: [r for seed in s.seeds if best[name] is not None and (r := self.result(name, best[name], seed))]
            for name in MAIN
        }
        ablations = {name: r for name in ABLATIONS if best["moe"] and (r := self.result(name, best["moe"], 0))}
        headline = {f"{a} vs {b}": reach_fractions(seeds[b], seeds[a]) for a, b, _ in PAIRS}
        write_json(
            self.out / "results.json",
            dict(
                scale=s.name,
                tokens_per_run=s.tokens,
                best_lr=best,
                headline=headline,
                runs=[r for rs in sweep.values() for r in rs.values()]
                + [r for rs in seeds.values() for r in rs if r["seed"] != 0]
                + list(ablations.values()),
            ),
        )
        plots = self.plot(sweep, seeds, ablations)
        lines = self.table(sweep, best, seeds, ablations, headline)
        lines += ["", "## Plots", "", *(f"![{p.stem}](plots/{p.name})" for p in plots), ""]
        table = self.out / "table.md"
        table.write_text("\n".join(lines))
        return table

    def table(
        self,
        sweep: dict[str, dict[float, dict]],
        best: dict[str, float | None],
        seeds: dict[str, list[dict]],
        ablations: dict[str, dict],
        headline: dict[str, dict],
    ) -> list[str]:
        s = self.scale
        lines = [
            f"# MoE vs dense at equal compute (scale `{s.name}`)",
            "",
            f"Each run: {s.steps} steps x {s.batch_size} rows x {s.seq_len} tokens = {s.tokens:,} tokens of the "
            f"built-in task corpus; d_model {s.shape['d_model']}, {s.shape['n_layers']} layers, dense d_ff "
            f"{s.shape['d_ff']}; Muon + AdamW, cosine schedule. Validation loss (nats/token) on "
            f"{s.eval_batches} held-out batches every {s.eval_every} steps.",
            "",
            "## Learning-rate sweep (seed 0): final validation loss",
            "",
        ]
        grid = sorted({m for runs in sweep.values() for m in runs})
        header = ["model", *(f"lr x{m:g}" for m in grid), "best"]
        rows = []
        for name in MAIN:
            losses = [f"{sweep[name][m]['final_val_loss']:.4f}" if m in sweep[name] else "-" for m in grid]
            rows.append([name, *losses, f"x{best[name]:g}" if best[name] else "-"])
        lines += markdown_table(header, rows)
        lines += ["", f"## Each model at its best lr, seeds {', '.join(map(str, s.seeds))}", ""]
        header = ["model", "total params", "active params", "FLOPs/token", "final val loss (mean ± sd)"]
        rows = []
        for name in MAIN:
            if runs := seeds[name]:
                loss = mean_sd([r["final_val_loss"] for r in runs])
                rows.append(
                    [
                        name,
                        f"{runs[0]['params'] / 1e6:.2f}M",
                        f"{runs[0]['active_params'] / 1e6:.2f}M",
                        f"{runs[0]['flops_per_token'] / 1e6:.2f}M",
                        f"{loss[0]:.4f} ± {loss[1]:.4f} (n={len(runs)})",
                    ]
                )
        lines += markdown_table(header, rows)
        lines += [
            "",
            "## Headline: the compute at which MoE reaches the reference's final loss",
            "",
            "The training FLOPs at which the MoE model's validation loss first reaches the reference model's final "
            "one (same seed; interpolated between evaluations), as a fraction of the reference's training FLOPs: "
            "mean ± sd over the seeds where it got there (goal at equal active parameters: at most 0.6). "
            "Loss difference: MoE minus reference, ± its standard error; significant beyond two.",
            "",
        ]
        header = ["MoE vs", "matched on", "fraction of the reference's FLOPs", "final loss difference"]
        rows = []
        for a, b, matched in PAIRS:
            if seeds[a] and seeds[b]:
                diff, se, sig = significant(
                    [r["final_val_loss"] for r in seeds[a]], [r["final_val_loss"] for r in seeds[b]]
                )
                verdict = "significant" if sig else "within noise"
                rows.append(
                    [b, matched, format_fraction(headline[f"{a} vs {b}"]), f"{diff:+.4f} ± {se:.4f} ({verdict})"]
                )
        lines += markdown_table(header, rows)
        if ablations:
            ref = self.result("moe", best["moe"], 0)
            noise = mean_sd([r["final_val_loss"] for r in seeds["moe"]])[1]
            lines += [
                "",
                f"## MoE ablations (seed 0, lr x{best['moe']:g})",
                "",
                f"Difference from `moe` on the same seed; the seed-to-seed sd of `moe` is {noise:.4f}. "
                "Max-violation: the worst layer's max load / mean load - 1 (final / mean over training).",
                "",
            ]
            header = [
                "variant",
                "routed x width, top-k, shared",
                "total params",
                "final val loss",
                "vs moe",
                "max-viol.",
            ]
            rows = []
            for name, r in {"moe": ref, **ablations}.items():
                m = self.models[name]
                mv = [v for _, v in r["max_violation"]]
                rows.append(
                    [
                        name,
                        f"{m['n_routed_experts']} x {m['moe_d_ff']}, top-{m['top_k']}, {m['n_shared_experts']}",
                        f"{r['params'] / 1e6:.2f}M",
                        f"{r['final_val_loss']:.4f}",
                        f"{r['final_val_loss'] - ref['final_val_loss']:+.4f}",
                        f"{mv[-1]:.2f} / {sum(mv) / len(mv):.2f}" if mv else "-",
                    ]
                )
            lines += markdown_table(header, rows)
        return lines

    def plot(self, sweep: dict[str, dict[float, dict]], seeds: dict[str, list[dict]], ablations: dict) -> list[Path]:
        plots = self.out / "plots"
        out = []
        if any(seeds.values()):
            with figure(plots / "val_loss_vs_flops.png") as ax:
                for name, runs in seeds.items():
                    for i, r in enumerate(runs):
                        xs, ys = [v[1] for v in r["val"]], [v[2] for v in r["val"]]
                        label = f"{name} (lr x{r['lr_mult']:g}, {len(runs)} seeds)" if i == 0 else None
                        ax.plot(xs, ys, color=_COLOURS[name], alpha=0.8, linewidth=1, label=label)
                ax.set_xlabel("training FLOPs")
                ax.set_ylabel("validation loss (nats/token)")
                ax.set_yscale("log")
                ax.set_title("validation loss vs training compute", fontsize=10)
            out.append(plots / "val_loss_vs_flops.png")
        if any(sweep.values()):
            with figure(plots / "lr_sweep.png") as ax:
                for name, runs in sweep.items():
                    if runs:
                        ax.plot(list(runs), [r["final_val_loss"] for r in runs.values()], "o-", label=name)
                ax.set_xscale("log", base=2)
                ax.set_xlabel("learning-rate multiplier (Muon 0.02, AdamW 3e-3 at x1)")
                ax.set_ylabel("final validation loss")
                ax.set_title("learning-rate sweep, seed 0", fontsize=10)
            out.append(plots / "lr_sweep.png")
        if ablations:
            ref = next(r for r in seeds["moe"] if r["seed"] == 0)
            with figure(plots / "ablations.png") as ax:
                for name, r in {"moe": ref, **ablations}.items():
                    ax.plot([v[1] for v in r["val"]], [v[2] for v in r["val"]], label=name)
                ax.set_xlabel("training FLOPs")
                ax.set_ylabel("validation loss (nats/token)")
                ax.set_yscale("log")
                ax.set_title("MoE ablations, seed 0", fontsize=10)
            with figure(plots / "router_balance.png") as ax:
                for name, r in {"moe": ref, **ablations}.items():
                    ax.plot([v[0] for v in r["max_violation"]], [v[1] for v in r["max_violation"]], label=name)
                ax.set_xlabel("step")
                ax.set_ylabel("max load / mean load - 1 (worst layer)")
                ax.set_title("router balance during training", fontsize=10)
            out += [plots / "ablations.png", plots / "router_balance.png"]
        return out


_COLOURS = {"dense": "tab:blue", "moe": "tab:orange", "dense-wide": "tab:green"}


def flops_to_reach(curve: list[tuple[int, float, float]], target: float) -> float | None:
    """The training FLOPs at which a validation curve [(step, flops, loss)] first reaches `target`,
    interpolated linearly between the two evaluations around it; None if it never does."""
    previous = None
    for _, x, y in curve:
        if y <= target:
            if previous is None:
                return x
            x0, y0 = previous
            return x0 + (x - x0) * (y0 - target) / (y0 - y)
        previous = (x, y)
    return None


def reach_fractions(reference: list[dict], challenger: list[dict]) -> dict[str, Any]:
    """Per seed both have: the fraction of the reference's training FLOPs at which the challenger reaches the
    reference's final validation loss (None: not within its own run)."""
    by_seed = {r["seed"]: r for r in reference}
    fractions = {}
    for r in challenger:
        ref = by_seed.get(r["seed"])
        if ref is not None:
            reached = flops_to_reach(r["val"], ref["final_val_loss"])
            fractions[r["seed"]] = None if reached is None else reached / ref["val"][-1][1]
    return dict(fractions=fractions)


def format_fraction(headline: dict[str, Any]) -> str:
    values = [v for v in headline["fractions"].values() if v is not None]
    n = len(headline["fractions"])
    if not n:
        return "-"
    if not values:
        return f"not reached (0/{n} seeds)"
    mean, sd = mean_sd(values)
    return f"{mean:.2f} ± {sd:.2f} ({len(values)}/{n} seeds reached)"


def run_study(out: str | Path, quick: bool = False, quiet: bool = False, steps: int | None = None) -> Path:
    """Run (or continue) the study in `out`; returns OUT/table.md. `steps`: another token budget per run."""
    scale = QUICK if quick else TINY
    if steps is not None:
        scale = Scale(**{**scale.__dict__, "steps": steps})
    claim_directory(Path(out), scale)
    return Study(Path(out), scale, quiet).run()
