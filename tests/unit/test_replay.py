"""Replay: demand measurement, the slot simulation and the methods on hand-made traces.

Every expected number is worked out in the comment above its assert.
"""

from __future__ import annotations

import numpy as np
import pytest

from broker import replay
from broker.replay import Demand, Trace, UserArrivals


def make_trace(starts, durations, length=120.0, memory_mb=512.0) -> Trace:
    user = UserArrivals(
        "a", np.array(starts, float), np.array(durations, float), memory_mb
    )
    return Trace([user], length)


def test_demand_counts():
    # Arrivals at 1 s and 2 s hold 10 s each; one at 70 s holds 5 s.
    trace = make_trace([1, 2, 70], [10, 10, 5])
    demand = replay.measure_demand(trace, 60.0)
    assert demand.arrivals.tolist() == [[2, 1]]
    # Both of the first two are open during [2, 11).
    assert demand.peak.tolist() == [[2, 1]]
    # Busy slot-seconds 10 + 10 = 20 in the first minute, 5 in the second.
    assert demand.busy[0, 0] == pytest.approx(20 / 60)
    assert demand.busy[0, 1] == pytest.approx(5 / 60)


def test_demand_whole_span(tmp_path):
    # Rows every 60 s for 5 minutes: the last row starts the fifth interval,
    # [240, 300), which must exist although the trace ends right after it.
    path = tmp_path / "trace.csv"
    rows = [f"{60 * m},{user},2" for m in range(5) for user in ("a", "b")]
    path.write_text("timestamp,user,count\n" + "\n".join(rows) + "\n")
    demand = replay.measure_demand(replay.load_csv(path), 60.0)
    assert demand.shape == (2, 5)
    assert demand.arrivals.tolist() == [[2] * 5, [2] * 5]
    # Each row's two arrivals start together and hold 1 s: peak 2 each minute.
    assert demand.peak.tolist() == [[2] * 5, [2] * 5]


def test_demand_carry_over():
    # One arrival at 50 s holding 20 s is still open at the start of minute 2.
    demand = replay.measure_demand(make_trace([50], [20]), 60.0)
    assert demand.peak.tolist() == [[1, 1]]
    assert demand.busy[0, 1] == pytest.approx(10 / 60)


def test_simulate_loss():
    trace = make_trace([1, 2, 70], [10, 10, 5])
    demand = replay.measure_demand(trace, 60.0)
    outcome = replay.simulate(trace, demand, np.array([[1.0, 1.0]]))
    # Minute 1, one slot: the arrival at 1 s takes it until 11 s, so the one
    # at 2 s misses. Minute 2: the arrival at 70 s finds the slot free.
    assert outcome.hits.tolist() == [[1, 1]]
    # Idle: minute 1 free during [0, 1) and [11, 60) = 50 s; minute 2 free
    # except [70, 75) = 55 s.
    assert outcome.idle_slot_seconds[0].tolist() == pytest.approx([50.0, 55.0])
    # 512 MB per slot: 105 slot-seconds x 0.5 GB.
    assert outcome.idle_memory_gb_seconds().sum() == pytest.approx(52.5)


def test_simulate_all_hit():
    trace = make_trace([1, 2, 70], [10, 10, 5])
    demand = replay.measure_demand(trace, 60.0)
    outcome = replay.simulate(trace, demand, np.array([[2.0, 0.0]]))
    # Two slots cover the first minute; no slot in the second.
    assert outcome.hits.tolist() == [[2, 0]]
    # Minute 1: 2 x 60 - 20 busy = 100 s idle; minute 2: no slot, no idle.
    assert outcome.idle_slot_seconds[0].tolist() == pytest.approx([100.0, 0.0])


