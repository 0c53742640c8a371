"""Demand parsers on fixture text in the Linux 6.1 cgroup v2 formats, and the history."""

from __future__ import annotations

import math

import pytest

from broker import demand
from broker.demand import (
    CgroupTexts,
    ConnectionCounters,
    DemandCollector,
    DemandHistory,
    DemandParseError,
    DemandSample,
)

# cpu.stat of a cgroup with the cpu controller enabled (Linux 6.1 prints the
# burst fields since 5.14).
CPU_STAT = """usage_usec 2503125
user_usec 1803115
system_usec 700010
nr_periods 120
nr_throttled 7
throttled_usec 35012
nr_bursts 0
burst_usec 0
"""

# cpu.stat where only the core fields exist (cpu controller not enabled).
CPU_STAT_CORE = "usage_usec 41\nuser_usec 30\nsystem_usec 11\n"

CPU_PRESSURE = """some avg10=1.53 avg60=0.87 avg300=0.25 total=1234567
full avg10=0.00 avg60=0.12 avg300=0.03 total=45678
"""

MEMORY_PRESSURE = """some avg10=0.00 avg60=0.00 avg300=0.00 total=0
full avg10=0.00 avg60=0.00 avg300=0.00 total=0
"""


def test_cpu_stat_full():
    stat = demand.parse_cpu_stat(CPU_STAT)
    assert stat.usage_usec == 2503125
    assert stat.user_usec == 1803115
    assert stat.system_usec == 700010
    assert stat.nr_throttled == 7
    assert stat.throttled_usec == 35012
    assert stat.burst_usec == 0


def test_cpu_stat_core_only():
    stat = demand.parse_cpu_stat(CPU_STAT_CORE)
    assert stat.usage_usec == 41
    assert stat.nr_periods is None


def test_cpu_stat_unknown_key_ignored():
    stat = demand.parse_cpu_stat(CPU_STAT_CORE + "core_sched.force_idle_usec 5\n")
    assert stat.usage_usec == 41


def test_cpu_stat_missing_usage():
    with pytest.raises(DemandParseError, match="usage_usec"):
        demand.parse_cpu_stat("user_usec 1\nsystem_usec 2\n")


def test_cpu_stat_bad_value():
    with pytest.raises(DemandParseError, match="not an integer"):
        demand.parse_cpu_stat("usage_usec x\nuser_usec 1\nsystem_usec 2\n")


def test_memory_current():
    assert demand.parse_memory_bytes("8835072\n") == 8835072


def test_memory_max_is_none():
    assert demand.parse_memory_bytes("max\n", "memory.max") is None


def test_memory_empty():
    with pytest.raises(DemandParseError, match="empty"):
        demand.parse_memory_bytes("\n")


def test_pressure_some_and_full():
    pressure = demand.parse_pressure(CPU_PRESSURE, "cpu.pressure")
    assert pressure.some.avg10 == pytest.approx(1.53)
    assert pressure.some.total == 1234567
    assert pressure.full is not None
    assert pressure.full.avg60 == pytest.approx(0.12)


def test_pressure_some_only():
    # Kernels before 5.13 print no `full` line in cpu.pressure.
    text = "some avg10=0.00 avg60=0.00 avg300=0.00 total=17\n"
    pressure = demand.parse_pressure(text)
    assert pressure.some.total == 17
    assert pressure.full is None


def test_pressure_malformed():
    with pytest.raises(DemandParseError):
        demand.parse_pressure("some avg10=0.00 total=x\n")


def test_history_ring_bounded():
    history = DemandHistory(capacity=3)
    for t in range(5):
        history.record(7, DemandSample(time=float(t), arrivals=float(t * 10)))
    times, values = history.series(7, "arrivals")
    assert history.size(7) == 3
    assert times.tolist() == [2.0, 3.0, 4.0]
    assert values.tolist() == [20.0, 30.0, 40.0]


def test_history_last():
    history = DemandHistory(capacity=8)
    for t in range(4):
        history.record(1, DemandSample(time=float(t), arrivals=1.0))
    times, _ = history.series(1, "arrivals", last=2)
    assert times.tolist() == [2.0, 3.0]


def test_history_unknown_user():
    history = DemandHistory()
    assert history.window(42).shape == (0, len(demand.RESOURCES) + 1)


def test_collector_deltas():
    history = DemandHistory()
    collector = DemandCollector(history)
    first = {
        "/slot0": CgroupTexts(
            cpu_stat=CPU_STAT_CORE.replace("usage_usec 41", "usage_usec 1000000"),
            memory_current="1048576\n",
            cpu_pressure="some avg10=0 avg60=0 avg300=0 total=0\n",
        )
    }
    second = {
        "/slot0": CgroupTexts(
            cpu_stat=CPU_STAT_CORE.replace("usage_usec 41", "usage_usec 1500000"),
            memory_current="2097152\n",
            memory_peak="4194304\n",
            cpu_pressure="some avg10=0 avg60=0 avg300=0 total=250000\n",
        )
    }
    assert collector.collect(5, 10.0, first, ConnectionCounters(100, 1)) is None
    sample = collector.collect(5, 12.0, second, ConnectionCounters(130, 4))
    assert sample is not None
    # 30 accepts since the last read; 4 open now.
    assert sample.arrivals == 30
    assert sample.open_connections == 4
    # (1.5 s - 1.0 s) of CPU over a 2 s interval = 0.25 cores.
    assert sample.cpu == pytest.approx(0.25)
    # 0.25 s of `some` stall over 2 s.
    assert sample.cpu_pressure == pytest.approx(0.125)
    assert sample.memory == 2097152
    assert sample.memory_peak == 4194304
    assert math.isnan(sample.memory_pressure)
    assert history.size(5) == 1


def test_collector_counter_reset():
    collector = DemandCollector(DemandHistory())
    collector.collect(1, 0.0, {}, ConnectionCounters(500, 0))
    sample = collector.collect(1, 1.0, {}, ConnectionCounters(3, 0))
    assert sample is not None
    assert sample.arrivals == 0


def test_collector_new_cgroup_waits():
    collector = DemandCollector(DemandHistory())
    collector.collect(1, 0.0, {}, None)
    texts = {"/new": CgroupTexts(cpu_stat=CPU_STAT_CORE)}
    sample = collector.collect(1, 1.0, texts, None)
    assert sample is not None
    assert math.isnan(sample.cpu)


def test_collector_bad_text_counted():
    collector = DemandCollector(DemandHistory())
    collector.collect(1, 0.0, {"/a": CgroupTexts(cpu_stat="garbage")}, None)
    assert collector.parse_errors == 1
