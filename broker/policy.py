"""Load and validate YAML policies into frozen, typed objects.

Files are composed into YAML nodes first, so every problem can name its file
and line. Duplicate keys are caught there, which PyYAML's own loader would
resolve silently to the last one. YAML 1.1 surprises are caught on the raw
text: an unquoted `no` or `off` that became a boolean, or a uid such as
`0755` that YAML reads as octal. All problems of all files are collected and raised together as one
PolicyError, in the form `FILE:LINE: field: problem; fix`.
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import logging
import os
import pwd
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from broker import units
from broker.errors import PolicyError, PolicyProblem

log = logging.getLogger(__name__)

DEFAULT_POLICY_DIR = Path("/etc/broker/policies.d")
BUNDLED_DEFAULT = Path(__file__).parent / "policies" / "default.yaml"

CPU_WEIGHT_RANGE = (1, 10000)
IO_WEIGHT_RANGE = (1, 10000)
CPU_MAX_DEFAULT_PERIOD_US = 100000
DEFAULT_IDLE_TIMEOUT = 30.0  # seconds, when no file sets a top-level idle_timeout
UNSET_IDLE = -1.0  # placeholder while parsing: the entry has no idle_timeout
MIN_FORECAST_SECONDS = 0.1  # shortest sampling, planning or horizon time

# Plain scalars that YAML 1.1 turns into booleans.
_YAML11_BOOLEANS = {"y", "yes", "n", "no", "on", "off", "true", "false"}


# --------------------------------------------------------------------------
# Typed policy objects
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuMax:
    """`cpu.max`: quota in microseconds (None means "max") per period."""

    quota_us: int | None
    period_us: int = CPU_MAX_DEFAULT_PERIOD_US

    def kernel_text(self) -> str:
        quota = "max" if self.quota_us is None else str(self.quota_us)
        return f"{quota} {self.period_us}"


@dataclass(frozen=True)
class Tier:
    """A named warm-slot size and the cgroup reservations written to each slot."""

    name: str
    cpu_weight: int
    memory_min: int
    memory_low: int | None = None
    memory_high: int | None = None  # None: leave the kernel default ("max")
    cpu_max: CpuMax | None = None
    io_weight: int | None = None

    def knobs(self) -> dict[str, str]:
        """Return the cgroup control files and the text to write to each."""
        out = {"cpu.weight": str(self.cpu_weight), "memory.min": str(self.memory_min)}
        if self.memory_low is not None:
            out["memory.low"] = str(self.memory_low)
        if self.memory_high is not None:
            out["memory.high"] = str(self.memory_high)
        if self.cpu_max is not None:
            out["cpu.max"] = self.cpu_max.kernel_text()
        if self.io_weight is not None:
            out["io.weight"] = str(self.io_weight)
        return out


@dataclass(frozen=True)
class UserMatch:
    """Selector of Unix users in a policy entry; exactly one field is set."""

    name: str | None = None
    uid: int | None = None
    uid_range: tuple[int, int] | None = None
    group: str | None = None

    def describe(self) -> str:
        if self.name is not None:
            return f"user {self.name}"
        if self.uid is not None:
            return f"uid {self.uid}"
        if self.uid_range is not None:
            return f"uids {self.uid_range[0]}-{self.uid_range[1]}"
        return f"group {self.group}"

    @property
    def specificity(self) -> int:
        """Rank used when several entries match one uid: higher wins."""
        if self.name is not None or self.uid is not None:
            return 3
        if self.uid_range is not None:
            return 2
        return 1

    def matches(self, uid: int, name: str | None, groups: frozenset[str]) -> bool:
        if self.name is not None:
            return name == self.name
        if self.uid is not None:
            return uid == self.uid
        if self.uid_range is not None:
            return self.uid_range[0] <= uid <= self.uid_range[1]
        return self.group in groups


@dataclass(frozen=True)
class UserPolicy:
    """A policy entry for matched users: static pool per tier and idle timeout."""

    match: UserMatch
    pool: tuple[tuple[str, int], ...]  # (tier name, slots), in file order
    idle_timeout: float
    max_slots: int  # cap on the pool per tier when the forecast sizes it
    source: str  # FILE:LINE of the entry, for messages

    def pool_dict(self) -> dict[str, int]:
        return dict(self.pool)


@dataclass(frozen=True)
class ClassRates:
    """An HTB class's guaranteed rate and ceiling, in bit/s."""

    rate: int
    ceil: int


@dataclass(frozen=True)
class InterfacePolicy:
    """Egress shaping on one interface."""

    name: str
    link_rate: int  # bit/s
    default: ClassRates  # the class for unmanaged traffic
    user: ClassRates  # each managed user's class while no slot is busy
    tiers: tuple[tuple[str, ClassRates], ...]  # warm rates per tier
    r2q: int = 10

    def tier_rates(self) -> dict[str, ClassRates]:
        return dict(self.tiers)


