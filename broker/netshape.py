"""Per-user egress shaping: one HTB tree and a BPF classifier per interface.

A Shaper builds this tree on one interface with pyroute2 (netlink):

    qdisc htb 1: root, default 2, r2q from the policy
      class 1:1    root class, rate = ceil = the link rate
        class 1:2  default class: every packet of an unmanaged socket
        class 1:N  one class per managed uid, N from ClassTable (0x10..0xfffe)
    filter bpf on 1: direct-action, classid 1: -> classify_uid

The classifier (bpf/classify.bpf.c) looks up the owner uid of each packet's
socket in the BPF hash map uid_classid, which the Shaper keeps in step with
the classes. Packets of other sockets go to the default class.

API for the daemon:

    shaper = Shaper(interface_policy)       # one per policy interface
    report = shaper.apply(managed_uids)     # idempotent; reads every write back
    shaper.set_user_state(uid, "heavy")     # a warm slot of tier heavy is busy
    shaper.set_user_state(uid, None)        # the last slot was reclaimed
    rows = shaper.stats()                   # ClassStats per class, from the kernel
    shaper.remove()                         # clean stop: qdisc, classes, filter
    shaper.close()                          # netlink socket and BPF object

ShaperGroup runs one Shaper per interface of a policy with the same calls,
and follows a reloaded policy with set_policy(policy.interfaces).

Methods block on netlink and are serialised by a lock. They may be called
from any thread, also one that runs an asyncio loop, because pyroute2 runs on
a private thread with its own event loop (pyroute2's synchronous IPRoute
raises RuntimeError inside a running loop). An apply() of hundreds of users
takes a noticeable fraction of a second: run it through asyncio.to_thread().

Units: rates are bit/s throughout. The kernel stores bytes/s, so a rate that
is not a multiple of 8 bit/s is rounded down before it is written, and
read-back compares bit/s with bit/s. Class ids are integers
(major << 16 | minor); format_handle() renders the tc form "1:10" for
messages, and nothing parses ids back from text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

from pyroute2 import AsyncIPRoute
from pyroute2.netlink import NLM_F_ECHO, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETTCLASS, TC_H_ROOT
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from broker import units
from broker.errors import BrokerError, NetshapeError
from broker.policy import ClassRates, InterfacePolicy

log = logging.getLogger(__name__)

DEFAULT_MAJOR = 0x1
ROOT_MINOR = 0x1
DEFAULT_MINOR = 0x2
FIRST_USER_MINOR = 0x10  # minors below are kept for the broker's own classes
LAST_USER_MINOR = 0xFFFE

# sch_htb.c warns "quantum of class X is small/big" when a quantum it derives
# from rate / r2q falls outside 1000..200000 bytes. The Shaper always passes
# a quantum inside that range, and never less than one full frame.
QUANTUM_MIN = 1000
QUANTUM_MAX = 200000
ETH_HLEN = 14

# HTB refills a class's tokens up to its burst only. With TSO/GSO a packet
# can be gso_max_size bytes (64 KiB on most devices). A burst smaller than
# that loses tokens whenever the class waits, so the class falls short of its
# rate: on a veth under contention, a 20 mbit ceil gave 15.7 mbit with tc's
# default burst of one MTU, and 19.4 mbit with this one. The burst covers one
# such packet or 1 ms at the rate, whichever is larger, but lasts at most
# BURST_TIME_MAX at the rate.
BURST_INTERVAL = 0.001  # seconds
BURST_TIME_MAX = 10.0  # seconds; the 32-bit buffer field counts ticks of 64 ns
GSO_MAX_SIZE_DEFAULT = 65536
PSCHED_TICK_NS = 64  # include/net/pkt_sched.h: PSCHED_SHIFT 6

# The kernel takes HTB rates as bytes/s: 32 bits in struct tc_ratespec and
# 64 bits in TCA_HTB_RATE64/TCA_HTB_CEIL64 (Linux 3.13+). pyroute2 0.9.7
# sends the 64-bit attributes above 2**32 - 1 bytes/s (34.36 gbit/s).
MIN_RATE = units.RATE_MIN
MAX_RATE = units.RATE_MAX

OBJECT_NAME = "classify"
PROGRAM_NAME = "classify_uid"
MAP_NAME = "uid_classid"
FILTER_NAME = "broker_classify_uid"
FILTER_PRIO = 1
FILTER_HANDLE = 1
TCA_BPF_FLAG_ACT_DIRECT = 1
ETH_P_ALL = 0x0003  # linux/if_ether.h; socket.ETH_P_ALL needs Python 3.12

NETLINK_TIMEOUT = 10.0  # seconds for one netlink request
_U32 = struct.Struct("=I")


# --------------------------------------------------------------------------
# Class ids
# --------------------------------------------------------------------------


def make_classid(major: int, minor: int) -> int:
    """Return the 32-bit tc handle major:minor."""
    if not 0 < major <= 0xFFFF or not 0 <= minor <= 0xFFFF:
        raise ValueError(f"handle {major:x}:{minor:x} is outside 16 bits")
    return major << 16 | minor


def format_handle(classid: int) -> str:
    """Format a handle as tc prints it, e.g. 0x10010 -> '1:10'."""
    if classid == TC_H_ROOT:
        return "root"
    return f"{classid >> 16:x}:{classid & 0xFFFF:x}"


class ClassTableFullError(NetshapeError):
    """Every user minor of an interface's HTB tree is taken."""


