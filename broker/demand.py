"""Per-user demand: parsers of cgroup v2 files, a sampler and a bounded history.

The parsers are pure functions of the text of one control file, in the format
of Linux 6.1 (Documentation/admin-guide/cgroup-v2.rst and
Documentation/accounting/psi.rst). The file I/O is done by the cgroups module,
which hands the texts to `DemandCollector.collect`; the probes hand over the
per-uid connection counters read from their BPF maps.

One `DemandSample` per user per interval holds:

- `arrivals`: connections accepted during the interval;
- `open_connections`: connections open at the end of the interval;
- `cpu`: CPU time used during the interval divided by its length (cores);
- `memory`: sum of `memory.current` over the user's cgroups, in bytes;
- `memory_peak`: sum of `memory.peak` (the high-water mark since each cgroup
  was created, Linux 5.19 and later), in bytes;
- `cpu_pressure`, `memory_pressure`: share of the interval in which some task
  of the user stalled (delta of the PSI `some` total over the interval).

A value the kernel does not provide is NaN, never zero.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields

import numpy as np

from broker.errors import BrokerError

log = logging.getLogger(__name__)

RESOURCES = (
    "arrivals",
    "open_connections",
    "cpu",
    "memory",
    "memory_peak",
    "cpu_pressure",
    "memory_pressure",
)


class DemandParseError(BrokerError):
    """A cgroup control file does not have the expected format."""


# --------------------------------------------------------------------------
# Parsers of cgroup v2 files
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuStat:
    """`cpu.stat`; the throttling and burst fields exist only with the cpu controller."""

    usage_usec: int
    user_usec: int
    system_usec: int
    nr_periods: int | None = None
    nr_throttled: int | None = None
    throttled_usec: int | None = None
    nr_bursts: int | None = None
    burst_usec: int | None = None


@dataclass(frozen=True)
class PressureLine:
    """One line of a PSI file: running averages in percent, total stall in usec."""

    avg10: float
    avg60: float
    avg300: float
    total: int


@dataclass(frozen=True)
class Pressure:
    """A `*.pressure` file; `full` is None where the kernel prints no full line."""

    some: PressureLine
    full: PressureLine | None = None


def _key_values(text: str, path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DemandParseError(
                f"{path}: line {number}: expected 'KEY VALUE': {line!r}"
            )
        out[parts[0]] = parts[1]
    return out


def _integer(value: str, path: str, key: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DemandParseError(f"{path}: {key}: {value!r} is not an integer") from None


def parse_cpu_stat(text: str) -> CpuStat:
    """Parse `cpu.stat`; unknown keys of newer kernels are ignored."""
    values = _key_values(text, "cpu.stat")
    for key in ("usage_usec", "user_usec", "system_usec"):
        if key not in values:
            raise DemandParseError(f"cpu.stat: missing {key}")
    known = {f.name for f in fields(CpuStat)}
    parsed = {
        key: _integer(value, "cpu.stat", key)
        for key, value in values.items()
        if key in known
    }
    return CpuStat(**parsed)


def parse_memory_bytes(text: str, path: str = "memory.current") -> int | None:
    """Parse a single-value memory file such as `memory.current` or `memory.peak`.

    Returns None for "max", which limit files use for "no limit".
    """
    value = text.strip()
    if value == "max":
        return None
    if not value:
        raise DemandParseError(f"{path}: empty")
    return _integer(value, path, "value")


def _pressure_line(line: str, path: str) -> tuple[str, PressureLine]:
    kind, *pairs = line.split()
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise DemandParseError(f"{path}: expected KEY=VALUE, got {pair!r}")
        values[key] = value
    try:
        entry = PressureLine(
            avg10=float(values["avg10"]),
            avg60=float(values["avg60"]),
            avg300=float(values["avg300"]),
            total=int(values["total"]),
        )
    except (KeyError, ValueError) as exc:
        raise DemandParseError(f"{path}: invalid line {line!r}") from exc
    return kind, entry


def parse_pressure(text: str, path: str = "pressure") -> Pressure:
    """Parse a PSI file (`cpu.pressure`, `memory.pressure`, `io.pressure`)."""
    lines: dict[str, PressureLine] = {}
    for line in text.splitlines():
        if line.strip():
            kind, entry = _pressure_line(line, path)
            lines[kind] = entry
    if "some" not in lines:
        raise DemandParseError(f"{path}: missing the 'some' line")
    return Pressure(some=lines["some"], full=lines.get("full"))


# --------------------------------------------------------------------------
# Samples and the bounded history
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DemandSample:
    """One user's demand over one interval; NaN where the kernel gave nothing."""

    time: float  # end of the interval, seconds (monotonic clock)
    arrivals: float = 0.0
    open_connections: float = 0.0
    cpu: float = math.nan
    memory: float = math.nan
    memory_peak: float = math.nan
    cpu_pressure: float = math.nan
    memory_pressure: float = math.nan

    def values(self) -> tuple[float, ...]:
        return tuple(float(getattr(self, name)) for name in RESOURCES)