@dataclass(frozen=True)
class ForecastPolicy:
    """Settings for demand collection, the forecast and the planner."""

    enabled: bool = False
    interval: float = 1.0  # seconds between demand samples
    plan_interval: float = 10.0  # seconds between planner runs
    quantile: float = 0.9
    window: int = 256  # max samples per user in the training window
    horizon_min: float = 10.0
    horizon_max: float = 300.0
    service_time: float = 1.0  # seconds a connection occupies a slot, if not measured
    memory_min_share: float = 0.5  # cap: sum of memory.min over all slots / RAM
    anomaly_sigma: float = 4.0
    # Relative width of the 90% predictive interval, (q95 - q05) / median, at or
    # below which all slots are of the lightest tier, and at or above which all
    # are of the heaviest.
    uncertainty_narrow: float = 0.5
    uncertainty_wide: float = 2.0
    # "quantile": slots at the policy quantile for each user. "value": the pool
    # size with the largest expected hits - slot_price x expected idle
    # slot-seconds, one price for all users (needs an arrivals forecast).
    sizing: str = "quantile"
    slot_price: float = 0.01  # hits an idle slot-second must be worth
    weights: tuple[tuple[str, float], ...] = (
        ("connections", 1.0),
        ("cpu", 1.0),
        ("memory", 1.0),
        ("bandwidth", 1.0),
    )


@dataclass(frozen=True)
class Policy:
    """The whole validated policy set, merged from all files."""

    tiers: tuple[Tier, ...]
    users: tuple[UserPolicy, ...]
    interfaces: tuple[InterfacePolicy, ...] = ()
    forecast: ForecastPolicy = field(default_factory=ForecastPolicy)
    sources: tuple[str, ...] = ()

    def tier(self, name: str) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(name)

    def user_policy_for(self, uid: int) -> UserPolicy | None:
        """Return the most specific entry that matches uid, or None."""
        name, groups = _account(uid)
        return self._best_entry(uid, name, groups)

    def managed_users(self) -> dict[int, UserPolicy]:
        """Resolve every account in the passwd database (and explicit uids) to its entry."""
        members: dict[str, set[str]] = {}
        gid_names: dict[int, str] = {}
        for group in grp.getgrall():
            gid_names[group.gr_gid] = group.gr_name
            for member in group.gr_mem:
                members.setdefault(member, set()).add(group.gr_name)
        accounts: dict[int, tuple[str | None, frozenset[str]]] = {}
        for entry in pwd.getpwall():
            names = set(members.get(entry.pw_name, ()))
            if entry.pw_gid in gid_names:
                names.add(gid_names[entry.pw_gid])
            accounts.setdefault(entry.pw_uid, (entry.pw_name, frozenset(names)))
        for user in self.users:
            if user.match.uid is not None:
                accounts.setdefault(user.match.uid, (None, frozenset()))
        accounts.pop(0, None)  # root's services are never moved into slots
        out = {}
        for uid, (name, group_names) in accounts.items():
            best = self._best_entry(uid, name, group_names)
            if best is not None:
                out[uid] = best
        return out

    def _best_entry(
        self, uid: int, name: str | None, groups: frozenset[str]
    ) -> UserPolicy | None:
        best: UserPolicy | None = None
        for entry in self.users:
            if not entry.match.matches(uid, name, groups):
                continue
            if best is None or entry.match.specificity > best.match.specificity:
                best = entry
        return best

    def source_names(self) -> str:
        names = [
            f"{s} (bundled default)" if Path(s) == BUNDLED_DEFAULT else s
            for s in self.sources
        ]
        return ", ".join(names)

    def summary(self) -> str:
        slots = sum(n for u in self.users for _, n in u.pool)
        return (
            f"{len(self.sources)} file(s), {len(self.tiers)} tier(s), "
            f"{len(self.users)} user entr{'y' if len(self.users) == 1 else 'ies'}, "
            f"{slots} warm slot(s) per matched user set, "
            f"{len(self.interfaces)} shaped interface(s)"
        )


def advice(policy: Policy) -> list[str]:
    """Return warnings about a valid policy on this host, as FILE:LINE: lines.

    A user or group name that matches no account, or an interface that does
    not exist, is not an error (accounts and links may appear later) but is
    often a typo that leaves nobody managed or shaped.
    """
    lines = []
    if not policy.users:
        names = policy.source_names() or "the policy"
        lines.append(
            f"{names}: users: none listed, so nobody is managed; add a users entry"
        )
    for entry in policy.users:
        match = entry.match
        if match.name is not None and not _exists(pwd.getpwnam, match.name):
            lines.append(
                f"{entry.source}: name: no account named {match.name!r} on this host; check the spelling"
            )
        if match.group is not None and not _exists(grp.getgrnam, match.group):
            lines.append(
                f"{entry.source}: group: no group named {match.group!r} on this host; check the spelling"
            )
    for iface in policy.interfaces:
        if not (Path("/sys/class/net") / iface.name).exists():
            lines.append(
                f"network.interfaces: no interface named {iface.name!r} on this host; the broker shapes it once it exists"
            )
    return lines


