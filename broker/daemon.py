"""The broker daemon: `broker run`.

One asyncio loop carries both paths:
- the event path: the accept probe's ring buffer wakes the loop through its
  epoll fd and Trigger.on_accept moves the process;
- the control path: a tick (default 1 s) that reclaims idle slots, refreshes
  the set of managed users, re-plans pools, writes status and pings the
  systemd watchdog.

Signals: SIGHUP reloads policies (a bad policy is rejected and the last good
one stays in force); SIGTERM and SIGINT return every process home, remove
the broker's cgroups and BPF links, then exit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import features as features_mod
from broker import metrics
from broker import policy as policy_mod
from broker import state as state_mod
from broker.cgroups import CgroupFS, join, parent_of
from broker.errors import BrokerError, PolicyError
from broker.netshape import ShaperGroup
from broker.policy import Policy, UserPolicy
from broker.probes import AcceptProbe
from broker.reconciler import HOLDER_LEAF, USERS_DIR, Reconciler
from broker.sdnotify import Notifier, watchdog_interval
from broker.trigger import Trigger

log = logging.getLogger(__name__)

USER_REFRESH_SECONDS = 30.0
SLOTS_UNIT = "broker-slots.service"
SLOTS_UNIT_CGROUP = "/system.slice/broker-slots.service"
CLASS_STATS_SECONDS = 5.0
# Imports scikit-learn, which takes seconds: 10-18 s in the TCG test VM.
FORECAST_MODULE = "broker.forecast_loop"


@dataclass
class DaemonOptions:
    """Command-line settings of `broker run`."""

    policy_paths: list[str] = field(default_factory=list)
    cgroup_root: str | None = None  # None: the daemon's own (delegated) cgroup
    state_dir: str | None = None
    tick: float = 1.0
    dry_run: bool = False
    ring_entries: int | None = None


def resolve_root(cg: CgroupFS, explicit: str | None) -> str:
    """Return the delegated cgroup that contains the slots.

    By default that is the cgroup of broker-slots.service, a unit with
    Delegate=yes and only a placeholder process. The slots live apart from
    the daemon's own unit because systemd (before version 254) cannot start a
    unit's process again in a cgroup that has controllers enabled for its
    children: a restarted daemon would fail with status 219/CGROUP while
    users' processes still sit in slots. "self" selects the daemon's own
    cgroup, for a transient scope (`systemd-run --scope -p Delegate=yes`).
    """
    if explicit == "self":
        own = cg.cgroup_of(os.getpid())
        if own is None or own == "/":
            raise BrokerError(
                "--cgroup-root self: the daemon runs in the root cgroup; start it in a delegated scope"
            )
        if own.rsplit("/", 1)[-1] == HOLDER_LEAF and cg.exists(
            join(parent_of(own), USERS_DIR)
        ):
            return parent_of(own)
        return own
    if explicit:
        return explicit.rstrip("/") or "/"
    root = _unit_cgroup(SLOTS_UNIT) or SLOTS_UNIT_CGROUP
    if not cg.exists(root):
        raise BrokerError(
            f"cgroup {root} of {SLOTS_UNIT} not found: start it "
            f"(systemctl start {SLOTS_UNIT}) or pass --cgroup-root"
        )
    return root


def _unit_property(
    unit: str, name: str, timeout: float = 10, value: bool = True
) -> str | None:
    """Return properties of a systemd unit as `systemctl show` prints them, or None.

    With value, only the value of the one property; else NAME=VALUE lines.
    """
    command = ["systemctl", "show", f"--property={name}", unit]
    if value:
        command.insert(3, "--value")
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("systemctl show %s of %s failed: %s", name, unit, exc)
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _unit_cgroup(unit: str) -> str | None:
    """Return a unit's cgroup path as systemd reports it, or None."""
    path = _unit_property(unit, "ControlGroup")
    return path if path and path.startswith("/") else None


