"""Bandwidth classes driven by broker.service in the VM, read back with tc.

The VM has no network card, so the test shapes loopback. Classes are found
by what tc prints (rates, byte counts), never by asking the broker.
"""

from __future__ import annotations

import pytest

from tests.tcshow import parse_classes, parse_qdiscs
from tests.vm.guest.guestlib import (
    Server,
    cgroup_of,
    clear_policies,
    ensure_user,
    in_guest,
    sh,
    wait_until,
    write_policy,
)

pytestmark = pytest.mark.skipif(not in_guest(), reason="runs inside the test VM")

USERS = {"alice": 2001, "bob": 2002}
IDLE_TIMEOUT = 6
POLICY = f"""\
idle_timeout: {IDLE_TIMEOUT}s
tiers:
  light:
    cpu.weight: 300
    memory.min: 0
users:
  - name: alice
    pool: {{light: 1}}
  - name: bob
    pool: {{light: 1}}
network:
  interfaces:
    - name: lo
      link_rate: 1gbit
      default: {{rate: 100mbit, ceil: 1gbit}}
      user: {{rate: 2mbit, ceil: 1gbit}}
      tiers:
        light: {{rate: 50mbit, ceil: 1gbit}}
"""
IDLE_RATE = 2_000_000
WARM_RATE = 50_000_000


def classes():
    return parse_classes(sh("tc", "-s", "class", "show", "dev", "lo").stdout)


def user_classes():
    return {h: c for h, c in classes().items() if c.rate in (IDLE_RATE, WARM_RATE)}


@pytest.fixture(scope="module")
def shaped():
    for name, uid in USERS.items():
        ensure_user(name, uid)
    clear_policies()
    write_policy("10-net.yaml", POLICY)
    sh("systemctl", "restart", "broker", timeout=120)
    wait_until(lambda: len(user_classes()) == 2, 60, "two user classes on lo")
    servers: list[Server] = []
    yield servers
    for server in servers:
        server.stop()
    sh("systemctl", "stop", "broker", check=False, timeout=120)
    clear_policies()


def test_tree_applied_on_start(shaped):
    qdiscs = [
        q
        for q in parse_qdiscs(sh("tc", "qdisc", "show", "dev", "lo").stdout)
        if q.kind == "htb"
    ]
    assert len(qdiscs) == 1
    assert qdiscs[0].parent == "root"
    rates = sorted(c.rate for c in classes().values())
    assert rates == [IDLE_RATE, IDLE_RATE, 100_000_000, 1_000_000_000]


def test_activation_boosts_user_class(shaped):
    # Starting the server already activates it: its readiness check is a request.
    shaped.append(Server("alice", 8101))
    alice = shaped[0]
    assert alice.request() == "200"
    wait_until(
        lambda: "/users/uid-2001/" in cgroup_of(alice.pid), 20, "alice in a slot"
    )
    warm = wait_until(
        lambda: [h for h, c in user_classes().items() if c.rate == WARM_RATE],
        20,
        "a 50mbit class",
    )
    assert len(warm) == 1
    before = classes()[warm[0]].sent_bytes
    for _ in range(5):
        assert alice.request() == "200"
    assert classes()[warm[0]].sent_bytes > before


def test_reclaim_drops_rate_back(shaped):
    wait_until(
        lambda: "/users/" not in cgroup_of(shaped[0].pid),
        IDLE_TIMEOUT + 15,
        "alice home",
    )
    wait_until(
        lambda: all(c.rate == IDLE_RATE for c in user_classes().values()),
        20,
        "idle rates again",
    )


def test_stop_removes_tree(shaped):
    sh("systemctl", "stop", "broker", timeout=120)
    qdiscs = parse_qdiscs(sh("tc", "qdisc", "show", "dev", "lo").stdout)
    assert [q for q in qdiscs if q.kind == "htb"] == []
    assert classes() == {}
