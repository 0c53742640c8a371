"""Parse the text of `tc -s class show` and `tc qdisc show` for tests.

The tests read the kernel's tc state through iproute2's tc, independently of
the broker's own netlink parsing. tc prints rates with SI prefixes
(1000-based: Kbit, Mbit, Gbit, Tbit) unless it runs with -iec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_RATE = re.compile(r"(\d+(?:\.\d+)?)([KMGT]?)bit")
_PREFIX = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_SENT = re.compile(
    r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+) requeues (\d+)\)"
)


@dataclass(frozen=True)
class TcClass:
    """One class from `tc -s class show`; rates in bit/s."""

    handle: str  # as tc prints it, e.g. "1:3f9"
    parent: str  # "root" for a root class
    rate: int
    ceil: int
    sent_bytes: int = 0
    sent_packets: int = 0
    dropped: int = 0
    overlimits: int = 0


@dataclass(frozen=True)
class TcQdisc:
    """One qdisc line from `tc -s qdisc show`."""

    kind: str
    handle: str
    parent: str  # "root" or the parent handle
    fields: dict[str, str]  # the remaining "key value" pairs, e.g. {"default": "0x2"}


def parse_rate(text: str) -> int:
    """Return bit/s from a rate as tc prints it, e.g. '4800Kbit' -> 4800000."""
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a tc rate: {text!r}")
    number, prefix = match.groups()
    return round(float(number) * _PREFIX[prefix])


def _blocks(text: str, first_word: str) -> list[list[str]]:
    """Split tc output into blocks that each start with a `first_word` line."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith(first_word + " "):
            blocks.append([line])
        elif blocks and line.strip():
            blocks[-1].append(line)
    return blocks


def parse_classes(text: str) -> dict[str, TcClass]:
    """Return the HTB classes of `tc [-s] class show` output by handle."""
    out = {}
    for block in _blocks(text, "class"):
        words = block[0].split()
        if words[1] != "htb":
            continue
        handle = words[2]
        parent = "root" if words[3] == "root" else words[words.index("parent") + 1]
        rate = parse_rate(words[words.index("rate") + 1])
        ceil = parse_rate(words[words.index("ceil") + 1])
        sent = _SENT.search("\n".join(block[1:]))
        counters = [int(g) for g in sent.groups()[:4]] if sent else [0, 0, 0, 0]
        out[handle] = TcClass(handle, parent, rate, ceil, *counters)
    return out


def parse_qdiscs(text: str) -> list[TcQdisc]:
    """Return the qdiscs of `tc [-s] qdisc show dev X` output, in order."""
    out = []
    for block in _blocks(text, "qdisc"):
        words = block[0].split()
        kind, handle = words[1], words[2]
        rest = words[3:]
        if rest and rest[0] == "root":
            parent, rest = "root", rest[1:]
        elif len(rest) >= 2 and rest[0] == "parent":
            parent, rest = rest[1], rest[2:]
        else:
            parent = ""
        fields = {rest[i]: rest[i + 1] for i in range(0, len(rest) - 1, 2)}
        out.append(TcQdisc(kind, handle, parent, fields))
    return out
