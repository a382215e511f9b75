"""Every command's --help explains every flag, and what happens when it is not given."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from rcllm.cli.main import app


def commands(group, path=()) -> list:
    """(path, command) for the root and every subcommand (typer ships its own click)."""
    found = [(path, group)]
    if getattr(group, "commands", None):
        for name, sub in group.commands.items():
            found += commands(sub, (*path, name))
    return found


ALL = commands(typer.main.get_command(app))


@pytest.mark.parametrize("path,command", ALL, ids=[" ".join(p) or "rcllm" for p, _ in ALL])
def test_every_option_has_help_and_a_stated_default(path, command):
    for param in command.params:
        if param.param_type_name != "option" or param.name == "help":
            continue
        flag = "/".join(param.opts)
        assert param.help and len(param.help) > 8, f"rcllm {' '.join(path)} {flag}: no help"
        if param.required or param.is_flag or param.default is False:
            continue
        if param.default is None:  # nothing to show: the help must say what happens without it
            assert "default" in param.help.lower() or "optional" in param.help.lower(), (
                f"rcllm {' '.join(path)} {flag}: default None and the help does not say what happens without it"
            )
        else:
            assert param.show_default is not False, f"rcllm {' '.join(path)} {flag}: default hidden"
    for argument in (p for p in command.params if p.param_type_name == "argument"):
        assert getattr(argument, "help", None), f"rcllm {' '.join(path)} {argument.name}: no help"
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output


def test_cli_defaults_are_the_engines():
    """rcllm/cli restates the engine's default model and fallback policy so that --help does not
    import torch: they must stay the same values."""
    from rcllm import cli
    from rcllm.engine.model_policy import FALLBACK_POLICY
    from rcllm.engine.models import DEFAULT_MODEL

    assert (cli.DEFAULT_MODEL, cli.FALLBACK_POLICY) == (DEFAULT_MODEL, FALLBACK_POLICY)