class DemandHistory:
    """A bounded ring of samples per user, one column per resource.

    Memory is fixed per user: `capacity` rows of `len(RESOURCES) + 1` floats.
    Not thread-safe: the control loop records, and a forecast worker reads a
    copy returned by `series` or `window`.
    """

    def __init__(self, capacity: int = 4096):
        if capacity < 1:
            raise ValueError(f"capacity {capacity} must be at least 1")
        self.capacity = capacity
        self._rows: dict[int, np.ndarray] = {}
        self._count: dict[int, int] = {}

    def record(self, uid: int, sample: DemandSample) -> None:
        """Append a sample for uid, dropping the oldest one when the ring is full."""
        rows = self._rows.get(uid)
        if rows is None:
            rows = np.full((self.capacity, len(RESOURCES) + 1), np.nan)
            self._rows[uid] = rows
            self._count[uid] = 0
        slot = self._count[uid] % self.capacity
        rows[slot, 0] = sample.time
        rows[slot, 1:] = sample.values()
        self._count[uid] += 1

    def users(self) -> list[int]:
        return sorted(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def size(self, uid: int) -> int:
        """Return the number of samples kept for uid (at most capacity)."""
        return min(self._count.get(uid, 0), self.capacity)

    def window(self, uid: int, last: int | None = None) -> np.ndarray:
        """Return a copy of the last samples of uid, oldest first.

        Column 0 is the time, then one column per name in RESOURCES.
        """
        if uid not in self._rows:
            return np.empty((0, len(RESOURCES) + 1))
        count = self._count[uid]
        size = min(count, self.capacity)
        order = (np.arange(count - size, count)) % self.capacity
        out = self._rows[uid][order]
        return out if last is None else out[-last:]

    def series(
        self, uid: int, resource: str, last: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (times, values) of one resource of uid, oldest first."""
        column = RESOURCES.index(resource) + 1
        rows = self.window(uid, last)
        return rows[:, 0].copy(), rows[:, column].copy()

    def forget(self, uid: int) -> None:
        """Drop the history of a user who is no longer managed."""
        self._rows.pop(uid, None)
        self._count.pop(uid, None)


# --------------------------------------------------------------------------
# The collector: file texts and counters in, samples out
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupTexts:
    """Texts of one cgroup's control files as read by the cgroups module.

    None means the file is absent (no PSI in the kernel, no memory.peak before
    Linux 5.19) or could not be read because the cgroup vanished.
    """

    cpu_stat: str | None = None
    memory_current: str | None = None
    memory_peak: str | None = None
    cpu_pressure: str | None = None
    memory_pressure: str | None = None


@dataclass(frozen=True)
class ConnectionCounters:
    """Per-uid counters read from the probes' BPF maps.

    `accepted` is cumulative since the map was created; `open` is a gauge.
    """

    accepted: int
    open: int


@dataclass
class _Previous:
    time: float
    accepted: int | None = None
    cumulative: dict[str, dict[str, int]] = field(default_factory=dict)


def _delta(new: int, old: int | None) -> int | None:
    """Return new - old for a cumulative counter, or None when it went backwards.

    A counter goes backwards when its cgroup or BPF map was recreated. The
    interval is then unknown, so it yields no value.
    """
    if old is None or new < old:
        return None
    return new - old


class DemandCollector:
    """Turn per-interval file texts and counters into samples in a DemandHistory.

    Cumulative values (CPU usage, PSI totals, accepted connections) are kept
    per cgroup path between calls so each sample holds the change over its
    interval. A cgroup seen for the first time contributes from its second
    interval on.
    """

    def __init__(self, history: DemandHistory):
        self.history = history
        self._previous: dict[int, _Previous] = {}
        self.parse_errors = 0

    def collect(
        self,
        uid: int,
        now: float,
        cgroups: dict[str, CgroupTexts],
        counters: ConnectionCounters | None = None,
    ) -> DemandSample | None:
        """Record and return the sample of uid ending at `now` (monotonic seconds).

        Returns None for the first call of a user, which only sets the
        baseline of the cumulative counters.
        """
        previous = self._previous.get(uid)
        current = _Previous(time=now, accepted=counters.accepted if counters else None)
        parsed = {path: self._parse(path, texts) for path, texts in cgroups.items()}
        current.cumulative = {path: p.cumulative for path, p in parsed.items()}
        self._previous[uid] = current
        if previous is None or now <= previous.time:
            return None
        sample = self._sample(previous, now, parsed, counters)
        self.history.record(uid, sample)
        return sample

    def forget(self, uid: int) -> None:
        self._previous.pop(uid, None)
        self.history.forget(uid)

    def _parse(self, path: str, texts: CgroupTexts) -> _Parsed:
        try:
            return _Parsed.from_texts(texts)
        except DemandParseError as exc:
            self.parse_errors += 1
            log.warning("cannot parse demand files of %s: %s", path, exc)
            return _Parsed()

    def _sample(
        self,
        previous: _Previous,
        now: float,
        parsed: dict[str, _Parsed],
        counters: ConnectionCounters | None,
    ) -> DemandSample:
        length = now - previous.time
        rates: dict[str, float] = {}
        for key in ("usage_usec", "cpu_some", "memory_some"):
            total, seen = 0, False
            for path, p in parsed.items():
                old = previous.cumulative.get(path, {}).get(key)
                change = _delta(p.cumulative[key], old) if key in p.cumulative else None
                if change is not None:
                    total += change
                    seen = True
            rates[key] = total / 1e6 / length if seen else math.nan
        arrivals = 0.0
        if counters is not None:
            arrivals = float(_delta(counters.accepted, previous.accepted) or 0)
        return DemandSample(
            time=now,
            arrivals=arrivals,
            open_connections=float(counters.open) if counters else 0.0,
            cpu=rates["usage_usec"],
            memory=_sum_present(p.memory for p in parsed.values()),
            memory_peak=_sum_present(p.memory_peak for p in parsed.values()),
            cpu_pressure=rates["cpu_some"],
            memory_pressure=rates["memory_some"],
        )


def _sum_present(values) -> float:
    present = [v for v in values if v is not None]
    return float(sum(present)) if present else math.nan


@dataclass
class _Parsed:
    """The parsed values of one cgroup at one instant."""

    cumulative: dict[str, int] = field(default_factory=dict)
    memory: int | None = None
    memory_peak: int | None = None

    @classmethod
    def from_texts(cls, texts: CgroupTexts) -> _Parsed:
        out = cls()
        if texts.cpu_stat is not None:
            out.cumulative["usage_usec"] = parse_cpu_stat(texts.cpu_stat).usage_usec
        if texts.cpu_pressure is not None:
            out.cumulative["cpu_some"] = parse_pressure(
                texts.cpu_pressure, "cpu.pressure"
            ).some.total
        if texts.memory_pressure is not None:
            pressure = parse_pressure(texts.memory_pressure, "memory.pressure")
            out.cumulative["memory_some"] = pressure.some.total
        if texts.memory_current is not None:
            out.memory = parse_memory_bytes(texts.memory_current)
        if texts.memory_peak is not None:
            out.memory_peak = parse_memory_bytes(texts.memory_peak, "memory.peak")
        return out
