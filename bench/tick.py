"""Measure the CPU time of one planner tick (forecast + plan) for 10 to 10,000 users.

Usage: PYTHONPATH=. python bench/tick.py [--users 10,100,1000,10000] [--json]

Each user's history is a real per-owner series of the Azure Functions 2019
sample (peak and arrivals per minute, from bench/data), picked round-robin
with a random offset, so the mix of sparse, periodic and dense users is the
trace's. A tick forecasts open connections and arrivals for every user and
plans all of them. The first tick includes the kernel hyperparameter fits;
the steady tick is the median of the next three, as the daemon runs them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from broker import planner, policy, replay
from broker.predictor import Predictor, PredictorSettings

DATA = Path(__file__).parent / "data" / "azure-functions-2019-sample"

POLICY = """
tiers:
  light: {cpu.weight: 100, memory.min: 32M}
  heavy: {cpu.weight: 400, memory.min: 128M}
users:
  - uids: 10000-59999
    pool: {light: 2, heavy: 1}
    max_slots: 32
forecast: {quantile: 0.9, plan_interval: 60s, window: 64}
"""


def series(window: int) -> tuple[np.ndarray, np.ndarray]:
    trace = replay.load_azure_functions(DATA)
    demand = replay.measure_demand(trace, 60.0)
    return demand.peak, demand.arrivals


def tick(predictors, loaded, users, peak, arrivals, labels) -> float:
    started = time.process_time()
    keys = list(users)
    forecasts = {
        "open_connections": predictors[0].forecast_windows(keys, peak, labels),
        "arrivals": predictors[1].forecast_windows(keys, arrivals, labels),
    }
    per_user = {
        uid: {r: forecasts[r][i] for r in forecasts} for i, uid in enumerate(keys)
    }
    planner.plan(loaded, per_user, 64 << 30, users)
    return time.process_time() - started


def measure(count: int, peak_all, arrivals_all, window: int, rng) -> dict[str, float]:
    loaded = policy.load_texts([("bench.yaml", POLICY)])
    entry = loaded.users[0]
    users = {10000 + i: entry for i in range(count)}
    rows = np.arange(count) % peak_all.shape[0]
    settings = PredictorSettings(window=window)
    predictors = [
        Predictor(settings, 60.0, "open_connections"),
        Predictor(settings, 60.0, "arrivals"),
    ]
    times = []
    for step in range(4):
        ends = rng.integers(window, peak_all.shape[1], count)
        index = ends[:, None] - window + np.arange(window)[None, :]
        peak = peak_all[rows[:, None], index]
        arrivals = arrivals_all[rows[:, None], index]
        labels = np.arange(step, step + window)
        times.append(tick(predictors, loaded, users, peak, arrivals, labels))
    return {
        "users": count,
        "first_tick_cpu_seconds": times[0],
        "steady_tick_cpu_seconds": statistics.median(times[1:]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--users", default="10,100,1000,10000", help="comma-separated user counts"
    )
    parser.add_argument(
        "--window", type=int, default=64, help="training window in steps (default 64)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON instead of a table"
    )
    args = parser.parse_args()
    peak, arrivals = series(args.window)
    rng = np.random.default_rng(0)
    results = [
        measure(int(n), peak, arrivals, args.window, rng) for n in args.users.split(",")
    ]
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'users':>6}  {'first tick s':>12}  {'steady tick s':>13}")
    for r in results:
        print(
            f"{r['users']:>6}  {r['first_tick_cpu_seconds']:>12.3f}  {r['steady_tick_cpu_seconds']:>13.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