def _exists(lookup: Any, name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _account(uid: int) -> tuple[str | None, frozenset[str]]:
    """Return the user name and group names of uid, from the passwd database."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return None, frozenset()
    names = {g.gr_name for g in grp.getgrall() if entry.pw_name in g.gr_mem}
    try:
        names.add(grp.getgrgid(entry.pw_gid).gr_name)
    except KeyError:
        pass
    return entry.pw_name, frozenset(names)


# --------------------------------------------------------------------------
# Node reading with file:line problems
# --------------------------------------------------------------------------


MERGE_TAG = "tag:yaml.org,2002:merge"


class _Reader:
    """Walks composed YAML nodes of one file and collects problems."""

    def __init__(self, path: str, problems: list[PolicyProblem]):
        self.path = path
        self.problems = problems

    def problem(self, node: yaml.Node | None, fld: str, text: str, fix: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append(PolicyProblem(self.path, line, fld, text, fix))

    def where(self, node: yaml.Node) -> str:
        return f"{self.path}:{node.start_mark.line + 1}"

    def mapping(
        self, node: yaml.Node, fld: str
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        """Return {key: (key node, value node)}, reporting duplicate keys."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(
                node,
                fld or "(top level)",
                "expected a mapping",
                "write `key: value` lines",
            )
            return None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key_node.tag == MERGE_TAG:
                merges.append(value_node)
                continue
            if key in out:
                first = out[key][0].start_mark.line + 1
                self.problem(
                    key_node,
                    f"{fld}.{key}" if fld else key,
                    f"duplicate key (first set on line {first})",
                    "keep one of the two",
                )
                continue
            out[key] = (key_node, value_node)
        for merged in merges:
            self._merge(merged, fld, out)
        return out

    def _merge(
        self, node: yaml.Node, fld: str, out: dict[str, tuple[yaml.Node, yaml.Node]]
    ) -> None:
        """Add the keys of a `<<:` merge that the mapping does not set itself."""
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                self.problem(
                    source,
                    f"{fld}.<<" if fld else "<<",
                    "a merge key takes a mapping or a list of mappings",
                    "merge an anchored mapping, e.g. `<<: *defaults`",
                )
                continue
            for key, pair in (self.mapping(source, fld) or {}).items():
                out.setdefault(key, pair)

    def unknown_keys(
        self,
        items: dict[str, tuple[yaml.Node, yaml.Node]],
        known: Iterable[str],
        fld: str,
    ) -> None:
        allowed = sorted(known)
        for key, (key_node, _) in items.items():
            if key not in allowed:
                near = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {near[0]}? " if near else ""
                self.problem(
                    key_node,
                    f"{fld}.{key}" if fld else key,
                    "unknown field",
                    f"{hint}use one of: {', '.join(allowed)}",
                )

    def scalar(self, node: yaml.Node, fld: str) -> yaml.ScalarNode | None:
        if not isinstance(node, yaml.ScalarNode):
            self.problem(node, fld, "expected a single value", "write a plain value")
            return None
        return node

    def string(self, node: yaml.Node, fld: str) -> str | None:
        scalar = self.scalar(node, fld)
        if scalar is None:
            return None
        if scalar.tag == "tag:yaml.org,2002:null":
            self.problem(node, fld, "is empty", "write a value")
            return None
        if scalar.style is None and scalar.value.lower() in _YAML11_BOOLEANS:
            self.problem(
                node,
                fld,
                f"unquoted {scalar.value!r} is read by YAML as a boolean",
                f'quote it: "{scalar.value}"',
            )
            return None
        return str(scalar.value)

    def integer(
        self, node: yaml.Node, fld: str, low: int | None = None, high: int | None = None
    ) -> int | None:
        scalar = self.scalar(node, fld)
        if scalar is None:
            return None
        text = scalar.value.strip()
        if re.fullmatch(r"0\d+", text):
            self.problem(
                node,
                fld,
                f"{text} has a leading zero, which YAML 1.1 reads as octal",
                f"write {int(text, 10)} without the leading zero"
                + (
                    f", or 0o{text[1:]} if octal is meant"
                    if re.fullmatch(r"0[0-7]+", text)
                    else ""
                ),
            )
            return None
        if not re.fullmatch(r"-?\d+", text) or scalar.style is not None:
            self.problem(
                node, fld, f"{text!r} is not an integer", "write a whole number"
            )
            return None
        value = int(text)
        return self._in_range(node, fld, value, low, high)

    def number(
        self,
        node: yaml.Node,
        fld: str,
        low: float | None = None,
        high: float | None = None,
    ) -> float | None:
        scalar = self.scalar(node, fld)
        if scalar is None:
            return None
        try:
            value = float(scalar.value)
        except ValueError:
            self.problem(
                node, fld, f"{scalar.value!r} is not a number", "write a number"
            )
            return None
        return self._in_range(node, fld, value, low, high)

    def _in_range(self, node, fld, value, low, high):
        if (low is not None and value < low) or (high is not None and value > high):
            self.problem(
                node,
                fld,
                f"{value} is out of range",
                f"the valid range is {low}..{high}",
            )
            return None
        return value

    def boolean(self, node: yaml.Node, fld: str) -> bool | None:
        scalar = self.scalar(node, fld)
        if scalar is None:
            return None
        text = scalar.value.lower()
        if scalar.style is None and text in ("true", "yes", "on"):
            return True
        if scalar.style is None and text in ("false", "no", "off"):
            return False
        self.problem(
            node, fld, f"{scalar.value!r} is not a boolean", "write true or false"
        )
        return None

    def converted(self, node: yaml.Node, fld: str, parse: Callable[[Any], Any]) -> Any:
        """Run a units parser on a scalar; a ValueError becomes a problem."""
        scalar = self.scalar(node, fld)
        if scalar is None:
            return None
        raw: Any = scalar.value
        if scalar.style is None and re.fullmatch(r"\d+", raw):
            raw = int(raw)
        try:
            return parse(raw)
        except ValueError as exc:
            text = str(exc)
            problem, _, fix = text.partition("; ")
            self.problem(node, fld, problem, fix or "see the policy documentation")
            return None


# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------

_TOP_KEYS = ("tiers", "users", "idle_timeout", "network", "forecast")
_TIER_KEYS = (
    "cpu.weight",
    "memory.min",
    "memory.low",
    "memory.high",
    "cpu.max",
    "io.weight",
)
_USER_KEYS = ("name", "uid", "uids", "group", "pool", "idle_timeout", "max_slots")
_MATCH_KEYS = ("name", "uid", "uids", "group")


def _parse_cpu_max(text: Any) -> CpuMax:
    parts = str(text).split()
    if not parts or len(parts) > 2:
        raise ValueError(
            f"invalid cpu.max {text!r}; write 'max', 'QUOTA' or 'QUOTA PERIOD' in microseconds"
        )
    period = CPU_MAX_DEFAULT_PERIOD_US
    if len(parts) == 2:
        if not parts[1].isdigit() or not 1000 <= int(parts[1]) <= 1000000:
            raise ValueError(
                f"invalid cpu.max period {parts[1]!r}; write 1000..1000000 microseconds"
            )
        period = int(parts[1])
    if parts[0] == "max":
        return CpuMax(None, period)
    if not parts[0].isdigit() or int(parts[0]) < 1000:
        raise ValueError(
            f"invalid cpu.max quota {parts[0]!r}; write 'max' or at least 1000 microseconds"
        )
    return CpuMax(int(parts[0]), period)


def _parse_memory_high(text: Any) -> int | None:
    if str(text) == "max":
        return None
    return units.parse_size(text)


def _parse_tier(reader: _Reader, name: str, node: yaml.Node) -> Tier | None:
    fld = f"tiers.{name}"
    items = reader.mapping(node, fld)
    if items is None:
        return None
    reader.unknown_keys(items, _TIER_KEYS, fld)
    values: dict[str, Any] = {}
    for key in ("cpu.weight", "memory.min"):
        if key not in items:
            reader.problem(node, f"{fld}.{key}", "missing", f"add {key} to tier {name}")
    if "cpu.weight" in items:
        values["cpu_weight"] = reader.integer(
            items["cpu.weight"][1], f"{fld}.cpu.weight", *CPU_WEIGHT_RANGE
        )
    if "memory.min" in items:
        values["memory_min"] = reader.converted(
            items["memory.min"][1], f"{fld}.memory.min", units.parse_size
        )
    if "memory.low" in items:
        values["memory_low"] = reader.converted(
            items["memory.low"][1], f"{fld}.memory.low", units.parse_size
        )
    if "memory.high" in items:
        values["memory_high"] = reader.converted(
            items["memory.high"][1], f"{fld}.memory.high", _parse_memory_high
        )
    if "cpu.max" in items:
        values["cpu_max"] = reader.converted(
            items["cpu.max"][1], f"{fld}.cpu.max", _parse_cpu_max
        )
    if "io.weight" in items:
        values["io_weight"] = reader.integer(
            items["io.weight"][1], f"{fld}.io.weight", *IO_WEIGHT_RANGE
        )
    if values.get("cpu_weight") is None or values.get("memory_min") is None:
        return None
    low, high, low_node = (
        values.get("memory_low"),
        values.get("memory_high"),
        items.get("memory.low"),
    )
    if low is not None and low < values["memory_min"] and low_node:
        reader.problem(
            low_node[1],
            f"{fld}.memory.low",
            "is below memory.min",
            "set memory.low >= memory.min or drop it",
        )
    if high is not None and low is not None and low > high and low_node:
        reader.problem(
            low_node[1],
            f"{fld}.memory.low",
            "is above memory.high, so the part above it can never be used",
            "lower memory.low to memory.high or less",
        )
    if high is not None and high < values["memory_min"] and "memory.high" in items:
        reader.problem(
            items["memory.high"][1],
            f"{fld}.memory.high",
            "is below memory.min",
            "raise memory.high above memory.min",
        )
    return Tier(name=name, **values)


def _parse_uid_range(text: Any) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(text))
    if not match:
        raise ValueError(
            f"invalid uid range {text!r}; write FIRST-LAST, e.g. 2000-2999"
        )
    first, last = int(match.group(1)), int(match.group(2))
    if first > last:
        raise ValueError(f"uid range {text!r} is reversed; write the lower uid first")
    if first == 0:
        raise ValueError(
            f"uid range {text!r} includes root; start it at 1 or above "
            f"(root's processes are never moved)"
        )
    return first, last


