"""Command line: usage errors and `broker check` output."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import cli

VALID_POLICY = """\
tiers:
  small:
    cpu.weight: 100
    memory.min: 0
users:
  - uid: 61001
    pool: {small: 2}
"""


def test_unknown_option_after_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["status", "--bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: broker status" in err


def test_unknown_option_before_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--bogus", "status"])
    err = capsys.readouterr().err
    assert err.startswith("usage: broker [-h]")


def test_check_valid_one_line(tmp_path: Path, capsys):
    path = tmp_path / "a.yaml"
    path.write_text(VALID_POLICY)
    assert cli.main(["check", str(path)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("\n") == 1
    assert stdout.startswith("policy ok: 1 file(s), 1 tier(s)")


def test_check_invalid_names_line(tmp_path: Path, capsys):
    path = tmp_path / "a.yaml"
    path.write_text(VALID_POLICY.replace("cpu.weight: 100", "cpu.weight: 0"))
    assert cli.main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:3: " in err
