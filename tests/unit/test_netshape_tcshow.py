"""The tc text parser that the host tests use, on captured tc output."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tcshow import parse_classes, parse_qdiscs, parse_rate

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1496bit", 1496),
        ("600Kbit", 600_000),
        ("4800Kbit", 4_800_000),
        ("20Mbit", 20_000_000),
        ("40Gbit", 40_000_000_000),
        ("100Gbit", 100_000_000_000),
        ("2Tbit", 2_000_000_000_000),
        ("1.5Mbit", 1_500_000),
    ],
)
def test_parse_rate(text: str, expected: int) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["600kbps", "20", "Mbit", "1Kibit"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


def test_classes_with_traffic() -> None:
    found = parse_classes(fixture("tc_class_traffic.txt"))

    assert sorted(found) == ["1:1", "1:2", "1:ee59", "1:ee5a"]
    user = found["1:ee59"]
    assert (user.parent, user.rate, user.ceil) == ("1:1", 600_000, 20_000_000)
    assert (user.sent_bytes, user.sent_packets) == (1046010, 697)
    assert (user.dropped, user.overlimits) == (0, 26)
    assert found["1:2"].sent_bytes == 314218
    assert found["1:ee5a"].sent_bytes == 0


def test_root_class_parent() -> None:
    root = parse_classes(fixture("tc_class_traffic.txt"))["1:1"]

    assert root.parent == "root"
    assert (root.rate, root.ceil, root.sent_bytes) == (10**9, 10**9, 1360228)


def test_classes_64_bit_and_byte_rates() -> None:
    found = parse_classes(fixture("tc_class_64bit.txt"))

    assert found["1:1"].rate == 100 * 10**9
    assert found["1:2"].rate == 4_800_000
    assert found["1:ee59"].rate == 600_000
    assert found["1:ee59"].ceil == 40 * 10**9
    assert found["1:ee5a"].rate == 1496


def test_classes_skip_other_kinds() -> None:
    text = "class fq_codel 8001:1 parent 8001:\n Sent 5 bytes 1 pkt (dropped 0, overlimits 0 requeues 0)\n"

    assert parse_classes(text) == {}


def test_qdisc_htb_fields() -> None:
    (root,) = parse_qdiscs(fixture("tc_qdisc_htb.txt"))

    assert (root.kind, root.handle, root.parent) == ("htb", "1:", "root")
    assert root.fields["default"] == "0x2"
    assert root.fields["r2q"] == "10"
    assert root.fields["direct_packets_stat"] == "0"


def test_qdisc_leaf_parent() -> None:
    text = (
        "qdisc noqueue 0: root refcnt 2\nqdisc pfifo 8001: parent 1:ee59 limit 1000p\n"
    )

    first, leaf = parse_qdiscs(text)

    assert (first.kind, first.parent) == ("noqueue", "root")
    assert (leaf.kind, leaf.handle, leaf.parent) == ("pfifo", "8001:", "1:ee59")
    assert leaf.fields == {"limit": "1000p"}