def _parse_user(reader: _Reader, index: int, node: yaml.Node) -> UserPolicy | None:
    """Parse one users[] entry; without its own idle_timeout it gets UNSET_IDLE."""
    fld = f"users[{index}]"
    items = reader.mapping(node, fld)
    if items is None:
        return None
    reader.unknown_keys(items, _USER_KEYS, fld)
    present = [k for k in _MATCH_KEYS if k in items]
    if len(present) != 1:
        reader.problem(
            node,
            fld,
            "needs exactly one of name, uid, uids, group"
            + (f" (has {', '.join(present)})" if present else ""),
            "keep one way to match users per entry",
        )
        return None
    key = present[0]
    value_node = items[key][1]
    who = f"{fld}.{key}"
    match: UserMatch | None = None
    if key == "name":
        name = reader.string(value_node, who)
        match = UserMatch(name=name) if name else None
    elif key == "uid":
        uid = reader.integer(value_node, who, 1, 2**32 - 2)
        match = UserMatch(uid=uid) if uid is not None else None
    elif key == "uids":
        span = reader.converted(value_node, who, _parse_uid_range)
        match = UserMatch(uid_range=span) if span else None
    else:
        group = reader.string(value_node, who)
        match = UserMatch(group=group) if group else None
    if match is None:
        return None
    label = match.describe()

    pool: list[tuple[str, int]] = []
    if "pool" not in items:
        reader.problem(
            node, f"{fld}.pool", f"missing for {label}", "add e.g. `pool: {light: 2}`"
        )
    else:
        pool_items = reader.mapping(items["pool"][1], f"{fld}.pool") or {}
        for tier_name, (_, count_node) in pool_items.items():
            count = reader.integer(
                count_node, f"{fld}.pool.{tier_name} ({label})", 0, 64
            )
            if count is not None:
                pool.append((tier_name, count))
    idle = UNSET_IDLE
    if "idle_timeout" in items:
        parsed = reader.converted(
            items["idle_timeout"][1],
            f"{fld}.idle_timeout ({label})",
            units.parse_duration,
        )
        idle = parsed if parsed is not None else idle
    max_slots = max([n for _, n in pool] + [8])
    if "max_slots" in items:
        parsed_max = reader.integer(
            items["max_slots"][1], f"{fld}.max_slots ({label})", 0, 256
        )
        max_slots = parsed_max if parsed_max is not None else max_slots
    return UserPolicy(match, tuple(pool), idle, max_slots, reader.where(node))


def _parse_rates(reader: _Reader, node: yaml.Node, fld: str) -> ClassRates | None:
    items = reader.mapping(node, fld)
    if items is None:
        return None
    reader.unknown_keys(items, ("rate", "ceil"), fld)
    if "rate" not in items:
        reader.problem(
            node, f"{fld}.rate", "missing", "add a guaranteed rate, e.g. rate: 10mbit"
        )
        return None
    rate = reader.converted(items["rate"][1], f"{fld}.rate", units.parse_rate)
    ceil = rate
    if "ceil" in items:
        ceil = reader.converted(items["ceil"][1], f"{fld}.ceil", units.parse_rate)
    if rate is None or ceil is None:
        return None
    for key, value in (("rate", rate), ("ceil", ceil)):
        if not units.RATE_MIN <= value <= units.RATE_MAX:
            reader.problem(
                items.get(key, items["rate"])[1],
                f"{fld}.{key}",
                _rate_range_text(value),
                _RATE_RANGE_FIX,
            )
            return None
    if rate > ceil:
        reader.problem(
            items["rate"][1],
            f"{fld}.rate",
            f"rate {units.format_rate(rate)} is above ceil {units.format_rate(ceil)}",
            "lower rate or raise ceil",
        )
        return None
    return ClassRates(rate, ceil)


_RATE_RANGE_FIX = "write at least 1kbit and at most 2**64-1 bytes per second"


def _rate_range_text(value: int) -> str:
    if value < units.RATE_MIN:
        return (
            f"{units.format_rate(value)} is below the HTB minimum of "
            f"{units.format_rate(units.RATE_MIN)}"
        )
    return f"{units.format_rate(value)} is above the kernel's 64-bit bytes/s limit"


def _parse_interface(
    reader: _Reader, index: int, node: yaml.Node
) -> InterfacePolicy | None:
    fld = f"network.interfaces[{index}]"
    items = reader.mapping(node, fld)
    if items is None:
        return None
    reader.unknown_keys(
        items, ("name", "link_rate", "default", "user", "tiers", "r2q"), fld
    )
    for key in ("name", "link_rate", "default", "user"):
        if key not in items:
            reader.problem(node, f"{fld}.{key}", "missing", f"add {key}")
    if any(k not in items for k in ("name", "link_rate", "default", "user")):
        return None
    name = reader.string(items["name"][1], f"{fld}.name")
    link = reader.converted(items["link_rate"][1], f"{fld}.link_rate", units.parse_rate)
    default = _parse_rates(reader, items["default"][1], f"{fld}.default")
    user = _parse_rates(reader, items["user"][1], f"{fld}.user")
    r2q = 10
    if "r2q" in items:
        r2q = reader.integer(items["r2q"][1], f"{fld}.r2q", 1, 100000) or 10
    tiers: list[tuple[str, ClassRates]] = []
    tier_nodes: list[yaml.Node] = []
    if "tiers" in items:
        for tier_name, (_, rates_node) in (
            reader.mapping(items["tiers"][1], f"{fld}.tiers") or {}
        ).items():
            rates = _parse_rates(reader, rates_node, f"{fld}.tiers.{tier_name}")
            if rates is not None:
                tiers.append((tier_name, rates))
                tier_nodes.append(rates_node)
    if link is not None and not units.RATE_MIN <= link <= units.RATE_MAX:
        reader.problem(
            items["link_rate"][1],
            f"{fld}.link_rate",
            _rate_range_text(link),
            _RATE_RANGE_FIX,
        )
        link = None
    if name is None or link is None or default is None or user is None:
        return None
    for label, rates, rnode in [
        ("default", default, items["default"][1]),
        ("user", user, items["user"][1]),
    ] + [
        (f"tiers.{t}", r, node) for (t, r), node in zip(tiers, tier_nodes, strict=True)
    ]:
        if rates.ceil > link:
            reader.problem(
                rnode,
                f"{fld}.{label}.ceil",
                f"ceil {units.format_rate(rates.ceil)} is above link_rate {units.format_rate(link)}",
                "lower ceil to at most link_rate",
            )
    return InterfacePolicy(name, link, default, user, tuple(tiers), r2q)


