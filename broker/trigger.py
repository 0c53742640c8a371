"""Activation, the cold path and reclamation.

on_accept() runs in the asyncio loop for every ring-buffer event. It reads
at most two small files of the accepting process (/proc/PID/stat and
/proc/PID/cgroup) and writes its pid to one cgroup.procs. It never loads
YAML, fits a model or scans /proc.

reclaim_idle() runs on the control tick: a placed process with no accept for
its user's idle timeout goes back home and its slot is free again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from broker.cgroups import CgroupFS, MoveOutcome, parent_of
from broker.probes import AcceptEvent
from broker.reconciler import Reconciler, Slot
from broker.state import Placement

log = logging.getLogger(__name__)

LATENCY_SAMPLES = 4096
# The reason given when a slot's owner exited and its leftovers go home.
OWNER_EXITED = "owner exited"


@dataclass
class UserCounters:
    """Per-uid outcome counts, as `broker status` shows them."""

    activations: int = 0
    misses: int = 0
    reclaims: int = 0
    exits: int = 0
    gone: int = 0
    zombies: int = 0
    kernel_threads: int = 0
    move_failures: int = 0
    returned_elsewhere: int = 0
    stopped_with_unit: int = 0  # killed because their service was stopped


@dataclass
class Trigger:
    """Moves accepting processes of managed users into free warm slots."""

    cg: CgroupFS
    reconciler: Reconciler
    idle_timeout: Callable[[int], float]  # uid -> seconds
    on_change: Callable[[], None] = lambda: None  # placements changed
    on_slot_state: Callable[[int, str | None], None] = lambda uid, tier: None
    on_miss: Callable[[int], None] = lambda uid: None  # cold path: ask for a slot
    # Unit name -> its KillMode, or None when systemd cannot tell.
    kill_mode: Callable[[str], str | None] = lambda unit: None
    placements: dict[int, Placement] = field(default_factory=dict)
    counters: dict[int, UserCounters] = field(default_factory=dict)
    # Kernel accept timestamp to the return of the cgroup.procs write.
    latencies_ns: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    # Kernel accept timestamp to the start of on_accept(): ring buffer and loop.
    delivery_ns: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    events: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _pidfds: dict[int, int] = field(default_factory=dict)

    def user(self, uid: int) -> UserCounters:
        counters = self.counters.get(uid)
        if counters is None:
            counters = self.counters[uid] = UserCounters()
        return counters

    # -- event path ----------------------------------------------------------

    def on_accept(self, event: AcceptEvent) -> None:
        handled_ns = time.monotonic_ns()
        self.events += 1
        now = handled_ns / 1e9
        placement = self.placements.get(event.tgid)
        if placement is not None:
            placement.last_accept = now
            return
        if event.uid not in self.reconciler.pools.slots:
            return  # managed by the filter but no pool (yet): nothing to do
        self._activate(event, now, handled_ns)

    def _activate(self, event: AcceptEvent, now: float, handled_ns: int) -> None:
        counters = self.user(event.uid)
        home = self.cg.cgroup_of(event.tgid)
        if home is None:
            counters.gone += 1
            log.debug("pid %d exited before it could be moved", event.tgid)
            return
        if home.startswith(self.reconciler.root + "/"):
            self._refresh_owner_of(home, now)
            return
        slot = self.reconciler.pools.free_slot(event.uid)
        if slot is None:
            counters.misses += 1
            log.debug(
                "no free slot for uid %d (pid %d): cold path", event.uid, event.tgid
            )
            self.on_miss(event.uid)
            return
        outcome = self.cg.move(event.tgid, slot.path)
        moved_ns = time.monotonic_ns()
        outcome = self._refine(outcome, event.tgid, slot.path)
        if outcome is not MoveOutcome.MOVED:
            self._count_failure(counters, outcome, event.tgid, slot.path)
            return
        slot.tgid = event.tgid
        self.placements[event.tgid] = Placement(
            event.tgid, event.uid, slot.path, home, event.ts_ns, moved_ns, now
        )
        self._watch(event.tgid)
        counters.activations += 1
        self.latencies_ns.append(moved_ns - event.ts_ns)
        self.delivery_ns.append(handled_ns - event.ts_ns)
        log.info(
            "activated pid %d of uid %d: %s -> %s (tier %s) after accept on fd %d",
            event.tgid,
            event.uid,
            home,
            slot.path,
            slot.tier,
            event.fd,
        )
        self.on_slot_state(event.uid, slot.tier)
        self.on_change()

    def _refine(self, outcome: MoveOutcome, pid: int, target: str) -> MoveOutcome:
        """Tell zombies and kernel threads apart after the write, off the timed path.

        The kernel accepts the pid of a zombie and moves nothing, and rejects a
        kernel thread with EINVAL. After a successful write, /proc/PID/cgroup
        shows whether the process really is in the target: a zombie still
        shows its old cgroup, while a process that exited right after the move
        shows the target, or is gone and is dropped at the next check.
        """
        if outcome is MoveOutcome.MOVED:
            now_in = self.cg.cgroup_of(pid)
            if now_in is None or now_in == target:
                return outcome
            return self.cg.classify(pid) or MoveOutcome.ZOMBIE
        return self.cg.classify(pid) or outcome

    def _refresh_owner_of(self, cgroup: str, now: float) -> None:
        """Refresh the idle timer of the slot in which a placed process's child accepted."""
        for placement in self.placements.values():
            if placement.slot == cgroup:
                placement.last_accept = now
                return

    def _count_failure(
        self, counters: UserCounters, outcome: MoveOutcome, pid: int, target: str
    ) -> None:
        if outcome is MoveOutcome.GONE:
            counters.gone += 1
            log.debug("pid %d exited before it could be moved", pid)
        elif outcome is MoveOutcome.ZOMBIE:
            counters.zombies += 1
            log.debug("pid %d is a zombie; not moved", pid)
        elif outcome is MoveOutcome.KERNEL_THREAD:
            counters.kernel_threads += 1
            log.debug("pid %d is a kernel thread; not moved", pid)
        else:
            counters.move_failures += 1
            log.warning("moving pid %d to %s failed: %s", pid, target, outcome.value)

    # -- control path ----------------------------------------------------------

    def watch_exits(self, loop: asyncio.AbstractEventLoop) -> None:
        """Free a slot as soon as its process exits, through a pidfd per placement.

        A pidfd (pidfd_open(2), Linux 5.3) becomes readable when the process
        exits, so the loop needs no per-tick scan of /proc for exits.
        """
        self._loop = loop
        for tgid in list(self.placements):
            self._watch(tgid)

    def _watch(self, tgid: int) -> None:
        if self._loop is None or tgid in self._pidfds:
            return
        try:
            fd = os.pidfd_open(tgid)
        except ProcessLookupError:
            # Exited (and reaped) before the watch began: free its slot now.
            self._loop.call_soon(self._on_exit, tgid)
            return
        except OSError as exc:
            log.debug(
                "pidfd_open(%d) failed: %s; relying on periodic checks", tgid, exc
            )
            return
        self._pidfds[tgid] = fd
        self._loop.add_reader(fd, self._on_exit, tgid)

    def _unwatch(self, tgid: int) -> None:
        fd = self._pidfds.pop(tgid, None)
        if fd is not None and self._loop is not None:
            self._loop.remove_reader(fd)
            os.close(fd)

    def _on_exit(self, tgid: int) -> None:
        placement = self.placements.get(tgid)
        self._unwatch(tgid)
        if placement is not None:
            slot = self.reconciler.pools.by_path(placement.slot, placement.uid)
            self._forget(placement, slot, exited=True)

    def check_placements(self) -> None:
        """Forget placements whose process left its slot without a pidfd telling."""
        for placement in list(self.placements.values()):
            if self.cg.cgroup_of(placement.tgid) != placement.slot:
                slot = self.reconciler.pools.by_path(placement.slot, placement.uid)
                self._forget(placement, slot, exited=True)

    def reclaim_idle(self, now: float | None = None) -> int:
        """Send home every placed process idle for its user's timeout; return how many."""
        now = time.monotonic() if now is None else now
        count = 0
        for placement in list(self.placements.values()):
            slot = self.reconciler.pools.by_path(placement.slot, placement.uid)
            if (
                self._loop is None
                and self.cg.cgroup_of(placement.tgid) != placement.slot
            ):
                self._forget(placement, slot, exited=True)
                continue
            if now - placement.last_accept >= self.idle_timeout(placement.uid):
                self.send_home(placement, slot, reason="idle")
                self.user(placement.uid).reclaims += 1
                count += 1
        return count

    def send_home(self, placement: Placement, slot: Slot | None, reason: str) -> None:
        """Move the placed process, and anything it started in the slot, home."""
        pids = self.cg.procs(placement.slot) or [placement.tgid]
        for pid in pids:
            self.return_pid(pid, placement.home, placement.uid, reason)
        self._forget(placement, slot, exited=False)

    def return_pid(
        self,
        pid: int,
        home: str,
        uid: int,
        reason: str,
        kill_modes: dict[str, str | None] | None = None,
    ) -> str | None:
        """Move pid to home, or to the nearest ancestor that accepts processes.

        The home cgroup may have vanished (systemd removes an empty scope) or
        gained children with controllers enabled while the process was away,
        and the kernel then rejects the write (ENOENT or EBUSY). The broker
        then walks up from home to the first ancestor that accepts processes
        and logs where the process went. A cgroup accepts processes when it
        has no controllers enabled for its children, and the root always does.
        """
        if self._stop_with_unit(pid, home, uid, reason, kill_modes):
            return None
        target = home
        while True:
            outcome = (
                self.cg.move(pid, target)
                if self.cg.accepts_processes(target) or target == "/"
                else MoveOutcome.NOT_LEAF
            )
            if outcome is MoveOutcome.MOVED:
                if target != home:
                    self.user(uid).returned_elsewhere += 1
                    log.warning(
                        "pid %d could not return to %s; moved it to %s instead",
                        pid,
                        home,
                        target,
                    )
                else:
                    log.info(
                        "returned pid %d of uid %d home to %s (%s)",
                        pid,
                        uid,
                        home,
                        reason,
                    )
                return target
            if outcome in (
                MoveOutcome.GONE,
                MoveOutcome.ZOMBIE,
                MoveOutcome.KERNEL_THREAD,
            ):
                return None
            if target == "/":
                log.error(
                    "pid %d could not be moved out of its slot: %s", pid, outcome.value
                )
                return None
            target = parent_of(target)

    def _stop_with_unit(
        self,
        pid: int,
        home: str,
        uid: int,
        reason: str,
        kill_modes: dict[str, str | None] | None,
    ) -> bool:
        """Kill pid if its home was a service that systemd has since stopped.

        systemd kills every process in the cgroup of a stopping unit with
        KillMode=control-group or mixed, but not the ones the broker had moved
        into a slot. So those are killed here, as systemd would have done;
        return True if pid was. systemd is asked only when home is gone or the
        slot's owner exited, because a stop shows up as one of the two.
        """
        unit = home.rsplit("/", 1)[-1]
        if not unit.endswith(".service"):
            return False
        if self.cg.exists(home) and reason != OWNER_EXITED:
            return False
        # Leftovers of one owner share the result, so systemctl runs once per unit.
        modes = {} if kill_modes is None else kill_modes
        if unit not in modes:
            modes[unit] = self.kill_mode(unit)
        mode = modes[unit]
        if mode not in ("control-group", "mixed"):
            return False
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return True
        try:
            # A signal through the pidfd reaches only the process it was opened
            # on, so a pid reused after this check of its cgroup is never hit.
            where = self.cg.cgroup_of(pid) or ""
            if not where.startswith(self.reconciler.users_dir + "/"):
                return False
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return True
        except OSError as exc:
            log.error("pid %d of stopped %s could not be killed: %s", pid, unit, exc)
            return False
        finally:
            os.close(pidfd)
        self.user(uid).stopped_with_unit += 1
        log.warning(
            "pid %d of uid %d: its unit %s was stopped (KillMode=%s), so it was "
            "killed as systemd would have",
            pid,
            uid,
            unit,
            mode,
        )
        return True

    def _forget(self, placement: Placement, slot: Slot | None, exited: bool) -> None:
        self.placements.pop(placement.tgid, None)
        self._unwatch(placement.tgid)
        if exited:
            self.user(placement.uid).exits += 1
            log.info(
                "pid %d of uid %d left slot %s",
                placement.tgid,
                placement.uid,
                placement.slot,
            )
            leftovers = self.cg.procs(placement.slot)
            kill_modes: dict[str, str | None] = {}
            for pid in leftovers:
                self.return_pid(
                    pid, placement.home, placement.uid, OWNER_EXITED, kill_modes
                )
        if slot is not None:
            self.reconciler.release(slot)
        if not any(p.uid == placement.uid for p in self.placements.values()):
            self.on_slot_state(placement.uid, None)
        self.on_change()

    def busy_tier(self, uid: int) -> str | None:
        """Return the tier of one busy slot of uid, or None when all are free."""
        for placement in self.placements.values():
            if placement.uid == uid:
                slot = self.reconciler.pools.by_path(placement.slot, placement.uid)
                if slot is not None:
                    return slot.tier
        return None

    def return_everyone(self, reason: str) -> int:
        """Send every placed process home (used on stop); return how many."""
        count = 0
        for placement in list(self.placements.values()):
            slot = self.reconciler.pools.by_path(placement.slot, placement.uid)
            self.send_home(placement, slot, reason)
            count += 1
        return count
