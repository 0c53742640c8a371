"""Stopping a service whose processes sit in a warm slot, in the VM.

A service run as a managed user forks a long-lived child per connection.
Once its main process is in a slot, the children are born there, outside
the unit's cgroup, where systemd cannot see them. Stopping the unit must
still end them when its KillMode requires it, and leave them alive (outside
any broker cgroup) when it does not. Liveness is read from /proc, placement
from /proc/PID/cgroup.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.vm.guest.guestlib import (
    PYTHON,
    UNIT_CGROUP,
    cgroup_of,
    clear_policies,
    ensure_user,
    in_guest,
    main_pid,
    sh,
    wait_until,
    write_policy,
)

pytestmark = pytest.mark.skipif(not in_guest(), reason="runs inside the test VM")

USER, UID = "gina", 2901
SERVER = Path(__file__).with_name("linger_server.py")
UNIT_DIR = Path("/run/systemd/system")
POLICY = f"""\
idle_timeout: 120s
tiers:
  light:
    cpu.weight: 300
    memory.min: 16M
users:
  - name: {USER}
    pool: {{light: 2}}
"""


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def in_slot(pid: int) -> bool:
    return cgroup_of(pid).startswith(f"{UNIT_CGROUP}/users/uid-{UID}/")


def request(port: int) -> None:
    sh("curl", "-s", "-o", "/dev/null", "--max-time", "5", f"http://127.0.0.1:{port}/")


class LingerService:
    """A unit file in /run/systemd/system that runs linger_server.py as the user."""

    def __init__(self, name: str, port: int, kill_mode: str | None):
        self.name, self.port = name, port
        self.pids = Path(f"/run/{name}.pids")
        self.pids.write_text("")
        self.pids.chmod(0o666)
        mode = f"KillMode={kill_mode}\n" if kill_mode else ""
        (UNIT_DIR / f"{name}.service").write_text(
            "[Service]\n"
            f"User={USER}\n"
            f"Environment=LINGER_PIDS={self.pids}\n"
            f"ExecStart={PYTHON} {SERVER} {port}\n"
            f"{mode}"
        )
        sh("systemctl", "daemon-reload")
        sh("systemctl", "start", f"{name}.service")

    def main_pid(self) -> int:
        result = sh("systemctl", "show", "-p", "MainPID", "--value", self.name)
        return int(result.stdout.strip() or 0)

    def children(self) -> list[int]:
        return [int(line) for line in self.pids.read_text().split()]

    def remove(self) -> None:
        sh("systemctl", "stop", f"{self.name}.service", check=False)
        for pid in self.children():
            if alive(pid):
                os.kill(pid, 9)
        (UNIT_DIR / f"{self.name}.service").unlink(missing_ok=True)
        self.pids.unlink(missing_ok=True)
        sh("systemctl", "daemon-reload", check=False)


def start_placed(name: str, port: int, kill_mode: str | None) -> LingerService:
    """Start the service, make two connections after its placement, and return it."""
    service = LingerService(name, port, kill_mode)
    wait_until(lambda: service.main_pid(), 20, f"{name} running")
    wait_until(
        lambda: (
            sh(
                "curl",
                "-s",
                "-o",
                "/dev/null",
                f"http://127.0.0.1:{port}/",
                check=False,
            ).returncode
            == 0
        ),
        30,
        f"{name} answering",
    )
    wait_until(lambda: in_slot(service.main_pid()), 20, f"{name} in a slot")
    request(port)
    request(port)
    wait_until(lambda: len(service.children()) >= 3, 20, f"{name}'s children")
    return service


@pytest.fixture(scope="module")
def daemon():
    ensure_user(USER, UID)
    clear_policies()
    write_policy("10-unit-stop.yaml", POLICY)
    sh("systemctl", "restart", "broker", timeout=120)
    yield
    sh("systemctl", "stop", "broker", check=False, timeout=120)
    clear_policies()
    sh("userdel", "-f", USER, check=False)


def test_stop_kills_children_in_slot(daemon):
    service = start_placed("linger-kill", 8301, None)
    try:
        children = service.children()
        # At least the two connections after placement forked in the slot.
        assert sum(in_slot(pid) for pid in children) >= 2
        sh("systemctl", "stop", "linger-kill.service", timeout=60)
        wait_until(
            lambda: not any(alive(pid) for pid in children),
            20,
            "linger-kill's children ended with their unit",
        )
    finally:
        service.remove()


def test_kill_mode_process_keeps_children(daemon):
    service = start_placed("linger-keep", 8302, "process")
    try:
        children = [pid for pid in service.children() if in_slot(pid)]
        assert len(children) >= 2
        sh("systemctl", "stop", "linger-keep.service", timeout=60)
        wait_until(
            lambda: not any(in_slot(pid) for pid in children if alive(pid)),
            20,
            "linger-keep's children out of the slot",
        )
        for pid in children:
            assert alive(pid), f"pid {pid} ended although KillMode=process"
    finally:
        service.remove()


def test_restart_keeps_children_in_slot(daemon):
    service = start_placed("linger-adopt", 8303, None)
    try:
        children = [pid for pid in service.children() if in_slot(pid)]
        assert len(children) >= 2
        old = main_pid()
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: main_pid() not in (0, old), 60, "the daemon restarted")
        wait_until(
            lambda: (
                sh("systemctl", "is-active", "broker", check=False).stdout.strip()
                == "active"
            ),
            120,
            "active again",
        )
        # The owner was re-adopted, so the children it forked stay with it.
        assert in_slot(service.main_pid())
        for pid in children:
            assert in_slot(pid), f"pid {pid} left the slot on restart"
    finally:
        service.remove()
