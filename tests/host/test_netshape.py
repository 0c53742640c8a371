"""Shaper against the real kernel: HTB tree, BPF classifier and traffic.

Each test creates two network namespaces joined by a veth pair, shapes the
veth end in the first one and sends TCP traffic from there to a receiver in
the second one. Senders are Python processes that drop to a test uid before
they open their socket, so the socket's owner uid is that uid. The kernel's
state is read back through iproute2's tc, parsed by the test itself, and
the classifier's map through libbpf's syscall wrappers, never through the
code under test.

Needs root (network namespaces, BPF) and `make bpf`. Skips otherwise, except
with CI=true, where a missing precondition fails the run.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from broker.errors import NetshapeError
from broker.netshape import Shaper, ShaperGroup
from broker.policy import ClassRates, InterfacePolicy, load_texts
from tests.tcshow import TcClass, parse_classes, parse_qdiscs

OBJECT = Path(__file__).resolve().parents[2] / "broker" / "bpf" / "classify.bpf.o"
USER_A, USER_B, USER_C = 61001, 61002, 61003
SPAN = 0xFFFE - 0x10 + 1  # user minors, see ClassTable
MBIT = 10**6


def _require(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI runs host tests, but {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _preconditions() -> None:
    _require(os.geteuid() == 0, "host tests need root (network namespaces, BPF)")
    _require(OBJECT.is_file(), f"{OBJECT} is missing; run `make bpf`")


# --------------------------------------------------------------------------
# Namespaces, tc and BPF maps
# --------------------------------------------------------------------------

_serial = itertools.count(1)


@dataclass(frozen=True)
class NetPair:
    """Namespace `shaped` contains `dev`, whose peer in `peer_ns` has `peer_addr`."""

    shaped: str
    peer_ns: str
    dev: str
    addr: str
    peer_addr: str


def run(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


@pytest.fixture
def pair() -> Iterator[NetPair]:
    serial = next(_serial)
    tag = f"{os.getpid() % 100000}x{serial}"
    net = NetPair(
        f"bnsA{tag}",
        f"bnsB{tag}",
        f"bsh{tag}"[:15],
        f"10.251.{serial % 250}.1",
        f"10.251.{serial % 250}.2",
    )
    try:
        run("ip", "netns", "add", net.shaped)
        run("ip", "netns", "add", net.peer_ns)
        for ns in (net.shaped, net.peer_ns):
            # Without IPv6 the kernel sends nothing of its own (MLD reports,
            # router solicitations) after link-up. Such a packet in the instant
            # between a new qdisc and its default class would go direct.
            run(
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            )
        run(
            "ip",
            "-n",
            net.shaped,
            "link",
            "add",
            net.dev,
            "type",
            "veth",
            "peer",
            "name",
            "peer0",
            "netns",
            net.peer_ns,
        )
        run("ip", "-n", net.shaped, "addr", "add", f"{net.addr}/24", "dev", net.dev)
        run(
            "ip",
            "-n",
            net.peer_ns,
            "addr",
            "add",
            f"{net.peer_addr}/24",
            "dev",
            "peer0",
        )
        for ns, dev in (
            (net.shaped, net.dev),
            (net.peer_ns, "peer0"),
            (net.shaped, "lo"),
            (net.peer_ns, "lo"),
        ):
            run("ip", "-n", ns, "link", "set", dev, "up")
        yield net
    finally:
        # Deleting a namespace deletes the veth pair inside it.
        run("ip", "netns", "del", net.shaped, check=False)
        run("ip", "netns", "del", net.peer_ns, check=False)


@pytest.fixture
def shapers() -> Iterator[list[Shaper]]:
    """Shapers that a test made; closed before its namespaces are deleted."""
    made: list[Shaper] = []
    yield made
    for shaper in made:
        shaper.close()


IDLE = ClassRates(5 * MBIT, 20 * MBIT)
UNMANAGED = ClassRates(10 * MBIT, 1000 * MBIT)


def iface_policy(
    dev: str,
    link: int = 1000 * MBIT,
    user: ClassRates = IDLE,
    default: ClassRates = UNMANAGED,
    tiers: tuple[tuple[str, ClassRates], ...] = (),
    r2q: int = 10,
) -> InterfacePolicy:
    return InterfacePolicy(dev, link, default, user, tiers, r2q)


def new_shaper(made: list[Shaper], net: NetPair, policy: InterfacePolicy) -> Shaper:
    shaper = Shaper(policy, netns=net.shaped)
    made.append(shaper)
    return shaper


def tc(net: NetPair, *args: str) -> str:
    return run("tc", "-n", net.shaped, *args, "dev", net.dev)


def classes(net: NetPair) -> dict[str, TcClass]:
    return parse_classes(tc(net, "-s", "class", "show"))


def htb_root(net: NetPair) -> dict[str, str]:
    roots = [
        q for q in parse_qdiscs(tc(net, "-s", "qdisc", "show")) if q.parent == "root"
    ]
    assert len(roots) == 1, f"expected one root qdisc, found {roots}"
    assert roots[0].kind == "htb", f"root qdisc is {roots[0].kind}"
    return roots[0].fields


def home_handle(uid: int) -> str:
    """The class ClassTable documents for a uid without collisions."""
    return f"1:{0x10 + uid % SPAN:x}"


def classifier_map(net: NetPair) -> dict[int, int]:
    """Return uid -> class id from the BPF map of the attached filter."""
    filters = tc(net, "filter", "show", "parent", "1:")
    ids = re.findall(r"direct-action.* id (\d+) name classify_uid", filters)
    assert len(ids) == 1, f"expected one classify_uid filter:\n{filters}"
    return read_prog_map(int(ids[0]))


# struct bpf_prog_info in linux/bpf.h, up to map_ids.
_PROG_INFO = struct.Struct("=II8sIIQQQIIQ")


def read_prog_map(prog_id: int) -> dict[int, int]:
    """Return the u32 -> u32 entries of the one map of a loaded BPF program.

    Goes through libbpf's thin syscall wrappers (libbpf.so.1), not through
    the broker's loader, so that the test reads the kernel independently.
    """
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    prog_fd = lib.bpf_prog_get_fd_by_id(ctypes.c_uint32(prog_id))
    assert prog_fd >= 0, f"bpf_prog_get_fd_by_id({prog_id}) failed"
    try:
        map_ids = (ctypes.c_uint32 * 1)()
        request = _PROG_INFO.pack(
            0, 0, b"", 0, 0, 0, 0, 0, 0, 1, ctypes.addressof(map_ids)
        )
        info = ctypes.create_string_buffer(request, len(request))
        length = ctypes.c_uint32(_PROG_INFO.size)
        assert lib.bpf_obj_get_info_by_fd(prog_fd, info, ctypes.byref(length)) == 0
        assert _PROG_INFO.unpack(info.raw)[9] == 1, "expected one map"
    finally:
        os.close(prog_fd)
    map_fd = lib.bpf_map_get_fd_by_id(ctypes.c_uint32(map_ids[0]))
    assert map_fd >= 0, f"bpf_map_get_fd_by_id({map_ids[0]}) failed"
    try:
        return _map_entries(lib, map_fd)
    finally:
        os.close(map_fd)


def _map_entries(lib: ctypes.CDLL, map_fd: int) -> dict[int, int]:
    entries = {}
    key, following, value = ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_uint32()
    previous = None
    while lib.bpf_map_get_next_key(map_fd, previous, ctypes.byref(following)) == 0:
        key.value = following.value
        assert (
            lib.bpf_map_lookup_elem(map_fd, ctypes.byref(key), ctypes.byref(value)) == 0
        )
        entries[key.value] = value.value
        previous = ctypes.byref(key)
    return entries


# --------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------

# Drops to the uid before the socket exists, so the socket belongs to it.
SENDER = r"""
import json, os, socket, sys, time
uid, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
seconds, limit = float(sys.argv[4]), int(sys.argv[5])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 131072)
sock.settimeout(20)
sock.connect((host, port))
chunk = b"x" * 65536
sent, deadline = 0, time.monotonic() + seconds
while sent < limit and time.monotonic() < deadline:
    sent += sock.send(chunk[: limit - sent])