def test_simulate_busy_slot_outlives_pool():
    # The arrival at 50 s holds its slot until 70 s; the one at 65 s finds
    # that slot busy although the second minute plans one slot.
    trace = make_trace([50, 65], [20, 1])
    demand = replay.measure_demand(trace, 60.0)
    outcome = replay.simulate(trace, demand, np.array([[1.0, 1.0]]))
    assert outcome.hits.tolist() == [[1, 0]]
    # Minute 1: free [0, 50) = 50 s. Minute 2: busy until 70 s, free [70, 120) = 50 s.
    assert outcome.idle_slot_seconds[0].tolist() == pytest.approx([50.0, 50.0])


def test_simulate_shrunk_pool_no_negative_idle():
    trace = make_trace([50], [20])
    demand = replay.measure_demand(trace, 60.0)
    outcome = replay.simulate(trace, demand, np.array([[1.0, 0.0]]))
    # Minute 2 plans no slot while the busy one stays: idle is 0, not -10.
    assert outcome.idle_slot_seconds[0].tolist() == pytest.approx([50.0, 0.0])


def peak_demand(peaks) -> Demand:
    peak = np.array([peaks], float)
    return Demand(60.0, peak.copy(), peak, peak / 2)


def test_window_percentile_pools():
    method = replay.WindowPercentile(window=3)
    method.prepare(peak_demand([0, 1, 2, 3, 4]), warmup=1)
    # The median (inverted CDF: sample ceil(0.5 n) of the sorted window) of
    # [], [0], [0 1], [0 1 2], [1 2 3] is 0, 0, 0, 1, 2.
    assert method.pools(0.5).tolist() == [[0, 0, 0, 1, 2]]


def test_reactive_pools():
    method = replay.Reactive()
    method.prepare(peak_demand([0, 1, 2, 3, 4]), warmup=1)
    # Max over the last two intervals: -, 0, max(0,1), max(1,2), max(2,3).
    assert method.pools(2).tolist() == [[0, 0, 1, 2, 3]]


def test_static_pools():
    method = replay.Static()
    method.prepare(peak_demand([0, 1, 5, 5]), warmup=2)
    # Warm-up peaks [0, 1]: the 100th percentile is 1, the 50th is 0.
    assert method.pools(1.0).tolist() == [[1, 1, 1, 1]]
    assert method.pools(0.5).tolist() == [[0, 0, 0, 0]]


def test_decaying_histogram_pools():
    method = replay.DecayingHistogram(half_life=1.0, margin=0.15)
    method.prepare(peak_demand([2, 0, 0]), warmup=1)
    # After the sample 2: weight 1 on bucket 2, so the median is 2 and the
    # pool ceil(2 x 1.15) = 3. After the sample 0: bucket 2 decayed to 0.5,
    # bucket 0 has 1, so P(<= 0) = 1 / 1.5 = 0.67 >= 0.5: pool 0; at 0.9
    # the percentile is 2 again: pool 3.
    assert method.pools(0.5)[0, :3].tolist() == [0, 3, 0]
    assert method.pools(0.9)[0, 2] == 3


def test_score_metrics():
    trace = make_trace([1, 2, 70], [10, 10, 5])
    demand = replay.measure_demand(trace, 60.0)
    method = replay.Static()
    method.prepare(demand, warmup=1)
    # Warm-up peak 2: pool 2 in both minutes; only minute 2 is scored.
    result = replay.score(method, 1.0, trace, demand, warmup=1, target=0.95)
    assert result.warm_hit_rate == 1.0
    assert result.users_below_half == 0
    # Minute 2: 2 slots x 60 s - 5 s busy = 115 s idle.
    assert result.idle_slot_seconds == pytest.approx(115.0)
    # Peak 1 <= pool 2: covered. Pinball at q = 1 of a pool 1 above: (1 - 1) x 1 = 0.
    assert result.coverage == 1.0
    assert result.pinball_loss == pytest.approx(0.0)


def test_pinball_mean():
    # q = 0.9: under-forecast 2 costs 0.9 x 2 = 1.8; over-forecast 1 costs 0.1.
    loss = replay.pinball_mean(np.array([3.0, 0.0]), np.array([1.0, 1.0]), 0.9)
    assert loss == pytest.approx((1.8 + 0.1) / 2)


