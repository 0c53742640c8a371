"""Forecast-driven pools under a ramp of real connections, in the VM.

A managed user's forking server serves each connection in a new process for
HOLD seconds, and a client opens connections at a rate that ramps up, holds
and stops. Every second the test counts the user's slot directories in
cgroupfs and reads the daemon's activation and miss counters. The pool must
grow during the ramp, serve most arrivals warm, and shrink after the load
ends. The series is written to the results directory.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.vm.guest.guestlib import (
    PYTHON,
    UNIT_CGROUP,
    clear_policies,
    ensure_user,
    in_guest,
    results_dir,
    sh,
    status_json,
    wait_until,
    write_policy,
)

pytestmark = pytest.mark.skipif(not in_guest(), reason="runs inside the test VM")

USER, UID = "rampy", 2301
HOLD = 2.0  # seconds each connection stays open
RAMP = [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]  # arrivals per second, 5 s per step
PEAK_SECONDS = 15
QUIET_SECONDS = 60
POLICY = f"""\
idle_timeout: 2s
tiers:
  light:
    cpu.weight: 200
    memory.min: 8M
users:
  - name: {USER}
    pool: {{light: 1}}
    max_slots: 24
forecast:
  enabled: true
  interval: 1s
  plan_interval: 5s
  quantile: 0.9
  window: 64
  horizon_min: 5s
  horizon_max: 30s
"""
SERVER = Path(__file__).with_name("hold_server.py")
SLOTS = Path(f"/sys/fs/cgroup{UNIT_CGROUP}/users/uid-{UID}")


def slot_count() -> int:
    if not SLOTS.is_dir():
        return 0
    return sum(1 for p in SLOTS.iterdir() if p.is_dir())


def counters() -> dict:
    return status_json()["users"].get(str(UID), {}).get("counters", {})


@pytest.fixture(scope="module")
def server():
    ensure_user(USER, UID)
    clear_policies()
    write_policy("10-forecast.yaml", POLICY)
    sh("systemctl", "restart", "broker", timeout=180)
    wait_until(lambda: slot_count() >= 1, 120, "the first warm slot")
    entry = pwd.getpwnam(USER)
    process = subprocess.Popen(
        [PYTHON, str(SERVER), str(HOLD)],
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=[],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    port = int(process.stdout.readline())
    yield port
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    sh("systemctl", "stop", "broker", check=False, timeout=120)
    clear_policies()


def connect(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.recv(1)


def drive(port: int, schedule: list[int], series: list[dict], started: float) -> None:
    """Open connections at schedule[i] per second during second i; sample each second."""
    threads: list[threading.Thread] = []
    for second, rate in enumerate(schedule):
        tick = started + second
        for k in range(rate):
            thread = threading.Thread(target=connect, args=(port,), daemon=True)
            thread.start()
            threads.append(thread)
            time.sleep(max(tick + (k + 1) / (rate + 1) - time.monotonic(), 0))
        time.sleep(max(tick + 1 - time.monotonic(), 0))
        series.append({"t": second, "rate": rate, "slots": slot_count(), **counters()})
    for thread in threads:
        thread.join(timeout=30)


def test_pool_follows_ramp(server):
    schedule = [rate for rate in RAMP for _ in range(5)]
    schedule += [RAMP[-1]] * PEAK_SECONDS + [0] * QUIET_SECONDS
    series: list[dict] = []
    drive(server, schedule, series, time.monotonic())
    (results_dir() / "forecast-ramp.json").write_text(json.dumps(series))

    ramp_end = len(RAMP) * 5
    peak_end = ramp_end + PEAK_SECONDS
    start_slots = series[0]["slots"]
    peak_slots = max(s["slots"] for s in series[ramp_end:peak_end])
    late = series[ramp_end // 2 : peak_end]
    activations = late[-1]["activations"] - late[0]["activations"]
    misses = late[-1]["misses"] - late[0]["misses"]
    print(
        json.dumps(
            {
                "start": start_slots,
                "peak": peak_slots,
                "end": series[-1]["slots"],
                "activations": activations,
                "misses": misses,
            }
        )
    )
    # Peak concurrency is about 6 arrivals/s times 2 s held.
    assert peak_slots >= 8
    assert peak_slots > start_slots
    assert activations / max(activations + misses, 1) >= 0.7
    assert series[-1]["slots"] <= peak_slots // 2


def test_explain_shows_derivation(server):
    result = sh("/opt/broker/bin/broker", "explain", USER)
    assert f"user {UID}:" in result.stdout
    assert "quantile 0.9" in result.stdout
    assert "horizon" in result.stdout


def test_explain_json_matches_slots(server):
    data = json.loads(sh("/opt/broker/bin/broker", "explain", USER, "--json").stdout)
    planned = sum(t["slots"] for t in data["plan"]["tiers"])
    assert planned >= 1
    assert data["plan"]["model"].split()[0] in ("gp", "sparse", "ewma")
