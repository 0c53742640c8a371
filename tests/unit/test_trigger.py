"""Trigger bookkeeping on a fake cgroup tree, with real pidfds for exits."""

from __future__ import annotations

import asyncio
import subprocess

from broker.reconciler import Reconciler
from broker.state import Placement
from broker.trigger import Trigger
from tests.unit.test_reconciler import TIERS, FakeCgroupFS


def test_exit_before_watch_frees_slot(tmp_path):
    fs = FakeCgroupFS(tmp_path)
    fs.mkdir("/broker")
    reconciler = Reconciler(fs, "/broker")
    reconciler.prepare(want_io=False)
    reconciler.apply({1001: {"light": 1}}, TIERS)
    slot = reconciler.pools.slots[1001][0]
    # A process that has exited and been reaped: pidfd_open(2) finds no process.
    child = subprocess.Popen(["true"])
    child.wait()
    slot.tgid = child.pid
    trigger = Trigger(fs, reconciler, idle_timeout=lambda uid: 30.0)
    trigger.placements[child.pid] = Placement(
        child.pid, 1001, slot.path, "/home.scope", 0, 0, 0.0
    )

    async def watch() -> None:
        trigger.watch_exits(asyncio.get_running_loop())
        await asyncio.sleep(0)

    asyncio.run(watch())
    assert child.pid not in trigger.placements
    assert slot.tgid is None


def test_leftovers_query_systemd_once(tmp_path):
    fs = FakeCgroupFS(tmp_path)
    fs.mkdir("/broker")
    reconciler = Reconciler(fs, "/broker")
    reconciler.prepare(want_io=False)
    reconciler.apply({1001: {"light": 1}}, TIERS)
    slot = reconciler.pools.slots[1001][0]
    owner = subprocess.Popen(["true"])
    owner.wait()
    # Two live processes of this test stand in for the owner's leftovers. The
    # fake tree lists them in the slot, but /proc puts them elsewhere, so the
    # trigger never signals them.
    leftovers = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    fs.fs_path(slot.path, "cgroup.procs").write_text(
        "".join(f"{p.pid}\n" for p in leftovers)
    )
    queried_units: list[str] = []

    def kill_mode(unit: str) -> str:
        queried_units.append(unit)
        return "control-group"

    trigger = Trigger(
        fs, reconciler, idle_timeout=lambda uid: 30.0, kill_mode=kill_mode
    )
    placement = Placement(owner.pid, 1001, slot.path, "/gone.service", 0, 0, 0.0)
    trigger.placements[owner.pid] = placement
    try:
        trigger._forget(placement, slot, exited=True)
    finally:
        for process in leftovers:
            process.kill()
            process.wait()
    assert queried_units == ["gone.service"]
