"""Smoke checks of the test VM itself, run inside the guest.

Each test reads the kernel or the filesystem directly, so it does not depend on
the broker's own code. Importing this module has no side effects, because the
host imports it to collect the test ids.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
TRACEFS = Path("/sys/kernel/tracing")
BROKER_COMMAND = Path("/opt/broker/bin/broker")


def mount_types() -> dict[str, str]:
    """Return mount point -> filesystem type from /proc/self/mounts."""
    types = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _device, mount_point, fs_type, *_rest = line.split()
        types[mount_point] = fs_type
    return types


def test_cgroup2_mounted() -> None:
    assert mount_types().get(str(CGROUP_ROOT)) == "cgroup2"


def test_cgroup_controllers() -> None:
    controllers = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
    assert "cpu" in controllers
    assert "memory" in controllers


def test_systemd_is_pid1() -> None:
    assert Path("/proc/1/comm").read_text().strip() == "systemd"


def test_broker_installed() -> None:
    assert BROKER_COMMAND.is_file()
    assert os.access(BROKER_COMMAND, os.X_OK)


def test_accept4_tracepoint() -> None:
    assert mount_types().get(str(TRACEFS)) == "tracefs"
    assert (TRACEFS / "events" / "syscalls" / "sys_exit_accept4" / "id").is_file()