def _parse_forecast(reader: _Reader, node: yaml.Node) -> ForecastPolicy | None:
    fld = "forecast"
    items = reader.mapping(node, fld)
    if items is None:
        return None
    known = (
        "enabled",
        "interval",
        "plan_interval",
        "quantile",
        "window",
        "horizon_min",
        "horizon_max",
        "service_time",
        "memory_min_share",
        "anomaly_sigma",
        "weights",
        "uncertainty_narrow",
        "uncertainty_wide",
        "sizing",
        "slot_price",
    )
    reader.unknown_keys(items, known, fld)
    values: dict[str, Any] = {}
    if "enabled" in items:
        values["enabled"] = reader.boolean(items["enabled"][1], f"{fld}.enabled")
    for key in (
        "interval",
        "plan_interval",
        "horizon_min",
        "horizon_max",
        "service_time",
    ):
        if key in items:
            values[key] = reader.converted(
                items[key][1], f"{fld}.{key}", units.parse_duration
            )
            if values[key] is not None and values[key] < MIN_FORECAST_SECONDS:
                reader.problem(
                    items[key][1],
                    f"{fld}.{key}",
                    f"{values[key]:g}s is too short",
                    f"write at least {MIN_FORECAST_SECONDS:g}s",
                )
                values[key] = None
    if "quantile" in items:
        values["quantile"] = reader.number(
            items["quantile"][1], f"{fld}.quantile", 0.5, 0.999
        )
    if "window" in items:
        values["window"] = reader.integer(items["window"][1], f"{fld}.window", 8, 4096)
    if "memory_min_share" in items:
        values["memory_min_share"] = reader.number(
            items["memory_min_share"][1], f"{fld}.memory_min_share", 0.0, 0.95
        )
    if "anomaly_sigma" in items:
        values["anomaly_sigma"] = reader.number(
            items["anomaly_sigma"][1], f"{fld}.anomaly_sigma", 1.0, 100.0
        )
    for key in ("uncertainty_narrow", "uncertainty_wide"):
        if key in items:
            values[key] = reader.number(items[key][1], f"{fld}.{key}", 0.0, 100.0)
    if "sizing" in items:
        sizing = reader.string(items["sizing"][1], f"{fld}.sizing")
        if sizing is not None and sizing not in ("quantile", "value"):
            reader.problem(
                items["sizing"][1],
                f"{fld}.sizing",
                f"unknown sizing {sizing!r}",
                "use quantile or value",
            )
            sizing = None
        values["sizing"] = sizing
    if "slot_price" in items:
        values["slot_price"] = reader.number(
            items["slot_price"][1], f"{fld}.slot_price", 0.0, 100.0
        )
    if "weights" in items:
        weights = []
        for key, (_, wnode) in (
            reader.mapping(items["weights"][1], f"{fld}.weights") or {}
        ).items():
            if key not in ("connections", "cpu", "memory", "bandwidth"):
                reader.problem(
                    wnode,
                    f"{fld}.weights.{key}",
                    "unknown resource",
                    "use connections, cpu, memory or bandwidth",
                )
                continue
            weight = reader.number(wnode, f"{fld}.weights.{key}", 0.0, 100.0)
            if weight is not None:
                weights.append((key, weight))
        values["weights"] = tuple(weights)
    if any(v is None for v in values.values()):
        return None
    result = ForecastPolicy(**values)
    if result.plan_interval < result.interval:
        where = items.get("plan_interval", (node, node))[1]
        reader.problem(
            where,
            f"{fld}.plan_interval",
            f"{result.plan_interval:g}s is shorter than interval {result.interval:g}s",
            "plan at most as often as demand is sampled",
        )
        return None
    if result.horizon_min > result.horizon_max:
        reader.problem(
            node,
            f"{fld}.horizon_min",
            "is above horizon_max",
            "set horizon_min <= horizon_max",
        )
        return None
    if result.uncertainty_narrow > result.uncertainty_wide:
        where = items.get("uncertainty_narrow", (node, node))[1]
        reader.problem(
            where,
            f"{fld}.uncertainty_narrow",
            "is above uncertainty_wide",
            "set uncertainty_narrow <= uncertainty_wide",
        )
        return None
    return result


