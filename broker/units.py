"""Parse sizes, durations and rates written in policies.

Each parser takes the raw text and returns one internal unit: bytes, seconds
or bit/s. Each raises ValueError with a message that suggests what to write
instead, and the policy loader adds the file and line.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

_NUMBER = r"(\d+(?:\.\d+)?)"

# Memory sizes use powers of 1024 for K, M, G and T, as the kernel's memparse()
# and systemd's MemoryMin= do.
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
}

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}

# Rate units as tc(8) reads them (case-insensitive): *bit is bits per second,
# *bps is BYTES per second, SI prefixes are powers of 1000 and IEC ones
# (kibit, mibps) powers of 1024.
_RATE_UNITS = {
    "bit": 1,
    "kbit": 10**3,
    "mbit": 10**6,
    "gbit": 10**9,
    "tbit": 10**12,
    "kibit": 1 << 10,
    "mibit": 1 << 20,
    "gibit": 1 << 30,
    "tibit": 1 << 40,
    "bps": 8,
    "kbps": 8 * 10**3,
    "mbps": 8 * 10**6,
    "gbps": 8 * 10**9,
    "tbps": 8 * 10**12,
    "kibps": 8 << 10,
    "mibps": 8 << 20,
    "gibps": 8 << 30,
    "tibps": 8 << 40,
}

# Rates an HTB class can take, in bit/s. The kernel keeps bytes/s in 64 bits
# (TCA_HTB_RATE64 above 2**32 - 1 bytes/s). The floor keeps the time that
# tc's default burst (about one MTU) lasts within the 32-bit buffer field,
# which counts 64 ns ticks and overflows below about 47 bit/s.
RATE_MIN = 1000
RATE_MAX = (2**64 - 1) * 8

# The largest size a cgroup memory file can mean. The kernel reads sizes with
# memparse(), which returns an unsigned 64-bit number.
SIZE_MAX = 2**64 - 1

# Units people write that tc would read differently from what they meant.
_AMBIGUOUS_RATE_UNITS = {"", "k", "m", "g", "t", "kb", "mb", "gb", "tb", "b"}


def parse_size(text: str | int) -> int:
    """Return a memory size in bytes from `64M`, `1G`, `512MiB` or an integer."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size {text} is negative; write 0 or more bytes")
        return _below_size_max(text, str(text))
    match = re.fullmatch(_NUMBER + r"\s*([a-zA-Z]*)", text.strip())
    if not match:
        raise ValueError(
            f"invalid size {text!r}; write bytes or a unit, e.g. 64M or 1G"
        )
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown size unit {unit!r} in {text!r}; use K, M, G or T")
    return _below_size_max(int(Decimal(number) * factor), text)


def _below_size_max(size: int, text: str) -> int:
    if size > SIZE_MAX:
        shown = text if len(text) <= 24 else text[:21] + "..."
        raise ValueError(
            f"size {shown!r} is above 2**64 - 1 bytes; write a smaller size"
        )
    return size


def _finite(number: Decimal | int | float, text: str, kind: str) -> float:
    """Return a number as a float; raise ValueError if it is too large for one."""
    try:
        value = float(number)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        shown = str(text) if len(str(text)) <= 24 else str(text)[:21] + "..."
        raise ValueError(f"{kind} {shown!r} is too large; write a smaller {kind}")
    return value


def parse_duration(text: str | int | float) -> float:
    """Return seconds from `30s`, `500ms`, `5m`, `1h` or a plain number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"duration {text} is negative")
        return _finite(text, str(text), "duration")
    match = re.fullmatch(_NUMBER + r"\s*([a-z]*)", str(text).strip())
    if not match:
        raise ValueError(f"invalid duration {text!r}; write e.g. 30s, 500ms, 5m or 1h")
    number, unit = match.groups()
    factor = _DURATION_UNITS.get(unit or "s")
    if factor is None:
        raise ValueError(
            f"unknown duration unit {unit!r} in {text!r}; use ms, s, m or h"
        )
    return _finite(Decimal(number) * Decimal(factor), str(text), "duration")


def parse_rate(text: str) -> int:
    """Return a rate in bit/s from tc-style text such as `10mbit` or `600kbps`."""
    match = re.fullmatch(_NUMBER + r"\s*([a-zA-Z]*)", str(text).strip())
    if not match:
        raise ValueError(f"invalid rate {text!r}; write e.g. 10mbit or 600kbps")
    number, unit = match.groups()
    unit = unit.lower()
    if unit in _AMBIGUOUS_RATE_UNITS:
        raise ValueError(
            f"ambiguous rate {text!r}; write the unit as tc reads it: "
            f"{number}mbit for megabits or {number}mbps for megabytes per second"
        )
    factor = _RATE_UNITS.get(unit)
    if factor is None:
        raise ValueError(
            f"unknown rate unit {unit!r} in {text!r}; use bit, kbit, mbit, gbit, "
            f"or bps, kbps, mbps, gbps for bytes per second"
        )
    return int(round(_finite(Decimal(number) * factor, text, "rate")))


def format_rate(bits_per_second: int) -> str:
    """Format bit/s for people, e.g. 4800000 -> '4.8mbit'."""
    for unit, factor in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits_per_second >= factor:
            return f"{bits_per_second / factor:g}{unit}"
    return f"{bits_per_second}bit"


def format_size(n_bytes: int) -> str:
    """Format bytes for people with 1024-based units, e.g. 67108864 -> '64M'."""
    for unit, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n_bytes >= factor and n_bytes % factor == 0:
            return f"{n_bytes // factor}{unit}"
    return str(n_bytes)