def stopped_unit_kill_mode(unit: str) -> str | None:
    """Return the KillMode of a unit that is stopping or stopped, else None.

    None also when systemd cannot be asked, so that nothing is killed on a guess.
    """
    text = _unit_property(unit, "ActiveState,KillMode", timeout=2, value=False)
    fields = dict(
        line.split("=", 1) for line in (text or "").splitlines() if "=" in line
    )
    if fields.get("ActiveState") in (None, "active", "reloading", "activating"):
        return None
    return fields.get("KillMode") or None


def is_delegated(cg: CgroupFS, root: str) -> bool:
    """Return True if systemd marked root as delegated (xattr set by systemd >= 251)."""
    path = cg.fs_path(root)
    for name in ("trusted.delegate", "user.delegate"):
        try:
            if os.getxattr(path, name) == b"1":
                return True
        except OSError:
            continue
    return False


class Daemon:
    """Wires policy, cgroups, probe and trigger into one loop."""

    def __init__(self, options: DaemonOptions):
        self.options = options
        self.cg = CgroupFS()
        self.notifier = Notifier()
        self.state_dir = state_mod.state_dir(options.state_dir)
        self.policy: Policy | None = None
        self.users: dict[int, UserPolicy] = {}
        self.last_reload_error: list[str] = []
        self.policy_loaded_at = 0.0
        self.started = time.time()
        self.stop_event = asyncio.Event()
        self.probe: AcceptProbe | None = None
        self.reconciler: Reconciler | None = None
        self.trigger: Trigger | None = None
        self.features: features_mod.Features | None = None
        self._dirty = False
        self._last_user_refresh = 0.0
        self._last_measure = 0.0
        self._pools_stale = False
        self.forecast: Any = None  # broker.forecast_loop.ForecastLoop when enabled
        self._forecast_import: asyncio.Future | None = None
        self.plan_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan")
        self.shaper: ShaperGroup | None = None
        # Netlink calls block for milliseconds to a fraction of a second, so
        # they run on one worker thread, in the order they were submitted.
        self.netshape_worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="netshape"
        )
        self.class_stats: list[dict[str, Any]] = []
        # File writes of the state directory, kept off the event loop.
        self.state_worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="state"
        )
        self._last_class_stats = 0.0

    # -- start ---------------------------------------------------------------

    def load_policy(self) -> Policy:
        paths = policy_mod.resolve_policy_paths(self.options.policy_paths)
        return policy_mod.load(paths)

    async def run(self) -> int:
        # Python's default for SIGHUP ends the process. Until the loop's handler
        # is installed, a SIGHUP only marks a reload to run once started.
        early_reload: list[int] = []
        signal.signal(signal.SIGHUP, lambda signum, frame: early_reload.append(signum))
        self.features = features_mod.probe(self.cg)
        features_mod.log_features(self.features)
        try:
            self.policy = self.load_policy()
        except PolicyError as exc:
            for problem in exc.problems:
                log.error("policy: %s", problem)
            return 1
        self.policy_loaded_at = time.time()
        log.info(
            "policy loaded from %s: %s",
            self.policy.source_names(),
            self.policy.summary(),
        )
        for line in policy_mod.advice(self.policy):
            log.warning("policy: %s", line)
        state_mod.ensure_dir(self.state_dir)
        try:
            self.start_kernel_side()
        except BrokerError as exc:
            log.error("%s", exc)
            self.shutdown()
            return 1
        self.install_signal_handlers()
        self.notifier.ready(self.status_line())
        log.info("broker ready: %s", self.status_line())
        if early_reload:
            log.info("reloading for a SIGHUP received while starting")
            self.reload()
        await self.control_loop()
        self.shutdown()
        return 0

    def start_kernel_side(self) -> None:
        root = resolve_root(self.cg, self.options.cgroup_root)
        if not is_delegated(self.cg, root):
            log.warning(
                "cgroup %s is not marked as delegated; keep the slots in "
                "broker-slots.service (Delegate=yes) or a scope with Delegate=yes",
                root,
            )
        self.reconciler = Reconciler(self.cg, root, dry_run=self.options.dry_run)
        assert self.policy is not None
        want_io = any(t.io_weight is not None for t in self.policy.tiers)
        self.reconciler.prepare(want_io)
        self.reconciler.adopt_existing()
        self.trigger = Trigger(
            self.cg,
            self.reconciler,
            idle_timeout=self.idle_timeout,
            on_change=self.mark_dirty,
            on_slot_state=self.on_slot_state,
            on_miss=self.on_miss,
            kill_mode=stopped_unit_kill_mode,
        )
        self.update_forecast(self.policy)
        if self.policy.interfaces:
            self.shaper = ShaperGroup(self.policy.interfaces)
        self.readopt()
        self.trigger.watch_exits(asyncio.get_running_loop())
        self.refresh_users(force=True)
        self.netshape_worker.submit(lambda: None).result()  # first tc apply done
        self.probe = AcceptProbe(ring_entries=self.options.ring_entries)
        self.probe.attach()
        self.probe.set_managed_uids(self.users)
        self.probe.start(asyncio.get_running_loop(), self.trigger.on_accept)

    def readopt(self) -> None:
        """Take over placements of a previous run whose processes are still in their slots."""
        assert self.trigger is not None and self.reconciler is not None
        saved = {p.tgid: p for p in state_mod.load_placements(self.state_dir)}
        for slot in self.reconciler.pools.all():
            pids = self.cg.procs(slot.path)
            owner_here = any(
                pid in saved and saved[pid].slot == slot.path for pid in pids
            )
            for pid in pids:
                placement = saved.get(pid)
                if placement is None and owner_here:
                    # Started in the slot by its owner: it goes home with the owner.
                    log.debug("pid %d stays in %s with its owner", pid, slot.path)
                    continue
                if placement is not None and placement.slot == slot.path:
                    placement.last_accept = time.monotonic()
                    slot.tgid = pid
                    self.trigger.placements[pid] = placement
                    log.info(
                        "re-adopted pid %d in %s (home %s)",
                        pid,
                        slot.path,
                        placement.home,
                    )
                    continue
                owner = next((p for p in saved.values() if p.slot == slot.path), None)
                home = owner.home if owner is not None else "/"
                log.warning(
                    "pid %d in %s has no saved placement; sending it to %s",
                    pid,
                    slot.path,
                    home,
                )
                self.trigger.return_pid(pid, home, slot.uid, "no saved placement")
        self.mark_dirty()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGTERM, self.stop_event.set)
        loop.add_signal_handler(signal.SIGINT, self.stop_event.set)

    # -- control path --------------------------------------------------------

    async def control_loop(self) -> None:
        watchdog = watchdog_interval()
        last_ping = 0.0
        while not self.stop_event.is_set():
            await self.tick()
            now = time.monotonic()
            if watchdog is not None and now - last_ping >= watchdog:
                self.notifier.watchdog()
                last_ping = now
            try:
                await asyncio.wait_for(
                    self.stop_event.wait(), timeout=self.options.tick
                )
            except asyncio.TimeoutError:
                pass

    async def tick(self) -> None:
        """Run one control period: reclaim, measure, predict, plan, apply.

        The steps yield to the loop in between, so ring-buffer events that
        arrive during a tick wait for one step, not for the whole tick.
        """
        assert self.trigger is not None
        steps = (
            self.trigger.reclaim_idle,
            self.check_placements,
            self.refresh_users,
            self.measure_and_plan,
            self.apply_stale_pools,
            self.refresh_class_stats,
        )
        for step in steps:
            try:
                step()
            except BrokerError as exc:
                log.error("control tick: %s", exc)
            await asyncio.sleep(0)
        self.write_state()

    def check_placements(self) -> None:
        assert self.trigger is not None
        if self._last_user_refresh + USER_REFRESH_SECONDS <= time.monotonic():
            self.trigger.check_placements()

    def apply_stale_pools(self) -> None:
        if self._pools_stale:
            self.apply_pools(verify=False)

    def refresh_users(self, force: bool = False) -> None:
        """Re-resolve managed users (accounts come and go) and apply pools."""
        now = time.monotonic()
        if not force and now - self._last_user_refresh < USER_REFRESH_SECONDS:
            return
        self._last_user_refresh = now
        assert self.policy is not None
        users = self.policy.managed_users()
        if users.keys() != self.users.keys() and self.probe is not None:
            self.probe.set_managed_uids(users)
        if self.forecast is not None:
            for uid in self.users.keys() - users.keys():
                self.forecast.forget(uid)
        self.users = users
        self.apply_pools(verify=True)
        if self.shaper is not None:
            self.in_netshape_worker(self.shaper.apply, list(users))

    def apply_pools(self, verify: bool) -> None:
        """Apply the static pools, or the forecast's plans once there are some."""
        assert self.policy is not None and self.reconciler is not None
        if self.forecast is not None:
            desired, overrides = self.forecast.desired(self.users)
        else:
            desired = {uid: entry.pool_dict() for uid, entry in self.users.items()}
            overrides = {}
        tiers = {t.name: t for t in self.policy.tiers}
        changes = self.reconciler.apply(desired, tiers, overrides, verify=verify)
        self._pools_stale = False
        if any(changes.values()):
            log.info("pools applied for %d user(s): %s", len(self.users), changes)
            self.mark_dirty()

    # -- forecast ----------------------------------------------------------------

    def update_forecast(self, policy: Policy, background: bool = False) -> None:
        """Start, keep or stop the forecast loop to match the policy.

        With background, a first import of the forecast module runs on the
        plan worker, because on the event loop it stalls activations and can
        outlast WatchdogSec. The static pools apply until the import is done.
        """
        if not policy.forecast.enabled:
            self.forecast = None
            return
        if (
            self.forecast is not None
            and self.forecast.policy.forecast == policy.forecast
        ):
            self.forecast.policy = policy  # tiers and users may change, history stays
            return
        if background and (
            self._forecast_import is not None or FORECAST_MODULE not in sys.modules
        ):
            self.import_forecast()
            return
        from broker.forecast_loop import ForecastLoop  # imports scikit-learn

        assert self.reconciler is not None
        self.forecast = ForecastLoop(policy, self.cg)
        log.info(
            "forecast enabled: plan every %.0fs at quantile %.2f",
            policy.forecast.plan_interval,
            policy.forecast.quantile,
        )

    def import_forecast(self) -> None:
        """Import the forecast module on the plan worker, then apply the policy in force."""
        if self._forecast_import is not None:
            return  # its callback reads the newest policy
        log.info(
            "forecast: loading scikit-learn; static pools apply until it is loaded"
        )
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self.plan_worker, importlib.import_module, FORECAST_MODULE
        )
        self._forecast_import = future

        def done(result: asyncio.Future) -> None:
            self._forecast_import = None
            if result.cancelled():
                log.error("forecast: loading %s was cancelled", FORECAST_MODULE)
            elif result.exception() is not None:
                log.error(
                    "forecast: loading %s failed: %r",
                    FORECAST_MODULE,
                    result.exception(),
                )
            elif self.policy is not None and not self.stop_event.is_set():
                self.update_forecast(self.policy)
                self._pools_stale = True

        future.add_done_callback(done)

    def measure_and_plan(self) -> None:
        """Record demand every forecast interval and start a plan when one is due."""
        if self.forecast is None or self.probe is None or self.reconciler is None:
            return
        now = time.monotonic()
        if now - self._last_measure >= self.forecast.policy.forecast.interval:
            self._last_measure = now
            slot_paths = {
                uid: [s.path for s in slots]
                for uid, slots in self.reconciler.pools.slots.items()
            }
            self.forecast.measure(now, self.users, slot_paths, self.probe.counters())
        if self.forecast.due(now):
            self.start_plan(now)

    def start_plan(self, now: float) -> None:
        """Fit and plan on a worker thread; apply the result back on the loop."""
        assert self.forecast is not None
        forecast = self.forecast
        users = dict(self.users)
        forecast.start_planning(now)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self.plan_worker, forecast.predict_and_plan, now, users
        )

        def done(result: asyncio.Future) -> None:
            plans = None
            if result.cancelled():
                log.warning("planning was cancelled")
            elif result.exception() is not None:
                log.error("planning failed: %r", result.exception())
            else:
                plans = result.result()
            forecast.finish_planning(plans)
            if plans is not None and forecast is self.forecast:
                self._pools_stale = True
                self.update_warm_rates(plans)

        future.add_done_callback(done)

    def update_warm_rates(self, plans: dict[int, Any]) -> None:
        """Hand the planned warm bandwidth of each user to the shaper."""
        if self.shaper is None:
            return
        rates = {
            uid: p.warm_rate for uid, p in plans.items() if p.warm_rate is not None
        }
        self.in_netshape_worker(self.shaper.set_warm_rates, rates)

    def on_miss(self, uid: int) -> None:
        """Cold path: with forecasts on, grow the user's pool by one at the next tick."""
        if self.forecast is not None:
            self.forecast.request_slot(uid)
            self._pools_stale = True

    def idle_timeout(self, uid: int) -> float:
        entry = self.users.get(uid)
        return entry.idle_timeout if entry is not None else 0.0

    def reload(self) -> None:
        """SIGHUP: validate the policy files, then switch to them or keep the old set."""
        self.notifier.reloading()
        try:
            new_policy = self.load_policy()
        except PolicyError as exc:
            self.last_reload_error = [str(p) for p in exc.problems]
            for problem in exc.problems:
                log.error("reload rejected, keeping the previous policy: %s", problem)
            self.notifier.ready(self.status_line())
            return
        self.policy = new_policy
        self.update_shaper(new_policy)
        self.update_forecast(new_policy, background=True)
        self.policy_loaded_at = time.time()
        self.last_reload_error = []
        log.info("policy reloaded: %s", new_policy.summary())
        try:
            self.refresh_users(force=True)
        except BrokerError as exc:
            log.error("applying the reloaded policy failed: %s", exc)
        self.notifier.ready(self.status_line())

    # -- bandwidth classes -----------------------------------------------------

    def in_netshape_worker(self, function: Any, *args: Any) -> None:
        """Run a netshape call on the worker thread; log its errors."""

        def call() -> None:
            try:
                function(*args)
            except BrokerError as exc:
                log.error("bandwidth classes: %s", exc)

        self.netshape_worker.submit(call)

    def on_slot_state(self, uid: int, tier: str | None) -> None:
        """Raise a user's class to the warm tier's rates, or drop it back (tier None)."""
        if self.shaper is not None:
            self.in_netshape_worker(self.shaper.set_user_state, uid, tier)

    def update_shaper(self, policy: Policy) -> None:
        if self.shaper is None and policy.interfaces:
            self.shaper = ShaperGroup(policy.interfaces)
        elif self.shaper is not None:
            self.in_netshape_worker(self.shaper.set_policy, policy.interfaces)

    def refresh_class_stats(self) -> None:
        now = time.monotonic()
        if self.shaper is None or now - self._last_class_stats < CLASS_STATS_SECONDS:
            return
        self._last_class_stats = now
        shaper = self.shaper

        def collect() -> None:
            self.class_stats = [row.as_dict() for row in shaper.stats()]

        self.in_netshape_worker(collect)

    # -- status ----------------------------------------------------------------

    def mark_dirty(self) -> None:
        """Save placements once the current burst of events is handled.

        Only the small placements file is written here, so a restarted daemon
        can re-adopt every process; the status files wait for the tick.
        """
        if not self._dirty:
            self._dirty = True
            asyncio.get_running_loop().call_soon(self.save_placements)

    def save_placements(self) -> None:
        """Write a snapshot of the placements on the state worker thread."""
        if self.trigger is not None and self._dirty:
            self._dirty = False
            snapshot = [
                dataclasses.replace(p) for p in self.trigger.placements.values()
            ]
            self.state_worker.submit(
                state_mod.save_placements, self.state_dir, snapshot
            )

    def write_state(self) -> None:
        if self.trigger is None:
            return
        self.save_placements()
        self.state_worker.submit(self._write_status_files, self.status())
        self.notifier.status(self.status_line())

    def _write_status_files(self, status: dict[str, Any]) -> None:
        state_mod.save_status(self.state_dir, status)
        text = metrics.render(status)
        state_mod.write_atomic(self.state_dir / state_mod.METRICS_FILE, text, 0o644)

    def status_line(self) -> str:
        if self.trigger is None or self.reconciler is None:
            return "starting"
        slots = self.reconciler.pools.all()
        busy = sum(1 for s in slots if s.busy)
        return (
            f"{len(self.users)} users, {busy}/{len(slots)} slots busy, "
            f"{sum(c.activations for c in self.trigger.counters.values())} activations"
        )

    def status(self) -> dict[str, Any]:
        assert self.trigger is not None and self.reconciler is not None
        counters = self.probe.counters() if self.probe else {}
        users: dict[str, Any] = {}
        for uid in sorted(set(self.users) | set(self.trigger.counters)):
            users[str(uid)] = self.user_status(uid, counters.get(uid))
            if self.forecast is not None:
                users[str(uid)]["plan"] = self.forecast.user_status(uid)
        return {
            "daemon": {
                "pid": os.getpid(),
                "started": self.started,
                "updated": time.time(),
                "cgroup_root": self.reconciler.root,
                "policy_sources": list(self.policy.sources) if self.policy else [],
                "policy_loaded_at": self.policy_loaded_at,
                "last_reload_error": self.last_reload_error,
                "events": self.trigger.events,
                "ring_buffer_drops": self.probe.drops() if self.probe else 0,
                "features": self.features.lines() if self.features else [],
            },
            "latency_us": latency_summary(list(self.trigger.latencies_ns)),
            "delivery_us": latency_summary(list(self.trigger.delivery_ns)),
            "users": users,
        }

    def user_status(self, uid: int, probe_counters: Any) -> dict[str, Any]:
        assert self.trigger is not None and self.reconciler is not None
        slots = self.reconciler.pools.slots.get(uid, [])
        counters = self.trigger.user(uid)
        return {
            "name": _user_name(uid),
            "slots": [
                {
                    "path": s.path,
                    "tier": s.tier,
                    "busy": s.busy,
                    "pid": s.tgid,
                    "retiring": s.retiring,
                }
                for s in slots
            ],
            "slots_free": sum(1 for s in slots if not s.busy),
            "slots_busy": sum(1 for s in slots if s.busy),
            "placed": sorted(
                p.tgid for p in self.trigger.placements.values() if p.uid == uid
            ),
            "counters": vars(counters),
            "accepts": probe_counters.accepts if probe_counters else 0,
            "open_connections": probe_counters.open if probe_counters else 0,
            "drops": probe_counters.drops if probe_counters else 0,
            "bandwidth": [row for row in self.class_stats if row.get("uid") == uid],
        }

    # -- stop ------------------------------------------------------------------

    def shutdown(self) -> None:
        """Return every process home, then remove slots, BPF links and the daemon leaf."""
        self.notifier.stopping()
        if self.trigger is not None:
            returned = self.trigger.return_everyone("stop")
            log.info("returned %d process(es) home", returned)
        if self.probe is not None:
            self.probe.close()
            self.probe = None
        self.netshape_worker.shutdown(wait=True)
        if self.shaper is not None:
            try:
                self.shaper.remove()
            except BrokerError as exc:
                log.error("removing bandwidth classes failed: %s", exc)
            self.shaper.close()
            self.shaper = None
        if self.reconciler is not None and not self.options.dry_run:
            failed = self.reconciler.remove_all()
            if failed:
                log.error("could not remove %s", ", ".join(failed))
            try:
                self.reconciler.release_root()
            except BrokerError as exc:
                log.warning("releasing %s failed: %s", self.reconciler.root, exc)
        if self.trigger is not None:
            self.trigger.placements.clear()
            self._dirty = True
            self.write_state()
        self.state_worker.shutdown(wait=True)
        log.info("broker stopped")


def latency_summary(samples: list[int]) -> dict[str, float | int | None]:
    """Return count, median and p99 of accept-to-move latencies in microseconds."""
    if not samples:
        return {"count": 0, "median": None, "p99": None, "max": None}
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {
        "count": len(ordered),
        "median": statistics.median(ordered) / 1000,
        "p99": p99 / 1000,
        "max": ordered[-1] / 1000,
    }


def _user_name(uid: int) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def run(options: DaemonOptions) -> int:
    return asyncio.run(Daemon(options).run())


__all__ = ["Daemon", "DaemonOptions", "run", "Path"]
