"""The `nanoseek` command: every subcommand is registered, parses --help, and `model` reports presets."""

from __future__ import annotations

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