def test_search_knob_smallest():
    # A user with peak 1 in every minute and one arrival per minute.
    starts = [60.0 * k + 30 for k in range(6)]
    trace = make_trace(starts, [1.0] * 6, length=360.0)
    demand = replay.measure_demand(trace, 60.0)
    method = replay.Reactive()
    method.prepare(demand, warmup=1)
    found = replay.search_knob(method, trace, demand, warmup=1, target=0.95)
    # Lookback 1 already gives one slot from minute 2 on: every scored arrival hits.
    assert found is not None
    assert found.knob == 1
    assert found.warm_hit_rate == 1.0


def test_load_csv(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(
        "timestamp,user,count,duration_s,memory_mb\n100,u1,2,0.5,64\n160,u2,1,,\n"
    )
    trace = replay.load_csv(path, spread=10.0, service_time=3.0)
    names = {u.name: u for u in trace.users}
    assert names["u1"].start.size == 2
    # Times are shifted so the first row is at 0; a count is spread over 10 s.
    assert names["u1"].start.min() >= 0.0
    assert names["u1"].start.max() < 10.0
    assert names["u2"].duration.tolist() == [3.0]
    assert names["u1"].memory_mb == 64.0


def test_load_csv_spread_aligned(tmp_path):
    # Rows at 100 s and 160 s, each spread over 60 s. Interval 1 contains the
    # first row's 3 arrivals and interval 2 the second row's 2, whichever
    # instants the spread draws.
    path = tmp_path / "trace.csv"
    path.write_text("timestamp,user,count\n100,u1,3\n160,u1,2\n")
    trace = replay.load_csv(path, spread=60.0)
    assert trace.length == 120.0
    demand = replay.measure_demand(trace, 60.0)
    assert demand.arrivals.tolist() == [[3, 2]]


def test_load_csv_bad_row(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("timestamp,user\nnoon,u1\n")
    with pytest.raises(replay.TraceError, match=":2:"):
        replay.load_csv(path)


@pytest.mark.parametrize(
    "rows, expected",
    [
        ("0,u1,-3\n60,u1,2\n", r":2: count: -3 is negative; give 0 or more"),
        ("0,u1,1\nnan,u1,2\n", r":3: timestamp: 'nan' is not a finite number"),
        ("0,u1,1\ninf,u1,2\n", r":3: timestamp: 'inf' is not a finite number"),
        ("0,u1,1\n60,u1,x\n", r":3: count: invalid literal for int\(\)"),
        ("0,u1,1\n60,u1,2000000\n", r":3: count: 2000000 arrivals in one row"),
        ("0,u1,1,-1\n", r":2: duration_s: -1 is negative"),
        ("0,u1\n60\n", r":3: user: missing"),
    ],
)
def test_load_csv_invalid_field(tmp_path, rows, expected):
    path = tmp_path / "trace.csv"
    path.write_text("timestamp,user,count,duration_s\n" + rows)
    with pytest.raises(replay.TraceError, match=expected):
        replay.load_csv(path)


@pytest.mark.parametrize(
    "text, expected",
    [
        (b"timestamp,user\n0,u1\n60,\xff\n", r":3: invalid UTF-8 byte 0xff"),
        (
            b"timestamp,user,cnt\n0,u1,5\n",
            r": unknown column 'cnt'.*did you mean count",
        ),
        (b"timestamp,user,user\n0,u1,u2\n", r": column 'user' appears twice"),
        (b"# trace\ntimestamp,user\n0,u1\n", r":1: .* the first line '# trace'"),
        (b"timestamp,user\n0,u1,3\n", r":2: 3 fields, but the header has 2"),
        (b"timestamp,user\n0,u1\n\n\n60,u1,3\n", r":5: 3 fields"),
        (b"timestamp,user\n0,u1\n# note\n", r":3: a comment line"),
        (b"timestamp,user\n0,u1\n60, \n", r":3: user: missing"),
        (b'timestamp,user\n0,"u1\n', r":2: unexpected end of data"),
    ],
)
def test_load_csv_invalid_layout(tmp_path, text, expected):
    path = tmp_path / "trace.csv"
    path.write_bytes(text)
    with pytest.raises(replay.TraceError, match=expected):
        replay.load_csv(path)


@pytest.mark.parametrize(
    "text",
    [
        b"\xef\xbb\xbftimestamp,user\n0,u1\n60,u1\n",
        b"timestamp,user\r\n0,u1\r\n60,u1\r\n",
        b'"timestamp","user"\n"0"," u1 "\n60,u1\n',
        b"user,timestamp\nu1,60\nu1,0\n",
    ],
)
def test_load_csv_odd_layout(tmp_path, text):
    path = tmp_path / "trace.csv"
    path.write_bytes(text)
    trace = replay.load_csv(path)
    assert [u.name for u in trace.users] == ["u1"]
    assert trace.users[0].start.tolist() == [0.0, 60.0]


def test_load_csv_single_instant(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("timestamp,user,count\n0,u1,3\n")
    with pytest.raises(replay.TraceError, match="timestamp: every arrival is at 0 s"):
        replay.load_csv(path)
    # Spread over a minute, the same row is a trace of 60 s.
    assert replay.load_csv(path, spread=60.0).length == 60.0


def test_load_csv_no_arrivals(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("timestamp,user,count\n0,u1,0\n60,u1,0\n")
    with pytest.raises(replay.TraceError, match="every row has 0 arrivals"):
        replay.load_csv(path)


def test_demand_span_bounded():
    trace = make_trace([0.0, 1e12], [1.0, 1.0], length=1e12 + 1)
    trace.source = "big.csv"
    # 1e12 s at 60 s per interval is 1.7e10 intervals; 1e12 / 100000 = 1e7 s.
    with pytest.raises(
        replay.TraceError,
        match=r"big.csv: timestamp: the trace spans 1e\+12 s, 1.667e\+10 "
        r"intervals of 60 s.*--interval 1e\+07 or more",
    ):
        replay.measure_demand(trace, 60.0)


def test_compare_warmup_zero():
    trace = make_trace([1, 70, 130], [1, 1, 1], length=180.0)
    options = replay.Options(warmup=0, methods=("static",))
    with pytest.raises(replay.TraceError, match="--warmup 0: .* use --warmup 1"):
        replay.compare(trace, options)


def test_run_invalid_trace_exit(tmp_path, capsys):
    path = tmp_path / "trace.csv"
    path.write_text("timestamp,user,count\n0,u1,-1\n")
    parser = replay.argparse.ArgumentParser()
    replay._add_arguments(parser)
    assert replay.run(parser.parse_args([str(path)])) == 1
    assert f"{path}:2: count:" in capsys.readouterr().err


def test_load_azure(tmp_path):
    owner, app = "o1", "a1"
    (tmp_path / "invocations.csv").write_text(
        "HashOwner,HashApp,HashFunction,Trigger,480,481\n"
        f"{owner},{app},f1,http,2,0\n{owner},{app},f2,timer,0,1\n"
    )
    (tmp_path / "durations.csv").write_text(
        f"HashOwner,HashApp,HashFunction,Average\n{owner},{app},f1,1500\n{owner},{app},f2,0\n"
    )
    (tmp_path / "memory.csv").write_text(
        f"HashFunction,HashOwner,HashApp,AverageAllocatedMb\nf1,{owner},{app},100\nf2,{owner},{app},40\n"
    )
    trace = replay.load_azure_functions(tmp_path)
    assert len(trace.users) == 1
    user = trace.users[0]
    # Two invocations in minute 480, one in 481; 2 minutes = 120 s.
    assert user.start.size == 3
    assert trace.length == 120.0
    assert (user.start[:2] < 60).all()
    # 1500 ms; 0 ms becomes the 1 ms floor. Memory: the larger function's.
    assert sorted(user.duration.tolist()) == [0.001, 1.5, 1.5]
    assert user.memory_mb == 100.0


def test_load_azure_negative_count(tmp_path):
    (tmp_path / "invocations.csv").write_text(
        "HashOwner,HashApp,HashFunction,Trigger,480,481\no1,a1,f1,http,2,-1\n"
    )
    (tmp_path / "durations.csv").write_text(
        "HashOwner,HashApp,HashFunction,Average\no1,a1,f1,1500\n"
    )
    with pytest.raises(replay.TraceError, match=r"invocations.csv:2: 481: -1 is"):
        replay.load_azure_functions(tmp_path)


def write_azure(directory, invocations, durations):
    (directory / "invocations.csv").write_text(
        "HashOwner,HashApp,HashFunction,Trigger,480,481\n" + invocations
    )
    (directory / "durations.csv").write_text(durations)


@pytest.mark.parametrize(
    "invocations, durations, expected",
    [
        (
            "o1,a1,f1,http,2\n",
            "HashFunction,Average\nf1,1500\n",
            r"invocations.csv:2: 481: missing",
        ),
        (
            "o1,a1,f1,http,2,1\n",
            "HashFunction,Avg\nf1,1500\n",
            r"durations.csv:1: missing column 'Average'",
        ),
        (
            "o1,a1,f1,http,2,1\n",
            "HashFunction,Average\nf1,abc\n",
            r"durations.csv:2: Average: .*give milliseconds as a number",
        ),
        (
            "o1,a1,f1,http,2,1\n",
            "HashFunction,Average\nf1,nan\n",
            r"durations.csv:2: Average: 'nan' is not a finite number",
        ),
        (
            "o1,a1,f1,http,2,1\n",
            "HashFunction,Average\nf1,-5\n",
            r"durations.csv:2: Average: -5 is negative",
        ),
    ],
)
def test_load_azure_invalid(tmp_path, invocations, durations, expected):
    write_azure(tmp_path, invocations, durations)
    with pytest.raises(replay.TraceError, match=expected):
        replay.load_azure_functions(tmp_path)


def test_load_azure_missing_owner(tmp_path):
    (tmp_path / "invocations.csv").write_text("Owner,HashFunction,480\no1,f1,2\n")
    (tmp_path / "durations.csv").write_text("HashFunction,Average\nf1,1500\n")
    with pytest.raises(replay.TraceError, match=r"missing column 'HashOwner'"):
        replay.load_azure_functions(tmp_path)


def test_unknown_method():
    with pytest.raises(replay.TraceError, match="unknown method"):
        replay.build_method("magic", make_trace([1], [1]), replay.Options())


def test_run_json_keys(tmp_path, capsys):
    # Two users, one arrival every 30 s for 40 minutes.
    rows = ["timestamp,user,duration_s"]
    rows += [f"{30 * i},{'ab'[i % 2]},2" for i in range(80)]
    path = tmp_path / "trace.csv"
    path.write_text("\n".join(rows) + "\n")
    parser = replay.argparse.ArgumentParser()
    replay._add_arguments(parser)
    args = parser.parse_args(
        [
            str(path),
            "--json",
            "--warmup",
            "16",
            "--window",
            "8",
            "--methods",
            "gp,static,reactive,window-percentile,decaying-histogram",
        ]
    )
    assert replay.run(args) == 0
    report = replay.json.loads(capsys.readouterr().out)
    for name, result in report["methods"].items():
        for key in (
            "warm_hit_rate",
            "user_hit_rate_median",
            "users_below_half",
            "idle_slot_seconds",
            "idle_memory_gb_seconds",
            "coverage",
            "pinball_loss",
            "fit_cpu_seconds",
            "at_target",
        ):
            assert key in result, (name, key)
    assert report["methods"]["reactive"]["coverage"] is None
    assert set(report["methods"]["gp"]["at_target"]) >= {
        "knob",
        "warm_hit_rate",
        "user_hit_rate_median",
        "idle_slot_seconds",
    }


def test_run_missing_trace(tmp_path, capsys):
    parser = replay.argparse.ArgumentParser()
    replay._add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "absent.csv")])
    assert replay.run(args) == 1
    assert "cannot read trace" in capsys.readouterr().err


def test_oracle_dynamic_follows_peaks():
    # Minute 1: two arrivals open together; minute 2: one. With a price of 0
    # an idle second costs nothing, so each interval takes the smallest pool
    # with all its hits: its peak.
    trace = make_trace([1, 2, 70], [10, 10, 5])
    demand = replay.measure_demand(trace, 60.0)
    method = replay.OracleDynamic(trace)
    method.prepare(demand, warmup=0)
    assert method.pools(0.0).tolist() == [[2, 1]]
    # At a price of 1 hit per idle second no slot is worth its 50+ idle seconds.
    assert method.pools(1.0).tolist() == [[0, 0]]


def test_gp_value_price_monotone():
    starts = [60.0 * k + 30 for k in range(40)]
    trace = make_trace(starts, [1.0] * 40, length=2400.0)
    demand = replay.measure_demand(trace, 60.0)
    method = replay.GaussianProcessValue(replay.PredictorSettings(window=16))
    method.prepare(demand, warmup=20)
    cheap, dear = method.pools(0.001), method.pools(1.0)
    # One arrival a minute of 1 s: the first slot brings about 1 hit for 59
    # idle seconds, worth it at 0.001 hits per second (0.059). A second slot
    # brings about 0.02 hits for 60 more idle seconds (0.06): not worth it.
    assert cheap[0, 20:].min() == 1
    assert cheap[0, 20:].max() == 1
    # At one hit per idle second no slot is worth it.
    assert dear[0, 20:].max() == 0


def test_demand_spread():
    # Arrivals at 1 s and 2 s hold 10 s each: over minute 1 the open count is
    # 1 during [1, 2) and [11, 12), 2 during [2, 11), else 0. Mean
    # (2 + 18) / 60 = 1/3; mean square (2 + 36) / 60; variance 38/60 - 1/9.
    demand = replay.measure_demand(make_trace([1, 2, 70], [10, 10, 5]), 60.0)
    assert demand.spread is not None
    assert demand.spread[0, 0] == pytest.approx(38 / 60 - 1 / 9)


def test_gp_anomaly_names_user(caplog):
    # A user with one arrival a minute for 30 minutes, then 40 at once: the
    # burst is far above any bound learnt from the quiet part, and the
    # warning names the trace's user, not a row number.
    starts = [60.0 * k + 30 for k in range(30)] + [1830.0 + 0.01 * i for i in range(40)]
    user = UserArrivals("carol", np.array(starts), np.ones(len(starts)), 512.0)
    trace = Trace([user], 1920.0)
    demand = replay.measure_demand(trace, 60.0)
    method = replay.GaussianProcess(replay.PredictorSettings(window=16))
    method.prepare(demand, warmup=20)
    assert "anomalous demand for user carol" in caplog.text


@pytest.mark.parametrize(
    "option, value",
    [
        ("--quantile", "0"),
        ("--quantile", "1"),
        ("--quantile", "nan"),
        ("--target-hit-rate", "0"),
        ("--target-hit-rate", "1.5"),
        ("--target-hit-rate", "nan"),
        ("--min-median", "-0.1"),
        ("--min-median", "2"),
        ("--window", "0"),
        ("--percentile-window", "0"),
        ("--seed", "-1"),
        ("--methods", "magic"),
        ("--methods", ",,"),
    ],
)
def test_parse_invalid_option(option, value, capsys):
    parser = replay.argparse.ArgumentParser()
    replay._add_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["trace.csv", f"{option}={value}"])
    assert exit_info.value.code == 2
    assert f"argument {option}: " in capsys.readouterr().err


