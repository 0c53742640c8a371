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


@pytest.mark.parametrize(
    "content",
    [
        b'{"daemon": {"pid": 1',
        b"garbage",
        b"\xff\xfe",
        b"[]",
        b"{}",
        b'{"daemon": {"pid": 1}, "users": []}',
    ],
)
@pytest.mark.parametrize(
    "command", [["status"], ["status", "--json"], ["explain", "1"]]
)
def test_status_corrupt_file(tmp_path: Path, capsys, content: bytes, command):
    (tmp_path / "status.json").write_bytes(content)
    assert cli.main([*command, "--state-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{tmp_path / 'status.json'}: " in err
    assert "restart the daemon" in err


def test_status_file_is_directory(tmp_path: Path, capsys):
    (tmp_path / "status.json").mkdir()
    assert cli.main(["status", "--state-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Is a directory" in err


def test_status_missing_field(tmp_path: Path, capsys):
    (tmp_path / "status.json").write_text('{"daemon": {"pid": 1}, "users": {}}')
    assert cli.main(["status", "--state-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "'cgroup_root'" in err


def test_explain_missing_field(tmp_path: Path, capsys):
    (tmp_path / "status.json").write_text('{"daemon": {}, "users": {"1": []}}')
    assert cli.main(["explain", "1", "--state-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "missing or of the wrong type" in err
