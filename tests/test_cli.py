"""The `nanoseek` command: every subcommand is registered, parses --help, and `model` reports presets."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from nanoseek.cli import COMMANDS, main
from nanoseek.model import Transformer, get_preset, preset_names


def test_every_subcommand_is_listed(capsys):
    assert main([]) == 0
    listing = capsys.readouterr().out
    for name in COMMANDS:
        assert name in listing


@pytest.mark.parametrize("name", list(COMMANDS))
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: nanoseek" in capsys.readouterr().out


def test_model_command_prints_every_preset(capsys):
    assert main(["model", "--seq-len", "1024"]) == 0
    out = capsys.readouterr().out
    for name in preset_names():
        with torch.device("meta"):
            m = Transformer(get_preset(name))
        assert f"{m.num_params() / 1e6:.1f}M" in out and name in out


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_beside_a_busy_process_openmp_threads_wait_passively_unless_told_otherwise(given, expected):
    # Read by the OpenMP runtime when it loads: the command must set it before anything imports torch.
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import sys, nanoseek.cli, os; print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))"
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # the spinner holds a core
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    finally:
        spinner.kill()
        spinner.wait()
    assert out.split() == ["False", expected]


def test_wait_policy_is_passive_only_beside_other_work():
    from nanoseek.cli import others_busy_cores, wait_policy

    assert wait_policy(None) is None and wait_policy(0.2) is None  # quiet (or unknown): OpenMP's default
    assert wait_policy(0.5) == "PASSIVE" and wait_policy(3.0) == "PASSIVE"
    busy = others_busy_cores(0.05)
    assert busy is None or 0 <= busy <= (os.cpu_count() or 1) + 0.01
