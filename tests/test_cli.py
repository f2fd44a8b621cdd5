"""The `medmim` command: help everywhere, exit 0/1/2, one-line errors and no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import click

from medmim import cli
from medmim.cli import main


def _command_table(cmd: click.Command = cli.cli, path: tuple[str, ...] = ()):
    """(argv path, command) for the CLI itself and every command and subcommand under it, walked from the
    click group: a new command is covered without editing this test."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _command_table(sub, path + (name,))


COMMANDS = dict(_command_table())


def _usage(path: tuple[str, ...]) -> str:
    """The usage line click writes for the command at ``path`` ("Usage: medmim data check [OPTIONS] PATH")."""
    cmd = cli.cli
    ctx = click.Context(cmd, info_name="medmim", **cmd.context_settings)
    for name in path:
        cmd = cmd.commands[name]
        ctx = click.Context(cmd, info_name=name, parent=ctx, **cmd.context_settings)
    return cmd.get_usage(ctx)


def test_the_command_table_is_walked_to_the_leaves() -> None:
    assert {(), ("data",), ("data", "check"), ("config", "show"), ("pretrain",), ("finetune",)} <= COMMANDS.keys()
    for path, cmd in COMMANDS.items():  # every group's subcommands are in the table too
        if isinstance(cmd, click.Group):
            assert cmd.commands and all(path + (name,) in COMMANDS for name in cmd.commands)


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "medmim")
def test_help_on_every_command(path: tuple[str, ...], capsys) -> None:
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    usage = _usage(path)
    assert usage.startswith("Usage: " + " ".join(("medmim", *path)))
    assert out.startswith(usage), (usage, out[:300])


def test_usage_errors_exit_2(capsys) -> None:
    assert main(["nonsense"]) == 2
    assert "No such command 'nonsense'" in capsys.readouterr().err
    assert main(["data", "phantom", "out", "--labeled", "many"]) == 2
    assert "'many' is not a valid integer" in capsys.readouterr().err


def test_bad_config_exits_2_naming_the_key(capsys) -> None:
    assert main(["config", "show", "mae-tiny", "train.max_steps=-4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'train.max_steps'" in err and err.startswith("medmim: error: mae-tiny:")
    assert main(["config", "show", "mae-tiny", "data.roi_size=[32,32]"]) == 2
    assert "'data.roi_size'" in capsys.readouterr().err


def test_config_show_prints_resolved_yaml(capsys) -> None:
    assert main(["config", "show", "mae-tiny", "train.max_steps=9", "data.path=/d"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 9" in out and "- /d" in out and "hidden_size: 48" in out


def test_internal_error_exits_1_with_one_line(monkeypatch, capsys) -> None:
    def boom(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("medmim.config.preset_names", boom)
    assert main(["config", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: ZeroDivisionError" in err and "Traceback" not in err


def test_installed_entry_point_exit_codes(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("medmim")
    ok = subprocess.run([str(exe), "--version"], capture_output=True, text=True, encoding="utf-8")
    assert ok.returncode == 0 and "medmim" in ok.stdout
    bad = subprocess.run([str(exe), "data", "check", str(tmp_path / "absent")], capture_output=True, text=True,
                         encoding="utf-8")
    assert bad.returncode == 2
    assert "absent: no such file or folder" in bad.stderr and "Traceback" not in bad.stderr