class ClassTable:
    """Assigns each managed uid an HTB minor in FIRST_USER_MINOR..LAST_USER_MINOR.

    A uid's home minor is FIRST_USER_MINOR + uid % span, so consecutive uids
    get consecutive minors. Two uids that share a home minor (they differ by a
    multiple of the span) collide: the later one takes the next free minor.
    A uid keeps its minor for as long as it stays managed, and sync() assigns
    new uids in ascending order, so one set of uids always gets one layout.
    """

    def __init__(self, interface: str, major: int = DEFAULT_MAJOR):
        self.interface = interface
        self.major = major
        self.span = LAST_USER_MINOR - FIRST_USER_MINOR + 1
        self.collisions = 0  # probes past a taken home minor since creation
        self._minor_of: dict[int, int] = {}
        self._uid_of: dict[int, int] = {}

    def sync(self, uids: Iterable[int]) -> None:
        """Release uids not in `uids`, then assign the new ones."""
        managed = set(uids)
        for uid in [u for u in self._minor_of if u not in managed]:
            self.release(uid)
        for uid in sorted(managed - self._minor_of.keys()):
            self.assign(uid)

    def assign(self, uid: int) -> int:
        """Return uid's class id, assigning a free minor on first use."""
        if not 0 <= uid <= 0xFFFFFFFF:
            raise ValueError(f"uid {uid} is outside 0..2**32-1")
        if uid in self._minor_of:
            return make_classid(self.major, self._minor_of[uid])
        if len(self._uid_of) >= self.span:
            raise ClassTableFullError(
                "assign an HTB class to",
                f"uid {uid} on {self.interface}",
                errno.ENOSPC,
                f"all {self.span} minors {FIRST_USER_MINOR:#x}..{LAST_USER_MINOR:#x} "
                "are taken; shape fewer users on this interface",
            )
        home = uid % self.span
        for step in range(self.span):
            minor = FIRST_USER_MINOR + (home + step) % self.span
            owner = self._uid_of.get(minor)
            if owner is None:
                break
            log.debug("uid %s collides with uid %s at minor %#x", uid, owner, minor)
            self.collisions += 1
        self._minor_of[uid] = minor
        self._uid_of[minor] = uid
        return make_classid(self.major, minor)

    def release(self, uid: int) -> None:
        minor = self._minor_of.pop(uid, None)
        if minor is not None:
            del self._uid_of[minor]

    def classid(self, uid: int) -> int | None:
        minor = self._minor_of.get(uid)
        return None if minor is None else make_classid(self.major, minor)

    def uid_of(self, classid: int) -> int | None:
        if classid >> 16 != self.major:
            return None
        return self._uid_of.get(classid & 0xFFFF)

    def assignments(self) -> dict[int, int]:
        """Return {uid: class id} for every assigned uid."""
        return {uid: make_classid(self.major, m) for uid, m in self._minor_of.items()}

    def __len__(self) -> int:
        return len(self._minor_of)


# --------------------------------------------------------------------------
# Desired classes
# --------------------------------------------------------------------------


def kernel_rate(bits_per_second: int) -> int:
    """Return the rate in bit/s that the kernel keeps, in whole bytes/s."""
    return bits_per_second - bits_per_second % 8


@dataclass(frozen=True)
class Link:
    """Interface properties that class sizes depend on."""

    index: int
    mtu: int
    gso_max_size: int = GSO_MAX_SIZE_DEFAULT


