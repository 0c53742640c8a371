"""The accept probe: BPF tracepoints on accept(2) exits, read from asyncio.

The probe filters in the kernel by a map of managed uids, so events of other
users never reach user space. Events arrive through a ring buffer whose epoll
fd is registered with the asyncio loop (`loop.add_reader`), so the loop wakes
only when there is something to read. Per-uid counters (connections accepted
and connections closed) and the count of events lost to a full ring buffer
are read from BPF maps on demand.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

from broker.bpfobj import BpfObject, RingBuffer, object_path, possible_cpus

log = logging.getLogger(__name__)

OBJECT_NAME = "accept"
PROGRAMS = ("broker_exit_accept4", "broker_exit_accept", "broker_sock_state")

# struct accept_event and struct uid_counters in bpf/include/broker_accept.h.
_EVENT = struct.Struct("=QIIIi")
_COUNTERS = struct.Struct("=QQQ")
_UID = struct.Struct("=I")
_MANAGED = b"\x01"


@dataclass(frozen=True)
class AcceptEvent:
    """One accepted connection, as the probe saw it at syscall exit."""

    ts_ns: int  # CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns)
    pid: int  # thread id
    tgid: int  # process id
    uid: int
    fd: int

    @classmethod
    def unpack(cls, data: bytes) -> "AcceptEvent":
        return cls(*_EVENT.unpack_from(data))


@dataclass(frozen=True)
class UidCounters:
    """Cumulative per-uid counts kept by the probe since it was loaded."""

    accepts: int
    closes: int
    drops: int  # events lost to a full ring buffer

    @property
    def open(self) -> int:
        """Accepted connections not yet closed."""
        return max(self.accepts - self.closes, 0)


class AcceptProbe:
    """Loads accept.bpf.o, keeps its uid filter in step and delivers events."""

    def __init__(self, ring_entries: int | None = None):
        sizes = {"events": ring_entries} if ring_entries else None
        self._obj = BpfObject.open(object_path(OBJECT_NAME), max_entries=sizes)
        self._managed = self._obj.map("managed_uids")
        self._stats = self._obj.map("uid_stats")
        self._drops = self._obj.map("ringbuf_drops")
        self._ring: RingBuffer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cpus = possible_cpus()

    def attach(self) -> None:
        for name in PROGRAMS:
            self._obj.attach(name)

    def set_managed_uids(self, uids: Iterable[int]) -> None:
        """Make the in-kernel filter match exactly these uids."""
        wanted = {_UID.pack(uid) for uid in uids}
        present = set(self._managed.keys())
        for key in present - wanted:
            self._managed.delete(key)
        for key in wanted - present:
            self._managed.update(key, _MANAGED)
        if wanted != present:
            log.info("probe now filters %d managed uid(s)", len(wanted))

    def managed_uids(self) -> set[int]:
        return {_UID.unpack(key)[0] for key in self._managed.keys()}

    def start(
        self, loop: asyncio.AbstractEventLoop, handler: Callable[[AcceptEvent], None]
    ) -> None:
        """Deliver events to handler from the loop's own thread."""

        def on_record(data: bytes) -> None:
            handler(AcceptEvent.unpack(data))

        self._ring = RingBuffer(self._obj.map("events"), on_record)
        self._loop = loop
        loop.add_reader(self._ring.epoll_fd(), self._ring.consume)

    def poll(self, handler: Callable[[AcceptEvent], None], timeout_ms: int) -> int:
        """Deliver events synchronously (tests and tools without a loop)."""
        if self._ring is None:
            self._ring = RingBuffer(
                self._obj.map("events"), lambda data: handler(AcceptEvent.unpack(data))
            )
        return self._ring.poll(timeout_ms)

    def drops(self) -> int:
        """Return events lost because the ring buffer was full, summed over CPUs."""
        raw = self._drops.lookup(_UID.pack(0), value_size=8 * self._cpus)
        if raw is None:
            return 0
        return sum(struct.unpack(f"={self._cpus}Q", raw))

    def counters(self) -> dict[int, UidCounters]:
        """Return cumulative accept and close counts per uid."""
        out: dict[int, UidCounters] = {}
        for key in list(self._stats.keys()):
            raw = self._stats.lookup(key)
            if raw is not None:
                out[_UID.unpack(key)[0]] = UidCounters(*_COUNTERS.unpack(raw))
        return out

    def close(self) -> None:
        """Stop delivery, detach every program and free the object."""
        if self._ring is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._ring.epoll_fd())
            self._ring.free()
            self._ring = None
        self._obj.close()
