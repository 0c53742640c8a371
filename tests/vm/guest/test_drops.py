"""Ring-buffer drops under a burst show up in `broker status`.

The daemon runs with the smallest ring buffer (one page, 128 events) and is
paused with SIGSTOP while a managed server accepts a burst of connections,
so the buffer must overflow; the kernel-side counter is then read through
`broker status`, which is what this test is about.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.vm.guest.guestlib import (
    PYTHON,
    clear_policies,
    ensure_user,
    in_guest,
    main_pid,
    sh,
    status_json,
    wait_until,
    write_policy,
)

pytestmark = pytest.mark.skipif(not in_guest(), reason="runs inside the test VM")

USER, UID = "bursty", 2201
BURST = 500
DROPIN = Path("/run/systemd/system/broker.service.d/ring.conf")
SERVER = Path(__file__).parents[2] / "host" / "accept_server.py"
POLICY = f"""\
tiers:
  light:
    cpu.weight: 100
    memory.min: 0
users:
  - name: {USER}
    pool: {{light: 1}}
"""


@pytest.fixture
def small_ring():
    ensure_user(USER, UID)
    clear_policies()
    write_policy("10-drops.yaml", POLICY)
    DROPIN.parent.mkdir(parents=True, exist_ok=True)
    DROPIN.write_text(
        "[Service]\nExecStart=\nExecStart=/opt/broker/bin/broker run --ring-entries 4096\n"
    )
    sh("systemctl", "daemon-reload")
    sh("systemctl", "restart", "broker", timeout=120)
    yield
    DROPIN.unlink()
    sh("systemctl", "daemon-reload")
    sh("systemctl", "stop", "broker", check=False, timeout=120)
    clear_policies()


def test_burst_drops_reported(small_ring):
    entry = pwd.getpwnam(USER)
    server = subprocess.Popen(
        [PYTHON, str(SERVER), str(BURST)],
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=[],
        stdout=subprocess.PIPE,
        text=True,
    )
    port = int(server.stdout.readline())
    daemon = main_pid()
    os.kill(daemon, signal.SIGSTOP)
    try:
        for _ in range(BURST):
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.recv(1)
    finally:
        os.kill(daemon, signal.SIGCONT)
    assert server.wait(timeout=60) == 0
    status = wait_until(
        lambda: (s := status_json())["daemon"]["ring_buffer_drops"] > 0 and s,
        20,
        "drops",
    )
    user = status["users"][str(UID)]
    assert status["daemon"]["ring_buffer_drops"] >= BURST - 128
    assert user["drops"] >= BURST - 128
    assert user["accepts"] == BURST
    assert "DROPS" in sh("/opt/broker/bin/broker", "status").stdout
