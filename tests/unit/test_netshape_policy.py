"""The `network:` section of policy files."""

from __future__ import annotations

import pytest

from broker.errors import PolicyError
from broker.policy import ClassRates, InterfacePolicy, load_texts

HEADER = """\
tiers:
  light: {cpu.weight: 100, memory.min: 0}
  heavy: {cpu.weight: 800, memory.min: 0}
users:
  - uid: 1001
    pool: {light: 1}
network:
  interfaces:
    - name: eth0
"""


def interface(body: str) -> InterfacePolicy:
    (found,) = load_texts([("net.yaml", HEADER + body)]).interfaces
    return found


def problems(body: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_texts([("net.yaml", HEADER + body)])
    return [str(p) for p in caught.value.problems]


GOOD = """\
      link_rate: 1gbit
      r2q: 20
      default: {rate: 600kbps, ceil: 1gbit}
      user: {rate: 600Kbit, ceil: 20mbit}
      tiers:
        heavy: {rate: 50mbit, ceil: 200mbit}
"""


def test_rates_normalised_to_bits() -> None:
    found = interface(GOOD)

    assert found.link_rate == 10**9
    assert found.default == ClassRates(4_800_000, 10**9)
    assert found.user == ClassRates(600_000, 20_000_000)
    assert found.tier_rates() == {"heavy": ClassRates(50_000_000, 200_000_000)}
    assert found.r2q == 20


def test_ceil_defaults_to_rate() -> None:
    found = interface(GOOD.replace("{rate: 600Kbit, ceil: 20mbit}", "{rate: 600Kbit}"))

    assert found.user == ClassRates(600_000, 600_000)


def test_64_bit_rates_accepted() -> None:
    body = GOOD.replace("link_rate: 1gbit", "link_rate: 100gbit").replace(
        "{rate: 50mbit, ceil: 200mbit}", "{rate: 36gbit, ceil: 40gbit}"
    )

    found = interface(body)

    assert found.tier_rates()["heavy"] == ClassRates(36 * 10**9, 40 * 10**9)


def test_ambiguous_unit_names_line() -> None:
    found = problems(GOOD.replace("rate: 50mbit", "rate: 50mb"))

    assert len(found) == 1
    assert found[0].startswith(
        "net.yaml:15: network.interfaces[0].tiers.heavy.rate: ambiguous"
    )


def test_bare_number_rejected() -> None:
    found = problems(GOOD.replace("link_rate: 1gbit", "link_rate: 1000"))

    assert len(found) == 1
    assert found[0].startswith(
        "net.yaml:10: network.interfaces[0].link_rate: ambiguous"
    )


def test_unknown_unit_rejected() -> None:
    found = problems(GOOD.replace("ceil: 20mbit", "ceil: 20megabit"))

    assert len(found) == 1
    assert "net.yaml:13:" in found[0]
    assert "unknown rate unit" in found[0]


def test_rate_above_ceil_rejected() -> None:
    found = problems(
        GOOD.replace("{rate: 600Kbit, ceil: 20mbit}", "{rate: 30mbit, ceil: 20mbit}")
    )

    assert len(found) == 1
    assert (
        "net.yaml:13: network.interfaces[0].user.rate: rate 30mbit is above ceil 20mbit"
        in found[0]
    )


def test_ceil_above_link_rejected() -> None:
    found = problems(GOOD.replace("ceil: 200mbit", "ceil: 2gbit"))

    assert len(found) == 1
    assert found[0].startswith(
        "net.yaml:15: network.interfaces[0].tiers.heavy.ceil: ceil 2gbit"
    )
    assert "link_rate 1gbit" in found[0]


def test_zero_rate_rejected() -> None:
    found = problems(GOOD.replace("rate: 600Kbit", "rate: 0kbit"))

    assert len(found) == 1
    assert "net.yaml:13:" in found[0]
    assert "below the HTB minimum of 1kbit" in found[0]


def test_rate_beyond_64_bits_rejected() -> None:
    huge = "999999999tbit"  # 1.25e20 bytes/s, above 2**64 - 1
    body = GOOD.replace("link_rate: 1gbit", f"link_rate: {huge}").replace(
        "ceil: 1gbit", f"ceil: {huge}"
    )

    found = problems(body)

    assert len(found) == 2
    assert all("64-bit bytes/s limit" in p for p in found)


def test_unknown_tier_rejected() -> None:
    found = problems(GOOD.replace("heavy: {rate", "medium: {rate"))

    assert len(found) == 1
    assert "unknown tier" in found[0]
