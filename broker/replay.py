"""Replay a recorded demand trace through the planner and compare pool-sizing methods.

The replay runs offline and faster than real time. Each arrival occupies a
warm slot for its service time if one is free when it arrives (a warm hit).
Otherwise it is served cold and occupies no slot (a miss). Every planning
interval each method sets each user's pool from the history before that
interval only. All methods see the same arrivals.

Idle reservation is the integral over time of max(pool - busy slots, 0): a
slot that is still busy when the pool shrinks stays until its connection
ends, as the reconciler never evicts a running process.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import heapq
import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from broker.errors import BrokerError
from broker.predictor import (
    Predictor,
    PredictorSettings,
    dispersion_index,
    little_slots_arrays,
    pit_below,
    value_curves,
)

log = logging.getLogger(__name__)


class TraceError(BrokerError):
    """A trace file is missing, unreadable or not in a known layout."""


# --------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------


@dataclass
class UserArrivals:
    """One user's arrivals, sorted by time, each with its service time."""

    name: str
    start: np.ndarray  # seconds from the start of the trace
    duration: np.ndarray  # seconds the arrival occupies a slot
    memory_mb: float  # memory.min a slot of this user reserves

    @property
    def end(self) -> np.ndarray:
        return self.start + self.duration


@dataclass
class Trace:
    """A set of users' arrivals over [0, length) seconds."""

    users: list[UserArrivals]
    length: float
    source: str = ""

    def arrivals(self) -> int:
        return int(sum(u.start.size for u in self.users))


def _user_from_parts(
    name: str, starts: list[np.ndarray], durations: list[np.ndarray], memory_mb: float
) -> UserArrivals:
    start = np.concatenate(starts) if starts else np.empty(0)
    duration = np.concatenate(durations) if durations else np.empty(0)
    order = np.argsort(start, kind="stable")
    return UserArrivals(name, start[order], duration[order], memory_mb)


# Service time for functions whose recorded average is 0 ms (rounded down).
MIN_SERVICE_TIME = 0.001

# Columns of the Azure Functions 2019 files that the replay reads.
AZURE_INVOCATIONS = ("HashOwner", "HashFunction")
AZURE_DURATIONS = ("HashFunction", "Average")
AZURE_MEMORY = ("HashFunction", "AverageAllocatedMb")


def load_azure_functions(directory: Path, seed: int = 0, spread: float = 60.0) -> Trace:
    """Load the Azure Functions 2019 layout: invocations, durations, memory CSVs.

    Owners are users. A function's invocations of one minute are placed at
    uniformly random instants of that minute (the arrival times of a Poisson
    process given its count), each holding a slot for the function's average
    duration. A user's slot reserves the largest average memory of its
    functions.
    """
    durations = {
        row["HashFunction"]: _size(row["Average"], where, "Average", "milliseconds")
        for where, row in _csv_rows(directory / "durations.csv", AZURE_DURATIONS)
    }
    memory = _azure_memory(directory / "memory.csv")
    rng = np.random.default_rng(seed)
    parts: dict[str, tuple[list, list, list]] = {}
    minutes: list[str] = []
    total = 0
    for where, row in _csv_rows(directory / "invocations.csv", AZURE_INVOCATIONS):
        minutes = minutes or _minute_columns(directory / "invocations.csv", row)
        counts = np.array([_count(row[m], where, m) for m in minutes])
        total = _add_arrivals(total, int(counts.sum()), where, "invocations")
        minute = np.repeat(np.arange(counts.size), counts)
        start = (minute + rng.random(minute.size)) * spread
        milliseconds = durations.get(row["HashFunction"])
        service = 1.0 if milliseconds is None else milliseconds / 1000.0
        service = max(service, MIN_SERVICE_TIME)
        starts, services, memories = parts.setdefault(row["HashOwner"], ([], [], []))
        starts.append(start)
        services.append(np.full(start.size, service))
        memories.append(memory.get(row["HashFunction"], 0.0))
    if not minutes:
        raise TraceError(f"{directory / 'invocations.csv'}: no rows; nothing to replay")
    users = [
        _user_from_parts(owner, s, d, max(m)) for owner, (s, d, m) in parts.items()
    ]
    return Trace(users, len(minutes) * spread, str(directory))


def _azure_memory(path: Path) -> dict[str, float]:
    """Return megabytes per function from memory.csv, or nothing if it is absent."""
    if not path.exists():
        log.warning("%s not found: idle memory GB-seconds will be 0", path)
        return {}
    return {
        row["HashFunction"]: _size(
            row["AverageAllocatedMb"], where, "AverageAllocatedMb", "megabytes"
        )
        or 0.0
        for where, row in _csv_rows(path, AZURE_MEMORY)
    }


def _minute_columns(path: Path, row: dict[str, str]) -> list[str]:
    """Return the minute-of-day columns (480, 481, ...) of invocations.csv."""
    minutes = [column for column in row if column.isdigit()]
    if not minutes:
        raise TraceError(f"{path}: no minute columns (480, 481, ...)")
    return minutes


