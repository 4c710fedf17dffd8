from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.ports import (
    LOW_TIER,
    TIERS,
    PortSpecError,
    count_ports,
    format_port_ranges,
    format_port_spec,
    order_by_tier,
    parse_port_ranges,
    parse_port_spec,
    tier_of,
)


@pytest.mark.parametrize(
    ("spec", "ports"),
    [
        ("80", [80]),
        ("22,80,443", [22, 80, 443]),
        ("1-5", [1, 2, 3, 4, 5]),
        (" 443 , 80-81 ,80", [80, 81, 443]),
        ("65535", [65535]),
    ],
)
def test_parse(spec: str, ports: list[int]) -> None:
    assert parse_port_spec(spec) == ports


def test_full_range() -> None:
    assert len(parse_port_spec("1-65535")) == 65535


@pytest.mark.parametrize(
    "spec", ["", " ", "0", "0-70000", "80-20", "abc", "1,,2", "-5", "5-", "1-2-3", "65536", "+80"]
)
def test_rejects(spec: str) -> None:
    with pytest.raises(PortSpecError):
        parse_port_spec(spec)


@given(st.sets(st.integers(1, 65535), min_size=1, max_size=300))
def test_format_round_trips(ports: set[int]) -> None:
    spec = format_port_spec(ports)
    assert parse_port_spec(spec) == sorted(ports)


def test_format_compresses_runs() -> None:
    assert format_port_spec([3, 1, 2, 80, 443, 444]) == "1-3,80,443-444"


def test_tiers_order_and_membership() -> None:
    assert [name for name, _ in TIERS] == ["critical", "high", "medium"]
    assert tier_of(22) == "critical"
    assert tier_of(53) == "high"
    assert tier_of(6379) == "medium"
    assert tier_of(12345) == LOW_TIER
    groups = order_by_tier([12345, 6379, 53, 22, 80, 1])
    assert groups == [
        ("critical", [22, 80]),
        ("high", [53]),
        ("medium", [6379]),
        ("low", [1, 12345]),
    ]
    assert order_by_tier([1000, 1001]) == [("low", [1000, 1001])]


def test_overlapping_ranges_are_merged() -> None:
    assert parse_port_ranges("80,1-10,5-20,21,443,79") == [(1, 21), (79, 80), (443, 443)]
    assert count_ports(parse_port_ranges("1-65535,1-65535,22")) == 65_535
    assert format_port_ranges(parse_port_ranges("22,21,23,80")) == "21-23,80"


def test_a_spec_repeating_the_full_range_costs_its_length_not_its_ports() -> None:
    """``"1-65535,"`` repeated to the field's length was ~33M set inserts, twice, on the
    gateway's event loop. Merged ranges never materialise a port: memory shows it."""
    import tracemalloc

    from shared.schemas import ScanRequest

    spec = ",".join(["1-65535"] * 511)
    assert len(spec) <= 4096
    tracemalloc.start()
    try:
        request = ScanRequest(target="127.0.0.1", ports=spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert request.ports == "1-65535"
    assert peak < 512 * 1024, peak  # a set of 65,535 ports alone is over 2 MB


def test_errors_do_not_echo_a_long_spec_whole() -> None:
    with pytest.raises(PortSpecError) as caught:
        parse_port_spec("1-80," * 800 + "x")
    assert len(str(caught.value)) < 200
