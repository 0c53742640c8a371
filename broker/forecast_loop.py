"""The daemon's forecast loop: measure, predict, plan.

Each control tick the loop records one demand sample per managed user: the
probe's accept and close counters, and the CPU, memory and pressure files of
the user's slots and of the user's systemd slice (`user-UID.slice`, read
only). Every `forecast.plan_interval` it fits the forecasts and plans the
pools on a worker thread, away from the event loop, and the daemon hands the
plans to the reconciler.

A miss on the event path requests one more slot at the next tick, up to the
user's `max_slots`, until the next plan replaces the request.

DemandHistory is not thread-safe, so while the worker reads it, new samples
wait in a buffer and are recorded when the worker has finished.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable

from broker.cgroups import (
    CPU_PRESSURE,
    CPU_STAT,
    MEMORY_CURRENT,
    MEMORY_PEAK,
    MEMORY_PRESSURE,
    CgroupFS,
)
from broker.demand import (
    CgroupTexts,
    ConnectionCounters,
    DemandCollector,
    DemandHistory,
    DemandSample,
)
from broker.errors import CgroupError
from broker.planner import UserPlan, explain_dict, explain_text, plan
from broker.policy import Policy, UserPolicy
from broker.predictor import Forecaster
from broker.probes import UidCounters

log = logging.getLogger(__name__)

USER_SLICE = "/user.slice/user-{uid}.slice"
MAX_SAMPLES_PER_USER = 4096


class _BufferedHistory:
    """A DemandHistory front that buffers records while a worker reads the history."""

    def __init__(self, history: DemandHistory):
        self.history = history
        self.hold = False
        self.pending: list[tuple[int, DemandSample]] = []

    def record(self, uid: int, sample: DemandSample) -> None:
        if self.hold:
            self.pending.append((uid, sample))
        else:
            self.history.record(uid, sample)

    def forget(self, uid: int) -> None:
        self.pending = [(u, s) for u, s in self.pending if u != uid]
        self.history.forget(uid)

    def release(self) -> None:
        self.hold = False
        for uid, sample in self.pending:
            self.history.record(uid, sample)
        self.pending.clear()


def host_memory() -> int:
    """Return the host's RAM in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class ForecastLoop:
    """Per-user demand history, forecasts and the latest plans."""

    policy: Policy
    cg: CgroupFS
    memory: int = field(default_factory=host_memory)
    plans: dict[int, UserPlan] = field(default_factory=dict)
    extra_slots: dict[int, int] = field(default_factory=dict)
    last_plan: float = float("-inf")
    running: bool = False
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        settings = self.policy.forecast
        # Enough raw samples for `window` planning steps, within a fixed bound.
        per_step = max(settings.plan_interval / settings.interval, 1.0)
        capacity = min(math.ceil(settings.window * per_step) + 8, MAX_SAMPLES_PER_USER)
        self.history = DemandHistory(capacity=capacity)
        self._buffer = _BufferedHistory(self.history)
        self.collector = DemandCollector(self._buffer)  # type: ignore[arg-type]
        self.forecaster = Forecaster(settings)

    # -- measure -------------------------------------------------------------

    def measure(
        self,
        now: float,
        users: Iterable[int],
        slot_paths: dict[int, list[str]],
        counters: dict[int, UidCounters],
    ) -> None:
        """Record one demand sample per user, ending at `now` (monotonic seconds)."""
        for uid in users:
            paths = list(slot_paths.get(uid, ()))
            home_slice = USER_SLICE.format(uid=uid)
            if self.cg.exists(home_slice):
                paths.append(home_slice)
            probe = counters.get(uid)
            connections = (
                ConnectionCounters(probe.accepts, probe.open) if probe else None
            )
            texts = {path: self._read_texts(path) for path in paths}
            self.collector.collect(uid, now, texts, connections)

    def _read_texts(self, path: str) -> CgroupTexts:
        return CgroupTexts(
            cpu_stat=self._read(path, CPU_STAT),
            memory_current=self._read(path, MEMORY_CURRENT),
            memory_peak=self._read(path, MEMORY_PEAK),
            cpu_pressure=self._read(path, CPU_PRESSURE),
            memory_pressure=self._read(path, MEMORY_PRESSURE),
        )

    def _read(self, path: str, filename: str) -> str | None:
        try:
            return self.cg.read(path, filename)
        except CgroupError:
            return None  # no PSI or memory.peak in this kernel, or the cgroup left

    def forget(self, uid: int) -> None:
        self.collector.forget(uid)
        self.plans.pop(uid, None)
        self.extra_slots.pop(uid, None)

    # -- predict and plan ------------------------------------------------------

    def due(self, now: float) -> bool:
        return (
            not self.running
            and now - self.last_plan >= self.policy.forecast.plan_interval
        )

    def start_planning(self, now: float) -> None:
        """Mark a worker as running; samples wait until finish_planning()."""
        self.running = True
        self.last_plan = now
        self._buffer.hold = True

    def finish_planning(self, plans: dict[int, UserPlan] | None) -> None:
        """Record the waiting samples and take the new plans (None: keep the old)."""
        self.running = False
        self._buffer.release()
        # Read on the loop thread while no worker changes the scores.
        self.scores = self.forecaster.status()
        if plans is not None:
            self.accept_plans(plans)

    def predict_and_plan(
        self, now: float, users: dict[int, UserPolicy]
    ) -> dict[int, UserPlan]:
        """Fit forecasts and plan every user's pool; runs on a worker thread."""
        forecasts = self.forecaster.forecast_users(self.history, list(users), now)
        anomalies = self.forecaster.anomalies()
        entries: dict[Hashable, UserPolicy] = {
            uid: entry for uid, entry in users.items()
        }
        plans = plan(
            self.policy, forecasts, self.memory, users=entries, anomalies=anomalies
        )
        return {int(str(uid)): user_plan for uid, user_plan in plans.items()}

    def accept_plans(self, plans: dict[int, UserPlan]) -> None:
        self.plans = plans
        self.extra_slots.clear()
        for uid, user_plan in plans.items():
            log.debug(
                "plan for uid %d: %s (model %s)",
                uid,
                user_plan.slots(),
                user_plan.model,
            )

    def request_slot(self, uid: int) -> None:
        """Remember a miss: one more slot for uid at the next tick."""
        self.extra_slots[uid] = self.extra_slots.get(uid, 0) + 1

    # -- desired pools ---------------------------------------------------------

    def desired(
        self, users: dict[int, UserPolicy]
    ) -> tuple[dict[int, dict[str, int]], dict[int, dict[str, dict[str, str]]]]:
        """Return slots per tier and per-tier knob overrides for every user.

        Users without a plan yet keep the policy's static pool.
        """
        pools: dict[int, dict[str, int]] = {}
        knobs: dict[int, dict[str, dict[str, str]]] = {}
        for uid, entry in users.items():
            user_plan = self.plans.get(uid)
            pool = user_plan.slots() if user_plan else entry.pool_dict()
            pools[uid] = self._with_extra(uid, entry, pool)
            if user_plan:
                knobs[uid] = {t.tier: t.knobs() for t in user_plan.tiers}
        return pools, knobs

    def _with_extra(
        self, uid: int, entry: UserPolicy, pool: dict[str, int]
    ) -> dict[str, int]:
        extra = self.extra_slots.get(uid, 0)
        if not extra or not entry.pool:
            return pool
        lightest = entry.pool[0][0]
        room = max(entry.max_slots - pool.get(lightest, 0), 0)
        grown = dict(pool)
        grown[lightest] = pool.get(lightest, 0) + min(extra, room)
        return grown

    # -- status ----------------------------------------------------------------

    def user_status(self, uid: int) -> dict[str, Any] | None:
        """Return the user's plan, its explanation and forecast scores, or None."""
        user_plan = self.plans.get(uid)
        if user_plan is None:
            return None
        data = explain_dict(user_plan)
        data["text"] = explain_text(user_plan)
        data["scores"] = {
            resource: by_user.get(str(uid)) for resource, by_user in self.scores.items()
        }
        return data
