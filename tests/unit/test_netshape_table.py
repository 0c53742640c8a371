"""ClassTable: uid -> HTB class id assignment."""

from __future__ import annotations

import errno

import pytest

from broker.netshape import (
    FIRST_USER_MINOR,
    LAST_USER_MINOR,
    ClassTable,
    ClassTableFullError,
    format_handle,
    make_classid,
)

SPAN = LAST_USER_MINOR - FIRST_USER_MINOR + 1


def minor(classid: int | None) -> int:
    assert classid is not None
    return classid & 0xFFFF


def test_consecutive_uids_get_consecutive_minors() -> None:
    table = ClassTable("eth0")
    table.sync([1000, 1001, 1002])

    minors = [minor(table.classid(uid)) for uid in (1000, 1001, 1002)]

    assert minors == [
        FIRST_USER_MINOR + 1000,
        FIRST_USER_MINOR + 1001,
        FIRST_USER_MINOR + 1002,
    ]
    assert table.collisions == 0


def test_classid_carries_major() -> None:
    table = ClassTable("eth0", major=7)

    classid = table.assign(1000)

    assert classid >> 16 == 7
    assert format_handle(classid) == f"7:{FIRST_USER_MINOR + 1000:x}"


def test_collision_takes_next_free_minor() -> None:
    table = ClassTable("eth0")
    table.sync([5, 5 + SPAN])

    assert minor(table.classid(5)) == FIRST_USER_MINOR + 5
    assert minor(table.classid(5 + SPAN)) == FIRST_USER_MINOR + 6
    assert table.collisions == 1


def test_collision_chain_skips_taken_minors() -> None:
    table = ClassTable("eth0")
    table.sync([5, 6, 5 + SPAN])

    assert minor(table.classid(5 + SPAN)) == FIRST_USER_MINOR + 7
    assert table.collisions == 2


def test_probe_wraps_below_0xffff() -> None:
    last_home = SPAN - 1  # home minor LAST_USER_MINOR
    table = ClassTable("eth0")
    table.sync([last_home, last_home + SPAN])

    assert minor(table.classid(last_home)) == LAST_USER_MINOR
    assert minor(table.classid(last_home + SPAN)) == FIRST_USER_MINOR


def test_assignment_stable_across_syncs() -> None:
    table = ClassTable("eth0")
    table.sync([5, 5 + SPAN])
    moved = table.classid(5 + SPAN)

    table.sync([5 + SPAN, 9, 10])  # uid 5 leaves, two uids join

    assert table.classid(5 + SPAN) == moved
    assert table.classid(5) is None
    assert minor(table.classid(9)) == FIRST_USER_MINOR + 9


def test_released_minor_is_reused() -> None:
    table = ClassTable("eth0")
    table.sync([5])
    table.sync([])

    table.sync([5 + SPAN])

    assert minor(table.classid(5 + SPAN)) == FIRST_USER_MINOR + 5
    assert len(table) == 1


def test_same_set_same_layout() -> None:
    uids = [70000, 4481, 4481 + SPAN, 12, 65535]
    first, second = ClassTable("eth0"), ClassTable("eth0")

    first.sync(uids)
    second.sync(reversed(uids))

    assert first.assignments() == second.assignments()


def test_uid_of_reverses_classid() -> None:
    table = ClassTable("eth0")
    table.sync([1234])

    assert table.uid_of(table.assign(1234)) == 1234
    assert table.uid_of(make_classid(1, 2)) is None
    assert table.uid_of(make_classid(2, FIRST_USER_MINOR + 1234)) is None


def test_full_table_raises() -> None:
    table = ClassTable("eth0")
    table.sync(range(SPAN))
    used = {minor(c) for c in table.assignments().values()}

    with pytest.raises(ClassTableFullError) as caught:
        table.assign(SPAN + 100)

    assert used == set(range(FIRST_USER_MINOR, LAST_USER_MINOR + 1))
    assert 0xFFFF not in used
    assert caught.value.errno == errno.ENOSPC
    assert f"uid {SPAN + 100}" in str(caught.value)
    assert "eth0" in str(caught.value)


def test_uid_outside_32_bits_rejected() -> None:
    table = ClassTable("eth0")

    with pytest.raises(ValueError):
        table.assign(2**32)
    with pytest.raises(ValueError):
        table.assign(-1)


def test_handle_limits() -> None:
    assert make_classid(1, 0xFFFF) == 0x1FFFF
    with pytest.raises(ValueError):
        make_classid(1, 0x10000)
    with pytest.raises(ValueError):
        make_classid(0, 1)