def load_csv(
    path: Path,
    seed: int = 0,
    spread: float = 0.0,
    service_time: float = 1.0,
    memory_mb: float = 64.0,
) -> Trace:
    """Load `timestamp,user[,count][,duration_s][,memory_mb]` rows (seconds as float).

    A row with a count stands for that many arrivals, placed at uniformly
    random instants of [timestamp, timestamp + spread). Raises TraceError
    naming the file, line and field of the first invalid value.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, tuple[list, list, list]] = {}
    stamps = []
    rows = total = 0
    for where, row in _csv_rows(path, CSV_REQUIRED, CSV_COLUMNS):
        rows += 1
        user, stamp, count, duration, memory = _csv_row(
            row, where, service_time, memory_mb
        )
        total = _add_arrivals(total, count, where, "count")
        if count:
            stamps.append(stamp)
        starts, services, memories = parts.setdefault(user, ([], [], []))
        starts.append(stamp + rng.random(count) * spread)
        services.append(np.full(count, max(duration, MIN_SERVICE_TIME)))
        memories.append(memory)
    if not rows:
        raise TraceError(
            f"{path}: no rows; expected a header with at least timestamp,user "
            "and one row per arrival time"
        )
    users = [_user_from_parts(name, s, d, max(m)) for name, (s, d, m) in parts.items()]
    return _shift_to_origin(users, stamps, spread, path)


CSV_REQUIRED = ("timestamp", "user")
CSV_COLUMNS = ("timestamp", "user", "count", "duration_s", "memory_mb")


# A count above this in one row or one minute is taken for a typo: a million
# arrivals already take tens of megabytes of replay arrays.
MAX_ROW_ARRIVALS = 1_000_000

# Arrivals a trace may have in all. Loading and replaying with static took
# about 160 bytes per arrival (6 million arrivals: 1.1 GB resident in
# `broker replay --methods static,reactive`), so this is some 3 GB. The Azure Functions sample in bench/data has 3 million.
MAX_TRACE_ARRIVALS = 20_000_000


def _add_arrivals(total: int, count: int, where: str, name: str) -> int:
    """Return total + count; raise TraceError above MAX_TRACE_ARRIVALS."""
    total += count
    if total > MAX_TRACE_ARRIVALS:
        raise TraceError(
            f"{where}: {name}: the trace has more than {MAX_TRACE_ARRIVALS} "
            "arrivals up to this row, more than a replay holds in memory; "
            "replay a shorter slice or fewer users"
        )
    return total


def _csv_row(
    row: dict[str, str], where: str, service_time: float, memory_mb: float
) -> tuple[str, float, int, float, float]:
    """Return user, timestamp, count, duration and memory of one CSV row."""
    if (row.get("timestamp") or "").startswith("#"):
        raise TraceError(f"{where}: a comment line; remove it, as CSV has no comments")
    user = (row.get("user") or "").strip()
    if not user:
        raise TraceError(f"{where}: user: missing; give every row a user column")
    stamp = _number(row.get("timestamp"), where, "timestamp", "seconds")
    count = _count(row.get("count") or "1", where, "count")
    duration = _size(row.get("duration_s"), where, "duration_s", "seconds")
    memory = _size(row.get("memory_mb"), where, "memory_mb", "megabytes")
    return (
        user,
        stamp,
        count,
        service_time if duration is None else duration,
        memory_mb if memory is None else memory,
    )


def _number(text: str | None, where: str, name: str, unit: str) -> float:
    """Parse a field that must hold a finite number."""
    if not text:
        raise TraceError(f"{where}: {name}: missing; give {unit} as a number")
    try:
        value = float(text)
    except ValueError as exc:
        raise TraceError(f"{where}: {name}: {exc}; give {unit} as a number") from None
    if not math.isfinite(value):
        raise TraceError(
            f"{where}: {name}: {text!r} is not a finite number; give {unit} as a "
            "finite number"
        )
    return value


def _size(text: str | None, where: str, name: str, unit: str) -> float | None:
    """Parse an optional field of 0 or more; None when it is empty."""
    if not text:
        return None
    value = _number(text, where, name, unit)
    if value < 0:
        raise TraceError(
            f"{where}: {name}: {value:g} is negative; give 0 {unit} or more"
        )
    return value


def _count(text: str | None, where: str, name: str) -> int:
    """Parse a whole number of arrivals, from 0 to MAX_ROW_ARRIVALS."""
    if text is None:
        raise TraceError(f"{where}: {name}: missing; give a whole number of arrivals")
    try:
        count = int(text)
    except ValueError as exc:
        raise TraceError(
            f"{where}: {name}: {exc}; give a whole number of arrivals"
        ) from None
    if count < 0:
        raise TraceError(
            f"{where}: {name}: {count} is negative; give 0 or more arrivals"
        )
    if count > MAX_ROW_ARRIVALS:
        raise TraceError(
            f"{where}: {name}: {count} arrivals in one row is more than "
            f"{MAX_ROW_ARRIVALS}; check the column, or split the row"
        )
    return count


def _shift_to_origin(
    users: list[UserArrivals], stamps: list[float], spread: float, path: Path
) -> Trace:
    """Return the trace with time 0 at the first row with arrivals.

    Planning intervals then start at that row's timestamp, so with rows every
    minute and --spread 60 each interval contains one row's arrivals. The trace
    ends `spread` seconds after the last row with arrivals, or just after that
    row's arrivals without a spread.
    """
    if not stamps:
        raise TraceError(f"{path}: count: every row has 0 arrivals; nothing to replay")
    origin, last = min(stamps), max(stamps)
    if spread <= 0 and last == origin:
        raise TraceError(
            f"{path}: timestamp: every arrival is at {origin:g} s, so the trace "
            "has no duration; give rows at two or more times, or spread each "
            "row's count over --spread seconds"
        )
    for user in users:
        user.start = user.start - origin
    return Trace(users, last - origin + max(spread, 1e-9), str(path))


def _csv_rows(
    path: Path, required: tuple[str, ...], known: tuple[str, ...] | None = None
) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield `FILE:LINE` and each row of a UTF-8 CSV file with a header line.

    A row may leave out trailing columns, which then read as missing. Raises
    TraceError for a header without the required columns, a column not in
    `known` (when given), a row with more fields than the header, invalid
    UTF-8 and unreadable files.
    """
    try:
        with open(path, "rb") as handle:
            reader = csv.DictReader(_utf8_lines(handle, path), strict=True)
            _check_header(path, reader.fieldnames, required, known)
            for row in _checked_rows(reader, path):
                yield f"{path}:{reader.line_num}", row
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror}") from exc


def _checked_rows(reader: csv.DictReader, path: Path) -> Iterator[dict[str, str]]:
    width = len(reader.fieldnames or ())
    try:
        for row in reader:
            if None in row:
                raise TraceError(
                    f"{path}:{reader.line_num}: {width + len(row[None])} fields, "
                    f"but the header has {width}; quote fields that contain commas"
                )
            yield row
    except csv.Error as exc:
        # line_num counts the lines of complete rows, so the bad row starts after.
        raise TraceError(
            f"{path}:{reader.line_num + 1}: {exc}; close each quoted field, and "
            'double a quote inside one ("")'
        ) from None


