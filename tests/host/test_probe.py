"""The accept probe on the running kernel, with servers the test starts.

Each server runs as its own uid (no passwd entry needed); the probe's map
decides which uid is managed. Counts are checked against what the test
itself did (the number of connections it opened), not against the probe's
own counters.
"""

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.host.conftest import require

SERVER = Path(__file__).with_name("accept_server.py")
# The venv interpreter may sit under a home directory other uids cannot enter.
SERVER_PYTHON = "/usr/bin/python3"
MANAGED_UID = 64001
UNMANAGED_UID = 64002


@pytest.fixture
def probe(root_only):
    require(
        Path("/sys/kernel/btf/vmlinux").exists(), "needs BTF at /sys/kernel/btf/vmlinux"
    )
    from broker.bpfobj import object_path
    from broker.probes import AcceptProbe

    try:
        object_path("accept")
    except Exception as exc:  # noqa: BLE001
        require(False, str(exc))
    instances = []

    def make(**kwargs):
        instance = AcceptProbe(**kwargs)
        instance.attach()
        instances.append(instance)
        return instance

    yield make
    for instance in instances:
        instance.close()


def start_server(uid: int, count: int) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [SERVER_PYTHON, str(SERVER), str(count)],
        user=uid,
        group=uid,
        stdout=subprocess.PIPE,
        text=True,
    )
    port = process.stdout.readline()
    assert port.strip().isdigit(), "server did not start"
    return process, int(port)


def connect_many(port: int, count: int) -> None:
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.recv(1)


def drain(instance, seen: list, until: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(seen) < until and time.monotonic() < deadline:
        instance.poll(seen.append, 100)
    instance.poll(seen.append, 100)


def test_probe_sees_every_managed_accept(probe):
    instance = probe()
    instance.set_managed_uids([MANAGED_UID])
    server, port = start_server(MANAGED_UID, 1000)
    seen: list = []
    connect_many(port, 1000)
    assert server.wait(timeout=30) == 0
    drain(instance, seen, 1000)
    from_server = [e for e in seen if e.tgid == server.pid]
    assert len(from_server) == 1000
    assert {e.uid for e in from_server} == {MANAGED_UID}
    assert instance.drops() == 0


def test_probe_ignores_unmanaged_uid(probe):
    instance = probe()
    instance.set_managed_uids([MANAGED_UID])
    server, port = start_server(UNMANAGED_UID, 200)
    seen: list = []
    connect_many(port, 200)
    assert server.wait(timeout=30) == 0
    drain(instance, seen, 1, timeout=0.5)
    assert [e for e in seen if e.tgid == server.pid] == []
    assert [e for e in seen if e.uid == UNMANAGED_UID] == []


def test_probe_event_fields(probe):
    instance = probe()
    instance.set_managed_uids([MANAGED_UID])
    server, port = start_server(MANAGED_UID, 1)
    before = time.monotonic_ns()
    connect_many(port, 1)
    assert server.wait(timeout=30) == 0
    seen: list = []
    drain(instance, seen, 1)
    event = next(e for e in seen if e.tgid == server.pid)
    assert event.pid == server.pid  # single-threaded: thread id is the pid
    assert event.fd >= 3
    assert before <= event.ts_ns <= time.monotonic_ns()


def test_probe_counts_ring_buffer_drops(probe):
    # One page fits 128 records of 32 bytes (24-byte event plus 8-byte header),
    # so a burst of 1000 accepts read only afterwards must overflow it.
    instance = probe(ring_entries=os.sysconf("SC_PAGE_SIZE"))
    instance.set_managed_uids([MANAGED_UID])
    server, port = start_server(MANAGED_UID, 1000)
    connect_many(port, 1000)
    assert server.wait(timeout=30) == 0
    seen: list = []
    drain(instance, seen, 1000, timeout=1.0)
    delivered = len([e for e in seen if e.tgid == server.pid])
    assert delivered < 1000
    assert instance.drops() == 1000 - delivered
    assert instance.counters()[MANAGED_UID].drops == 1000 - delivered


def test_probe_counts_open_and_closed(probe):
    instance = probe()
    instance.set_managed_uids([MANAGED_UID])
    server, port = start_server(MANAGED_UID, 50)
    connect_many(port, 50)
    assert server.wait(timeout=30) == 0
    deadline = time.monotonic() + 5
    while (
        instance.counters().get(MANAGED_UID) is None
        or instance.counters()[MANAGED_UID].closes < 50
    ):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    counters = instance.counters()[MANAGED_UID]
    assert counters.accepts == 50
    assert counters.closes == 50
    assert counters.open == 0


def test_filter_follows_set_managed_uids(probe):
    instance = probe()
    instance.set_managed_uids([MANAGED_UID, UNMANAGED_UID])
    instance.set_managed_uids([UNMANAGED_UID])
    assert instance.managed_uids() == {UNMANAGED_UID}


def test_close_detaches_programs(probe):
    instance = probe()
    instance.close()
    listing = subprocess.run(
        ["bpftool", "prog", "show"], capture_output=True, text=True
    )
    if listing.returncode != 0:
        pytest.skip("bpftool not available")
    assert "broker_exit_acc" not in listing.stdout
