"""The recipe's claims measured at our scale: one module per study, each a resumable directory of runs.

    nanoseek study moe-vs-dense       # nanoseek.studies.moe_vs_dense
    nanoseek study rl-ablation        # nanoseek.studies.rl_ablation
    nanoseek study r1-zero            # nanoseek.studies.r1_zero

Every study trains with the stages themselves (`nanoseek.train.stages`, `nanoseek.train.rl`); what they
share (skipping finished runs, means and spreads, markdown tables) is in `nanoseek.studies.common`.
docs/STUDIES.md holds the results.
"""

STUDIES = {
    "moe-vs-dense": "nanoseek.studies.moe_vs_dense",
    "rl-ablation": "nanoseek.studies.rl_ablation",
    "r1-zero": "nanoseek.studies.r1_zero",
}
"""Study name -> its module, which defines `run_study(out, quick=False, quiet=False, **options) -> Path` (the table)."""