def test_parse_methods_deduplicated():
    parser = replay.argparse.ArgumentParser()
    replay._add_arguments(parser)
    args = parser.parse_args(["t.csv", "--methods", "static, gp,static"])
    assert replay.options_from_args(args).methods == ("static", "gp")


def test_run_plot_unwritable(tmp_path, capsys):
    path = tmp_path / "trace.csv"
    path.write_text("timestamp,user\n" + "".join(f"{60 * m},u1\n" for m in range(4)))
    parser = replay.argparse.ArgumentParser()
    replay._add_arguments(parser)
    target = tmp_path / "absent" / "plot.png"
    args = parser.parse_args(
        [str(path), "--methods", "static", "--warmup", "1", "--plot", str(target)]
    )
    assert replay.run(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"--plot {target}: " in err


def test_run_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(replay.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(replay, "load_trace", pytest.fail)
    parser = replay.argparse.ArgumentParser()
    replay._add_arguments(parser)
    args = parser.parse_args(["t.csv", "--plot", str(tmp_path / "plot.png")])
    # Rejected before the trace is read, so no replay runs first.
    assert replay.run(args) == 1
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_load_azure_without_memory_warns(tmp_path, caplog):
    (tmp_path / "invocations.csv").write_text(
        "HashOwner,HashApp,HashFunction,Trigger,480\no1,a1,f1,http,2\n"
    )
    (tmp_path / "durations.csv").write_text(
        "HashOwner,HashApp,HashFunction,Average\no1,a1,f1,1500\n"
    )
    trace = replay.load_azure_functions(tmp_path)
    assert trace.users[0].memory_mb == 0.0
    assert "memory.csv not found" in caplog.text


def test_load_csv_arrivals_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(replay, "MAX_TRACE_ARRIVALS", 5)
    path = tmp_path / "trace.csv"
    path.write_text("timestamp,user,count\n0,u1,3\n60,u2,3\n")
    with pytest.raises(replay.TraceError, match=r":3: count: .* more than 5 "):
        replay.load_csv(path)


def test_load_azure_arrivals_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(replay, "MAX_TRACE_ARRIVALS", 5)
    write_azure(tmp_path, "o1,a1,f1,http,2,1\no2,a1,f2,http,2,1\n", "")
    (tmp_path / "durations.csv").write_text("HashFunction,Average\nf1,10\n")
    with pytest.raises(replay.TraceError, match=r"invocations.csv:3: .* more than 5 "):
        replay.load_azure_functions(tmp_path)


def test_demand_cells_bounded(monkeypatch):
    monkeypatch.setattr(replay, "MAX_CELLS", 3)
    trace = Trace(
        [
            UserArrivals(name, np.array([0.0, 100.0]), np.ones(2), 64.0)
            for name in ("a", "b")
        ],
        120.0,
        "t.csv",
    )
    # 2 users x 2 intervals of 60 s = 4 cells; 2 x 1 interval of 120 s = 2.
    with pytest.raises(replay.TraceError, match=r"2 users x 2 intervals"):
        replay.measure_demand(trace, 60.0)
    assert replay.measure_demand(trace, 120.0).shape == (2, 1)


def test_histogram_size_bounded(monkeypatch):
    monkeypatch.setattr(replay, "MAX_POOL_CELLS", 10)
    # 5 arrivals at once hold 10 s: peak 5, so 6 pool sizes x 2 intervals = 12.
    trace = make_trace([1, 1, 1, 1, 1, 70], [10, 10, 10, 10, 10, 1])
    demand = replay.measure_demand(trace, 60.0)
    with pytest.raises(replay.TraceError, match=r"decaying-histogram: .* 6 pool sizes"):
        replay.DecayingHistogram().prepare(demand, 1)


@pytest.mark.parametrize("oracle", [replay.OracleStatic, replay.OracleDynamic])
def test_oracle_pools_bounded(monkeypatch, oracle):
    monkeypatch.setattr(replay, "MAX_ORACLE_POOLS", 5)
    # Peak 5: pool sizes 0 to 5 are 6 whole-trace replays.
    trace = make_trace([1, 1, 1, 1, 1, 70], [10, 10, 10, 10, 10, 1])
    demand = replay.measure_demand(trace, 60.0)
    with pytest.raises(
        replay.TraceError, match=r"oracle-.*: 6 pool sizes .* the 5 whole-trace"
    ):
        oracle(trace).prepare(demand, 1)
