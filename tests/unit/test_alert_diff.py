"""When ``ports.changed`` goes out: only for ports both scans looked at, never for hosts whose
open ports were capped."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

from shared.schemas import PortResult, ScanResult
from shared.webhook_store import alert_diff

NOW = datetime(2031, 1, 1, tzinfo=UTC)


def scan(ports: str, open_ports: list[int], *, capped: bool = False) -> ScanResult:
    return ScanResult(
        scan_id=uuid4(),
        target="198.18.0.1",
        addresses=["198.18.0.1"],
        ports=ports,
        total_ports_scanned=0,
        open_ports=[PortResult(port=p, state="open", address="198.18.0.1") for p in open_ports],
        capped_addresses=["198.18.0.1"] if capped else [],
        started_at=NOW,
        finished_at=NOW,
        duration_seconds=0.0,
    )


def test_a_port_outside_the_previous_scans_ports_is_not_newly_open() -> None:
    assert alert_diff(scan("22", [22]), scan("1-65535", [22, 80])) is None


def test_a_port_inside_both_scans_that_opened_is_newly_open() -> None:
    diff = alert_diff(scan("1-65535", [22]), scan("1-65535", [22, 80]))
    assert diff is not None
    assert [p["port"] for p in diff["newly_open"]] == [80]
    assert diff["not_scanned_before"] == []


def test_unscanned_ports_are_reported_beside_a_real_change() -> None:
    diff = alert_diff(scan("22-23", [22]), scan("1-1000", [23, 80]))
    assert diff is not None
    assert [p["port"] for p in diff["newly_open"]] == [23]
    assert [p["port"] for p in diff["newly_closed"]] == [22]
    assert [p["port"] for p in diff["not_scanned_before"]] == [80]


def test_a_capped_host_is_not_compared() -> None:
    assert alert_diff(scan("1-65535", [22], capped=True), scan("1-65535", [22, 80])) is None
    assert alert_diff(scan("1-65535", [22, 80]), scan("1-65535", [22], capped=True)) is None
