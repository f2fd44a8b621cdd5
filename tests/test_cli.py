"""The `medmim` command: help everywhere, exit 0/1/2, one-line errors and no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medmim import cli
from medmim.cli import main

COMMANDS = [[], ["data"], ["data", "check"], ["data", "phantom"], ["data", "split"], ["config"],
            ["config", "list"], ["config", "show"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "medmim")
def test_help_on_every_command(cmd: list[str], capsys) -> None:
    assert main(cmd + ["--help"]) == 0
    assert "Usage: medmim" in capsys.readouterr().out


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
    ok = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and "medmim" in ok.stdout
    bad = subprocess.run([str(exe), "data", "check", str(tmp_path / "absent")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "absent: no such file or folder" in bad.stderr and "Traceback" not in bad.stderr