def quantum_for(rate: int, r2q: int, mtu: int) -> int:
    """Return the HTB quantum in bytes for a class of `rate` bit/s.

    It is rate / r2q in bytes, as HTB would derive it, kept between one full
    frame (mtu plus the Ethernet header, at least QUANTUM_MIN) and QUANTUM_MAX.
    """
    low = min(max(QUANTUM_MIN, mtu + ETH_HLEN), QUANTUM_MAX)
    return max(low, min(rate // 8 // r2q, QUANTUM_MAX))


def burst_for(rate: int, link: Link) -> int:
    """Return the HTB burst in bytes for a rate in bit/s (see BURST_INTERVAL)."""
    rate_bytes = rate // 8
    size = max(link.mtu + ETH_HLEN, link.gso_max_size, int(rate_bytes * BURST_INTERVAL))
    return max(1, min(size, int(rate_bytes * BURST_TIME_MAX)))


@dataclass(frozen=True)
class ClassSpec:
    """One HTB class as the policy wants it; rates in bit/s, quantum in bytes."""

    classid: int
    parent: int  # TC_H_ROOT for the root class, as the kernel reports it
    rate: int
    ceil: int
    quantum: int
    burst: int  # bytes at rate
    cburst: int  # bytes at ceil
    role: str  # "root", "default" or "user"
    uid: int | None = None
    tier: str | None = None  # warm tier whose rates are in force

    def describe(self, interface: str) -> str:
        owner = f" (uid {self.uid})" if self.uid is not None else f" ({self.role})"
        return f"class {format_handle(self.classid)}{owner} on {interface}"


def check_rates(policy: InterfacePolicy) -> None:
    """Raise NetshapeError when a rate of the policy cannot be written to HTB."""
    named = [("link_rate", ClassRates(policy.link_rate, policy.link_rate))]
    named += [("default", policy.default), ("user", policy.user)]
    named += [(f"tiers.{name}", rates) for name, rates in policy.tiers]
    for label, rates in named:
        for value in (rates.rate, rates.ceil):
            if not MIN_RATE <= value <= MAX_RATE:
                raise NetshapeError(
                    "plan HTB classes for",
                    policy.name,
                    errno.EINVAL,
                    f"{label} rate {units.format_rate(value)} is outside "
                    f"{units.format_rate(MIN_RATE)}..2**64-1 bytes/s",
                )


def user_rates(
    policy: InterfacePolicy, tier: str | None
) -> tuple[ClassRates, str | None]:
    """Return a user's rates and the tier they come from (None: idle rates)."""
    if tier is None:
        return policy.user, None
    rates = policy.tier_rates().get(tier)
    if rates is None:
        return policy.user, None
    return rates, tier


def desired_classes(
    policy: InterfacePolicy,
    assignments: Mapping[int, int],
    states: Mapping[int, str],
    link: Link,
    major: int = DEFAULT_MAJOR,
    warm_rates: Mapping[int, int] | None = None,
) -> dict[int, ClassSpec]:
    """Return the classes the policy wants, keyed by class id, root first.

    warm_rates[uid] replaces the warm tier's guaranteed rate of a busy user
    (the planner's sizing), kept between the user's idle rate and the tier's
    ceil.
    """
    root = make_classid(major, ROOT_MINOR)

    def spec(
        classid: int, parent: int, rates: ClassRates, role: str, **labels: Any
    ) -> ClassSpec:
        rate, ceil = kernel_rate(rates.rate), kernel_rate(rates.ceil)
        quantum = quantum_for(rate, policy.r2q, link.mtu)
        burst, cburst = burst_for(rate, link), burst_for(ceil, link)
        return ClassSpec(
            classid, parent, rate, ceil, quantum, burst, cburst, role, **labels
        )

    link_rates = ClassRates(policy.link_rate, policy.link_rate)
    specs = [
        spec(root, TC_H_ROOT, link_rates, "root"),
        spec(make_classid(major, DEFAULT_MINOR), root, policy.default, "default"),
    ]
    for uid, classid in sorted(assignments.items(), key=lambda item: item[1]):
        rates, tier = user_rates(policy, states.get(uid))
        planned = (warm_rates or {}).get(uid)
        if tier is not None and planned is not None:
            rate = min(max(planned, policy.user.rate), rates.ceil)
            rates = ClassRates(rate, rates.ceil)
        specs.append(spec(classid, root, rates, "user", uid=uid, tier=tier))
    return {s.classid: s for s in specs}


# --------------------------------------------------------------------------
# What the kernel reports
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelClass:
    """An HTB class as the kernel dumps it; rates in bit/s."""

    classid: int
    parent: int
    rate: int
    ceil: int
    quantum: int
    burst: int  # bytes, from the buffer time at rate
    cburst: int
    level: int  # 0 for a leaf
    bytes: int
    packets: int
    drops: int
    overlimits: int
    backlog: int


@dataclass(frozen=True)
class KernelQdisc:
    """The root qdisc of an interface."""

    kind: str
    handle: int
    defcls: int | None  # HTB only
    r2q: int | None
    direct_packets: int | None


@dataclass(frozen=True)
class KernelFilter:
    """A cls_bpf filter as the kernel dumps it."""

    handle: int
    prio: int
    protocol: int
    name: str
    classid: int
    flags: int


def class_differences(spec: ClassSpec, kernel: KernelClass) -> list[str]:
    """Return 'field expected -> found' for every field that differs."""
    out = []
    if spec.parent != kernel.parent:
        out.append(
            f"parent {format_handle(spec.parent)} -> {format_handle(kernel.parent)}"
        )
    for name in ("rate", "ceil"):
        want, have = getattr(spec, name), getattr(kernel, name)
        if want != have:
            out.append(f"{name} {units.format_rate(want)} -> {units.format_rate(have)}")
    # HTB uses the quantum of leaves only and ignores writes to an inner class's.
    if kernel.level == 0 and spec.quantum != kernel.quantum:
        out.append(f"quantum {spec.quantum} -> {kernel.quantum}")
    for name, rate in (("burst", spec.rate), ("cburst", spec.ceil)):
        want, have = getattr(spec, name), getattr(kernel, name)
        if abs(want - have) > _burst_tolerance(rate):
            out.append(f"{name} {want} -> {have} bytes")
    return out


def _burst_tolerance(rate: int) -> int:
    """Bytes that a burst may lose on its way through whole microseconds and ticks."""
    return rate // 8 * 2 // 1_000_000 + 2


@dataclass(frozen=True)
class ClassPlan:
    """The class writes that make the kernel match the desired classes."""

    add: tuple[ClassSpec, ...]
    change: tuple[ClassSpec, ...]
    delete: tuple[KernelClass, ...]
    keep: tuple[int, ...]


def plan_classes(
    desired: Mapping[int, ClassSpec], current: Mapping[int, KernelClass]
) -> ClassPlan:
    """Compare desired classes with the kernel's and list the writes.

    A class under another parent cannot be moved (HTB has no such change), so
    it is deleted and added again. Deletions run leaves first.
    """
    add, change, keep, delete = [], [], [], []
    for classid, spec in desired.items():
        found = current.get(classid)
        if found is None:
            add.append(spec)
        elif found.parent != spec.parent:
            delete.append(found)
            add.append(spec)
        elif class_differences(spec, found):
            change.append(spec)
        else:
            keep.append(classid)
    delete += [c for c in current.values() if c.classid not in desired]
    delete.sort(key=lambda c: (c.level, c.classid))
    return ClassPlan(tuple(add), tuple(change), tuple(delete), tuple(keep))


@dataclass(frozen=True)
class ClassStats:
    """One class of a shaped interface, read from the kernel's statistics."""

    interface: str
    classid: int
    role: str  # "root", "default", "user" or "unknown"
    uid: int | None
    tier: str | None  # warm tier whose rates are in force; None: idle rates
    rate: int  # bit/s
    ceil: int  # bit/s
    bytes: int  # sent since the class was created
    packets: int
    drops: int
    overlimits: int
    backlog: int  # bytes queued now

    @property
    def handle(self) -> str:
        return format_handle(self.classid)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "handle": self.handle}


@dataclass(frozen=True)
class ApplyReport:
    """Changes that one apply() made on one interface."""

    interface: str
    qdisc: str  # "kept", "created" or "recreated"
    added: tuple[int, ...]
    changed: tuple[int, ...]
    deleted: tuple[int, ...]
    unchanged: int
    map_writes: int  # BPF map updates and deletions
    filter: str  # "kept" or "attached"
    netlink_writes: int
    seconds: float

    @property
    def writes(self) -> int:
        return self.map_writes + self.netlink_writes


# --------------------------------------------------------------------------
# Netlink on a private thread
# --------------------------------------------------------------------------

_HINTS = {
    errno.EPERM: "run as root or with CAP_NET_ADMIN",
    errno.EACCES: "run as root or with CAP_NET_ADMIN",
    errno.ENODEV: "check the interface name under network.interfaces in the policy",
    errno.ENOENT: "check `tc qdisc show` and run apply again, "
    "or load the sch_htb and cls_bpf modules",
    errno.EEXIST: "another program changed the tc tree meanwhile, so run apply again",
    errno.EBUSY: "the class still has children or bound filters",
    errno.EINVAL: "check the rates in the policy",
    errno.EOPNOTSUPP: "the kernel needs CONFIG_NET_SCH_HTB and CONFIG_NET_CLS_BPF",
}


def _error(operation: str, target: str, exc: NetlinkError) -> NetshapeError:
    """Translate a NetlinkError, keeping the kernel's extended ack text."""
    message = exc.args[1] if len(exc.args) > 1 else ""
    kernel_text = message if message and message != os.strerror(exc.code) else ""
    kernel_text = f"kernel: {kernel_text}" if kernel_text else ""
    hint = "; ".join(t for t in (kernel_text, _HINTS.get(exc.code, "")) if t)
    return NetshapeError(operation, target, exc.code, hint)


class _Netlink:
    """An AsyncIPRoute that runs on its own thread and event loop."""

    def __init__(self, netns: str | None, timeout: float = NETLINK_TIMEOUT):
        self.writes = 0
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="netshape-netlink", daemon=True
        )
        self._thread.start()
        target = f"netns {netns}" if netns else "the current netns"
        try:
            self._ipr = self.call("open a netlink socket in", target, self._open, netns)
        except BaseException:
            self._stop()
            raise

    @staticmethod
    async def _open(netns: str | None) -> AsyncIPRoute:
        # groups=0: no multicast subscriptions, so only replies arrive.
        kwargs: dict[str, Any] = {"groups": 0, "ext_ack": True}
        if netns:
            kwargs["netns"] = netns
        ipr = AsyncIPRoute(**kwargs)
        await ipr.setup_endpoint()
        return ipr

    def call(
        self,
        operation: str,
        target: str,
        func: Callable[..., Awaitable[Any]],
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Run func(*args) on the netlink thread; collect an async iterator."""

        async def run() -> Any:
            result = await func(*args, **kwargs)
            if hasattr(result, "__aiter__"):
                return [msg async for msg in result]
            return result

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return future.result(self._timeout)
        except NetlinkError as exc:
            raise _error(operation, target, exc) from exc
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise NetshapeError(
                operation, target, errno.ETIMEDOUT, "netlink did not answer"
            ) from exc
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise NetshapeError(operation, target, err, _HINTS.get(err, "")) from exc

    def write(self, operation: str, target: str, *args: Any, **kwargs: Any) -> Any:
        """Send one tc write request (ipr.tc) and count it."""
        result = self.call(operation, target, self._ipr.tc, *args, **kwargs)
        self.writes += 1
        return result

    def link(self, name: str) -> Link:
        msgs = self.call("look up interface", name, self._ipr.link, "get", ifname=name)
        gso = msgs[0].get_attr("IFLA_GSO_MAX_SIZE") or GSO_MAX_SIZE_DEFAULT
        return Link(msgs[0]["index"], msgs[0].get_attr("IFLA_MTU"), gso)

    def qdiscs(self, ifindex: int, target: str) -> list[Any]:
        return self.call("list qdiscs of", target, self._ipr.get_qdiscs, index=ifindex)

    def classes(self, ifindex: int, target: str) -> list[Any]:
        return self.call(
            "list classes of", target, self._ipr.get_classes, index=ifindex
        )

    def filters(self, ifindex: int, parent: int, target: str) -> list[Any]:
        return self.call(
            "list filters of",
            target,
            self._ipr.get_filters,
            index=ifindex,
            parent=parent,
        )

    def get_class(self, ifindex: int, classid: int, target: str) -> Any | None:
        """Return one class's message, or None when it does not exist.

        The kernel replies to a non-dump RTM_GETTCLASS only when NLM_F_ECHO is
        set, because tclass_notify() in net/sched/sch_api.c sends the reply as
        an echo.
        """
        msg = tcmsg()
        msg["family"] = socket.AF_UNSPEC
        msg["index"] = ifindex
        msg["handle"] = classid
        flags = NLM_F_REQUEST | NLM_F_ECHO
        try:
            msgs = self.call(
                "read back", target, self._ipr.nlm_request, msg, RTM_GETTCLASS, flags
            )
        except NetshapeError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return msgs[0] if msgs else None

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self.call("close", "netlink socket", self._close)
            finally:
                self._stop()

    async def _close(self) -> None:
        self._ipr.close()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self._timeout)
        if not self._thread.is_alive():
            self._loop.close()


def _kernel_class(msg: Any) -> KernelClass | None:
    """Return the HTB class in a tc class message, or None for other kinds."""
    if msg.get_attr("TCA_KIND") != "htb":
        return None
    options = msg.get_attr("TCA_OPTIONS")
    parms = options.get_attr("TCA_HTB_PARMS")
    # The 32-bit field contains min(rate, 2**32 - 1), and RATE64 comes above that.
    rate = options.get_attr("TCA_HTB_RATE64") or parms["rate"]
    ceil = options.get_attr("TCA_HTB_CEIL64") or parms["ceil"]
    # buffer and cbuffer are times in psched ticks of 64 ns (PSCHED_SHIFT 6).
    burst = parms["buffer"] * PSCHED_TICK_NS * rate // 10**9
    cburst = parms["cbuffer"] * PSCHED_TICK_NS * ceil // 10**9
    stats = msg.get_attr("TCA_STATS2")
    basic = stats.get_attr("TCA_STATS_BASIC") if stats else None
    queue = stats.get_attr("TCA_STATS_QUEUE") if stats else None
    return KernelClass(
        classid=msg["handle"],
        parent=msg["parent"],
        rate=rate * 8,
        ceil=ceil * 8,
        quantum=parms["quantum"],
        burst=burst,
        cburst=cburst,
        level=parms["level"],
        bytes=basic["bytes"] if basic else 0,
        packets=basic["packets"] if basic else 0,
        drops=queue["drops"] if queue else 0,
        overlimits=queue["overlimits"] if queue else 0,
        backlog=queue["backlog"] if queue else 0,
    )


def _kernel_qdisc(msg: Any) -> KernelQdisc:
    kind = msg.get_attr("TCA_KIND")
    options = msg.get_attr("TCA_OPTIONS") if kind == "htb" else None
    init = options.get_attr("TCA_HTB_INIT") if options else None
    if init is None:
        return KernelQdisc(kind, msg["handle"], None, None, None)
    return KernelQdisc(
        kind, msg["handle"], init["defcls"], init["rate2quantum"], init["direct_pkts"]
    )


def _kernel_filter(msg: Any) -> KernelFilter | None:
    options = msg.get_attr("TCA_OPTIONS")
    if msg.get_attr("TCA_KIND") != "bpf" or options is None:
        return None
    return KernelFilter(
        handle=msg["handle"],
        prio=msg["info"] >> 16,
        protocol=socket.ntohs(msg["info"] & 0xFFFF),
        name=options.get_attr("TCA_BPF_NAME") or "",
        classid=options.get_attr("TCA_BPF_CLASSID") or 0,
        flags=options.get_attr("TCA_BPF_FLAGS") or 0,
    )


# --------------------------------------------------------------------------
# The classifier's map
# --------------------------------------------------------------------------


class Classifier(Protocol):
    """The BPF side: a tc program and its uid -> class id map."""

    prog_fd: int

    def entries(self) -> dict[int, int]: ...

    def lookup(self, uid: int) -> int | None: ...

    def put(self, uid: int, classid: int) -> None: ...

    def delete(self, uid: int) -> None: ...

    def close(self) -> None: ...


class BpfClassifier:
    """classify.bpf.o loaded through broker.bpfobj (libbpf)."""

    def __init__(self, path: Path | None = None):
        from broker.bpfobj import BpfObject, object_path

        self._obj = BpfObject.open(path or object_path(OBJECT_NAME))
        try:
            self.prog_fd = self._obj.program_fd(PROGRAM_NAME)
            self._map = self._obj.map(MAP_NAME)
        except BaseException:
            self._obj.close()
            raise

    def entries(self) -> dict[int, int]:
        out = {}
        for key in list(self._map.keys()):
            value = self._map.lookup(key)
            if value is not None:
                out[_U32.unpack(key)[0]] = _U32.unpack(value)[0]
        return out

    def lookup(self, uid: int) -> int | None:
        value = self._map.lookup(_U32.pack(uid))
        return None if value is None else _U32.unpack(value)[0]

    def put(self, uid: int, classid: int) -> None:
        self._map.update(_U32.pack(uid), _U32.pack(classid))

    def delete(self, uid: int) -> None:
        self._map.delete(_U32.pack(uid))

    def close(self) -> None:
        self._obj.close()


# --------------------------------------------------------------------------
# The shaper
# --------------------------------------------------------------------------


@dataclass
class _Counts:
    added: list[int] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)
    map_writes: int = 0


class Shaper:
    """Keeps one interface's HTB tree, classifier and class map like the policy.

    `netns` names a network namespace (as `ip netns` does) whose interface is
    shaped; None is the daemon's own. `classifier` replaces the bundled BPF
    object, which is otherwise loaded on the first apply().
    """

    def __init__(
        self,
        policy: InterfacePolicy,
        *,
        netns: str | None = None,
        classifier: Classifier | None = None,
        major: int = DEFAULT_MAJOR,
    ):
        check_rates(policy)
        self.policy = policy
        self.major = major
        self.table = ClassTable(policy.name, major)
        self._states: dict[int, str] = {}
        self._warm_rates: dict[int, int] = {}  # planned warm rates, bit/s
        self._classifier = classifier
        self._filter_attached = False  # by this Shaper, with its program
        self._link: Link | None = None  # as found by the last apply()
        self._lock = threading.RLock()
        self._netlink = _Netlink(netns)
        self._warned_oversubscribed = False

    @property
    def interface(self) -> str:
        return self.policy.name

    @property
    def qdisc_handle(self) -> int:
        return make_classid(self.major, 0)

    def set_policy(self, policy: InterfacePolicy) -> None:
        """Use a reloaded policy from the next apply() on."""
        if policy.name != self.policy.name:
            raise ValueError(
                f"policy is for {policy.name}, this shaper shapes {self.policy.name}"
            )
        check_rates(policy)
        with self._lock:
            self.policy = policy
            self._warned_oversubscribed = False

    # ---------------------------------------------------------------- apply

    def apply(self, managed_uids: Iterable[int]) -> ApplyReport:
        """Make the kernel match the policy for these uids; idempotent.

        Every class written is read back and compared in bit/s; a mismatch
        raises NetshapeError. Classes of uids no longer managed are deleted.
        """
        with self._lock:
            started = time.perf_counter()
            writes_before = self._netlink.writes
            self._classifier_ready()  # load BPF before touching the tc tree
            link = self._link = self._netlink.link(self.interface)
            ifindex = link.index
            self.table.sync(managed_uids)
            desired = desired_classes(
                self.policy,
                self.table.assignments(),
                self._states,
                link,
                self.major,
                self._warm_rates,
            )
            self._warn_if_oversubscribed(desired)

            qdisc = self._ensure_qdisc(ifindex)
            counts = _Counts()
            plan = plan_classes(desired, self._our_classes(ifindex))
            counts.map_writes += self._drop_stale_map_entries()
            self._write_classes(ifindex, plan, counts)
            counts.map_writes += self._fill_map()
            self._delete_classes(ifindex, plan.delete, counts)
            attached = self._ensure_filter(ifindex)

            report = ApplyReport(
                interface=self.interface,
                qdisc=qdisc,
                added=tuple(counts.added),
                changed=tuple(counts.changed),
                deleted=tuple(c for c in counts.deleted if c not in desired),
                unchanged=len(plan.keep),
                map_writes=counts.map_writes,
                filter="attached" if attached else "kept",
                netlink_writes=self._netlink.writes - writes_before,
                seconds=time.perf_counter() - started,
            )
            self._log_report(report)
            return report

    def _delete_root_qdisc(self, ifindex: int, target: str) -> None:
        """Delete the broker's HTB root qdisc, and with it every class and filter."""
        self._netlink.write(
            "delete",
            target,
            "del",
            index=ifindex,
            handle=self.qdisc_handle,
            parent=TC_H_ROOT,
        )

    def _ensure_qdisc(self, ifindex: int) -> str:
        """Create the HTB root qdisc, or recreate it when default or r2q differ."""
        root = self._root_qdisc(ifindex)
        target = f"root qdisc {format_handle(self.qdisc_handle)} on {self.interface}"
        if root is not None and root.kind == "htb" and root.handle == self.qdisc_handle:
            if root.defcls == DEFAULT_MINOR and root.r2q == self.policy.r2q:
                return "kept"
            # HTB has no qdisc change operation ("Change operation not supported").
            log.warning(
                "%s: HTB default %s r2q %s differ from default %s r2q %s; recreating the tree",
                self.interface,
                root.defcls,
                root.r2q,
                DEFAULT_MINOR,
                self.policy.r2q,
            )
            self._delete_root_qdisc(ifindex, target)
            self._filter_attached = False
            outcome = "recreated"
        else:
            if root is not None and root.handle != 0:
                log.warning(
                    "%s: replacing root qdisc %s %s",
                    self.interface,
                    root.kind,
                    format_handle(root.handle),
                )
            outcome = "created"
        self._netlink.write(
            "create",
            target,
            "replace",
            "htb",
            ifindex,
            handle=self.qdisc_handle,
            default=DEFAULT_MINOR,
            r2q=self.policy.r2q,
        )
        self._verify_qdisc(ifindex, target)
        self._filter_attached = False
        return outcome

    def _root_qdisc(self, ifindex: int) -> KernelQdisc | None:
        for msg in self._netlink.qdiscs(ifindex, self.interface):
            if msg["parent"] == TC_H_ROOT:
                return _kernel_qdisc(msg)
        return None

    def _verify_qdisc(self, ifindex: int, target: str) -> None:
        root = self._root_qdisc(ifindex)
        found = (
            None if root is None else (root.kind, root.handle, root.defcls, root.r2q)
        )
        expected = ("htb", self.qdisc_handle, DEFAULT_MINOR, self.policy.r2q)
        if found != expected:
            raise NetshapeError(
                "read back",
                target,
                errno.EIO,
                f"kernel reports {found}, expected {expected}",
            )

    def _our_classes(self, ifindex: int) -> dict[int, KernelClass]:
        out = {}
        for msg in self._netlink.classes(ifindex, self.interface):
            found = _kernel_class(msg)
            if found is not None and found.classid >> 16 == self.major:
                out[found.classid] = found
        return out

    def _write_classes(self, ifindex: int, plan: ClassPlan, counts: _Counts) -> None:
        moved = {c.classid for c in plan.delete} & {s.classid for s in plan.add}
        for old in plan.delete:
            if old.classid in moved:
                self._delete_class(ifindex, old, counts)
        for spec in plan.add:
            self._write_class(ifindex, spec, "add-class")
            counts.added.append(spec.classid)
        for spec in plan.change:
            self._write_class(ifindex, spec, "change-class")
            counts.changed.append(spec.classid)

    def _write_class(self, ifindex: int, spec: ClassSpec, command: str) -> None:
        """Write one class (add or change in place) and read it back."""
        target = spec.describe(self.interface)
        parent = self.qdisc_handle if spec.parent == TC_H_ROOT else spec.parent
        self._netlink.write(
            "add" if command == "add-class" else "change",
            target,
            command,
            "htb",
            ifindex,
            handle=spec.classid,
            parent=parent,
            rate=spec.rate // 8,
            ceil=spec.ceil // 8,
            quantum=spec.quantum,
            prio=0,
            burst=spec.burst,
            cburst=spec.cburst,
        )
        self._read_back(ifindex, spec, target)
        log.debug(
            "%s: %s rate %s ceil %s quantum %s",
            target,
            command,
            units.format_rate(spec.rate),
            units.format_rate(spec.ceil),
            spec.quantum,
        )

    def _read_back(self, ifindex: int, spec: ClassSpec, target: str) -> KernelClass:
        msg = self._netlink.get_class(ifindex, spec.classid, target)
        found = None if msg is None else _kernel_class(msg)
        if found is None:
            raise NetshapeError(
                "read back",
                target,
                errno.ENOENT,
                "the class is missing after the write",
            )
        differences = class_differences(spec, found)
        if differences:
            raise NetshapeError(
                "read back",
                target,
                errno.EIO,
                "kernel differs from what was written: " + ", ".join(differences),
            )
        return found

    def _delete_classes(
        self, ifindex: int, stale: Iterable[KernelClass], counts: _Counts
    ) -> None:
        for old in stale:
            if old.classid not in counts.deleted:
                self._delete_class(ifindex, old, counts)

    def _delete_class(self, ifindex: int, old: KernelClass, counts: _Counts) -> None:
        target = f"class {format_handle(old.classid)} on {self.interface}"
        self._netlink.write(
            "delete", target, "del-class", index=ifindex, handle=old.classid
        )
        if self._netlink.get_class(ifindex, old.classid, target) is not None:
            raise NetshapeError(
                "read back",
                target,
                errno.EIO,
                "the class still exists after the delete",
            )
        counts.deleted.append(old.classid)
        log.debug("%s: deleted", target)

    # ------------------------------------------------------ classifier map

    def _classifier_ready(self) -> Classifier:
        if self._classifier is None:
            self._classifier = BpfClassifier()
        return self._classifier

    def _drop_stale_map_entries(self) -> int:
        """Delete map entries of uids no longer managed or with a new class."""
        classifier = self._classifier_ready()
        expected = self.table.assignments()
        writes = 0
        for uid, classid in classifier.entries().items():
            if expected.get(uid) != classid:
                classifier.delete(uid)
                writes += 1
        return writes

    def _fill_map(self) -> int:
        """Put every managed uid's class id into the map and read it back."""
        classifier = self._classifier_ready()
        current = classifier.entries()
        writes = 0
        for uid, classid in self.table.assignments().items():
            if current.get(uid) == classid:
                continue
            classifier.put(uid, classid)
            writes += 1
            found = classifier.lookup(uid)
            if found != classid:
                raise NetshapeError(
                    "read back",
                    f"{MAP_NAME}[{uid}] for {self.interface}",
                    errno.EIO,
                    f"map holds {found}, expected {format_handle(classid)}",
                )
        return writes

    def _ensure_filter(self, ifindex: int) -> bool:
        """Attach the classifier unless this Shaper's filter is in place."""
        if self._filter_attached and self._find_filter(ifindex) is not None:
            return False
        classifier = self._classifier_ready()
        target = f"bpf filter {FILTER_NAME} on {self.interface}"
        self._netlink.write(
            "attach",
            target,
            "replace-filter",
            "bpf",
            ifindex,
            handle=FILTER_HANDLE,
            parent=self.qdisc_handle,
            prio=FILTER_PRIO,
            protocol=ETH_P_ALL,
            fd=classifier.prog_fd,
            name=FILTER_NAME,
            direct_action=True,
            classid=self.qdisc_handle,
        )
        found = self._find_filter(ifindex)
        if found is None:
            raise NetshapeError(
                "read back",
                target,
                errno.ENOENT,
                "the filter is missing after the write",
            )
        self._filter_attached = True
        log.info("%s: attached BPF classifier %s", self.interface, PROGRAM_NAME)
        return True

    def _find_filter(self, ifindex: int) -> KernelFilter | None:
        """Return the broker's filter if it has the expected settings."""
        for msg in self._netlink.filters(ifindex, self.qdisc_handle, self.interface):
            found = _kernel_filter(msg)
            if (
                found is not None
                and found.name == FILTER_NAME
                and found.handle == FILTER_HANDLE
                and found.prio == FILTER_PRIO
                and found.classid == self.qdisc_handle
                and found.flags & TCA_BPF_FLAG_ACT_DIRECT
            ):
                return found
        return None

    # ----------------------------------------------------------- warm boost

    def set_user_state(self, uid: int, tier: str | None) -> bool:
        """Give uid the warm tier's rates while a slot is busy; None drops back.

        The daemon passes the tier of each slot it activates, and None when
        the user's last slot is reclaimed. While a user is in one tier, a
        tier with lower rates on this interface does not replace it, so a
        light slot that becomes busy next to a heavy one keeps the heavy
        rates. A tier without rates here leaves the idle user rates. Returns
        True when the kernel class changed. For a uid that apply() has not
        given a class yet, the state is kept for the next apply().
        """
        with self._lock:
            if tier is None:
                self._states.pop(uid, None)
            else:
                self._states[uid] = self._stronger_tier(self._states.get(uid), tier)
                tier = self._states[uid]
            classid = self.table.classid(uid)
            if classid is None or self._link is None:
                log.debug(
                    "%s: uid %s has no class yet; state %s kept",
                    self.interface,
                    uid,
                    tier,
                )
                return False
            return self._update_user_class(uid, classid, tier)

    def set_warm_rates(self, rates: Mapping[int, int]) -> None:
        """Use planned warm rates (bit/s per uid) from the next class update on."""
        with self._lock:
            self._warm_rates = dict(rates)

    def _stronger_tier(self, current: str | None, new: str) -> str:
        """Return the tier with the higher (rate, ceil) on this interface."""

        def strength(tier: str | None) -> tuple[int, int]:
            rates, _ = user_rates(self.policy, tier)
            return rates.rate, rates.ceil

        return new if current is None or strength(new) > strength(current) else current

    def _update_user_class(self, uid: int, classid: int, tier: str | None) -> bool:
        link = self._link
        assert link is not None  # set_user_state() checked it
        ifindex = link.index
        spec = desired_classes(
            self.policy,
            {uid: classid},
            self._states,
            link,
            self.major,
            self._warm_rates,
        )[classid]
        target = spec.describe(self.interface)
        msg = self._netlink.get_class(ifindex, classid, target)
        found = None if msg is None else _kernel_class(msg)
        if found is not None and not class_differences(spec, found):
            return False
        self._write_class(
            ifindex, spec, "add-class" if found is None else "change-class"
        )
        old = (
            "missing"
            if found is None
            else f"rate {units.format_rate(found.rate)} ceil {units.format_rate(found.ceil)}"
        )
        log.info(
            "%s: %s -> rate %s ceil %s (%s)",
            target,
            old,
            units.format_rate(spec.rate),
            units.format_rate(spec.ceil),
            f"warm tier {tier}" if spec.tier else "idle",
        )
        return True

    # --------------------------------------------------------------- status

    def stats(self) -> list[ClassStats]:
        """Return every class of the broker's tree with its kernel counters."""
        with self._lock:
            ifindex = self._netlink.link(self.interface).index
            rows = []
            for found in self._our_classes(ifindex).values():
                rows.append(self._stats_row(found))
            return sorted(rows, key=lambda row: row.classid)

    def _stats_row(self, found: KernelClass) -> ClassStats:
        minor = found.classid & 0xFFFF
        uid = self.table.uid_of(found.classid)
        role = {ROOT_MINOR: "root", DEFAULT_MINOR: "default"}.get(
            minor, "user" if uid is not None else "unknown"
        )
        _, tier = (
            user_rates(self.policy, self._states.get(uid))
            if uid is not None
            else (None, None)
        )
        return ClassStats(
            self.interface,
            found.classid,
            role,
            uid,
            tier,
            found.rate,
            found.ceil,
            found.bytes,
            found.packets,
            found.drops,
            found.overlimits,
            found.backlog,
        )

    def direct_packets(self) -> int | None:
        """Return packets HTB sent unshaped through its direct queue, or None."""
        with self._lock:
            ifindex = self._netlink.link(self.interface).index
            root = self._root_qdisc(ifindex)
            if root is None or root.kind != "htb" or root.handle != self.qdisc_handle:
                return None
            return root.direct_packets

    # ----------------------------------------------------------------- stop

    def remove(self) -> None:
        """Delete the root qdisc, which takes its classes and the filter along."""
        with self._lock:
            try:
                ifindex = self._netlink.link(self.interface).index
            except NetshapeError as exc:
                if exc.errno in (errno.ENODEV, errno.ENOENT):
                    log.info("%s: interface is gone; nothing to remove", self.interface)
                    return
                raise
            target = (
                f"root qdisc {format_handle(self.qdisc_handle)} on {self.interface}"
            )
            root = self._root_qdisc(ifindex)
            if (
                root is not None
                and root.kind == "htb"
                and root.handle == self.qdisc_handle
            ):
                self._delete_root_qdisc(ifindex, target)
                root = self._root_qdisc(ifindex)
                if root is not None and root.handle == self.qdisc_handle:
                    raise NetshapeError(
                        "read back",
                        target,
                        errno.EIO,
                        "the qdisc still exists after the delete",
                    )
                log.info("%s: removed HTB tree and classifier", self.interface)
            self._clear_map()
            self.table.sync(())
            self._filter_attached = False
            self._link = None

    def _clear_map(self) -> None:
        if self._classifier is not None:
            for uid in self._classifier.entries():
                self._classifier.delete(uid)

    def close(self) -> None:
        """Close the netlink socket and the BPF object; the tree stays."""
        with self._lock:
            self._netlink.close()
            if self._classifier is not None:
                self._classifier.close()
                self._classifier = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -------------------------------------------------------------- logging

    def _warn_if_oversubscribed(self, desired: Mapping[int, ClassSpec]) -> None:
        guaranteed = sum(s.rate for s in desired.values() if s.role != "root")
        if guaranteed > self.policy.link_rate and not self._warned_oversubscribed:
            log.warning(
                "%s: guaranteed rates add up to %s, above the link rate %s; "
                "HTB cannot honour every guarantee at once",
                self.interface,
                units.format_rate(guaranteed),
                units.format_rate(self.policy.link_rate),
            )
            self._warned_oversubscribed = True

    def _log_report(self, report: ApplyReport) -> None:
        if report.writes == 0:
            log.debug("%s: tc tree already matches the policy", self.interface)
            return
        log.info(
            "%s: qdisc %s, %d class(es) added, %d changed, %d deleted, %d unchanged, "
            "%d map write(s), filter %s, %.3f s",
            self.interface,
            report.qdisc,
            len(report.added),
            len(report.changed),
            len(report.deleted),
            report.unchanged,
            report.map_writes,
            report.filter,
            report.seconds,
        )


# --------------------------------------------------------------------------
# Every interface of a policy
# --------------------------------------------------------------------------


class ShaperGroup:
    """One Shaper per shaped interface of the policy, driven together.

    An error on one interface is logged and does not stop the others:
    apply() raises the first error after it has tried every interface, and
    set_user_state(), which runs on the daemon's event path, only logs.
    """

    def __init__(
        self, interfaces: Iterable[InterfacePolicy], *, netns: str | None = None
    ):
        self._netns = netns
        self.shapers: dict[str, Shaper] = {}
        self.set_policy(interfaces)

    def set_policy(self, interfaces: Iterable[InterfacePolicy]) -> None:
        """Follow a reloaded policy: add, update and remove interfaces.

        An interface that left the policy loses its tree at once. The others
        use their new rates from the next apply().
        """
        wanted = {iface.name: iface for iface in interfaces}
        for name in [n for n in self.shapers if n not in wanted]:
            shaper = self.shapers.pop(name)
            log.info("%s: no longer in the policy; removing its tc tree", name)
            try:
                shaper.remove()
            finally:
                shaper.close()
        for name, iface in wanted.items():
            if name in self.shapers:
                self.shapers[name].set_policy(iface)
            else:
                self.shapers[name] = Shaper(iface, netns=self._netns)

    def apply(self, managed_uids: Iterable[int]) -> list[ApplyReport]:
        """Run apply() on every interface; raise the first error at the end."""
        uids = list(managed_uids)
        reports, errors = [], []
        for name, shaper in self.shapers.items():
            try:
                reports.append(shaper.apply(uids))
            except BrokerError as exc:
                log.error("%s: apply failed: %s", name, exc)
                errors.append(exc)
        if errors:
            raise errors[0]
        return reports

    def set_user_state(self, uid: int, tier: str | None) -> None:
        """Run set_user_state() on every interface; log errors, raise none."""
        for name, shaper in self.shapers.items():
            try:
                shaper.set_user_state(uid, tier)
            except BrokerError as exc:
                log.error("%s: rates of uid %s for tier %s: %s", name, uid, tier, exc)

    def set_warm_rates(self, rates: Mapping[int, int]) -> None:
        for shaper in self.shapers.values():
            shaper.set_warm_rates(rates)

    def stats(self) -> list[ClassStats]:
        rows: list[ClassStats] = []
        for shaper in self.shapers.values():
            rows.extend(shaper.stats())
        return rows

    def remove(self) -> None:
        """Remove every interface's tree; raise the first error at the end."""
        errors = []
        for name, shaper in self.shapers.items():
            try:
                shaper.remove()
            except BrokerError as exc:
                log.error("%s: removing the tc tree failed: %s", name, exc)
                errors.append(exc)
        if errors:
            raise errors[0]

    def close(self) -> None:
        for shaper in self.shapers.values():
            shaper.close()
        self.shapers.clear()
