"""Kernel edge cases of the cgroup gateway and trigger, on real cgroupfs in the VM.

Each test works in its own subtree under /sys/fs/cgroup/broker-kt and removes
it afterwards. Processes are started by the test itself.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time

import pytest

from tests.vm.guest.guestlib import CGROUP, cgroup_of, in_guest, read_knob

pytestmark = pytest.mark.skipif(not in_guest(), reason="runs inside the test VM")

TOP = "/broker-kt"
UID = 4001


def remove_tree(path):
    base = CGROUP / path.lstrip("/")
    if not base.exists():
        return
    for directory in sorted(
        (p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
    ):
        directory.rmdir()
    base.rmdir()


@pytest.fixture
def cg():
    from broker.cgroups import CgroupFS

    fs = CgroupFS()
    fs.enable_controllers("/", {"cpu", "memory"})
    fs.mkdir(TOP)
    fs.enable_controllers(TOP, {"cpu", "memory"})
    started = []
    yield fs, started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
    for pid in fs.procs(TOP) + [
        p for c in fs.children(TOP) for p in fs.procs(f"{TOP}/{c}")
    ]:
        fs.move(pid, "/")
    remove_tree(TOP)


def spawn_in(fs, cgroup: str, started: list, uid: int = 0) -> subprocess.Popen:
    process = subprocess.Popen(["sleep", "300"], user=uid or None)
    started.append(process)
    assert fs.move(process.pid, cgroup).value == "moved"
    return process


def make_trigger(fs, pool=None):
    from broker.policy import Tier
    from broker.reconciler import Reconciler
    from broker.trigger import Trigger

    reconciler = Reconciler(fs, f"{TOP}/broker")
    fs.mkdir(reconciler.root)
    reconciler.prepare(want_io=False)
    tiers = {"light": Tier("light", cpu_weight=250, memory_min=0)}
    reconciler.apply({UID: pool or {"light": 1}}, tiers)
    return Trigger(fs, reconciler, idle_timeout=lambda uid: 1.0)


def event_for(pid: int, uid: int = UID):
    from broker.probes import AcceptEvent

    return AcceptEvent(ts_ns=time.monotonic_ns(), pid=pid, tgid=pid, uid=uid, fd=5)


def test_trigger_moves_and_reclaims(cg):
    fs, started = cg
    fs.mkdir(f"{TOP}/home")
    process = spawn_in(fs, f"{TOP}/home", started, UID)
    trigger = make_trigger(fs)
    trigger.on_accept(event_for(process.pid))
    assert cgroup_of(process.pid) == f"{TOP}/broker/users/uid-{UID}/light-0"
    assert read_knob(cgroup_of(process.pid), "cpu.weight") == "250"
    assert trigger.reclaim_idle(now=time.monotonic() + 10) == 1
    assert cgroup_of(process.pid) == f"{TOP}/home"


def test_memory_min_zero_written(cg):
    fs, _ = cg
    trigger = make_trigger(fs)
    slot = f"{TOP}/broker/users/uid-{UID}/light-0"
    fs.write(slot, "memory.min", "4096")
    from broker.policy import Tier

    trigger.reconciler.apply({UID: {"light": 1}}, {"light": Tier("light", 250, 0)})
    assert read_knob(slot, "memory.min") == "0"


def test_cold_path_counts_miss(cg):
    fs, started = cg
    fs.mkdir(f"{TOP}/home")
    first = spawn_in(fs, f"{TOP}/home", started, UID)
    second = spawn_in(fs, f"{TOP}/home", started, UID)
    trigger = make_trigger(fs)
    trigger.on_accept(event_for(first.pid))
    trigger.on_accept(event_for(second.pid))
    assert cgroup_of(second.pid) == f"{TOP}/home"
    assert trigger.user(UID).misses == 1


def test_exited_pid_counted_gone(cg, caplog):
    fs, started = cg
    trigger = make_trigger(fs)
    process = subprocess.Popen(["true"])
    process.wait()
    with caplog.at_level(logging.INFO, logger="broker"):
        trigger.on_accept(event_for(process.pid))
    assert trigger.user(UID).gone == 1
    assert [r for r in caplog.records if r.levelno > logging.DEBUG] == []
    fs.mkdir(f"{TOP}/home")
    alive = spawn_in(fs, f"{TOP}/home", started, UID)
    trigger.on_accept(event_for(alive.pid))
    assert cgroup_of(alive.pid).endswith("/light-0")


def test_zombie_skipped_and_counted(cg):
    fs, _ = cg
    trigger = make_trigger(fs)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 5
        while fs.process_info(pid).state != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        trigger.on_accept(event_for(pid))
        assert trigger.user(UID).zombies == 1
        assert trigger.placements == {}
    finally:
        os.waitpid(pid, 0)


def test_kernel_thread_skipped_and_counted(cg):
    fs, _ = cg
    trigger = make_trigger(fs)
    kthreadd = 2
    assert fs.process_info(kthreadd).is_kernel_thread
    trigger.on_accept(event_for(kthreadd))
    assert trigger.user(UID).kernel_threads == 1
    assert cgroup_of(kthreadd) == "/"


def test_home_turned_interior_falls_back(cg):
    fs, started = cg
    fs.mkdir(f"{TOP}/home")
    process = spawn_in(fs, f"{TOP}/home", started, UID)
    trigger = make_trigger(fs)
    trigger.on_accept(event_for(process.pid))
    fs.mkdir(f"{TOP}/home/child")
    fs.enable_controllers(f"{TOP}/home", {"cpu"})
    trigger.reclaim_idle(now=time.monotonic() + 10)
    landed = cgroup_of(process.pid)
    assert not landed.startswith(f"{TOP}/broker")
    assert fs.accepts_processes(landed)
    assert trigger.user(UID).returned_elsewhere == 1


def test_enable_on_populated_names_pids(cg):
    from broker.errors import CgroupError

    fs, started = cg
    fs.mkdir(f"{TOP}/busy")
    process = spawn_in(fs, f"{TOP}/busy", started)
    with pytest.raises(CgroupError) as caught:
        fs.enable_controllers(f"{TOP}/busy", {"cpu"})
    assert caught.value.errno == errno.EBUSY
    assert str(process.pid) in str(caught.value)
    assert read_knob(f"{TOP}/busy", "cgroup.subtree_control") == ""


def test_missing_controller_names_level(cg):
    from broker.errors import ControllerMissingError

    fs, _ = cg
    # TOP enables memory for a, but a enables nothing for b, so b is the
    # first level on the way down to c whose cgroup.controllers lacks it.
    fs.mkdir(f"{TOP}/a")
    fs.mkdir(f"{TOP}/a/b")
    fs.mkdir(f"{TOP}/a/b/c")
    with pytest.raises(ControllerMissingError) as caught:
        fs.enable_controllers(f"{TOP}/a/b/c", {"memory"})
    assert caught.value.level == str(CGROUP / "broker-kt/a/b")
    assert "subtree_control" in str(caught.value)


def test_rmdir_right_after_exit(cg):
    fs, started = cg
    fs.mkdir(f"{TOP}/short")
    process = spawn_in(fs, f"{TOP}/short", started)
    process.kill()
    assert fs.rmdir(f"{TOP}/short") is True
    process.wait()
    assert not (CGROUP / "broker-kt/short").exists()


def test_rmdir_populated_names_pids(cg):
    from broker.errors import CgroupError

    fs, started = cg
    fs.mkdir(f"{TOP}/held")
    process = spawn_in(fs, f"{TOP}/held", started)
    with pytest.raises(CgroupError) as caught:
        fs.rmdir(f"{TOP}/held", timeout=0.2)
    assert str(process.pid) in str(caught.value)


def test_remove_all_leaves_nothing(cg):
    fs, _ = cg
    trigger = make_trigger(fs, {"light": 3})
    trigger.reconciler.remove_all()
    assert fs.children(f"{TOP}/broker/users") == []
