"""scripts/install run a second time in the guest, after the rig's first run.

Each check reads the result from the filesystem or the venv's own metadata, not
from the script's output.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

VENV = Path("/opt/broker")
BIN_LINK = Path("/usr/local/bin/broker")
POLICY_DIR = Path("/etc/broker/policies.d")
UNIT = Path("/etc/systemd/system/broker.service")


def project() -> Path:
    return Path(os.environ.get("BROKER_VM_PROJECT", "/mnt/broker/project"))


def wheelhouse() -> Path:
    return Path(os.environ.get("BROKER_VM_SHARE", "/mnt/broker")) / "wheelhouse"


def run_install(*args: str) -> subprocess.CompletedProcess[str]:
    command = ["bash", str(project() / "scripts" / "install"), *args]
    return subprocess.run(command, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def second_install() -> subprocess.CompletedProcess[str]:
    return run_install("--no-apt", "--wheelhouse", str(wheelhouse()))


def installed_version() -> str:
    code = "import importlib.metadata as m; print(m.version('broker'))"
    probe = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    return probe.stdout.strip()


def test_install_rerun_succeeds(second_install) -> None:
    assert second_install.returncode == 0, second_install.stderr


def test_install_rerun_version(second_install) -> None:
    wheels = list(wheelhouse().glob("broker-*.whl"))
    assert len(wheels) == 1
    assert installed_version() == wheels[0].name.split("-")[1]


def test_install_links_command(second_install) -> None:
    assert BIN_LINK.is_symlink()
    assert os.readlink(BIN_LINK) == str(VENV / "bin" / "broker")


def test_install_policy_dir_empty(second_install) -> None:
    assert POLICY_DIR.is_dir()
    assert list(POLICY_DIR.iterdir()) == []


def test_install_copies_unit(second_install) -> None:
    source = project() / "systemd" / "broker.service"
    if not source.is_file():
        pytest.skip("the project has no systemd/broker.service yet")
    assert UNIT.read_bytes() == source.read_bytes()


def test_install_help() -> None:
    shown = run_install("--help")
    assert shown.returncode == 0
    assert "--wheelhouse" in shown.stdout


def test_install_unknown_option() -> None:
    rejected = run_install("--no-such-option")
    assert rejected.returncode == 2
