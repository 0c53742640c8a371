"""Turn each user's forecast into a frozen pool plan: slots per tier and reservations.

API for the daemon's control loop (one tick every `forecast.plan_interval`):

    history = DemandHistory(capacity=...)                 # broker.demand
    collector = DemandCollector(history)
    collector.collect(uid, now, cgroup_texts, counters)   # each interval, or
    history.record(uid, sample)                           # with a ready sample

    forecaster = Forecaster(policy.forecast)              # broker.predictor
    # Off the event loop; fits models, so run it in an executor:
    forecasts = await loop.run_in_executor(
        None, forecaster.forecast_users, history, uids, now)
    # forecasts: dict[uid, dict[resource, Forecast]]; for one user:
    # forecaster.forecast(uid, history, now) -> dict[resource, Forecast]
    # Forecaster(policy.forecast, resources=(..., "memory", "cpu")) also
    # forecasts memory and CPU, which size memory.min and cpu.weight per slot.

    plans = plan(policy, forecasts, host_memory)          # dict[uid, UserPlan]
    # The reconciler applies plans[uid].slots() and each TierPlan's knobs.
    explain_text(plans[uid]); explain_dict(plans[uid])    # `broker explain`
    forecaster.status()                                   # `broker status`

Sizing rules, in order, each recorded in `UserPlan.derivation`:

1. Needed concurrency at the policy quantile q, the maximum over the forecast
   horizon, times the `connections` weight. It is the smaller of two sizes.
   The first is the q-quantile of the peak of open connections in a planning
   interval, which lets every arrival of the interval find a slot with
   probability q. The second is the number of slots by which a share q of
   arrivals find a free one. By Little's law the mean number open is the
   arrival rate times the service time. An arrival finds a Poisson number of
   them open (PASTA), mixed over the forecast's uncertainty
   (`predictor.little_slots_moments`) and widened by the measured dispersion
   of open connections within a step, and needs one more slot for itself.
   The first size is smaller for sparse users, the second for busy ones.
   With `sizing: value` the number is instead the pool size with the largest
   expected hits - `slot_price` x expected idle slot-seconds, from the
   arrivals forecast and Little's law (`predictor.value_curves`). One price
   for all users puts slots where they bring the most hits, which suits a
   host-wide hit-rate goal. Quantile sizing suits a per-user goal.
2. Slots are that number rounded up. When they fit in the user's static
   pool (the sum of its `pool` counts), every slot is of the lightest tier
   the pool names. Otherwise the relative width of the 90% predictive
   interval decides the tier mix: at or below `uncertainty_narrow` every slot
   is of the lightest tier, at or above `uncertainty_wide` every slot is of
   the heaviest, linearly in between. A user whose pool names a single tier
   gets one more slot instead when the interval is wide.
3. Caps: a user gets at most `max_slots` slots. The plan notes the cap as an
   anomaly cap when the forecast flagged one. Then, over all users, the sum
   of memory.min is at most `memory_min_share` of host memory, and slots are
   taken away from the largest pools first.
4. Per slot: memory.min is the tier's, raised to the forecast memory per open
   connection (times the `memory` weight) up to the tier's memory.high;
   cpu.weight is the tier's, scaled up by the forecast CPU cores per slot
   (times the `cpu` weight). The warm bandwidth rate is the sum over slots of
   the tier's class rate times the `bandwidth` weight, at most the user
   class's ceil.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np

from broker.policy import ForecastPolicy, Policy, Tier, UserPolicy
from broker.predictor import Forecast, little_slots_moments, value_curves

log = logging.getLogger(__name__)

CPU_WEIGHT_MAX = 10000
INTERVAL_LOW, INTERVAL_HIGH = 0.05, 0.95  # the 90% predictive interval
MAX_VALUE_SLOTS = 256  # largest pool the value sizing considers (max_slots caps it too)


@dataclass(frozen=True)
class TierPlan:
    """Slots of one tier and the reservations written to each of them."""

    tier: str
    slots: int
    memory_min: int  # bytes per slot
    cpu_weight: int  # per slot

    def knobs(self) -> dict[str, str]:
        return {"cpu.weight": str(self.cpu_weight), "memory.min": str(self.memory_min)}


@dataclass(frozen=True)
class UserPlan:
    """The pool the planner wants for one user, and how each number was derived."""

    uid: Hashable
    tiers: tuple[TierPlan, ...]
    model: str
    quantile: float
    horizon: float  # seconds
    needed: float  # concurrency at the quantile, before rounding
    interval_width: float  # relative width of the 90% predictive interval
    warm_rate: int | None  # bit/s reserved for the warm classes, None without shaping
    anomaly: bool
    capped: tuple[str, ...]
    derivation: tuple[tuple[str, str], ...]

    def slots(self) -> dict[str, int]:
        return {t.tier: t.slots for t in self.tiers}

    def total_slots(self) -> int:
        return sum(t.slots for t in self.tiers)

    def memory_min_total(self) -> int:
        return sum(t.slots * t.memory_min for t in self.tiers)


# --------------------------------------------------------------------------
# Per-user sizing
# --------------------------------------------------------------------------


def _weights(settings: ForecastPolicy) -> dict[str, float]:
    weights = {"connections": 1.0, "cpu": 1.0, "memory": 1.0, "bandwidth": 1.0}
    weights.update(dict(settings.weights))
    return weights


def _needed(
    forecasts: Mapping[str, Forecast], settings: ForecastPolicy, weight: float
) -> tuple[float, str, Forecast | None]:
    """Return the needed concurrency at the quantile, its derivation and the main forecast."""
    q = settings.quantile
    candidates: list[tuple[float, str]] = []
    open_forecast = forecasts.get("open_connections")
    if open_forecast is not None:
        peak = float(open_forecast.quantile(q).max())
        candidates.append((peak, f"open connections peak q{q:g} = {peak:g}"))
    arrivals = forecasts.get("arrivals")
    if arrivals is not None:
        # Little's law: mean open connections = arrival rate x service time.
        factor = settings.service_time / arrivals.step
        mean = arrivals.expected() * factor
        variance = arrivals.variance() * factor**2
        variance = variance + mean * (max(arrivals.dispersion, 1.0) - 1.0)
        little = float(little_slots_moments(mean, variance, np.array([q])).max())
        rate = float(arrivals.expected().max()) / arrivals.step
        candidates.append(
            (
                little,
                (
                    f"Little's law: arrivals {rate:.3f}/s x service time "
                    f"{settings.service_time:g} s, 1 + mixed-Poisson q{q:g} = {little:g}"
                ),
            )
        )
    if settings.sizing == "value" and arrivals is not None:
        return _value_needed(arrivals, settings, weight)
    if not candidates:
        return 0.0, "no forecast", None
    value, _ = min(candidates)
    parts = "; ".join(text for _, text in candidates)
    main = open_forecast if open_forecast is not None else arrivals
    return value * weight, f"min({parts}) x weight {weight:g}", main


def _value_needed(
    arrivals: Forecast, settings: ForecastPolicy, weight: float
) -> tuple[float, str, Forecast]:
    """Return the pool size with the largest expected hits - price x idle seconds."""
    factor = settings.service_time / arrivals.step
    expected = arrivals.expected()
    mean, variance = expected * factor, arrivals.variance() * factor**2
    variance = variance + mean * (max(arrivals.dispersion, 1.0) - 1.0)
    sizes = np.arange(MAX_VALUE_SLOTS + 1)
    hits, idle = value_curves(expected, mean, variance, sizes, arrivals.step)
    best = int(np.argmax(hits - settings.slot_price * idle, axis=1).max())
    text = (
        f"value: {best} slot(s) maximise expected hits - {settings.slot_price:g} x "
        f"idle slot-seconds (arrivals {float(expected.max()):.2f} per step, "
        f"service time {settings.service_time:g} s) x weight {weight:g}"
    )
    return best * weight, text, arrivals


def _width(forecast: Forecast | None) -> float:
    """Return (q95 - q05) / max(median, 1) of the first horizon step."""
    if forecast is None:
        return 0.0
    low = float(forecast.quantile(INTERVAL_LOW)[0])
    high = float(forecast.quantile(INTERVAL_HIGH)[0])
    middle = float(forecast.quantile(0.5)[0])
    return (high - low) / max(middle, 1.0)


def _tier_mix(
    slots: int,
    tiers: list[Tier],
    width: float,
    settings: ForecastPolicy,
    static: int,
) -> tuple[dict[str, int], str]:
    """Split slots between the lightest and heaviest tier by the interval width.

    Slots that fit in the user's static pool are all of the lightest tier.
    At small demand the relative width measures the Poisson noise of a count,
    not the forecast's uncertainty: a known rate of 1 connection per step
    already has q95 - q05 = 3. Without this rule every idle or sparse user got
    heavy slots, or one slot more.
    """
    light, heavy = tiers[0], tiers[-1]
    if slots <= static:
        how = (
            f"{slots} slot(s) within the static pool of {static}: all {light.name}, "
            f"whatever the interval width {width:.2f}"
        )
        mix = {light.name: slots}
        if heavy.name != light.name:
            mix[heavy.name] = 0
        return mix, how
    narrow, wide = settings.uncertainty_narrow, settings.uncertainty_wide
    share = float(np.clip((width - narrow) / max(wide - narrow, 1e-9), 0.0, 1.0))
    if light.name == heavy.name:
        extra = 1 if width >= wide and slots > 0 else 0
        how = f"one tier; interval width {width:.2f}" + (
            f" >= {wide:g}: one extra slot" if extra else f" < {wide:g}: no extra slot"
        )
        return {light.name: slots + extra}, how
    heavy_slots = round(slots * share)
    how = (
        f"interval width {width:.2f} between {narrow:g} and {wide:g}: "
        f"{share:.0%} of slots in {heavy.name}"
    )
    return {light.name: slots - heavy_slots, heavy.name: heavy_slots}, how


def _per_slot(
    tier: Tier,
    forecasts: Mapping[str, Forecast],
    slots: int,
    settings: ForecastPolicy,
    weights: dict[str, float],
) -> tuple[int, int, str]:
    """Return memory.min and cpu.weight per slot of a tier, and how."""
    q = settings.quantile
    memory_min, how = (
        tier.memory_min,
        f"{tier.name}: memory.min {tier.memory_min} (tier)",
    )
    memory = forecasts.get("memory")
    opened = forecasts.get("open_connections")
    if memory is not None and slots > 0:
        connections = max(float(opened.expected()[0]) if opened else 1.0, 1.0)
        per_connection = (
            float(memory.quantile(q).max()) / connections * weights["memory"]
        )
        ceiling = tier.memory_high if tier.memory_high is not None else math.inf
        memory_min = int(min(max(tier.memory_min, per_connection), ceiling))
        how = f"{tier.name}: memory.min max(tier {tier.memory_min}, q{q:g} memory per connection {per_connection:.0f})"
    cpu_weight = tier.cpu_weight
    cpu = forecasts.get("cpu")
    if cpu is not None and slots > 0:
        cores = float(cpu.quantile(q).max()) / slots * weights["cpu"]
        cpu_weight = int(min(CPU_WEIGHT_MAX, round(tier.cpu_weight * max(1.0, cores))))
        how += (
            f", cpu.weight tier {tier.cpu_weight} x max(1, {cores:.2f} cores per slot)"
        )
    else:
        how += f", cpu.weight {tier.cpu_weight} (tier)"
    return memory_min, cpu_weight, how


def _warm_rate(
    policy: Policy, slots: dict[str, int], weight: float
) -> tuple[int | None, str]:
    if not policy.interfaces:
        return None, "no shaped interface"
    rates = []
    for iface in policy.interfaces:
        tier_rates = iface.tier_rates()
        total = sum(n * tier_rates[t].rate for t, n in slots.items() if t in tier_rates)
        rates.append(min(int(total * weight), iface.user.ceil))
    return max(
        rates
    ), f"sum of slots x tier class rate x weight {weight:g}, at most the user ceil"


def plan_user(
    uid: Hashable,
    policy: Policy,
    user: UserPolicy,
    forecasts: Mapping[str, Forecast],
    anomaly: bool = False,
) -> UserPlan:
    """Return the plan of one user before the host-wide memory cap."""
    settings = policy.forecast
    weights = _weights(settings)

    needed, needed_how, main = _needed(forecasts, settings, weights["connections"])
    width = _width(main)
    slots = math.ceil(needed - 1e-9)
    tiers = sorted(
        (policy.tier(name) for name, _ in user.pool),
        key=lambda t: (t.memory_min, t.cpu_weight),
    )
    if not tiers:
        tiers = list(policy.tiers[:1])

    static = sum(count for _, count in user.pool)
    mix, mix_how = _tier_mix(slots, tiers, width, settings, static)
    capped = []
    if sum(mix.values()) > user.max_slots:
        mix = _cap_mix(mix, user.max_slots)
        capped.append("anomaly: max_slots" if anomaly else "max_slots")
    derivation = [
        ("needed", f"{needed:.2f} = {needed_how}"),
        ("slots", f"{slots} = ceil({needed:.2f})"),
        ("tiers", mix_how),
    ]
    if capped:
        derivation.append(
            ("cap", f"at most max_slots {user.max_slots} ({user.source})")
        )

    plans = []
    for tier in tiers:
        count = mix.get(tier.name, 0)
        memory_min, cpu_weight, how = _per_slot(
            tier, forecasts, count, settings, weights
        )
        plans.append(TierPlan(tier.name, count, memory_min, cpu_weight))
        derivation.append((f"slot {tier.name}", how))
    rate, rate_how = _warm_rate(policy, mix, weights["bandwidth"])
    derivation.append(("warm rate", rate_how))
    return UserPlan(
        uid=uid,
        tiers=tuple(plans),
        model=_model_name(main),
        quantile=settings.quantile,
        horizon=(main.horizon * main.step) if main else 0.0,
        needed=needed,
        interval_width=width,
        warm_rate=rate,
        anomaly=anomaly,
        capped=tuple(capped),
        derivation=tuple(derivation),
    )


def _model_name(forecast: Forecast | None) -> str:
    if forecast is None:
        return "none"
    if forecast.period:
        return f"{forecast.model} (period {forecast.period} steps)"
    return forecast.model


def _cap_mix(mix: dict[str, int], limit: int) -> dict[str, int]:
    """Cut slots to at most `limit`, removing light slots before heavy ones."""
    out = dict(mix)
    excess = sum(out.values()) - limit
    for name in list(out):
        take = min(out[name], max(excess, 0))
        out[name] -= take
        excess -= take
    return out


# --------------------------------------------------------------------------
# All users, under the host cap
# --------------------------------------------------------------------------


def plan(
    policy: Policy,
    forecasts: Mapping[Hashable, Mapping[str, Forecast]],
    host_memory: int,
    users: Mapping[Hashable, UserPolicy] | None = None,
    anomalies: frozenset | set = frozenset(),
) -> dict[Hashable, UserPlan]:
    """Return a plan per managed user, with the sum of memory.min under the host cap.

    users: the policy entry of each uid; by default looked up with
    `policy.user_policy_for`. Users without an entry are not managed and get
    no plan.
    """
    plans: dict[Hashable, UserPlan] = {}
    for uid, user_forecasts in forecasts.items():
        entry = users[uid] if users is not None and uid in users else None
        if entry is None and users is None and isinstance(uid, int):
            entry = policy.user_policy_for(uid)
        if entry is None:
            continue
        plans[uid] = plan_user(uid, policy, entry, user_forecasts, uid in anomalies)
    limit = int(policy.forecast.memory_min_share * host_memory)
    return _apply_memory_cap(plans, limit)


def _apply_memory_cap(
    plans: dict[Hashable, UserPlan], limit: int
) -> dict[Hashable, UserPlan]:
    """Remove slots from the largest pools until the sum of memory.min fits the limit."""
    total = sum(p.memory_min_total() for p in plans.values())
    if total <= limit:
        return plans
    counts = {uid: {t.tier: t.slots for t in p.tiers} for uid, p in plans.items()}
    sizes = {uid: {t.tier: t.memory_min for t in p.tiers} for uid, p in plans.items()}
    heap = [
        (-p.total_slots(), str(uid), uid) for uid, p in plans.items() if p.total_slots()
    ]
    heapq.heapify(heap)
    removed: dict[Hashable, int] = {}
    while total > limit and heap:
        negative, label, uid = heapq.heappop(heap)
        tier = max(
            (t for t, n in counts[uid].items() if n > 0), key=lambda t: sizes[uid][t]
        )
        counts[uid][tier] -= 1
        total -= sizes[uid][tier]
        removed[uid] = removed.get(uid, 0) + 1
        if negative + 1 < 0:
            heapq.heappush(heap, (negative + 1, label, uid))
    log.warning(
        "sum of memory.min over all slots exceeds the host cap of %d bytes: removed %d slot(s) from %d user(s)",
        limit,
        sum(removed.values()),
        len(removed),
    )
    out = dict(plans)
    for uid, count in removed.items():
        out[uid] = _with_counts(plans[uid], counts[uid], count, limit)
    return out


def _with_counts(
    plan: UserPlan, counts: dict[str, int], removed: int, limit: int
) -> UserPlan:
    tiers = tuple(
        TierPlan(t.tier, counts[t.tier], t.memory_min, t.cpu_weight) for t in plan.tiers
    )
    note = (
        "host cap",
        f"{removed} slot(s) removed: sum of memory.min over all users above {limit} bytes",
    )
    return UserPlan(
        plan.uid,
        tiers,
        plan.model,
        plan.quantile,
        plan.horizon,
        plan.needed,
        plan.interval_width,
        plan.warm_rate,
        plan.anomaly,
        plan.capped + ("host memory",),
        plan.derivation + (note,),
    )


# --------------------------------------------------------------------------
# `broker explain`
# --------------------------------------------------------------------------


def explain_dict(plan: UserPlan) -> dict[str, object]:
    """Return the plan as plain data for `broker explain --json`."""
    return {
        "uid": plan.uid,
        "model": plan.model,
        "quantile": plan.quantile,
        "horizon_seconds": plan.horizon,
        "needed": plan.needed,
        "interval_width": plan.interval_width,
        "anomaly": plan.anomaly,
        "capped": list(plan.capped),
        "warm_rate_bits": plan.warm_rate,
        "tiers": [
            {
                "tier": t.tier,
                "slots": t.slots,
                "memory.min": t.memory_min,
                "cpu.weight": t.cpu_weight,
            }
            for t in plan.tiers
        ],
        "derivation": {name: text for name, text in plan.derivation},
    }


def explain_text(plan: UserPlan) -> str:
    """Return the plan and the derivation of each number, as `broker explain` prints it."""
    slots = ", ".join(f"{t.tier} {t.slots}" for t in plan.tiers) or "none"
    lines = [
        f"user {plan.uid}: {slots} slot(s)",
        f"  model {plan.model}, quantile {plan.quantile:g}, horizon {plan.horizon:g} s",
    ]
    if plan.anomaly:
        lines.append(
            "  anomaly: demand far above the forecast bound; pool capped at max_slots"
        )
    for name, text in plan.derivation:
        lines.append(f"  {name}: {text}")
    if plan.warm_rate is not None:
        lines.append(f"  warm rate: {plan.warm_rate} bit/s")
    return "\n".join(lines)
