"""The README's quick start, followed literally in a fresh copy of the repository on a fresh shell.

The test reads the bash block that follows the `<!-- quickstart: ... -->` marker in README.md and runs
its lines, in order, with `bash -e` in a copy of the repository's files (tracked and untracked, as
git lists them: what a clone holds) under an empty environment (PATH=/usr/bin:/bin, HOME in the
temporary directory). Two things differ from a newcomer's run, both said here and checked:

- `make install` is not run (it would build a virtual environment with torch: minutes and a
  download). The copy's `.venv` is instead a link to the environment this test runs in, the one
  `make install` built (the test is skipped outside a virtual environment); `make -n install`
  checks that the target exists. PYTHONPATH points at the copy, so the copy's code is what runs.
- Sizes are shrunk, nothing else: `train.steps=N` becomes `train.steps=2` and training commands
  get `--set data.builtin_examples=200`; `--n-problems N` becomes `--n-problems 2`. Every training
  command must set its steps (a quick start that trains for the defaults' minutes fails here).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- quickstart:"


def quickstart_lines(readme: str) -> list[str]:
    """The commands of the bash block after the marker, comments and blank lines dropped."""
    after = readme[readme.index(MARKER) :]
    block = re.search(r"```bash\n(.*?)```", after, re.S)
    assert block, "no ```bash block after the quickstart marker in README.md"
    lines = [line.split("  #")[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def shrink(line: str) -> str:
    """The README's command with its sizes made tiny (see the module docstring)."""
    if re.match(r"nanoseek (pretrain|sft|rl)\b", line):
        assert "train.steps=" in line, f"a quick-start training command sets no train.steps: {line}"
        line = re.sub(r"train\.steps=\d+", "train.steps=2", line) + " --set data.builtin_examples=200"
    return re.sub(r"--n-problems \d+", "--n-problems 2", line)


def copy_repository(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="runs the quick start with this test's virtual environment")
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_readme_quickstart_runs_in_a_fresh_shell(tmp_path: Path) -> None:
    lines = quickstart_lines((ROOT / "README.md").read_text(encoding="utf-8"))
    assert lines[0] == "make install", f"the quick start should begin with `make install`, not {lines[0]!r}"
    assert any(line.startswith(". .venv/bin/activate") for line in lines), "the quick start never puts nanoseek on PATH"
    repo = tmp_path / "nanoseek"
    copy_repository(repo)
    (repo / ".venv").symlink_to(sys.prefix)
    assert subprocess.run(["make", "-n", "install"], cwd=repo, capture_output=True).returncode == 0
    script = "\n".join(["set -e", *(shrink(line) for line in lines[1:])]) + "\n"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(repo),
        "OMP_NUM_THREADS": "1",
        "LANG": "C.UTF-8",
    }
    (tmp_path / "home").mkdir()
    proc = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"quick start failed:\n{script}\n--- stderr ---\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr
    # What the commands should have left: each stage's run, a generation, an evaluation report.
    assert (repo / "runs/first/pretrain/summary.json").is_file()
    assert (repo / "runs/first/sft/summary.json").is_file()
    assert (repo / "runs/first/eval/report.md").is_file()
    assert '"text"' in proc.stdout  # generate's JSON line
