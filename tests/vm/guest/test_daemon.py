"""broker.service end to end in the VM: real users, servers, curl, systemd.

Tests run in file order and share one set of users and servers. Placement
is checked through /proc/PID/cgroup and the slot's own cgroup files.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.vm.guest.guestlib import (
    BROKER,
    DAEMON_CGROUP,
    UNIT_CGROUP,
    Server,
    cgroup_of,
    clear_policies,
    ensure_user,
    in_guest,
    journal,
    main_pid,
    procs_under,
    read_knob,
    sh,
    status_json,
    wait_until,
    write_policy,
)

pytestmark = pytest.mark.skipif(not in_guest(), reason="runs inside the test VM")

USERS = {"alice": 2001, "bob": 2002, "carol": 3001}
IDLE_TIMEOUT = 8
POLICY = f"""\
idle_timeout: {IDLE_TIMEOUT}s
tiers:
  light:
    cpu.weight: 300
    memory.min: 16M
  heavy:
    cpu.weight: 900
    memory.min: 64M
    memory.low: 96M
users:
  - name: alice
    pool: {{light: 1, heavy: 1}}
  - name: bob
    pool: {{light: 2}}
"""
MIB = 1 << 20


def slot_dir(uid: int) -> str:
    return f"{UNIT_CGROUP}/users/uid-{uid}"


def in_slot_of(uid: int, pid: int) -> bool:
    return cgroup_of(pid).startswith(slot_dir(uid) + "/")


@pytest.fixture(scope="module")
def servers():
    for name, uid in USERS.items():
        ensure_user(name, uid)
    clear_policies()
    write_policy("10-test.yaml", POLICY)
    started = {
        "alice": Server("alice", 8001),
        "bob": Server("bob", 8002),
        "carol": Server("carol", 8003),
    }
    yield started
    for server in started.values():
        server.stop()
    sh("systemctl", "stop", "broker", check=False)
    clear_policies()


def activate(server: Server, uid: int) -> str:
    assert server.request() == "200"
    wait_until(
        lambda: in_slot_of(uid, server.pid),
        20,
        f"pid {server.pid} in a slot of uid {uid}",
    )
    return cgroup_of(server.pid)


def test_check_accepts_policy(servers):
    result = sh(BROKER, "check", check=False)
    assert result.returncode == 0, result.stderr
    assert "policy ok" in result.stdout


def test_enable_now_starts_service(servers):
    sh("systemctl", "enable", "--now", "broker")
    assert sh("systemctl", "is-active", "broker").stdout.strip() == "active"
    assert sh("systemctl", "is-enabled", "broker").stdout.strip() == "enabled"
    assert cgroup_of(main_pid()) == DAEMON_CGROUP
    assert sh("systemctl", "is-active", "broker-slots").stdout.strip() == "active"


def test_slots_carry_reservations(servers):
    alice = slot_dir(USERS["alice"])
    wait_until(
        lambda: os.path.isdir(f"/sys/fs/cgroup{alice}/heavy-0"), 20, "alice's slots"
    )
    assert read_knob(f"{alice}/light-0", "cpu.weight") == "300"
    assert read_knob(f"{alice}/light-0", "memory.min") == str(16 * MIB)
    assert read_knob(f"{alice}/heavy-0", "cpu.weight") == "900"
    assert read_knob(f"{alice}/heavy-0", "memory.min") == str(64 * MIB)
    assert read_knob(f"{alice}/heavy-0", "memory.low") == str(96 * MIB)


def test_parent_protection_is_sum_of_slots(servers):
    alice = slot_dir(USERS["alice"])
    assert read_knob(alice, "memory.min") == str(80 * MIB)
    assert set(read_knob(alice, "cgroup.subtree_control").split()) >= {"cpu", "memory"}


def test_bob_has_two_light_slots(servers):
    bob = slot_dir(USERS["bob"])
    children = sorted(
        p
        for p in os.listdir(f"/sys/fs/cgroup{bob}")
        if os.path.isdir(f"/sys/fs/cgroup{bob}/{p}")
    )
    assert children == ["light-0", "light-1"]


def test_managed_servers_move_into_slots(servers):
    for name in ("alice", "bob"):
        slot = activate(servers[name], USERS[name])
        assert read_knob(slot, "cpu.weight") == "300"
        assert read_knob(slot, "memory.min") == str(16 * MIB)
        assert read_knob(slot, "cgroup.procs").split() == [str(servers[name].pid)]


def test_unmanaged_server_stays_home(servers):
    carol = servers["carol"]
    for _ in range(5):
        assert carol.request() == "200"
    time.sleep(2)
    assert cgroup_of(carol.pid) == carol.home


def test_idle_servers_return_home(servers):
    for name in ("alice", "bob"):
        server = servers[name]
        wait_until(
            lambda server=server: cgroup_of(server.pid) == server.home,
            IDLE_TIMEOUT + 15,
            f"{name}'s server back home",
        )
    assert procs_under(f"{UNIT_CGROUP}/users") == []


def test_status_reports_activity(servers):
    users = status_json()["users"]
    alice = users[str(USERS["alice"])]
    assert alice["counters"]["activations"] >= 1
    assert alice["counters"]["reclaims"] >= 1
    assert alice["slots_free"] == 2
    assert str(USERS["carol"]) not in users


def test_status_text_lists_users(servers):
    text = sh(BROKER, "status").stdout
    assert "alice" in text
    assert "bob" in text


def test_reload_rejects_duplicate_key(servers):
    slot = activate(servers["alice"], USERS["alice"])
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    bad = POLICY.replace(
        "    cpu.weight: 300\n", "    cpu.weight: 500\n    cpu.weight: 600\n"
    )
    write_policy("10-test.yaml", bad)
    try:
        sh("systemctl", "reload", "broker")
        wait_until(
            lambda: "duplicate key" in journal(since),
            20,
            "the rejection in the journal",
        )
        assert "10-test.yaml:5: tiers.light.cpu.weight: duplicate key" in journal(since)
        assert sh("systemctl", "is-active", "broker").stdout.strip() == "active"
        assert cgroup_of(servers["alice"].pid) == slot
        assert read_knob(slot, "cpu.weight") == "300"
        assert status_json()["daemon"]["last_reload_error"]
    finally:
        write_policy("10-test.yaml", POLICY)
        sh("systemctl", "reload", "broker")


def test_reload_applies_good_change(servers):
    changed = POLICY.replace("cpu.weight: 300", "cpu.weight: 400")
    write_policy("10-test.yaml", changed)
    try:
        sh("systemctl", "reload", "broker")
        light = f"{slot_dir(USERS['bob'])}/light-1"
        wait_until(
            lambda: read_knob(light, "cpu.weight") == "400",
            20,
            "cpu.weight 400 after reload",
        )
    finally:
        write_policy("10-test.yaml", POLICY)
        sh("systemctl", "reload", "broker")
        light = f"{slot_dir(USERS['bob'])}/light-1"
        wait_until(
            lambda: read_knob(light, "cpu.weight") == "300",
            20,
            "cpu.weight back to 300",
        )


def test_kill9_keeps_users_processes(servers):
    alice = servers["alice"]
    slot = activate(alice, USERS["alice"])
    old = main_pid()
    os.kill(old, 9)
    wait_until(lambda: main_pid() not in (0, old), 60, "systemd to restart the daemon")
    assert alice.process.poll() is None
    assert cgroup_of(alice.pid) == slot
    wait_until(
        lambda: (
            sh("systemctl", "is-active", "broker", check=False).stdout.strip()
            == "active"
        ),
        60,
        "active again",
    )
    wait_until(
        lambda: cgroup_of(alice.pid) == alice.home,
        IDLE_TIMEOUT + 20,
        "re-adopted server reclaimed home",
    )


def test_stop_returns_everyone_home(servers):
    activate(servers["alice"], USERS["alice"])
    activate(servers["bob"], USERS["bob"])
    sh("systemctl", "stop", "broker", timeout=120)
    for name in ("alice", "bob", "carol"):
        assert cgroup_of(servers[name].pid) == servers[name].home
        assert servers[name].process.poll() is None
    assert procs_under(f"{UNIT_CGROUP}/users") == []
    assert not os.path.exists(f"/sys/fs/cgroup{UNIT_CGROUP}/users")
    assert read_knob(UNIT_CGROUP, "cgroup.subtree_control") == ""
