"""Turning forecasts on with a reload while the daemon runs, in the VM.

The first import of scikit-learn takes seconds (10-18 s under TCG, which
can exceed WatchdogSec=15s). A reload that enables forecasts must neither stall
activations for that long nor get the daemon killed by the watchdog.
Placement is read from /proc/PID/cgroup, restarts from systemctl.
"""

from __future__ import annotations

import time

import pytest

from tests.vm.guest.guestlib import (
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
    wait_until,
    write_policy,
)

pytestmark = pytest.mark.skipif(not in_guest(), reason="runs inside the test VM")

USER, UID = "frank", 2801
PORT = 8201
# An accept is normally handled within a fraction of a second, even under TCG.
MAX_MOVE_SECONDS = 3
STATIC = f"""\
idle_timeout: 120s
tiers:
  light:
    cpu.weight: 300
    memory.min: 16M
users:
  - name: {USER}
    pool: {{light: 1}}
"""
FORECAST = STATIC + "forecast:\n  enabled: true\n  plan_interval: 10s\n"


def in_slot(pid: int) -> bool:
    return cgroup_of(pid).startswith(f"{UNIT_CGROUP}/users/uid-{UID}/")


@pytest.fixture(scope="module")
def server():
    ensure_user(USER, UID)
    clear_policies()
    write_policy("10-forecast-reload.yaml", STATIC)
    # The server starts first, so its readiness probe is no activation, and
    # the daemon is a fresh one that has not imported scikit-learn yet.
    started = Server(USER, PORT)
    sh("systemctl", "restart", "broker", timeout=120)
    yield started
    started.stop()
    sh("systemctl", "stop", "broker", check=False, timeout=120)
    sh("systemctl", "reset-failed", "broker", check=False)
    clear_policies()
    sh("userdel", "-f", USER, check=False)


def test_reload_forecast_keeps_daemon(server):
    assert not in_slot(server.pid)
    pid, before = main_pid(), restarts()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    write_policy("10-forecast-reload.yaml", FORECAST)
    sh("systemctl", "reload", "broker")
    time.sleep(1)  # the daemon takes the SIGHUP before the accept below
    started = time.monotonic()
    assert server.request() == "200"
    wait_until(lambda: in_slot(server.pid), 60, "the server in a slot")
    moved_after = time.monotonic() - started
    wait_until(lambda: "forecast enabled" in journal(since), 120, "forecast enabled")
    log = journal(since)
    assert moved_after < MAX_MOVE_SECONDS, log
    assert main_pid() == pid, log
    assert restarts() == before, log
