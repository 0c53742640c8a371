"""Rate, size and duration parsing."""

from __future__ import annotations

import pytest

from broker import units


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("600kbit", 600_000),
        ("600Kbit", 600_000),
        ("600kbps", 4_800_000),  # tc reads bps as bytes per second
        ("10mbit", 10_000_000),
        ("10Mbps", 80_000_000),
        ("1gbit", 10**9),
        ("40gbit", 40 * 10**9),
        ("2tbit", 2 * 10**12),
        ("1.5mbit", 1_500_000),
        ("100bit", 100),
        ("100bps", 800),
        ("1kibit", 1024),
        ("1mibit", 1 << 20),
        ("1kibps", 8 << 10),
        (" 20 mbit ", 20_000_000),
    ],
)
def test_parse_rate(text: str, bits: int) -> None:
    assert units.parse_rate(text) == bits


@pytest.mark.parametrize(
    "text", ["600", "10m", "10mb", "10MB", "1g", "5k", "1tb", "3b"]
)
def test_parse_rate_ambiguous(text: str) -> None:
    with pytest.raises(ValueError, match="ambiguous"):
        units.parse_rate(text)


def test_parse_rate_bare_integer_ambiguous() -> None:
    # YAML turns an unquoted 600 into an int before parse_rate() receives it.
    with pytest.raises(ValueError, match="ambiguous"):
        units.parse_rate(600)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["10mbits", "10furlongs", "10 mbit/s"])
def test_parse_rate_unknown_unit(text: str) -> None:
    with pytest.raises(ValueError):
        units.parse_rate(text)


@pytest.mark.parametrize("text", ["", "mbit", "-5mbit", "1e9bit", "ten mbit"])
def test_parse_rate_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        units.parse_rate(text)


def test_parse_rate_message_names_fix() -> None:
    with pytest.raises(ValueError) as caught:
        units.parse_rate("10mb")

    assert "10mbit" in str(caught.value)
    assert "10mbps" in str(caught.value)


@pytest.mark.parametrize(
    ("bits", "text"),
    [
        (4_800_000, "4.8mbit"),
        (600_000, "600kbit"),
        (40 * 10**9, "40gbit"),
        (999, "999bit"),
    ],
)
def test_format_rate(bits: int, text: str) -> None:
    assert units.format_rate(bits) == text


def test_rate_limits_cover_64_bit_bytes() -> None:
    assert units.RATE_MAX // 8 == 2**64 - 1
    assert units.RATE_MIN == 1000


@pytest.mark.parametrize(
    ("text", "size"),
    [("64M", 64 << 20), ("1G", 1 << 30), ("512MiB", 512 << 20), ("0", 0), (4096, 4096)],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert units.parse_size(text) == size


def test_parse_size_unknown_unit() -> None:
    with pytest.raises(ValueError):
        units.parse_size("5 parsecs")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("500ms", 0.5), ("5m", 300.0), ("1h", 3600.0), (7, 7.0)],
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    assert units.parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "9" * 400 + "M",
        "9" * 400,
        int("9" * 400),
        "17179869184G",
        "18446744073709551616",
    ],
)
def test_parse_size_too_large(text: str | int) -> None:
    with pytest.raises(ValueError, match="above 2\\*\\*64 - 1 bytes"):
        units.parse_size(text)


def test_parse_size_largest() -> None:
    assert units.parse_size("18446744073709551615") == 2**64 - 1


@pytest.mark.parametrize("text", ["9" * 400 + "s", "9" * 400, int("9" * 400)])
def test_parse_duration_infinite(text: str | int) -> None:
    with pytest.raises(ValueError, match="too large"):
        units.parse_duration(text)


def test_parse_rate_infinite() -> None:
    with pytest.raises(ValueError, match="too large"):
        units.parse_rate("9" * 400 + "mbit")


def test_parse_duration_product_too_large() -> None:
    with pytest.raises(ValueError, match="too large"):
        units.parse_duration("1" + "0" * 306 + "h")
