"""Policy reloads and account changes while a user's process sits in a slot.

Tests run in file order and share one daemon, two users and their servers.
Placement is read from /proc/PID/cgroup, daemon state from systemctl.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.vm.guest.guestlib import (
    BROKER,
    UNIT_CGROUP,
    Server,
    cgroup_of,
    clear_policies,
    ensure_user,
    in_guest,
    journal,
    main_pid,
    restarts,
    sh,
    unit_property,
    wait_until,
    write_policy,
)

pytestmark = pytest.mark.skipif(not in_guest(), reason="runs inside the test VM")

USERS = {"dave": 2601, "erin": 2602}
# Longer than every wait below, so an idle reclaim never explains a return home.
IDLE_TIMEOUT = 120
# The daemon re-reads the passwd database every 30 s (USER_REFRESH_SECONDS).
USER_REFRESH = 30
TIERS = """\
tiers:
  light:
    cpu.weight: 300
    memory.min: 16M
"""
ENTRIES = {name: f"  - name: {name}\n    pool: {{light: 1}}\n" for name in USERS}
BOTH = f"idle_timeout: {IDLE_TIMEOUT}s\n{TIERS}users:\n" + "".join(ENTRIES.values())
ONLY_ERIN = f"idle_timeout: {IDLE_TIMEOUT}s\n{TIERS}users:\n" + ENTRIES["erin"]
ZERO_INTERVAL = BOTH + "forecast:\n  enabled: true\n  interval: 0s\n"


def slot_dir(uid: int) -> str:
    return f"{UNIT_CGROUP}/users/uid-{uid}"


def in_slot_of(uid: int, pid: int) -> bool:
    return cgroup_of(pid).startswith(slot_dir(uid) + "/")


def describe_tree(cgroup: str) -> str:
    """Return each cgroup under CGROUP with its cgroup.procs and memory.min."""
    lines = []
    for directory, _, _ in os.walk(f"/sys/fs/cgroup{cgroup}"):
        try:
            procs = open(f"{directory}/cgroup.procs").read().split()
            floor = open(f"{directory}/memory.min").read().strip()
        except FileNotFoundError:
            continue  # removed while this walk was reading it
        lines.append(f"{directory}: procs {procs} memory.min {floor}")
    return "\n".join(lines)


def activate(server: Server, uid: int) -> None:
    assert server.request() == "200"
    wait_until(lambda: in_slot_of(uid, server.pid), 20, f"pid {server.pid} in a slot")


@pytest.fixture(scope="module")
def servers():
    for name, uid in USERS.items():
        ensure_user(name, uid)
    clear_policies()
    write_policy("10-edges.yaml", BOTH)
    started = {name: Server(name, 8100 + i) for i, name in enumerate(USERS)}
    sh("systemctl", "start", "broker")
    yield started
    for server in started.values():
        server.stop()
    sh("systemctl", "stop", "broker", check=False, timeout=120)
    sh("systemctl", "reset-failed", "broker", check=False)
    clear_policies()
    for name in USERS:
        sh("userdel", "-f", name, check=False)


def test_check_rejects_zero_interval(tmp_path):
    policy = tmp_path / "zero.yaml"
    policy.write_text(ZERO_INTERVAL)
    result = sh(BROKER, "check", str(policy), check=False)
    assert result.returncode == 1, result.stdout


def test_sighup_storm_keeps_placement(servers):
    dave = servers["dave"]
    activate(dave, USERS["dave"])
    slot = cgroup_of(dave.pid)
    pid = main_pid()
    for _ in range(50):
        os.kill(pid, signal.SIGHUP)
    time.sleep(5)
    assert main_pid() == pid
    assert unit_property("ActiveState") == "active"
    assert cgroup_of(dave.pid) == slot


def test_reload_dropping_user_sends_home(servers):
    dave = servers["dave"]
    activate(dave, USERS["dave"])
    write_policy("10-edges.yaml", ONLY_ERIN)
    sh("systemctl", "reload", "broker")
    wait_until(lambda: cgroup_of(dave.pid) == dave.home, 20, "dave's server home")
    assert dave.process.poll() is None
    # The user's cgroup goes with its last slot, not at the next refresh.
    deadline = time.monotonic() + 10
    left = describe_tree(slot_dir(USERS["dave"]))
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = describe_tree(slot_dir(USERS["dave"]))
    assert left == "", left


def test_deleted_user_sent_home(servers):
    erin = servers["erin"]
    activate(erin, USERS["erin"])
    sh("userdel", "-f", "erin")
    wait_until(
        lambda: cgroup_of(erin.pid) == erin.home,
        USER_REFRESH + 20,
        "erin's server home after userdel",
    )
    assert erin.process.poll() is None


def test_reload_zero_interval_rejected(servers):
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    pid = main_pid()
    write_policy("10-edges.yaml", ZERO_INTERVAL)
    try:
        sh("systemctl", "reload", "broker", check=False, timeout=30)
        time.sleep(40)
        log = journal(since)
        assert restarts() == 0, log
        assert main_pid() == pid, log
        assert unit_property("ActiveState") == "active", log
    finally:
        write_policy("10-edges.yaml", BOTH)
