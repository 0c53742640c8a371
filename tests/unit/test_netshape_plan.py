"""Class sizes, desired classes and the write plan, without a kernel."""

from __future__ import annotations

import errno
from dataclasses import replace

import pytest
from pyroute2.netlink.rtnl import TC_H_ROOT

from broker.errors import NetshapeError
from broker.netshape import (
    QUANTUM_MAX,
    QUANTUM_MIN,
    ClassSpec,
    KernelClass,
    Link,
    burst_for,
    check_rates,
    class_differences,
    desired_classes,
    kernel_rate,
    plan_classes,
    quantum_for,
)
from broker.policy import ClassRates, InterfacePolicy

MBIT = 10**6
LINK = Link(index=3, mtu=1500, gso_max_size=65536)


def policy(**changes: object) -> InterfacePolicy:
    base = InterfacePolicy(
        name="eth0",
        link_rate=1000 * MBIT,
        default=ClassRates(10 * MBIT, 1000 * MBIT),
        user=ClassRates(5 * MBIT, 20 * MBIT),
        tiers=(("heavy", ClassRates(50 * MBIT, 200 * MBIT)),),
        r2q=10,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def kernel(spec: ClassSpec, level: int = 0, **changes: int) -> KernelClass:
    """The class as the kernel would report it right after writing spec."""
    found = KernelClass(
        spec.classid,
        spec.parent,
        spec.rate,
        spec.ceil,
        spec.quantum,
        spec.burst,
        spec.cburst,
        level,
        bytes=0,
        packets=0,
        drops=0,
        overlimits=0,
        backlog=0,
    )
    return replace(found, **changes)


# ---------------------------------------------------------------- quantum


@pytest.mark.parametrize(
    ("rate", "r2q", "mtu", "expected"),
    [
        (5 * MBIT, 10, 1500, 62500),  # rate / 8 / r2q
        (100 * 1000, 10, 1500, 1514),  # small rate: one full frame
        (10_000, 10, 500, QUANTUM_MIN),  # small frame: the kernel's floor
        (10_000 * MBIT, 10, 1500, QUANTUM_MAX),  # 125 MB/10 capped
        (10 * MBIT, 10, 9000, 125000),  # jumbo frames under rate / r2q
        (1 * MBIT, 10, 9000, 12500),
        (100 * 1000, 10, 9000, 9014),
        (1 * MBIT, 10, 65536, 65550),  # loopback MTU
        (1 * MBIT, 10, 400000, QUANTUM_MAX),  # a frame above the cap
        (40_000 * MBIT, 1, 1500, QUANTUM_MAX),
    ],
)
def test_quantum_for(rate: int, r2q: int, mtu: int, expected: int) -> None:
    assert quantum_for(rate, r2q, mtu) == expected


def test_quantum_stays_in_kernel_range() -> None:
    for rate in (1000, 10**5, 10**7, 10**9, 10**11, 10**14):
        for r2q in (1, 10, 100, 100000):
            assert QUANTUM_MIN <= quantum_for(rate, r2q, 1500) <= QUANTUM_MAX


# ------------------------------------------------------------------ burst


def test_burst_covers_gso_packet() -> None:
    assert burst_for(20 * MBIT, LINK) == 65536


def test_burst_one_ms_at_high_rate() -> None:
    assert burst_for(10_000 * MBIT, LINK) == 1_250_000


def test_burst_without_gso_uses_frame() -> None:
    assert burst_for(1 * MBIT, Link(3, 1500, gso_max_size=0)) == 1514


def test_burst_time_capped_at_low_rate() -> None:
    # 8 kbit/s is 1000 bytes/s; 10 s of it is below one GSO packet.
    assert burst_for(8000, LINK) == 10_000


def test_burst_fits_buffer_ticks() -> None:
    for rate in (1000, 8000, 10**6, 10**9, 10**12):
        ticks = burst_for(rate, LINK) / (rate / 8) * 1e9 / 64
        assert ticks < 2**32


# -------------------------------------------------------- desired classes


def test_desired_tree_shape() -> None:
    specs = desired_classes(policy(), {1001: 0x103F9}, {}, LINK)

    root, default, user = specs[0x10001], specs[0x10002], specs[0x103F9]
    assert list(specs) == [0x10001, 0x10002, 0x103F9]
    assert (root.parent, root.rate, root.ceil) == (TC_H_ROOT, 1000 * MBIT, 1000 * MBIT)
    assert (default.parent, default.rate, default.ceil) == (
        0x10001,
        10 * MBIT,
        1000 * MBIT,
    )
    assert (user.parent, user.rate, user.ceil, user.uid) == (
        0x10001,
        5 * MBIT,
        20 * MBIT,
        1001,
    )


def test_desired_warm_tier_rates() -> None:
    specs = desired_classes(
        policy(), {1001: 0x103F9, 1002: 0x103FA}, {1001: "heavy"}, LINK
    )

    assert (specs[0x103F9].rate, specs[0x103F9].ceil, specs[0x103F9].tier) == (
        50 * MBIT,
        200 * MBIT,
        "heavy",
    )
    assert (specs[0x103FA].rate, specs[0x103FA].tier) == (5 * MBIT, None)


def test_desired_tier_without_rates_keeps_idle() -> None:
    specs = desired_classes(policy(), {1001: 0x103F9}, {1001: "light"}, LINK)

    assert (specs[0x103F9].rate, specs[0x103F9].tier) == (5 * MBIT, None)


def test_desired_rounds_to_whole_bytes() -> None:
    odd = policy(user=ClassRates(1_000_007, 2_000_003))

    user = desired_classes(odd, {1001: 0x103F9}, {}, LINK)[0x103F9]

    assert (user.rate, user.ceil) == (1_000_000, 2_000_000)
    assert kernel_rate(15) == 8


def test_desired_other_major() -> None:
    specs = desired_classes(policy(), {1001: 0x703F9}, {}, LINK, major=7)

    assert list(specs) == [0x70001, 0x70002, 0x703F9]
    assert specs[0x703F9].parent == 0x70001


# ------------------------------------------------------------ differences


def test_differences_none_for_same() -> None:
    spec = desired_classes(policy(), {}, {}, LINK)[0x10002]

    assert class_differences(spec, kernel(spec)) == []


def test_differences_name_field_and_units() -> None:
    spec = desired_classes(policy(), {}, {}, LINK)[0x10002]

    found = class_differences(spec, kernel(spec, rate=4_800_000))

    assert found == ["rate 10mbit -> 4.8mbit"]


def test_differences_ignore_inner_quantum() -> None:
    spec = desired_classes(policy(), {}, {}, LINK)[0x10001]

    assert class_differences(spec, kernel(spec, level=7, quantum=0)) == []
    assert class_differences(spec, kernel(spec, level=0, quantum=0)) == [
        f"quantum {spec.quantum} -> 0"
    ]


def test_differences_burst_tolerance() -> None:
    spec = desired_classes(policy(), {}, {}, LINK)[0x10002]

    assert class_differences(spec, kernel(spec, burst=spec.burst - 3)) == []
    assert class_differences(spec, kernel(spec, burst=spec.burst - 100)) != []


# ------------------------------------------------------------------- plan


def test_plan_empty_kernel_adds_all() -> None:
    desired = desired_classes(policy(), {1001: 0x103F9}, {}, LINK)

    plan = plan_classes(desired, {})

    assert [s.classid for s in plan.add] == [0x10001, 0x10002, 0x103F9]
    assert (plan.change, plan.delete, plan.keep) == ((), (), ())


def test_plan_matching_kernel_keeps_all() -> None:
    desired = desired_classes(policy(), {1001: 0x103F9}, {}, LINK)
    current = {c: kernel(s, level=1 if c == 0x10001 else 0) for c, s in desired.items()}

    plan = plan_classes(desired, current)

    assert (plan.add, plan.change, plan.delete) == ((), (), ())
    assert plan.keep == (0x10001, 0x10002, 0x103F9)


def test_plan_changed_rate_changes_in_place() -> None:
    old = desired_classes(policy(), {1001: 0x103F9}, {}, LINK)
    new = desired_classes(
        policy(user=ClassRates(8 * MBIT, 20 * MBIT)), {1001: 0x103F9}, {}, LINK
    )

    plan = plan_classes(new, {c: kernel(s) for c, s in old.items()})

    assert [s.classid for s in plan.change] == [0x103F9]
    assert plan.add == ()


def test_plan_deletes_stale_leaves_first() -> None:
    desired = desired_classes(policy(), {}, {}, LINK)
    current = {c: kernel(s) for c, s in desired.items()}
    stale_leaf = kernel(replace(desired[0x10002], classid=0x10050))
    stale_inner = kernel(replace(desired[0x10002], classid=0x10040), level=1)
    current.update({0x10050: stale_leaf, 0x10040: stale_inner})

    plan = plan_classes(desired, current)

    assert [c.classid for c in plan.delete] == [0x10050, 0x10040]


def test_plan_moved_class_deleted_and_added() -> None:
    desired = desired_classes(policy(), {1001: 0x103F9}, {}, LINK)
    current = {c: kernel(s) for c, s in desired.items()}
    current[0x103F9] = kernel(desired[0x103F9], parent=0x10002)

    plan = plan_classes(desired, current)

    assert [c.classid for c in plan.delete] == [0x103F9]
    assert [s.classid for s in plan.add] == [0x103F9]


# ------------------------------------------------------------ rate checks


def test_check_rates_accepts_64_bit_rates() -> None:
    check_rates(
        policy(link_rate=100_000 * MBIT, user=ClassRates(40_000 * MBIT, 40_000 * MBIT))
    )


@pytest.mark.parametrize("bad", [0, 999, (2**64) * 8])
def test_check_rates_rejects_out_of_range(bad: int) -> None:
    with pytest.raises(NetshapeError) as caught:
        check_rates(policy(default=ClassRates(bad, max(bad, 1000 * MBIT))))

    assert caught.value.errno == errno.EINVAL
    assert "default" in str(caught.value)


def test_planned_warm_rate_replaces_tier_rate() -> None:
    specs = desired_classes(
        policy(), {1001: 0x103F9}, {1001: "heavy"}, LINK, warm_rates={1001: 80 * MBIT}
    )
    assert specs[0x103F9].rate == 80 * MBIT
    assert specs[0x103F9].ceil == 200 * MBIT


def test_planned_warm_rate_bounded_by_idle_and_ceil() -> None:
    low = desired_classes(
        policy(), {1001: 0x103F9}, {1001: "heavy"}, LINK, warm_rates={1001: 1}
    )
    high = desired_classes(
        policy(), {1001: 0x103F9}, {1001: "heavy"}, LINK, warm_rates={1001: 10**12}
    )
    assert low[0x103F9].rate == 5 * MBIT
    assert high[0x103F9].rate == 200 * MBIT


def test_planned_warm_rate_ignored_when_idle() -> None:
    specs = desired_classes(
        policy(), {1001: 0x103F9}, {}, LINK, warm_rates={1001: 80 * MBIT}
    )
    assert specs[0x103F9].rate == 5 * MBIT
