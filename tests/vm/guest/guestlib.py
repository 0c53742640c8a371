"""Helpers for tests that run inside the test VM as root, under systemd.

Nothing here runs at import time, so the host can collect these tests.
Every check reads the kernel's own files (/proc/PID/cgroup, cgroupfs),
never the daemon's report, unless a test is about the report itself.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

CGROUP = Path("/sys/fs/cgroup")
UNIT_CGROUP = "/system.slice/broker-slots.service"
DAEMON_CGROUP = "/system.slice/broker.service"
POLICY_DIR = Path("/etc/broker/policies.d")
BROKER = "/opt/broker/bin/broker"
PYTHON = "/usr/bin/python3"


def in_guest() -> bool:
    """Return True inside the test VM (the rig sets BROKER_VM_GUEST=1)."""
    return os.environ.get("BROKER_VM_GUEST") == "1"


def sh(
    *args: str, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run a command; with check, a failure raises with its stdout and stderr."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited with {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def ensure_user(name: str, uid: int) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        sh(
            "useradd",
            "--uid",
            str(uid),
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        )


def cgroup_of(pid: int) -> str:
    """Return pid's cgroup v2 path from /proc/PID/cgroup."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"pid {pid} has no cgroup v2 line")


def read_knob(cgroup: str, name: str) -> str:
    return (CGROUP / cgroup.lstrip("/") / name).read_text().strip()


def procs_under(cgroup: str) -> list[int]:
    """Return every pid in cgroup and its descendants."""
    base = CGROUP / cgroup.lstrip("/")
    pids: list[int] = []
    if not base.exists():
        return pids
    for procs in base.rglob("cgroup.procs"):
        try:
            pids.extend(int(p) for p in procs.read_text().split())
        except FileNotFoundError:
            continue
    return pids


class Server:
    """`python3 -m http.server` on a loopback port, run directly as a user."""

    def __init__(self, user: str, port: int):
        entry = pwd.getpwnam(user)
        self.port = port
        self.process = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "http.server",
                str(port),
                "--bind",
                "127.0.0.1",
                "--directory",
                "/",
            ],
            user=entry.pw_uid,
            group=entry.pw_gid,
            extra_groups=[],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.pid = self.process.pid
        wait_until(self.listening, 30, f"http.server of {user} on port {port}")
        self.home = cgroup_of(self.pid)

    def listening(self) -> bool:
        return (
            sh(
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "2",
                f"http://127.0.0.1:{self.port}/",
                check=False,
            ).returncode
            == 0
        )

    def request(self) -> str:
        """Send one request with curl and return the HTTP status code."""
        result = sh(
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            f"http://127.0.0.1:{self.port}/",
        )
        return result.stdout

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def write_policy(name: str, text: str) -> Path:
    POLICY_DIR.mkdir(parents=True, exist_ok=True)
    path = POLICY_DIR / name
    path.write_text(text)
    return path


def clear_policies() -> None:
    if POLICY_DIR.exists():
        for path in POLICY_DIR.iterdir():
            path.unlink()


def main_pid() -> int:
    return int(
        sh("systemctl", "show", "-p", "MainPID", "--value", "broker").stdout.strip()
        or 0
    )


def unit_property(name: str, unit: str = "broker") -> str:
    """Return one property of a systemd unit, as `systemctl show` prints it."""
    return sh("systemctl", "show", "-p", name, "--value", unit).stdout.strip()


def restarts() -> int:
    """Return how often systemd has restarted broker.service."""
    return int(unit_property("NRestarts") or 0)


def status_json() -> dict:
    return json.loads(sh(BROKER, "status", "--json").stdout)


def journal(since: str) -> str:
    return sh(
        "journalctl",
        "-u",
        "broker",
        "--since",
        since,
        "--no-pager",
        "-o",
        "cat",
        check=False,
    ).stdout


def results_dir() -> Path:
    """Directory shared with the host for measurements (the rig's share)."""
    share = os.environ.get("BROKER_VM_SHARE")
    path = Path(share) / "results" if share else Path("/tmp/broker-results")
    path.mkdir(parents=True, exist_ok=True)
    return path
