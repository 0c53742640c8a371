"""The daemon's forecast loop on synthetic counters: measure, plan, desired pools.

No kernel is involved: the cgroup mount is an empty directory, so only the
probe counters feed the history. The planner's own arithmetic is tested in
test_planner.py; this checks the wiring the daemon relies on.
"""

from pathlib import Path

import pytest

from broker import policy
from broker.cgroups import CgroupFS
from broker.probes import UidCounters

POLICY = """\
tiers:
  light:
    cpu.weight: 100
    memory.min: 16M
users:
  - uid: 5001
    pool: {light: 1}
    max_slots: 12
forecast:
  enabled: true
  interval: 1s
  plan_interval: 5s
  quantile: 0.9
"""


@pytest.fixture
def loop(tmp_path: Path):
    from broker.forecast_loop import ForecastLoop

    loaded = policy.load_texts([("p.yaml", POLICY)])
    return ForecastLoop(loaded, CgroupFS(tmp_path), memory=8 << 30), loaded


def feed(loop, seconds: int, open_at) -> None:
    accepts = 0
    for second in range(seconds):
        accepts += open_at(second)
        counters = {
            5001: UidCounters(
                accepts=accepts, closes=accepts - open_at(second), drops=0
            )
        }
        loop.measure(float(second), [5001], {}, counters)


def test_static_pool_before_first_plan(loop):
    forecast, loaded = loop
    pools, knobs = forecast.desired({5001: loaded.users[0]})
    assert pools == {5001: {"light": 1}}
    assert knobs == {}


def test_busy_user_gets_more_slots(loop):
    forecast, loaded = loop
    feed(forecast, 600, lambda s: 6)
    forecast.start_planning(600.0)
    plans = forecast.predict_and_plan(600.0, {5001: loaded.users[0]})
    forecast.finish_planning(plans)
    pools, knobs = forecast.desired({5001: loaded.users[0]})
    assert pools[5001]["light"] >= 6
    assert pools[5001]["light"] <= 12
    assert knobs[5001]["light"]["memory.min"] == str(16 << 20)


def test_idle_user_keeps_few_slots(loop):
    forecast, loaded = loop
    feed(forecast, 600, lambda s: 0)
    plans = forecast.predict_and_plan(600.0, {5001: loaded.users[0]})
    forecast.accept_plans(plans)
    pools, _ = forecast.desired({5001: loaded.users[0]})
    assert pools[5001]["light"] <= 1


def test_miss_asks_for_one_more_slot(loop):
    forecast, loaded = loop
    forecast.request_slot(5001)
    forecast.request_slot(5001)
    pools, _ = forecast.desired({5001: loaded.users[0]})
    assert pools == {5001: {"light": 3}}


def test_samples_wait_while_planning(loop):
    forecast, _ = loop
    feed(forecast, 3, lambda s: 1)
    before = forecast.history.size(5001)
    forecast.start_planning(3.0)
    forecast.measure(3.0, [5001], {}, {5001: UidCounters(9, 8, 0)})
    assert forecast.history.size(5001) == before
    forecast.finish_planning(None)
    assert forecast.history.size(5001) == before + 1


def test_status_has_plan_text(loop):
    forecast, loaded = loop
    feed(forecast, 120, lambda s: 2)
    forecast.start_planning(120.0)
    forecast.finish_planning(forecast.predict_and_plan(120.0, {5001: loaded.users[0]}))
    status = forecast.user_status(5001)
    assert status["quantile"] == 0.9
    assert "light" in status["text"]