# --------------------------------------------------------------------------
# Files and merging
# --------------------------------------------------------------------------


@dataclass
class _FileParts:
    path: str
    tiers: list[tuple[Tier, str]] = field(default_factory=list)
    users: list[UserPolicy] = field(default_factory=list)
    interfaces: list[tuple[InterfacePolicy, str]] = field(default_factory=list)
    forecast: tuple[ForecastPolicy, str] | None = None
    broken_tiers: set[str] = field(default_factory=set)
    idle_timeout: tuple[float, str] | None = None  # top-level default and where


def _compose(path: str, text: str, problems: list[PolicyProblem]) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        text, fix = str(exc.problem or exc), "fix the YAML syntax"
        if "another document" in text:
            text = "a second YAML document starts here"
            fix = "one policy per file: remove the '---' line or split the file"
        problems.append(PolicyProblem(path, line, "(syntax)", text, fix))
    except yaml.YAMLError as exc:
        problems.append(
            PolicyProblem(path, 1, "(syntax)", str(exc), "fix the YAML syntax")
        )
    return None


def _parse_file(path: str, text: str, problems: list[PolicyProblem]) -> _FileParts:
    parts = _FileParts(path)
    root = _compose(path, text, problems)
    if root is None:
        return parts
    reader = _Reader(path, problems)
    items = reader.mapping(root, "")
    if items is None:
        return parts
    reader.unknown_keys(items, _TOP_KEYS, "")
    if "idle_timeout" in items:
        idle = reader.converted(
            items["idle_timeout"][1], "idle_timeout", units.parse_duration
        )
        if idle is not None:
            parts.idle_timeout = (idle, reader.where(items["idle_timeout"][0]))
    if "tiers" in items:
        for name, (key_node, tier_node) in (
            reader.mapping(items["tiers"][1], "tiers") or {}
        ).items():
            tier = _parse_tier(reader, name, tier_node)
            if tier is not None:
                parts.tiers.append((tier, reader.where(key_node)))
            else:
                parts.broken_tiers.add(name)
    if "users" in items:
        users_node = items["users"][1]
        if not isinstance(users_node, yaml.SequenceNode):
            reader.problem(
                users_node,
                "users",
                "expected a list",
                "write each user entry as `- name: ...`",
            )
        else:
            for index, user_node in enumerate(users_node.value):
                user = _parse_user(reader, index, user_node)
                if user is not None:
                    parts.users.append(user)
    if "network" in items:
        net = reader.mapping(items["network"][1], "network") or {}
        reader.unknown_keys(net, ("interfaces",), "network")
        if "interfaces" in net:
            seq = net["interfaces"][1]
            if not isinstance(seq, yaml.SequenceNode):
                reader.problem(
                    seq,
                    "network.interfaces",
                    "expected a list",
                    "write each interface as `- name: eth0`",
                )
            else:
                for index, if_node in enumerate(seq.value):
                    iface = _parse_interface(reader, index, if_node)
                    if iface is not None:
                        parts.interfaces.append((iface, reader.where(if_node)))
    if "forecast" in items:
        forecast = _parse_forecast(reader, items["forecast"][1])
        if forecast is not None:
            parts.forecast = (forecast, reader.where(items["forecast"][0]))
    return parts


def _problem_at(where: str, fld: str, problem: str, fix: str) -> PolicyProblem:
    path, _, line = where.rpartition(":")
    return PolicyProblem(path, int(line), fld, problem, fix)


def _merge(files: list[_FileParts], problems: list[PolicyProblem]) -> Policy:
    tiers: dict[str, tuple[Tier, str]] = {}
    interfaces: dict[str, tuple[InterfacePolicy, str]] = {}
    forecast: tuple[ForecastPolicy, str] | None = None
    users: list[UserPolicy] = []
    idle: tuple[float, str] | None = None
    for parts in files:
        for tier, where in parts.tiers:
            if tier.name in tiers:
                problems.append(
                    _problem_at(
                        where,
                        f"tiers.{tier.name}",
                        f"tier defined twice (also at {tiers[tier.name][1]})",
                        "rename or remove one",
                    )
                )
                continue
            tiers[tier.name] = (tier, where)
        for iface, where in parts.interfaces:
            if iface.name in interfaces:
                problems.append(
                    _problem_at(
                        where,
                        "network.interfaces",
                        f"interface {iface.name} defined twice (also at {interfaces[iface.name][1]})",
                        "keep one",
                    )
                )
                continue
            interfaces[iface.name] = (iface, where)
        if parts.forecast is not None:
            if forecast is not None:
                problems.append(
                    _problem_at(
                        parts.forecast[1],
                        "forecast",
                        f"forecast section defined twice (also at {forecast[1]})",
                        "keep one",
                    )
                )
            else:
                forecast = parts.forecast
        users.extend(parts.users)
        if parts.idle_timeout is not None:
            if idle is not None:
                problems.append(
                    _problem_at(
                        parts.idle_timeout[1],
                        "idle_timeout",
                        f"default set twice (also at {idle[1]})",
                        "keep one top-level idle_timeout; it applies to all files",
                    )
                )
            else:
                idle = parts.idle_timeout

    default_idle = idle[0] if idle is not None else DEFAULT_IDLE_TIMEOUT
    users = [
        dataclasses.replace(u, idle_timeout=default_idle)
        if u.idle_timeout == UNSET_IDLE
        else u
        for u in users
    ]
    broken = set().union(*(p.broken_tiers for p in files)) if files else set()
    _check_references(tiers, broken, users, interfaces, problems)
    _name_users_of_tiers(users, problems)
    return Policy(
        tiers=tuple(t for t, _ in tiers.values()),
        users=tuple(users),
        interfaces=tuple(i for i, _ in interfaces.values()),
        forecast=forecast[0] if forecast else ForecastPolicy(),
        sources=tuple(p.path for p in files),
    )


