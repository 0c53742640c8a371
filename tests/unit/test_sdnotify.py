"""sd_notify datagrams, received on a real unix socket the test binds."""

import socket

from broker.sdnotify import Notifier, watchdog_interval


def bound_socket(tmp_path):
    path = str(tmp_path / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(2)
    return receiver, path


def test_ready_sends_status(tmp_path):
    receiver, path = bound_socket(tmp_path)
    Notifier(path).ready("3 users")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=3 users"


def test_reloading_carries_monotonic_usec(tmp_path):
    receiver, path = bound_socket(tmp_path)
    Notifier(path).reloading()
    fields = receiver.recv(4096).decode().split("\n")
    assert fields[0] == "RELOADING=1"
    assert fields[1].startswith("MONOTONIC_USEC=")


def test_abstract_socket_address():
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0broker-test-notify")
    receiver.settimeout(2)
    Notifier("@broker-test-notify").watchdog()
    assert receiver.recv(4096) == b"WATCHDOG=1"


def test_disabled_without_socket():
    notifier = Notifier("")
    assert not notifier.enabled
    notifier.ready("x")


def test_watchdog_interval_is_half(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 5.0


def test_watchdog_for_other_pid(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval() is None
