"""A SIGHUP that reaches the daemon while it is still starting, in the VM.

Python ends a process on SIGHUP by default. A reload sent between the
daemon's first log line and READY must not kill it; the reload runs once
the daemon is up. State is read from systemctl and the journal.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.vm.guest.guestlib import (
    clear_policies,
    ensure_user,
    in_guest,
    journal,
    main_pid,
    sh,
    unit_property,
    wait_until,
    write_policy,
)

pytestmark = pytest.mark.skipif(not in_guest(), reason="runs inside the test VM")

USER, UID = "hank", 3101
# Forecasts make the start slow (scikit-learn loads before READY), which
# leaves a wide window between the first log line and READY.
POLICY = f"""\
tiers:
  light:
    cpu.weight: 300
    memory.min: 16M
users:
  - name: {USER}
    pool: {{light: 1}}
forecast:
  enabled: true
"""


@pytest.fixture
def stopped_daemon():
    ensure_user(USER, UID)
    sh("systemctl", "stop", "broker", timeout=120)
    sh("systemctl", "reset-failed", "broker", check=False)
    clear_policies()
    write_policy("10-early-sighup.yaml", POLICY)
    yield
    sh("systemctl", "stop", "broker", check=False, timeout=120)
    clear_policies()
    sh("userdel", "-f", USER, check=False)


def test_sighup_while_starting(stopped_daemon):
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    sh("systemctl", "start", "--no-block", "broker")
    wait_until(lambda: "policy loaded from" in journal(since), 60, "first log line")
    pid = main_pid()
    assert unit_property("ActiveState") == "activating"
    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: unit_property("ActiveState") != "activating", 120, "start end")
    log = journal(since)
    assert unit_property("ActiveState") == "active", log
    assert main_pid() == pid, log
    assert unit_property("NRestarts") == "0", log
    assert "reloading for a SIGHUP received while starting" in log