sock.shutdown(socket.SHUT_WR)
sock.recv(1)
print(json.dumps({"uid": uid, "port": sock.getsockname()[1], "sent": sent}))
"""

# Serves each connection in its own thread, so no sender waits for another.
RECEIVER = r"""
import json, socket, sys, threading, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((host, port))
server.listen(16)
server.settimeout(30)
print("ready", flush=True)
def serve(conn, peer):
    total, first, last = 0, None, None
    while True:
        data = conn.recv(262144)
        if not data:
            break
        last = time.monotonic()
        first = first or last
        total += len(data)
    conn.close()
    print(json.dumps({"port": peer[1], "bytes": total, "first": first, "last": last}), flush=True)
for _ in range(count):
    conn, peer = server.accept()
    threading.Thread(target=serve, args=(conn, peer)).start()
"""


@dataclass(frozen=True)
class Flow:
    uid: int
    bytes: int  # received
    seconds: float  # first to last received byte

    @property
    def bits_per_second(self) -> float:
        return self.bytes * 8 / self.seconds if self.seconds else 0.0


def transfer(
    net: NetPair, flows: list[tuple[int, float, int]], port: int = 5201
) -> dict[int, Flow]:
    """Run one sender per (uid, seconds, byte limit) at once; return flows by uid."""
    receiver = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            net.peer_ns,
            sys.executable,
            "-c",
            RECEIVER,
            net.peer_addr,
            str(port),
            str(len(flows)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        senders = [
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    net.shaped,
                    sys.executable,
                    "-c",
                    SENDER,
                    str(uid),
                    net.peer_addr,
                    str(port),
                    str(seconds),
                    str(limit),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for uid, seconds, limit in flows
        ]
        by_port = {}
        for sender in senders:
            out, err = sender.communicate(timeout=60)
            assert sender.returncode == 0, f"sender failed: {err}"
            record = json.loads(out)
            by_port[record["port"]] = record["uid"]
        out, err = receiver.communicate(timeout=60)
        assert receiver.returncode == 0, f"receiver failed: {err}"
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    result = {}
    for line in out.splitlines():
        record = json.loads(line)
        uid = by_port[record["port"]]
        result[uid] = Flow(uid, record["bytes"], record["last"] - record["first"])
    return result


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_traffic_lands_in_user_classes(pair: NetPair, shapers: list[Shaper]) -> None:
    policy = iface_policy(pair.dev, user=ClassRates(100 * MBIT, 1000 * MBIT))
    shaper = new_shaper(shapers, pair, policy)
    shaper.apply([USER_A, USER_B])
    sizes = {USER_A: 3_000_000, USER_B: 1_000_000, USER_C: 2_000_000}

    flows = transfer(pair, [(uid, 30.0, size) for uid, size in sizes.items()])

    for uid, size in sizes.items():
        assert flows[uid].bytes == size, f"uid {uid} delivered {flows[uid].bytes}"
    found = classes(pair)
    a, b, default = found[home_handle(USER_A)], found[home_handle(USER_B)], found["1:2"]
    # Class bytes include TCP/IP and Ethernet headers: about 4.6% at MSS 1448.
    assert sizes[USER_A] <= a.sent_bytes <= sizes[USER_A] * 1.1
    assert sizes[USER_B] <= b.sent_bytes <= sizes[USER_B] * 1.1
    assert sizes[USER_C] <= default.sent_bytes <= sizes[USER_C] * 1.1 + 20_000
    assert htb_root(pair)["direct_packets_stat"] == "0"


def test_stats_match_tc(pair: NetPair, shapers: list[Shaper]) -> None:
    policy = iface_policy(pair.dev, user=ClassRates(100 * MBIT, 1000 * MBIT))
    shaper = new_shaper(shapers, pair, policy)
    shaper.apply([USER_A, USER_B])
    transfer(pair, [(USER_A, 30.0, 700_000)])

    rows = {row.handle: row for row in shaper.stats()}
    found = classes(pair)
    direct = shaper.direct_packets()

    assert sorted(rows) == sorted(found)
    for handle, row in rows.items():
        assert (row.rate, row.ceil) == (found[handle].rate, found[handle].ceil)
    for uid in (USER_A, USER_B):
        row, tc_row = rows[home_handle(uid)], found[home_handle(uid)]
        assert row.uid == uid
        assert row.role == "user"
        assert (row.bytes, row.packets) == (tc_row.sent_bytes, tc_row.sent_packets)
        assert row.drops == tc_row.dropped
    assert rows[home_handle(USER_A)].bytes >= 700_000
    assert (rows["1:1"].role, rows["1:2"].role) == ("root", "default")
    assert direct == int(htb_root(pair)["direct_packets_stat"])
    assert json.dumps(rows[home_handle(USER_A)].as_dict())


def test_classifier_map_matches_classes(pair: NetPair, shapers: list[Shaper]) -> None:
    shaper = new_shaper(shapers, pair, iface_policy(pair.dev))
    shaper.apply([USER_A, USER_B])

    entries = classifier_map(pair)

    assert entries == {
        USER_A: 0x10000 | (0x10 + USER_A % SPAN),
        USER_B: 0x10000 | (0x10 + USER_B % SPAN),
    }
    found = classes(pair)
    for uid in (USER_A, USER_B):
        assert found[home_handle(uid)].parent == "1:1"


def test_ceil_holds_under_contention(pair: NetPair, shapers: list[Shaper]) -> None:
    policy = iface_policy(
        pair.dev,
        link=200 * MBIT,
        user=ClassRates(5 * MBIT, 20 * MBIT),
        default=ClassRates(10 * MBIT, 200 * MBIT),
        tiers=(("heavy", ClassRates(20 * MBIT, 200 * MBIT)),),
    )
    shaper = new_shaper(shapers, pair, policy)
    shaper.apply([USER_A, USER_B])
    shaper.set_user_state(USER_B, "heavy")
    # HTB lends spare rate in proportion to quantum (rate / r2q): uid A's
    # share of the spare 175 mbit is above 20 mbit, so its ceil binds.

    flows = transfer(pair, [(USER_A, 4.0, 10**9), (USER_B, 4.0, 10**9)])

    limited, unlimited = flows[USER_A], flows[USER_B]
    print(
        f"\nuid {USER_A} under a 20 mbit ceil: {limited.bits_per_second / MBIT:.2f} mbit/s "
        f"over {limited.seconds:.1f} s; uid {USER_B} (ceil 200 mbit) alongside: "
        f"{unlimited.bits_per_second / MBIT:.2f} mbit/s"
    )
    assert limited.seconds > 3.0
    # Goodput excludes headers, so it stays a little under the class rate.
    assert limited.bits_per_second <= 20 * MBIT * 1.05
    assert limited.bits_per_second >= 20 * MBIT * 0.8
    assert unlimited.bits_per_second > 100 * MBIT
    assert htb_root(pair)["direct_packets_stat"] == "0"


def test_warm_tier_raises_and_drops_rate(pair: NetPair, shapers: list[Shaper]) -> None:
    heavy = ClassRates(80 * MBIT, 200 * MBIT)
    policy = iface_policy(pair.dev, tiers=(("heavy", heavy),))
    shaper = new_shaper(shapers, pair, policy)
    shaper.apply([USER_A, USER_B])
    handle = home_handle(USER_A)

    assert shaper.set_user_state(USER_A, "heavy") is True
    boosted = classes(pair)[handle]
    assert shaper.set_user_state(USER_A, "heavy") is False
    assert shaper.set_user_state(USER_A, None) is True
    idle = classes(pair)[handle]

    assert (boosted.rate, boosted.ceil) == (80 * MBIT, 200 * MBIT)
    assert (idle.rate, idle.ceil) == (5 * MBIT, 20 * MBIT)
    assert classes(pair)[home_handle(USER_B)].rate == 5 * MBIT


def test_weaker_tier_keeps_stronger(pair: NetPair, shapers: list[Shaper]) -> None:
    tiers = (
        ("light", ClassRates(10 * MBIT, 50 * MBIT)),
        ("heavy", ClassRates(80 * MBIT, 200 * MBIT)),
    )
    shaper = new_shaper(shapers, pair, iface_policy(pair.dev, tiers=tiers))
    shaper.apply([USER_A])
    handle = home_handle(USER_A)

    shaper.set_user_state(USER_A, "heavy")
    changed = shaper.set_user_state(USER_A, "light")
    kept = classes(pair)[handle]
    shaper.set_user_state(USER_A, None)
    shaper.set_user_state(USER_A, "light")
    light = classes(pair)[handle]

    assert changed is False
    assert (kept.rate, kept.ceil) == (80 * MBIT, 200 * MBIT)
    assert (light.rate, light.ceil) == (10 * MBIT, 50 * MBIT)


def test_group_follows_policy(pair: NetPair) -> None:
    second = "bsh2" + pair.dev[3:]
    run(
        "ip",
        "-n",
        pair.shaped,
        "link",
        "add",
        second,
        "type",
        "veth",
        "peer",
        "name",
        "peer1",
        "netns",
        pair.peer_ns,
    )
    heavy = (("heavy", ClassRates(80 * MBIT, 200 * MBIT)),)
    first_policy = iface_policy(pair.dev, tiers=heavy)
    group = ShaperGroup([first_policy, iface_policy(second)], netns=pair.shaped)
    try:
        reports = group.apply([USER_A])
        group.set_policy([first_policy])
        group.set_user_state(USER_A, "heavy")
        rows = group.stats()
        group.remove()
    finally:
        group.close()

    second_qdiscs = run("tc", "-n", pair.shaped, "qdisc", "show", "dev", second)
    assert [r.interface for r in reports] == [pair.dev, second]
    assert "htb" not in second_qdiscs
    assert "htb" not in tc(pair, "qdisc", "show")
    boosted = [r for r in rows if r.uid == USER_A]
    assert [(r.interface, r.tier, r.rate) for r in boosted] == [
        (pair.dev, "heavy", 80 * MBIT)
    ]


def test_second_apply_is_noop(pair: NetPair, shapers: list[Shaper]) -> None:
    shaper = new_shaper(shapers, pair, iface_policy(pair.dev))
    shaper.apply([USER_A, USER_B])
    before = tc(pair, "class", "show")

    report = shaper.apply([USER_A, USER_B])

    assert report.writes == 0
    assert report.qdisc == "kept"
    assert tc(pair, "class", "show") == before


def test_new_shaper_adopts_tree(pair: NetPair, shapers: list[Shaper]) -> None:
    policy = iface_policy(pair.dev)
    first = new_shaper(shapers, pair, policy)
    first.apply([USER_A, USER_B])
    first.close()
    before = tc(pair, "class", "show")

    report = new_shaper(shapers, pair, policy).apply([USER_A, USER_B])

    assert report.qdisc == "kept"
    assert (report.added, report.changed, report.deleted) == ((), (), ())
    assert report.filter == "attached"
    assert tc(pair, "class", "show") == before
    assert set(classifier_map(pair)) == {USER_A, USER_B}


def test_rate_change_in_place(pair: NetPair, shapers: list[Shaper]) -> None:
    policy = iface_policy(pair.dev)
    shaper = new_shaper(shapers, pair, policy)
    shaper.apply([USER_A, USER_B])

    shaper.set_policy(replace(policy, user=ClassRates(8 * MBIT, 30 * MBIT)))
    report = shaper.apply([USER_A, USER_B])

    found = classes(pair)
    assert len(report.changed) == 2
    assert report.added == ()
    for uid in (USER_A, USER_B):
        assert (found[home_handle(uid)].rate, found[home_handle(uid)].ceil) == (
            8 * MBIT,
            30 * MBIT,
        )


def test_removed_user_class_deleted(pair: NetPair, shapers: list[Shaper]) -> None:
    shaper = new_shaper(shapers, pair, iface_policy(pair.dev))
    shaper.apply([USER_A, USER_B])

    shaper.apply([USER_B])

    found = classes(pair)
    assert home_handle(USER_A) not in found
    assert home_handle(USER_B) in found
    assert classifier_map(pair) == {USER_B: 0x10000 | (0x10 + USER_B % SPAN)}


def test_rate_above_32_bits(pair: NetPair, shapers: list[Shaper]) -> None:
    # 40 gbit/s is 5e9 bytes/s, above the 32-bit field's 4294967295 bytes/s.
    policy = iface_policy(
        pair.dev,
        link=100_000 * MBIT,
        user=ClassRates(36_000 * MBIT, 40_000 * MBIT),
        default=ClassRates(10 * MBIT, 100_000 * MBIT),
    )
    shaper = new_shaper(shapers, pair, policy)

    shaper.apply([USER_A])

    found = classes(pair)
    assert found[home_handle(USER_A)].rate == 36_000 * MBIT
    assert found[home_handle(USER_A)].ceil == 40_000 * MBIT
    assert found["1:1"].rate == 100_000 * MBIT


def test_bytes_and_bits_units(pair: NetPair, shapers: list[Shaper]) -> None:
    text = f"""