def _utf8_lines(handle: BinaryIO, path: Path) -> Iterator[str]:
    """Decode a file line by line, so an invalid byte is reported with its line."""
    for number, raw in enumerate(handle, 1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise TraceError(
                f"{path}:{number}: invalid UTF-8 byte {raw[exc.start]:#04x} in "
                f"column {exc.start + 1}; save the file as UTF-8"
            ) from None


def _check_header(
    path: Path,
    header: Sequence[str] | None,
    required: tuple[str, ...],
    known: tuple[str, ...] | None,
) -> None:
    """Raise TraceError for a repeated, missing or unknown column in the header."""
    if header is None:
        return  # An empty file: the loader reports that it has no rows.
    for column in header:
        if header.count(column) > 1:
            raise TraceError(f"{path}:1: column {column!r} appears twice; keep one")
    missing = [column for column in required if column not in header]
    if missing:
        line = ",".join(header)
        line = line if len(line) <= 60 else line[:57] + "..."
        raise TraceError(
            f"{path}:1: missing column {missing[0]!r}; the first line "
            f"{line!r} must be a header with at least {','.join(required)}"
        )
    unknown = [column for column in header if known and column not in known]
    if unknown:
        near = difflib.get_close_matches(unknown[0], known or (), n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise TraceError(
            f"{path}:1: unknown column {unknown[0]!r}; {hint}"
            f"the columns are {','.join(known or ())}"
        )


def load_trace(
    path: Path, seed: int = 0, spread: float | None = None, service_time: float = 1.0
) -> Trace:
    """Load a trace from a directory in the Azure Functions layout or a CSV file."""
    if path.is_dir():
        if not (path / "invocations.csv").exists():
            raise TraceError(
                f"{path}: a directory trace needs invocations.csv and durations.csv"
            )
        return load_azure_functions(path, seed, 60.0 if spread is None else spread)
    return load_csv(path, seed, 0.0 if spread is None else spread, service_time)


# --------------------------------------------------------------------------
# Demand per planning interval, measured as if every arrival were served
# --------------------------------------------------------------------------


@dataclass
class Demand:
    """Per user (rows) and planning interval (columns), every arrival served.

    This is what the probes measure whatever the pool: accepted connections
    and open connections do not depend on whether a slot was warm.
    """

    interval: float
    arrivals: np.ndarray  # arrivals in the interval
    peak: np.ndarray  # max open connections at any instant of the interval
    busy: np.ndarray  # mean open connections (busy slot-seconds / interval)
    spread: np.ndarray | None = None  # variance over time of open connections
    names: tuple[str, ...] = ()  # user of each row, as the trace names them

    @property
    def shape(self) -> tuple[int, int]:
        return self.arrivals.shape

    def user_names(self) -> list[str]:
        """Return each row's user name, or its row number where the trace gave none."""
        if len(self.names) == self.shape[0]:
            return list(self.names)
        return [str(row) for row in range(self.shape[0])]


def _events(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return event times and the open count after each, ends before starts on ties."""
    times = np.concatenate([end, start])
    steps = np.concatenate([-np.ones(end.size), np.ones(start.size)])
    order = np.lexsort((steps, times))
    return times[order], np.cumsum(steps[order])


def _level_before(times: np.ndarray, level: np.ndarray, at: np.ndarray) -> np.ndarray:
    index = np.searchsorted(times, at, side="right") - 1
    return np.where(index >= 0, level[np.maximum(index, 0)], 0.0)


def _busy_integral(times: np.ndarray, level: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Return the integral of the open count from 0 to each instant in `at`."""
    if times.size == 0:
        return np.zeros(at.size)
    widths = np.diff(times, prepend=times[0])
    before = np.concatenate([[0.0], level[:-1]])
    cumulative = np.cumsum(before * widths)
    index = np.searchsorted(times, at, side="right") - 1
    safe = np.maximum(index, 0)
    value = cumulative[safe] + level[safe] * (at - times[safe])
    return np.where(index >= 0, value, 0.0)


# Planning intervals a replay accepts. More is almost always a timestamp in
# the wrong unit or a too short --interval. Every method keeps arrays of
# users x intervals, and the gp method forecasts one interval after another,
# at about 0.2 CPU-seconds per interval for the 428 users of the Azure sample.
MAX_INTERVALS = 100_000

# Users x intervals a replay accepts. The methods keep per cell up to about
# 500 bytes: gp a pool per quantile level and window-percentile a sorted
# window of 60 peaks. So this bounds them to some 5 GB.
MAX_CELLS = 10_000_000


def interval_count(trace: Trace, interval: float) -> int:
    """Return the number of planning intervals that cover the trace and every arrival.

    A CSV trace without --spread ends just after its last arrival. When that
    arrival starts a whole number of intervals after the first, the rounding
    tolerance of the length alone would leave it outside the last interval.
    Raises TraceError for an interval that is not a positive number, for
    more than MAX_INTERVALS intervals and for more than MAX_CELLS users x
    intervals.
    """
    if not (math.isfinite(interval) and interval > 0):
        raise TraceError(f"--interval {interval:g}: give a positive number of seconds")
    span = max(
        [trace.length] + [float(u.start[-1]) for u in trace.users if u.start.size]
    )
    if span / interval > MAX_INTERVALS:
        raise TraceError(
            f"{trace.source}: timestamp: the trace spans {span:g} s, "
            f"{span / interval:.4g} intervals of {interval:g} s, more than the "
            f"{MAX_INTERVALS} a replay accepts; use --interval "
            f"{math.ceil(span / MAX_INTERVALS):g} or more, or check that the "
            "timestamps are in seconds"
        )
    count = math.ceil(trace.length / interval - 1e-9)
    for user in trace.users:
        if user.start.size:
            count = max(count, math.floor(float(user.start[-1]) / interval) + 1)
    count = max(count, 1)
    if len(trace.users) * count > MAX_CELLS:
        raise TraceError(
            f"{trace.source}: {len(trace.users)} users x {count} intervals of "
            f"{interval:g} s is more than the {MAX_CELLS} a replay holds in "
            "memory; raise --interval, or replay fewer users"
        )
    return count


def measure_demand(trace: Trace, interval: float) -> Demand:
    """Return arrivals, peak, mean and variance of open connections per user and interval."""
    count = interval_count(trace, interval)
    bounds = np.arange(count + 1) * interval
    shape = (len(trace.users), count)
    arrivals, peak, busy = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    spread = np.zeros(shape)
    for row, user in enumerate(trace.users):
        index = np.minimum((user.start // interval).astype(int), count - 1)
        arrivals[row] = np.bincount(index, minlength=count)
        times, level = _events(user.start, user.end)
        inside = times < bounds[-1]
        np.maximum.at(peak[row], (times[inside] // interval).astype(int), level[inside])
        peak[row] = np.maximum(peak[row], _level_before(times, level, bounds[:-1]))
        busy[row] = np.diff(_busy_integral(times, level, bounds)) / interval
        square = np.diff(_busy_integral(times, level**2, bounds)) / interval
        spread[row] = np.maximum(square - busy[row] ** 2, 0.0)
    names = tuple(user.name for user in trace.users)
    return Demand(interval, arrivals, peak, busy, spread, names)


# --------------------------------------------------------------------------
# Simulation of warm slots under a pool plan
# --------------------------------------------------------------------------


@dataclass
class Outcome:
    """Per user and interval results of one replay of one pool plan."""

    hits: np.ndarray
    arrivals: np.ndarray
    idle_slot_seconds: np.ndarray
    memory_mb: np.ndarray  # per user

    def idle_memory_gb_seconds(self) -> np.ndarray:
        return self.idle_slot_seconds * (self.memory_mb[:, None] / 1024.0)


def _serve_interval(
    pool: int, carry: list[float], start: np.ndarray, end: np.ndarray
) -> np.ndarray:
    """Serve one interval's arrivals in order; return which found a free slot."""
    busy = list(carry)
    heapq.heapify(busy)
    accepted = np.zeros(start.size, dtype=bool)
    for i, (t, stop) in enumerate(zip(start.tolist(), end.tolist())):
        while busy and busy[0] <= t:
            heapq.heappop(busy)
        if len(busy) < pool:
            heapq.heappush(busy, stop)
            accepted[i] = True
    return accepted


def _accepted(
    user: UserArrivals, pools: np.ndarray, peak: np.ndarray, interval: float
) -> np.ndarray:
    """Return which arrivals of one user got a warm slot under per-interval pools.

    Where the pool covers the interval's peak of all open connections, every
    arrival of that interval finds a slot, because the connections holding
    warm slots are a subset of all open ones. Only the other intervals are
    served one arrival at a time, in order, with the slots still held by
    earlier accepted arrivals.
    """
    accepted = np.ones(user.start.size, dtype=bool)
    bounds = np.searchsorted(user.start, np.arange(pools.size + 1) * interval)
    longest = float(user.duration.max()) if user.duration.size else 0.0
    for k in np.flatnonzero(pools < peak):
        lo, hi = bounds[k], bounds[k + 1]
        if lo == hi:
            continue
        first = k * interval
        back = np.searchsorted(user.start, first - longest)
        ends = user.end[back:lo][accepted[back:lo]]
        carry = ends[ends > first].tolist()
        accepted[lo:hi] = _serve_interval(
            int(pools[k]), carry, user.start[lo:hi], user.end[lo:hi]
        )
    return accepted


def _idle(
    user: UserArrivals, accepted: np.ndarray, pools: np.ndarray, interval: float
) -> np.ndarray:
    """Return per interval the integral of max(pool - busy warm slots, 0)."""
    length = pools.size * interval
    bounds = np.arange(pools.size + 1) * interval
    start, end = user.start[accepted], np.minimum(user.end[accepted], length)
    times = np.concatenate([start, end, bounds])
    steps = np.concatenate(
        [np.ones(start.size), -np.ones(end.size), np.zeros(bounds.size)]
    )
    order = np.argsort(times, kind="stable")
    times, level = times[order], np.cumsum(steps[order])
    widths = np.diff(times)
    index = np.minimum((times[:-1] // interval).astype(int), pools.size - 1)
    free = np.maximum(pools[index] - level[:-1], 0.0) * widths
    return np.bincount(index, weights=free, minlength=pools.size)


def simulate(trace: Trace, demand: Demand, pools: np.ndarray) -> Outcome:
    """Replay every user's arrivals against a pool plan of shape (users, intervals)."""
    hits = np.zeros(demand.shape)
    idle = np.zeros(demand.shape)
    count = demand.shape[1]
    for row, user in enumerate(trace.users):
        plan = pools[row].astype(float)
        accepted = _accepted(user, plan, demand.peak[row], demand.interval)
        index = np.minimum((user.start // demand.interval).astype(int), count - 1)
        hits[row] = np.bincount(index[accepted], minlength=count)
        idle[row] = _idle(user, accepted, plan, demand.interval)
    memory = np.array([u.memory_mb for u in trace.users])
    return Outcome(hits, demand.arrivals, idle, memory)


# --------------------------------------------------------------------------
# Methods: each turns the demand before an interval into that interval's pool
# --------------------------------------------------------------------------


class Method:
    """A pool-sizing method with one knob; `pools(knob)` is cheap after `prepare`."""

    name = ""
    knob = ""
    knob_range: tuple[float, float] = (0.0, 1.0)
    integer = False
    default = 0.9
    quantile_knob = True  # the knob is the quantile the pool is meant to cover
    increasing = True  # a larger knob gives larger pools

    def prepare(self, demand: Demand, warmup: int) -> None:
        raise NotImplementedError

    def pools(self, knob: float) -> np.ndarray:
        raise NotImplementedError


def _inverted_cdf_index(count: np.ndarray, q: float) -> np.ndarray:
    """Return the index into sorted samples of the q-quantile (inverted CDF)."""
    return np.clip(np.ceil(q * count - 1e-9).astype(int) - 1, 0, None)


class Static(Method):
    """A fixed pool per user: the knob-percentile of its peaks during warm-up."""

    name, knob, default = "static", "percentile", 0.95

    def prepare(self, demand: Demand, warmup: int) -> None:
        self.sorted = np.sort(demand.peak[:, :warmup], axis=1)
        self.shape = demand.shape

    def pools(self, knob: float) -> np.ndarray:
        index = _inverted_cdf_index(np.array(self.sorted.shape[1]), knob)
        return np.repeat(self.sorted[:, int(index)][:, None], self.shape[1], axis=1)


class Reactive(Method):
    """Pool = the largest peak of the last `knob` intervals (1: the last one)."""

    name, knob, knob_range, integer, default = "reactive", "lookback", (1, 60), True, 1
    quantile_knob = False

    def prepare(self, demand: Demand, warmup: int) -> None:
        self.peak = demand.peak

    def pools(self, knob: float) -> np.ndarray:
        lookback = int(knob)
        out = np.zeros_like(self.peak)
        for k in range(1, self.peak.shape[1]):
            out[:, k] = self.peak[:, max(0, k - lookback) : k].max(axis=1)
        return out


class WindowPercentile(Method):
    """Pool = the knob-percentile of the peaks of the last `window` intervals.

    This is the moving-window percentile recommender of Autopilot (Rzadca et
    al., EuroSys 2020) on the per-interval peak of open connections.
    """

    name, knob, default = "window-percentile", "percentile", 0.95

    def __init__(self, window: int = 60):
        self.window = window

    def prepare(self, demand: Demand, warmup: int) -> None:
        peak = demand.peak
        padded = np.concatenate(
            [np.full((peak.shape[0], self.window), np.nan), peak], axis=1
        )
        view = np.lib.stride_tricks.sliding_window_view(padded, self.window, axis=1)
        self.sorted = np.sort(view[:, : peak.shape[1], :], axis=2)  # NaN last
        self.count = np.minimum(np.arange(peak.shape[1]), self.window)

    def pools(self, knob: float) -> np.ndarray:
        index = _inverted_cdf_index(self.count, knob)
        picked = np.take_along_axis(self.sorted, index[None, :, None], axis=2)[:, :, 0]
        return np.nan_to_num(np.where(self.count[None, :] > 0, picked, 0.0))


# Values per user, interval and pool size from 0 to the largest peak that
# decaying-histogram and oracle-dynamic keep, 4 bytes each: 1 GB.
MAX_POOL_CELLS = 250_000_000

# Pool sizes from 0 to the largest peak that the oracles replay the whole
# trace with, one replay each.
MAX_ORACLE_POOLS = 1000


def _check_pool_sizes(name: str, demand: Demand, per_interval: bool) -> None:
    """Raise TraceError if a method's work grows past its bound with the largest peak.

    With `per_interval` the bound is MAX_POOL_CELLS values per user, interval
    and pool size, otherwise MAX_ORACLE_POOLS pool sizes.
    """
    users, count = demand.shape
    largest = int(demand.peak.max()) if demand.peak.size else 0
    sizes = f"{largest + 1} pool sizes (0 to the largest peak, {largest})"
    if per_interval and users * count * (largest + 1) > MAX_POOL_CELLS:
        size = f"{users} users x {count} intervals x {sizes}"
        limit = f"the {MAX_POOL_CELLS} values it holds in memory"
    elif not per_interval and largest + 1 > MAX_ORACLE_POOLS:
        size = sizes
        limit = f"the {MAX_ORACLE_POOLS} whole-trace replays it runs"
    else:
        return
    raise TraceError(
        f"{name}: {size} is more than {limit}; check the counts and durations, "
        "raise --interval, or leave the method out of --methods"
    )


class DecayingHistogram(Method):
    """Pool = (1 + margin) times the knob-percentile of a decaying histogram of peaks.

    This follows the Kubernetes VPA recommender: every sample adds weight
    2 ** (age / half_life) to its bucket, so old samples count less, and the
    target is the 90th percentile plus a 15% safety margin. Peaks are whole
    numbers, so each bucket is one value.
    """

    name, knob, default = "decaying-histogram", "percentile", 0.9

    def __init__(self, half_life: float = 60.0, margin: float = 0.15):
        self.half_life = half_life
        self.margin = margin

    def prepare(self, demand: Demand, warmup: int) -> None:
        peak = demand.peak.astype(int)
        users, count = peak.shape
        buckets = int(peak.max()) + 1 if peak.size else 1
        _check_pool_sizes(self.name, demand, per_interval=True)
        weight = np.zeros((users, buckets))
        self.cumulative = np.zeros((count, users, buckets), dtype=np.float32)
        for k in range(1, count):
            # Decaying the old weights equals growing the new ones by 2**(1/h).
            weight *= 2.0 ** (-1.0 / self.half_life)
            weight[np.arange(users), peak[:, k - 1]] += 1.0
            total = weight.sum(axis=1, keepdims=True)
            self.cumulative[k] = np.cumsum(weight, axis=1) / np.maximum(total, 1e-300)

    def pools(self, knob: float) -> np.ndarray:
        reached = self.cumulative >= knob - 1e-7
        value = np.argmax(reached, axis=2).astype(float)
        value[0] = 0.0
        return np.ceil(value * (1.0 + self.margin) - 1e-9).T


# Quantile levels at which the gp method keeps its pools, so a knob search
# needs no new forecasts.
GP_LEVELS = np.unique(
    np.round(
        np.concatenate(
            [
                [0.001, 0.0025, 0.005, 0.01],
                np.linspace(0.02, 0.9, 45),
                np.arange(0.9, 0.999, 0.0025),
            ]
        ),
        4,
    )
)
CALIBRATION_LEVELS = np.array([0.5, 0.8, 0.9, 0.95])
BAND_LEVELS = np.array([0.05, 0.5, 0.95])  # the forecast band drawn by --plot


class GaussianProcess(Method):
    """Pool = slots at the knob-quantile of the predictor's calibrated forecasts.

    Two forecasts are made each interval: of the peak of open connections and
    of the mean number open (Little's law). The pool is the smaller of the
    peak's quantile, which lets every arrival of the interval find a slot with
    probability q, and the slots by which a share q of arrivals find a free
    one (`predictor.little_slots`). With `peak_only` only the first is used.
    """

    name, knob, default = "gp", "quantile", 0.9
    knob_range = (0.001, 0.9975)

    def __init__(
        self,
        settings: PredictorSettings,
        progress: Callable[[int, int], None] | None = None,
        peak_only: bool = False,
    ):
        self.settings = settings
        self.progress = progress
        self.peak_only = peak_only
        if peak_only:
            self.name = "gp-peak"

    def prepare(self, demand: Demand, warmup: int) -> None:
        peak = demand.peak
        users, count = peak.shape
        self.predictor = Predictor(self.settings, demand.interval, "open_connections")
        busy_predictor = Predictor(self.settings, demand.interval, "busy")
        self.grid = np.zeros((users, count, GP_LEVELS.size), dtype=np.int32)
        self.pit = np.full((users, count, len(CALIBRATION_LEVELS)), np.nan)
        self.models = np.full((users, count), "", dtype=object)
        self.band = np.full((users, count, len(BAND_LEVELS)), np.nan)
        keys = demand.user_names()
        start = max(1, warmup - self.settings.window)
        for k in range(start, count):
            first = max(0, k - self.settings.window)
            labels = np.arange(first, k)
            forecasts = self.predictor.forecast_windows(keys, peak[:, first:k], labels)
            busy = None
            if not self.peak_only:
                busy = busy_predictor.forecast_windows(
                    keys, demand.busy[:, first:k], labels
                )
            dispersion = _dispersion(demand, first, k)
            little = self._little(
                busy, busy_predictor, demand.busy[:, k], k, dispersion
            )
            for row, forecast in enumerate(forecasts):
                slots = forecast.levels(GP_LEVELS).max(axis=0)
                self.band[row, k] = forecast.levels(BAND_LEVELS)[0]
                if row in little:
                    slots = np.minimum(slots, little[row])
                self.grid[row, k] = np.maximum(np.ceil(slots - 1e-9), 0)
                self.models[row, k] = forecast.model
                actual = float(peak[row, k])
                self.pit[row, k] = pit_below(forecast, actual, CALIBRATION_LEVELS)
                self.predictor.observe(forecast, actual, label=k)
            if self.progress:
                self.progress(k - start + 1, count - start)

    @staticmethod
    def _little(
        busy,
        predictor: Predictor,
        actual: np.ndarray,
        label: int,
        dispersion: np.ndarray,
    ) -> dict[int, np.ndarray]:
        """Return Little's-law slots at every level for the rows with a GP busy forecast."""
        if busy is None:
            return {}
        rows = [row for row, f in enumerate(busy) if f.model != "sparse"]
        if not rows:
            return {}
        moments = [busy[row].calibrated() for row in rows]
        mean = np.stack([m for m, _ in moments])
        std = np.stack([d for _, d in moments])
        spread = dispersion[rows][:, None]
        slots = little_slots_arrays(mean, std, GP_LEVELS, spread).max(axis=1)
        for row in rows:
            predictor.observe(busy[row], float(actual[row]), label=label)
        return dict(zip(rows, slots))

    def pools(self, knob: float) -> np.ndarray:
        level = int(
            np.clip(np.searchsorted(GP_LEVELS, knob - 1e-9), 0, GP_LEVELS.size - 1)
        )
        return self.grid[:, :, level].astype(float)


def _dispersion(demand: Demand, first: int, last: int) -> np.ndarray:
    """Return each user's dispersion index of open connections over [first, last)."""
    if demand.spread is None:
        return np.ones(demand.shape[0])
    return dispersion_index(demand.busy[:, first:last], demand.spread[:, first:last])


class GaussianProcessValue(Method):
    """Pool = the size whose expected hits minus price x expected idle time is largest.

    The same predictor forecasts arrivals N and the mean number of open
    connections L of each user and interval. An arrival finds D open, mixed
    Poisson with mean L (Little's law, PASTA), so P slots give about
    E[N] P(D <= P - 1) hits and P - E[min(D, P)] idle slots. The knob is the
    price of an idle slot-second in hits: one price for all users puts slots
    where they bring the most hits, which is what a pooled hit rate rewards.
    """

    name, knob, knob_range, default = "gp-value", "price", (0.0, 0.25), 0.01
    quantile_knob = False
    increasing = False

    def __init__(self, settings: PredictorSettings, progress=None):
        self.settings = settings
        self.progress = progress

    def prepare(self, demand: Demand, warmup: int) -> None:
        users, count = demand.shape
        largest = int(demand.peak.max()) + 1 if demand.peak.size else 1
        sizes = np.arange(largest + 1)
        arrivals = Predictor(self.settings, demand.interval, "arrivals")
        busy = Predictor(self.settings, demand.interval, "busy")
        self.hits = np.zeros((users, count, sizes.size), dtype=np.float32)
        self.idle = np.zeros((users, count, sizes.size), dtype=np.float32)
        keys = demand.user_names()
        start = max(1, warmup - self.settings.window)
        for k in range(start, count):
            first = max(0, k - self.settings.window)
            labels = np.arange(first, k)
            counted = arrivals.forecast_windows(
                keys, demand.arrivals[:, first:k], labels
            )
            opened = busy.forecast_windows(keys, demand.busy[:, first:k], labels)
            expected = np.array([f.expected()[0] for f in counted])
            mean = np.array([max(f.expected()[0], 1e-9) for f in opened])
            variance = np.array([max(f.variance()[0], 0.0) for f in opened])
            variance = variance + mean * (_dispersion(demand, first, k) - 1.0)
            hits, idle = value_curves(expected, mean, variance, sizes, demand.interval)
            self.hits[:, k], self.idle[:, k] = hits, idle
            for row in range(users):
                arrivals.observe(counted[row], float(demand.arrivals[row, k]), label=k)
                busy.observe(opened[row], float(demand.busy[row, k]), label=k)
            if self.progress:
                self.progress(k - start + 1, count - start)

    def pools(self, knob: float) -> np.ndarray:
        return np.argmax(self.hits - knob * self.idle, axis=2).astype(float)


class OracleStatic(Method):
    """The fixed pool per user that, in hindsight, reaches a pooled hit rate with the
    least idle reservation.

    It is a reference line, not a method, because it uses the future. For each
    user and pool size it replays the whole evaluation period. The knob is the
    price of one idle slot-second in hits, and each user takes the pool that
    maximises hits - price * idle.
    """

    name, knob, knob_range, default = "oracle-static", "price", (0.0, 0.25), 0.01
    quantile_knob = False
    increasing = False

    def __init__(self, trace: Trace):
        self.trace = trace

    def prepare(self, demand: Demand, warmup: int) -> None:
        _check_pool_sizes(self.name, demand, per_interval=False)
        largest = int(demand.peak.max()) if demand.peak.size else 0
        users = demand.shape[0]
        self.hits = np.zeros((users, largest + 1))
        self.idle = np.zeros((users, largest + 1))
        self.shape = demand.shape
        user_peak = demand.peak.max(axis=1)
        for size in range(largest + 1):
            pools = np.minimum(np.full(demand.shape, float(size)), user_peak[:, None])
            outcome = simulate(self.trace, demand, pools)
            self.hits[:, size] = outcome.hits[:, warmup:].sum(axis=1)
            self.idle[:, size] = outcome.idle_slot_seconds[:, warmup:].sum(axis=1)
        # Beyond a user's largest peak, more slots add idle time and no hits.
        above = np.arange(largest + 1)[None, :] > user_peak[:, None]
        self.hits[above] = -np.inf

    def pools(self, knob: float) -> np.ndarray:
        value = self.hits - knob * self.idle
        size = np.argmax(value, axis=1).astype(float)
        return np.repeat(size[:, None], self.shape[1], axis=1)


class OracleDynamic(Method):
    """The pool per user and interval that, in hindsight, reaches a pooled hit rate
    with the least idle reservation: a bound that no forecast can beat.

    It uses the future, so it is a reference line, not a method. Each user and
    interval takes the pool that maximises hits - price * idle over that
    interval. Hits and idle time per interval come from replays with a
    constant pool, so a connection carried over from an interval with a
    different pool is counted as if the pool had not changed (an
    approximation).
    """

    name, knob, knob_range, default = "oracle-dynamic", "price", (0.0, 0.25), 0.01
    quantile_knob = False
    increasing = False

    def __init__(self, trace: Trace):
        self.trace = trace

    def prepare(self, demand: Demand, warmup: int) -> None:
        _check_pool_sizes(self.name, demand, per_interval=False)
        _check_pool_sizes(self.name, demand, per_interval=True)
        largest = int(demand.peak.max()) if demand.peak.size else 0
        users, count = demand.shape
        self.hits = np.zeros((users, count, largest + 1), dtype=np.float32)
        self.idle = np.zeros((users, count, largest + 1), dtype=np.float32)
        for size in range(largest + 1):
            outcome = simulate(self.trace, demand, np.full(demand.shape, float(size)))
            self.hits[:, :, size] = outcome.hits
            self.idle[:, :, size] = outcome.idle_slot_seconds

    def pools(self, knob: float) -> np.ndarray:
        return np.argmax(self.hits - knob * self.idle, axis=2).astype(float)


# --------------------------------------------------------------------------
# Metrics and the knob search
# --------------------------------------------------------------------------


def pinball_mean(actual: np.ndarray, predicted: np.ndarray, q: float) -> float:
    diff = actual - predicted
    return float(np.mean(np.where(diff >= 0, q * diff, (q - 1.0) * diff)))


@dataclass
class Score:
    """A method's results at one knob setting over the evaluation intervals."""

    knob: float
    warm_hit_rate: float
    user_hit_rate_median: float | None
    users_below_half: int
    idle_slot_seconds: float
    idle_memory_gb_seconds: float
    coverage: float | None
    pinball_loss: float
    pinball_level: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def score(
    method: Method,
    knob: float,
    trace: Trace,
    demand: Demand,
    warmup: int,
    target: float,
) -> Score:
    """Replay a method's pools at one knob and score the intervals after warm-up."""
    pools = method.pools(knob)
    outcome = simulate(trace, demand, pools)
    hits = outcome.hits[:, warmup:].sum(axis=1)
    arrivals = outcome.arrivals[:, warmup:].sum(axis=1)
    active = arrivals > 0
    rates = hits[active] / arrivals[active]
    level = knob if method.quantile_knob else target
    peak, planned = demand.peak[:, warmup:], pools[:, warmup:]
    return Score(
        knob=float(knob),
        warm_hit_rate=float(hits.sum() / max(arrivals.sum(), 1)),
        user_hit_rate_median=float(np.median(rates)) if rates.size else None,
        users_below_half=int((rates < 0.5).sum()),
        idle_slot_seconds=float(outcome.idle_slot_seconds[:, warmup:].sum()),
        idle_memory_gb_seconds=float(
            outcome.idle_memory_gb_seconds()[:, warmup:].sum()
        ),
        coverage=float(np.mean(peak <= planned)) if method.quantile_knob else None,
        pinball_loss=pinball_mean(peak, planned, level),
        pinball_level=float(level),
    )


def search_knob(
    method: Method,
    trace: Trace,
    demand: Demand,
    warmup: int,
    target: float,
    min_median: float | None = None,
    steps: int = 12,
    seen: list[Score] | None = None,
) -> Score | None:
    """Return the score at the smallest pools (knob) that reach the target.

    The target is a pooled hit rate and, if min_median is given, also a median
    per-user hit rate. Bisection assumes both grow with the pools; returns
    None when even the largest pools miss the target. Every score computed
    is appended to `seen`.
    """
    low, high = method.knob_range
    if not method.increasing:
        low, high = high, low

    def run(knob: float) -> Score:
        result = score(method, knob, trace, demand, warmup, target)
        if seen is not None:
            seen.append(result)
        return result

    def reached(result: Score) -> bool:
        if result.warm_hit_rate < target:
            return False
        median = result.user_hit_rate_median
        return min_median is None or (median is not None and median >= min_median)

    best = run(high)
    if not reached(best):
        return None
    lowest = run(low)
    if reached(lowest):
        return lowest
    for _ in range(steps):
        if method.integer and abs(high - low) <= 1:
            break
        middle = (low + high) / 2.0
        if method.integer:
            middle = math.floor(middle) if method.increasing else math.ceil(middle)
        trial = run(middle)
        if reached(trial):
            high, best = middle, trial
        else:
            low = middle
    return best


# --------------------------------------------------------------------------
# Running a comparison
# --------------------------------------------------------------------------


@dataclass
class Options:
    """Settings of one replay."""

    interval: float = 60.0
    warmup: int = 64  # intervals used only as history
    target: float = 0.95
    methods: tuple[str, ...] = (
        "gp",
        "static",
        "reactive",
        "window-percentile",
        "decaying-histogram",
        "oracle-static",
    )
    settings: PredictorSettings = field(default_factory=PredictorSettings)
    percentile_window: int = 60
    half_life: float = 60.0
    knobs: dict[str, float] = field(default_factory=dict)
    min_median: float | None = 0.9  # second target: median per-user hit rate
    curve_points: int = 0  # extra knob settings replayed for the plot


METHOD_NAMES = (
    "gp",
    "gp-peak",
    "gp-value",
    "static",
    "reactive",
    "window-percentile",
    "decaying-histogram",
    "oracle-static",
    "oracle-dynamic",
)


def build_method(name: str, trace: Trace, options: Options, progress=None) -> Method:
    if name in ("gp", "gp-peak"):
        return GaussianProcess(options.settings, progress, peak_only=name == "gp-peak")
    if name == "gp-value":
        return GaussianProcessValue(options.settings, progress)
    if name == "static":
        return Static()
    if name == "reactive":
        return Reactive()
    if name == "window-percentile":
        return WindowPercentile(options.percentile_window)
    if name == "decaying-histogram":
        return DecayingHistogram(options.half_life)
    if name == "oracle-static":
        return OracleStatic(trace)
    if name == "oracle-dynamic":
        return OracleDynamic(trace)
    raise TraceError(f"unknown method {name!r}")


class Progress:
    """A progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()

    def stage(self, name: str) -> Callable[[int, int], None] | None:
        if not self.enabled:
            return None

        def update(done: int, total: int) -> None:
            width = 30
            filled = int(width * done / max(total, 1))
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r{name:20s} [{bar}] {done}/{total}")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()

        return update

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text + "\n")
            self.stream.flush()


@dataclass
class Comparison:
    """The `--json` object and what the plot needs."""

    report: dict[str, object]
    methods: dict[str, Method]
    curves: dict[str, list[Score]]
    demand: Demand


def compare(
    trace: Trace, options: Options, progress: Progress | None = None
) -> Comparison:
    """Run every method on the trace; return the report and the prepared methods."""
    if options.warmup < 1:
        raise TraceError(
            f"--warmup {options.warmup}: every method needs at least one interval "
            "of history to plan from; use --warmup 1 or more"
        )
    demand = measure_demand(trace, options.interval)
    if demand.shape[1] <= options.warmup:
        raise TraceError(
            f"{trace.source}: the trace has {demand.shape[1]} interval(s) of "
            f"{options.interval:g} s, not more than the warm-up of "
            f"{options.warmup}; lower --warmup or --interval"
        )
    results: dict[str, object] = {}
    curves: dict[str, list[Score]] = {}
    prepared: dict[str, Method] = {}
    for name in options.methods:
        update = progress.stage(name) if progress else None
        method = build_method(name, trace, options, update)
        started = time.process_time()
        method.prepare(demand, options.warmup)
        fit_seconds = time.process_time() - started
        prepared[name] = method
        results[name], curves[name] = _method_result(
            method, trace, demand, options, fit_seconds
        )
        if progress:
            progress.note(f"{name}: done")
    report: dict[str, object] = {
        "trace": trace.source,
        "users": len(trace.users),
        "arrivals": trace.arrivals(),
        "interval_seconds": options.interval,
        "warmup_intervals": options.warmup,
        "target_hit_rate": options.target,
        "methods": results,
    }
    gp = prepared.get("gp") or prepared.get("gp-peak")
    if isinstance(gp, GaussianProcess):
        report["gp_calibration"] = _calibration(gp, options.warmup)
    return Comparison(report, prepared, curves, demand)


def _method_result(
    method: Method, trace: Trace, demand: Demand, options: Options, fit_seconds: float
) -> tuple[dict[str, object], list[Score]]:
    seen: list[Score] = []
    knob = options.knobs.get(method.name, method.default)
    at_default = score(method, knob, trace, demand, options.warmup, options.target)
    seen.append(at_default)
    result = at_default.as_dict()
    result["fit_cpu_seconds"] = fit_seconds
    result["knob_name"] = method.knob
    pooled = search_knob(
        method, trace, demand, options.warmup, options.target, seen=seen
    )
    result["at_target"] = _target_dict(pooled, method)
    if options.min_median is not None:
        both = search_knob(
            method,
            trace,
            demand,
            options.warmup,
            options.target,
            options.min_median,
            seen=seen,
        )
        result["at_target_with_median"] = _target_dict(both, method)
    if options.curve_points:
        for knob in np.linspace(*method.knob_range, options.curve_points):
            seen.append(
                score(
                    method, float(knob), trace, demand, options.warmup, options.target
                )
            )
    return result, seen


def _target_dict(found: Score | None, method: Method) -> dict[str, object] | None:
    if found is None:
        return None
    return {
        "knob": found.knob,
        "knob_name": method.knob,
        "warm_hit_rate": found.warm_hit_rate,
        "user_hit_rate_median": found.user_hit_rate_median,
        "users_below_half": found.users_below_half,
        "idle_slot_seconds": found.idle_slot_seconds,
        "idle_memory_gb_seconds": found.idle_memory_gb_seconds,
        "coverage": found.coverage,
        "pinball_loss": found.pinball_loss,
    }


def _calibration(method: GaussianProcess, warmup: int) -> dict[str, object]:
    """Return the mean non-randomised PIT coverage at each calibration level, and
    the share of forecasts each model produced."""
    pit = method.pit[:, warmup:, :]
    coverage = {
        f"{q:g}": float(np.nanmean(pit[:, :, i]))
        for i, q in enumerate(CALIBRATION_LEVELS)
    }
    models = method.models[:, warmup:].ravel()
    names, counts = np.unique(models[models != ""], return_counts=True)
    return {
        "coverage": coverage,
        "models": {str(n): int(c) for n, c in zip(names, counts)},
        "anomalies": method.predictor.anomaly_total,
        "refits": method.predictor.refit_total,
        "kernel_fits": method.predictor.kernels.fits,
    }


# --------------------------------------------------------------------------
# Output: table, plot, command line
# --------------------------------------------------------------------------

_COLUMNS = (
    ("method", "{}"),
    ("knob", "{:g}"),
    ("hit", "{:.4f}"),
    ("median", "{:.3f}"),
    ("<50%", "{}"),
    ("idle slot-s", "{:.4g}"),
    ("idle GB-s", "{:.4g}"),
    ("coverage", "{:.3f}"),
    ("pinball", "{:.4f}"),
)


def _row(name: str, values: dict | None) -> list[str]:
    if values is None:
        return [name, "target not reached"]
    keys = (
        "knob",
        "warm_hit_rate",
        "user_hit_rate_median",
        "users_below_half",
        "idle_slot_seconds",
        "idle_memory_gb_seconds",
        "coverage",
        "pinball_loss",
    )
    cells = [name]
    for key, (_, fmt) in zip(keys, _COLUMNS[1:]):
        value = values.get(key)
        cells.append("-" if value is None else fmt.format(value))
    return cells


def format_table(report: dict) -> str:
    """Return the report as text tables: at each method's default knob, then at target."""
    methods = report["methods"]
    sections = [("default knob", lambda r: r)]
    sections.append(
        (
            f"smallest knob with pooled hit rate >= {report['target_hit_rate']:g}",
            lambda r: r.get("at_target"),
        )
    )
    if any("at_target_with_median" in r for r in methods.values()):
        sections.append(
            (
                "... and per-user median hit rate >= the --min-median",
                lambda r: r.get("at_target_with_median"),
            )
        )
    header = (
        f"{report['trace']}: {report['users']} users, {report['arrivals']} arrivals, "
        f"interval {report['interval_seconds']:g} s, warm-up {report['warmup_intervals']}"
    )
    lines = [header]
    for title, pick in sections:
        rows = [[c for c, _ in _COLUMNS]] + [
            _row(n, pick(r)) for n, r in methods.items()
        ]
        widths = [
            max(len(r[i]) for r in rows if i < len(r)) for i in range(len(_COLUMNS))
        ]
        lines.append("")
        lines.append(title + ":")
        for r in rows:
            lines.append(
                "  ".join(
                    c.rjust(w) if i else c.ljust(w)
                    for i, (c, w) in enumerate(zip(r, widths))
                )
            )
    calibration = report.get("gp_calibration")
    if calibration:
        pairs = ", ".join(f"{q}: {v:.3f}" for q, v in calibration["coverage"].items())
        lines.append("")
        lines.append(f"gp calibration (mean PIT coverage at nominal level): {pairs}")
        lines.append(f"gp models used: {calibration['models']}")
    return "\n".join(lines)


def plot(comparison: Comparison, trace: Trace, path: Path, users: int = 3) -> None:
    """Draw actual peaks against the gp forecast band for a few users, and the
    pooled hit rate against idle reservation for each method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise TraceError("--plot needs matplotlib: install the `plot` extra") from exc
    gp = next(
        (m for m in comparison.methods.values() if isinstance(m, GaussianProcess)), None
    )
    demand = comparison.demand
    chosen: list[int] = []
    if gp is not None:
        chosen = np.argsort(-demand.arrivals.sum(axis=1))[:users].tolist()
    figure, axes = plt.subplots(len(chosen) + 1, 1, figsize=(10, 3 * (len(chosen) + 1)))
    axes = np.atleast_1d(axes)
    minutes = np.arange(demand.shape[1])
    for axis, row in zip(axes, chosen):
        assert gp is not None
        band = gp.band[row]
        axis.fill_between(minutes, band[:, 0], band[:, 2], alpha=0.3, label="gp 5%-95%")
        axis.plot(minutes, band[:, 1], lw=0.8, label="gp median")
        axis.plot(minutes, demand.peak[row], lw=0.8, color="k", label="actual peak")
        axis.set_title(f"user {trace.users[row].name[:12]}")
        axis.set_ylabel("open connections")
        axis.legend(loc="upper right", fontsize=7)
    curve = axes[-1]
    for name, scores in comparison.curves.items():
        points = sorted((s.idle_slot_seconds, s.warm_hit_rate) for s in scores)
        curve.plot(
            [p[0] for p in points], [p[1] for p in points], marker=".", label=name
        )
    curve.set_xlabel("idle reservation (slot-seconds)")
    curve.set_ylabel("pooled warm-hit rate")
    curve.set_xscale("log")
    curve.legend(fontsize=7)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=100)
    except OSError as exc:
        raise TraceError(f"--plot {path}: {exc.strerror or exc}") from exc
    finally:
        plt.close(figure)


def _check_plot_path(path: Path) -> None:
    """Raise TraceError before a replay whose plot could not be written."""
    if importlib.util.find_spec("matplotlib") is None:
        raise TraceError("--plot needs matplotlib: install the `plot` extra")
    directory = path.parent
    if not directory.is_dir():
        raise TraceError(
            f"--plot {path}: directory {directory} not found; create it first"
        )
    if not os.access(directory, os.W_OK):
        raise TraceError(f"--plot {path}: directory {directory} is not writable")


EPILOG = """examples:
  broker replay bench/data/azure-functions-2019-sample
  broker replay --json --methods gp,window-percentile trace.csv > result.json
  broker replay --plot replay.png --interval 5 llm.csv

A directory is read in the Azure Functions 2019 layout (invocations.csv,
durations.csv, memory.csv; owners are users). A file is a CSV with the header
timestamp,user[,count][,duration_s][,memory_mb], timestamps in seconds.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `replay` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "replay",
        help="compare pool-sizing methods on a recorded trace",
        description="Replay a demand trace through the planner, faster than real time, and "
        "compare the forecast with static, reactive, window-percentile and "
        "decaying-histogram pool sizing on the same arrivals.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    return parser


def _positive(text: str) -> float:
    """Parse a finite number above 0 for argparse."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def _non_negative(text: str) -> float:
    """Parse a finite number of 0 or more for argparse."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _open_fraction(text: str) -> float:
    """Parse a number strictly between 0 and 1 for argparse."""
    value = _finite(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1 (exclusive)")
    return value


def _hit_rate(text: str) -> float:
    """Parse a hit rate above 0 and at most 1 for argparse."""
    value = _finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not above 0 and at most 1")
    return value


def _fraction(text: str) -> float:
    """Parse a number from 0 to 1 for argparse."""
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not from 0 to 1")
    return value


def _whole(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{text} is below {low}")
    return value


def _positive_int(text: str) -> int:
    return _whole(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole(text, 0)


def _method_names(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list of methods for argparse, dropping repeats."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError("no method named")
    for name in names:
        if name not in METHOD_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}"
            )
    return names


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "trace", type=Path, help="trace directory (Azure Functions layout) or CSV file"
    )
    parser.add_argument(
        "--interval",
        type=_positive,
        default=60.0,
        help="planning interval in seconds (default 60)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=64,
        help="intervals used only as history (default 64)",
    )
    parser.add_argument(
        "--target-hit-rate",
        type=_hit_rate,
        default=0.95,
        help="pooled warm-hit rate to reach (default 0.95)",
    )
    parser.add_argument(
        "--min-median",
        type=_fraction,
        default=0.9,
        help="second target: median per-user hit rate (default 0.9; 0 turns it off)",
    )
    parser.add_argument(
        "--methods",
        type=_method_names,
        default=",".join(Options().methods),
        help="comma-separated methods (also: gp-peak, gp-value, oracle-dynamic)",
    )
    parser.add_argument(
        "--quantile",
        type=_open_fraction,
        default=0.9,
        help="gp quantile at its default setting (default 0.9)",
    )
    parser.add_argument(
        "--window",
        type=_positive_int,
        default=64,
        help="gp training window in intervals (default 64)",
    )
    parser.add_argument(
        "--percentile-window",
        type=_positive_int,
        default=60,
        help="window-percentile window in intervals (default 60)",
    )
    parser.add_argument(
        "--half-life",
        type=_positive,
        default=60.0,
        help="decaying-histogram half-life in intervals (default 60)",
    )
    parser.add_argument(
        "--spread",
        type=_non_negative,
        default=None,
        help="seconds over which a row's count is spread (default 60 for Azure, 0 for CSV)",
    )
    parser.add_argument(
        "--service-time",
        type=_positive,
        default=1.0,
        help="service time in seconds for CSV rows without duration_s (default 1)",
    )
    parser.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="seed of the arrival times within a row (default 0)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of tables"
    )
    parser.add_argument(
        "--plot",
        type=Path,
        help="write a PNG with forecast bands and hit-rate/idle curves",
    )


def options_from_args(args: argparse.Namespace) -> Options:
    settings = PredictorSettings(quantile=args.quantile, window=args.window)
    return Options(
        interval=args.interval,
        warmup=args.warmup,
        target=args.target_hit_rate,
        methods=args.methods,
        settings=settings,
        percentile_window=args.percentile_window,
        half_life=args.half_life,
        knobs={"gp": args.quantile, "gp-peak": args.quantile},
        min_median=args.min_median or None,
        curve_points=6 if args.plot else 0,
    )


def run(args: argparse.Namespace) -> int:
    """Run `broker replay`; return the exit code (1 on a trace or usage error)."""
    try:
        if args.plot:
            _check_plot_path(args.plot)
        trace = load_trace(args.trace, args.seed, args.spread, args.service_time)
        comparison = compare(trace, options_from_args(args), Progress())
        if args.plot:
            plot(comparison, trace, args.plot)
    except TraceError as exc:
        print(f"broker replay: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(comparison.report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(comparison.report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker.replay",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s"
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