def _name_users_of_tiers(
    users: list[UserPolicy], problems: list[PolicyProblem]
) -> None:
    """Add to each tier problem which users the broken tier would have served."""
    for problem in problems:
        if not problem.field.startswith("tiers."):
            continue
        tier_name = problem.field.split(".")[1]
        who = [u.match.describe() for u in users if tier_name in dict(u.pool)]
        if who:
            problem.problem += f" (tier {tier_name} is used by {', '.join(who)})"


def _check_references(tiers, broken, users, interfaces, problems) -> None:
    seen: dict[UserMatch, str] = {}
    for user in users:
        for tier_name, _ in user.pool:
            if tier_name not in tiers and tier_name not in broken:
                known = ", ".join(sorted(tiers)) or "none defined"
                problems.append(
                    _problem_at(
                        user.source,
                        f"pool.{tier_name}",
                        f"unknown tier for {user.match.describe()}",
                        f"define it under tiers (known: {known})",
                    )
                )
        if user.match in seen:
            problems.append(
                _problem_at(
                    user.source,
                    "users",
                    f"{user.match.describe()} is listed twice (also at {seen[user.match]})",
                    "merge the two entries",
                )
            )
        seen.setdefault(user.match, user.source)
    for iface, where in interfaces.values():
        for tier_name, _ in iface.tiers:
            if tier_name not in tiers:
                problems.append(
                    _problem_at(
                        where,
                        f"network.interfaces.tiers.{tier_name}",
                        "unknown tier",
                        "define it under tiers",
                    )
                )


def policy_files(target: Path) -> list[Path]:
    """Return the policy files of a directory (sorted *.yaml, *.yml) or a file.

    A symlink named *.yaml whose target is missing is returned, so that
    loading it reports the broken link instead of skipping its policy.
    """
    if target.is_dir():
        return sorted(
            p
            for p in target.iterdir()
            if p.suffix in (".yaml", ".yml")
            and (p.is_file() or (p.is_symlink() and not p.exists()))
        )
    return [target]


def load_texts(texts: list[tuple[str, str]]) -> Policy:
    """Validate (path, text) pairs and return the merged Policy, or raise PolicyError."""
    problems: list[PolicyProblem] = []
    files = [_parse_file(path, text, problems) for path, text in texts]
    policy = _merge(files, problems)
    if problems:
        raise PolicyError(problems)
    return policy


def load(paths: Iterable[Path]) -> Policy:
    """Load policy files and directories; with no paths, load the bundled default.

    A directory given explicitly that holds no *.yaml or *.yml file is an
    error, not a silent switch to the default.
    """
    targets = [Path(p) for p in paths]
    files: list[Path] = []
    empty: list[PolicyProblem] = []
    for target in targets:
        found = policy_files(target)
        files.extend(found)
        if not found:
            empty.append(
                PolicyProblem(
                    str(target),
                    1,
                    "(directory)",
                    "contains no *.yaml or *.yml policy file",
                    "add a policy file, or name a file instead",
                )
            )
    if empty:
        raise PolicyError(empty)
    if not targets:
        files = [BUNDLED_DEFAULT]
    texts: list[tuple[str, str]] = []
    problems: list[PolicyProblem] = []
    for path in files:
        try:
            texts.append((str(path), _read_utf8(path)))
        except UnicodeDecodeError as exc:
            problems.append(
                PolicyProblem(
                    str(path),
                    exc.object[: exc.start].count(b"\n") + 1,
                    "(file)",
                    f"invalid UTF-8 byte {exc.object[exc.start]:#04x}",
                    "save the file as UTF-8",
                )
            )
        except OSError as exc:
            problems.append(
                PolicyProblem(
                    str(path),
                    1,
                    "(file)",
                    f"cannot be read: {exc.strerror}",
                    "check the path and its permissions",
                )
            )
    if problems:
        raise PolicyError(problems)
    return load_texts(texts)


def _read_utf8(path: Path) -> str:
    """Return a file's text; raise UnicodeDecodeError on invalid UTF-8."""
    return path.read_bytes().decode("utf-8")


def resolve_policy_paths(explicit: list[str] | None) -> list[Path]:
    """Return the policy paths to load: the given ones, else the default directory."""
    if explicit:
        # A path given twice is loaded once, or its entries would clash with themselves.
        unique: dict[str, Path] = {}
        for text in explicit:
            unique.setdefault(os.path.realpath(text), Path(text))
        return list(unique.values())
    env = os.environ.get("BROKER_POLICY_DIR")
    directory = Path(env) if env else DEFAULT_POLICY_DIR
    return [directory] if directory.is_dir() and policy_files(directory) else []
