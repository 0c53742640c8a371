"""Planner: sizing from forecasts, tier mix by uncertainty, caps and `explain`."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from broker import planner, policy
from broker.demand import DemandHistory, DemandSample
from broker.predictor import Forecast, Forecaster

POLICY = """
tiers:
  light: {cpu.weight: 100, memory.min: 64M}
  heavy: {cpu.weight: 400, memory.min: 256M, memory.high: 1G}
users:
  - uid: 5001
    pool: {light: 1, heavy: 1}
    max_slots: 6
  - uid: 5002
    pool: {light: 2}
    max_slots: 3
forecast:
  quantile: 0.9
  plan_interval: 10s
  service_time: 2s
  uncertainty_narrow: 0.5
  uncertainty_wide: 2.0
"""

MIB = 1 << 20


@pytest.fixture
def setup():
    loaded = policy.load_texts([("test.yaml", POLICY)])
    users = {5001: loaded.users[0], 5002: loaded.users[1]}
    return loaded, users


def sharp(count: float, resource="open_connections", horizon=1) -> Forecast:
    """A forecast of exactly `count` connections (std tiny) at every step."""
    root = math.sqrt(count + 0.5)
    return Forecast(
        "u", resource, "gp", 10.0, np.full(horizon, root), np.full(horizon, 1e-3)
    )


def wide(median_root: float, std: float) -> Forecast:
    return Forecast(
        "u", "open_connections", "gp", 10.0, np.array([median_root]), np.array([std])
    )


def test_sharp_forecast_light_slots(setup):
    loaded, users = setup
    plans = planner.plan(
        loaded, {5001: {"open_connections": sharp(4)}}, 64 << 30, users
    )
    plan = plans[5001]
    # Exactly 4 connections: 4 slots; the interval has width 0, so all light.
    assert plan.slots() == {"light": 4, "heavy": 0}
    assert plan.model == "gp"
    assert plan.quantile == 0.9


def test_little_law(setup):
    loaded, users = setup
    # 10 arrivals per 10 s step = 1/s, times a service time of 2 s: a mean of
    # 2 open (Little's law). An arrival finds Poisson(2) open: P(<= 3) = 0.857
    # < 0.9 <= P(<= 4) = 0.947, so 4 + 1 = 5 slots, fewer than the peak of 8.
    forecasts = {"open_connections": sharp(8), "arrivals": sharp(10, "arrivals")}
    plan = planner.plan(loaded, {5001: forecasts}, 64 << 30, users)[5001]
    assert plan.needed == pytest.approx(5.0)
    assert plan.total_slots() == 5
    assert "service time 2 s" in dict(plan.derivation)["needed"]


def test_peak_smaller_than_little(setup):
    loaded, users = setup
    # A peak of 1 needs 1 slot, and Little's law needs at least 1 + 0: the peak wins.
    forecasts = {"open_connections": sharp(1), "arrivals": sharp(10, "arrivals")}
    plan = planner.plan(loaded, {5001: forecasts}, 64 << 30, users)[5001]
    assert plan.total_slots() == 1


def test_wide_interval_heavy(setup):
    loaded, users = setup
    plan = planner.plan(
        loaded, {5001: {"open_connections": wide(2.0, 1.0)}}, 64 << 30, users
    )[5001]
    assert plan.interval_width >= 2.0
    # Wider than uncertainty_wide: every slot is heavy.
    assert plan.slots()["light"] == 0
    assert plan.slots()["heavy"] == plan.total_slots()


def test_single_tier_wide_extra_slot(setup):
    loaded, users = setup
    forecast = wide(1.5, 1.0)
    plan = planner.plan(
        loaded, {5002: {"open_connections": forecast}}, 64 << 30, users
    )[5002]
    base = int(forecast.slots(0.9)[0])
    # One tier: a wide interval adds one slot instead of a heavier tier.
    assert plan.slots() == {"light": min(base + 1, 3)}


def test_max_slots_cap(setup):
    loaded, users = setup
    plan = planner.plan(
        loaded, {5002: {"open_connections": sharp(40)}}, 64 << 30, users
    )[5002]
    assert plan.total_slots() == 3
    assert plan.capped == ("max_slots",)


def test_anomaly_cap_noted(setup):
    loaded, users = setup
    plans = planner.plan(
        loaded,
        {5002: {"open_connections": sharp(40)}},
        64 << 30,
        users,
        anomalies={5002},
    )
    assert plans[5002].capped == ("anomaly: max_slots",)
    assert "anomaly" in planner.explain_text(plans[5002])


def test_host_memory_cap(setup):
    loaded, users = setup
    forecasts = {
        5001: {"open_connections": sharp(6)},
        5002: {"open_connections": sharp(3)},
    }
    # Uncapped: 6 light for 5001 and 3 light for 5002, 9 x 64M = 576M. A host
    # of 1G with memory_min_share 0.5 allows 512M = 8 slots: one is removed
    # from the larger pool.
    plans = planner.plan(loaded, forecasts, 1 << 30, users)
    assert plans[5001].total_slots() == 5
    assert plans[5002].total_slots() == 3
    total = sum(p.memory_min_total() for p in plans.values())
    assert total <= (1 << 30) // 2
    assert "host memory" in plans[5001].capped


def test_memory_forecast_raises_memory_min(setup):
    loaded, users = setup
    forecasts = {
        "open_connections": sharp(2),
        "memory": Forecast(
            "u",
            "memory",
            "gp",
            10.0,
            np.array([math.sqrt(400 * MIB)]),
            np.array([1.0]),
            discrete=False,
        ),
    }
    plan = planner.plan(loaded, {5001: forecasts}, 64 << 30, users)[5001]
    light = next(t for t in plan.tiers if t.tier == "light")
    # About 400M over an expected 2 open connections: about 200M per slot,
    # above the tier's 64M.
    assert light.memory_min > 150 * MIB
    assert light.memory_min < 250 * MIB


def test_unmanaged_user_no_plan(setup):
    loaded, users = setup
    assert (
        planner.plan(loaded, {9999: {"open_connections": sharp(1)}}, 1 << 30, users)
        == {}
    )


def test_explain_text_and_dict(setup):
    loaded, users = setup
    plan = planner.plan(
        loaded, {5001: {"open_connections": sharp(3)}}, 64 << 30, users
    )[5001]
    text = planner.explain_text(plan)
    assert text.startswith("user 5001: light 3, heavy 0 slot(s)")
    assert "quantile 0.9" in text
    assert "needed: 3.00" in text
    data = planner.explain_dict(plan)
    assert data["tiers"][0] == {
        "tier": "light",
        "slots": 3,
        "memory.min": 64 * MIB,
        "cpu.weight": 100,
    }
    assert data["model"] == "gp"


def test_horizon_max_over_steps(setup):
    loaded, users = setup
    forecast = Forecast(
        "u",
        "open_connections",
        "gp",
        10.0,
        np.sqrt(np.array([1.5, 5.5, 2.5])),
        np.full(3, 1e-3),
    )
    plan = planner.plan(
        loaded, {5001: {"open_connections": forecast}}, 64 << 30, users
    )[5001]
    # Steps forecast 1, 5 and 2 connections: the pool covers the largest.
    assert plan.total_slots() == 5
    assert plan.horizon == 30.0


def test_value_sizing(setup):
    loaded, users = setup
    settings = replace(loaded.forecast, sizing="value", slot_price=0.01)
    priced = replace(loaded, forecast=settings)
    # 10 arrivals per 10 s step, 2 s each: L = 2, and D ~ Poisson(2). Slot k
    # brings 10 x P(D = k - 1) hits and 10 s x P(D <= k - 1) idle seconds,
    # worth 0.01 hits each. Slot 7: 10 x 0.0120 = 0.120 > 0.1 x 0.9955.
    # Slot 8: 10 x 0.0034 = 0.034 < 0.1 x 0.9989. So 7 slots, capped at the
    # user's max_slots of 6.
    forecasts = {"arrivals": sharp(10, "arrivals")}
    plan = planner.plan(priced, {5001: forecasts}, 64 << 30, users)[5001]
    assert plan.total_slots() == 6
    assert "value: 7 slot(s)" in dict(plan.derivation)["needed"]


def test_value_sizing_policy_rejects_unknown():
    text = POLICY.replace("quantile: 0.9", "quantile: 0.9\n  sizing: magic")
    with pytest.raises(policy.PolicyError, match="unknown sizing 'magic'"):
        policy.load_texts([("test.yaml", text)])


def test_dispersion_more_slots(setup):
    loaded, users = setup
    plain = {"open_connections": sharp(40), "arrivals": sharp(10, "arrivals")}
    bursty = dict(plain, arrivals=replace(plain["arrivals"], dispersion=4.0))
    first = planner.plan(loaded, {5002: plain, 5001: bursty}, 64 << 30, users)
    # Same arrivals; bursts (variance 4x the mean) need more slots for q = 0.9.
    assert first[5001].needed > first[5002].needed


DEFAULT_POLICY = Path(__file__).parents[2] / "policies" / "default.yaml"


def plans_over_time(demand, seconds: int) -> dict[int, list[planner.UserPlan]]:
    """Plan every 10 s under the bundled default policy, as the daemon does.

    demand: uid -> function of the second returning open connections, which
    are also the arrivals of that second.
    """
    loaded = policy.load_texts([(str(DEFAULT_POLICY), DEFAULT_POLICY.read_text())])
    users = {uid: loaded.user_policy_for(uid) for uid in demand}
    forecaster = Forecaster(loaded.forecast)
    history = DemandHistory(capacity=4096)
    plans: dict[int, list[planner.UserPlan]] = {uid: [] for uid in demand}
    for second in range(1, seconds + 1):
        for uid, count in demand.items():
            value = float(count(second))
            history.record(uid, DemandSample(second, value, value))
        if second % 10:
            continue
        forecasts = forecaster.forecast_users(history, list(users), second)
        planned = planner.plan(loaded, forecasts, 2 << 30, users)
        for uid, user_plan in planned.items():
            plans[uid].append(user_plan)
    return plans


def test_idle_users_static_light():
    rng = np.random.default_rng(3)
    demand = {
        1001: lambda second: 0,
        # Three connections together once a minute, as a browser opens them.
        1002: lambda second: 3 if second % 60 == 7 else 0,
        # About one connection every 3 s.
        1003: lambda second: rng.poisson(0.3),
        # One connection every 5 minutes: the sparse model.
        1004: lambda second: 1 if second % 300 == 150 else 0,
    }
    plans = plans_over_time(demand, 400)
    # The default pool is light 2, heavy 1: 3 slots.
    for uid, series in plans.items():
        assert max(p.total_slots() for p in series) <= 3, uid
        assert max(p.slots()["heavy"] for p in series) == 0, uid


def test_busy_volatile_user_heavy():
    rng = np.random.default_rng(4)
    # Bursts of 5 to 40 connections in a third of the seconds, else 0 to 2.
    demand = {
        1001: lambda second: (
            rng.integers(5, 41) if rng.random() < 0.3 else rng.integers(0, 3)
        )
    }
    last = plans_over_time(demand, 400)[1001][-1]
    assert last.interval_width >= 0.5
    assert last.total_slots() > 3
    assert last.slots()["heavy"] > 0