tiers:
  light: {{cpu.weight: 100, memory.min: 0}}
users:
  - uid: {USER_A}
    pool: {{light: 1}}
network:
  interfaces:
    - name: {pair.dev}
      link_rate: 100mbit
      default: {{rate: 600kbps, ceil: 100mbit}}
      user: {{rate: 600Kbit, ceil: 10mbit}}
"""
    (iface,) = load_texts([("units.yaml", text)]).interfaces
    shaper = new_shaper(shapers, pair, iface)

    shaper.apply([USER_A])

    found = classes(pair)
    assert found["1:2"].rate == 4_800_000  # 600 kbytes/s
    assert found[home_handle(USER_A)].rate == 600_000


def test_default_class_exists(pair: NetPair, shapers: list[Shaper]) -> None:
    shaper = new_shaper(shapers, pair, iface_policy(pair.dev))
    shaper.apply([])
    assert htb_root(pair)["default"] == "0x2"
    tc(pair, "class", "del", "classid", "1:2")

    report = shaper.apply([])
    flows = transfer(pair, [(USER_C, 30.0, 500_000)])

    assert report.added == (0x10002,)
    assert htb_root(pair)["default"] == "0x2"
    assert classes(pair)["1:2"].sent_bytes >= flows[USER_C].bytes
    assert htb_root(pair)["direct_packets_stat"] == "0"


def test_foreign_root_qdisc_replaced(pair: NetPair, shapers: list[Shaper]) -> None:
    run(
        "tc",
        "-n",
        pair.shaped,
        "qdisc",
        "add",
        "dev",
        pair.dev,
        "root",
        "handle",
        "5:",
        "tbf",
        "rate",
        "1mbit",
        "burst",
        "10kb",
        "latency",
        "50ms",
    )
    shaper = new_shaper(shapers, pair, iface_policy(pair.dev))

    report = shaper.apply([USER_A])

    assert report.qdisc == "created"
    assert htb_root(pair)["default"] == "0x2"


def test_r2q_change_recreates_qdisc(pair: NetPair, shapers: list[Shaper]) -> None:
    policy = iface_policy(pair.dev)
    shaper = new_shaper(shapers, pair, policy)
    shaper.apply([USER_A])

    shaper.set_policy(replace(policy, r2q=20))
    report = shaper.apply([USER_A])

    assert report.qdisc == "recreated"
    assert htb_root(pair)["r2q"] == "20"
    assert home_handle(USER_A) in classes(pair)
    assert USER_A in classifier_map(pair)


def test_600_users_apply(pair: NetPair, shapers: list[Shaper]) -> None:
    uids = list(range(20000, 20600))
    shaper = new_shaper(shapers, pair, iface_policy(pair.dev, link=10_000 * MBIT))

    started = time.perf_counter()
    first = shaper.apply(uids)
    elapsed = time.perf_counter() - started
    before = tc(pair, "class", "show")
    second = shaper.apply(uids)

    print(f"\n600-user apply: {elapsed:.2f} s, no-op apply: {second.seconds:.3f} s")
    assert len(first.added) == 602
    assert len(parse_classes(before)) == 602
    assert second.writes == 0
    assert tc(pair, "class", "show") == before
    assert len(classifier_map(pair)) == 600


def test_remove_clears_tree(pair: NetPair, shapers: list[Shaper]) -> None:
    shaper = new_shaper(shapers, pair, iface_policy(pair.dev))
    shaper.apply([USER_A, USER_B])

    shaper.remove()

    kinds = [q.kind for q in parse_qdiscs(tc(pair, "qdisc", "show"))]
    assert "htb" not in kinds
    assert tc(pair, "class", "show").strip() == ""
    assert tc(pair, "filter", "show").strip() == ""


def test_missing_interface_error(pair: NetPair, shapers: list[Shaper]) -> None:
    shaper = new_shaper(shapers, pair, iface_policy("bshnosuchdev"))

    with pytest.raises(NetshapeError) as caught:
        shaper.apply([USER_A])

    assert caught.value.errno == errno.ENODEV
    assert "bshnosuchdev" in str(caught.value)
