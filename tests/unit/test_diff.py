from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest
from pydantic import ValidationError

from shared.diff import ScanDiff, diff_results
from shared.ports import parse_port_spec
from shared.schemas import PortResult, ScanResult

T0 = datetime(2026, 11, 25, 14, 0, tzinfo=UTC)


def port(number: int, address: str | None = "127.0.0.1", **fields: Any) -> PortResult:
    return PortResult(port=number, state="open", address=address, reason="syn-ack", **fields)


def scan(
    open_ports: list[PortResult],
    *,
    ports: str = "1-1024,8080",
    addresses: tuple[str, ...] = ("127.0.0.1",),
    at: datetime = T0,
) -> ScanResult:
    total = len(parse_port_spec(ports)) * len(addresses)
    return ScanResult(
        scan_id=uuid4(),
        target=addresses[0],
        addresses=list(addresses),
        ports=ports,
        total_ports_scanned=total,
        open_ports=open_ports,
        closed_ports=total - len(open_ports),
        started_at=at,
        finished_at=at + timedelta(seconds=3),
        duration_seconds=3.0,
    )


def later(open_ports: list[PortResult], **kwargs: Any) -> ScanResult:
    return scan(open_ports, at=T0 + timedelta(hours=1), **kwargs)


def keys(ports: list[PortResult]) -> list[tuple[str | None, int]]:
    return [(p.address, p.port) for p in ports]


def test_identical_scans_have_no_changes() -> None:
    old = scan([port(22, service="ssh"), port(80, service="http")])
    new = later([port(80, service="http"), port(22, service="ssh")])
    diff = diff_results(old, new)
    assert not diff.has_changes
    assert diff.unchanged == 2
    assert diff.newly_open == diff.newly_closed == diff.not_rescanned == []
    assert diff.changed == []


def test_opened_closed_and_changed_ports() -> None:
    old = scan(
        [
            port(22, service="ssh", product="OpenSSH", version="9.2p1"),
            port(80, service="http", product="nginx", version="1.24.0", banner="a"),
            port(443, service="https"),
        ]
    )
    new = later(
        [
            port(8080, service="http-proxy"),
            port(22, service="ssh", product="OpenSSH", version="9.6p1"),
            port(80, service="http", product="nginx", version="1.24.0", banner="b"),
            port(21, service="ftp"),
        ]
    )
    diff = diff_results(old, new)
    assert diff.has_changes
    assert keys(diff.newly_open) == [("127.0.0.1", 21), ("127.0.0.1", 8080)]
    assert keys(diff.newly_closed) == [("127.0.0.1", 443)]
    assert diff.newly_closed[0].service == "https"
    (change,) = diff.changed
    assert (change.address, change.port, change.changed) == ("127.0.0.1", 22, ["version"])
    assert (change.before.version, change.after.version) == ("9.2p1", "9.6p1")
    assert diff.unchanged == 1  # port 80: only the banner differs, which is not a service change


def test_every_service_field_counts() -> None:
    old = scan([port(80, service="http", product="nginx", version="1")])
    new = later([port(80, service="http-alt", product="Apache httpd", version=None)])
    (change,) = diff_results(old, new).changed
    assert change.changed == ["service", "product", "version"]


def test_both_scan_ids_times_and_task_ids() -> None:
    old, new = scan([]), later([])
    old_task, new_task = uuid4(), uuid4()
    diff = diff_results(old, new, old_task_id=old_task, new_task_id=new_task)
    assert (diff.old.scan_id, diff.new.scan_id) == (old.scan_id, new.scan_id)
    assert (diff.old.task_id, diff.new.task_id) == (old_task, new_task)
    assert (diff.old.started_at, diff.new.finished_at) == (old.started_at, new.finished_at)
    assert (diff.old.ports, diff.new.target) == (old.ports, new.target)


def test_ports_outside_the_new_scan_are_not_called_closed() -> None:
    old = scan([port(22), port(8080), port(80, "127.0.0.2")], addresses=("127.0.0.1", "127.0.0.2"))
    new = later([port(22)], ports="1-1024")
    diff = diff_results(old, new)
    assert diff.newly_closed == []
    assert keys(diff.not_rescanned) == [("127.0.0.1", 8080), ("127.0.0.2", 80)]
    assert not diff.has_changes


def test_ports_are_matched_per_address() -> None:
    hosts = ("127.0.0.1", "127.0.0.2", "::1")
    old = scan([port(22, "127.0.0.1"), port(22, "::1")], addresses=hosts)
    new = later([port(22, "127.0.0.2"), port(22, "::1")], addresses=hosts)
    diff = diff_results(old, new)
    assert keys(diff.newly_open) == [("127.0.0.2", 22)]
    assert keys(diff.newly_closed) == [("127.0.0.1", 22)]
    assert diff.unchanged == 1


def test_a_port_without_address_belongs_to_the_scans_only_address() -> None:
    old = scan([port(22, None, service="ssh")])
    new = later([port(22, "127.0.0.1", service="ssh"), port(23, None)])
    diff = diff_results(old, new)
    assert diff.unchanged == 1
    assert keys(diff.newly_open) == [("127.0.0.1", 23)]


def test_only_open_ports_count() -> None:
    old = scan([port(22), PortResult(port=23, state="filtered", address="127.0.0.1")])
    new = later([PortResult(port=22, state="closed", address="127.0.0.1")])
    diff = diff_results(old, new)
    assert keys(diff.newly_closed) == [("127.0.0.1", 22)]
    assert diff.newly_open == []


def test_the_diff_is_a_frozen_strict_json_model() -> None:
    diff = diff_results(scan([port(22)]), later([port(80, service="http")]))
    assert ScanDiff.model_validate_json(diff.model_dump_json()) == diff
    with pytest.raises(ValidationError):
        ScanDiff.model_validate({**diff.model_dump(), "extra": 1})
    with pytest.raises(ValidationError):
        diff.unchanged = 3  # type: ignore[misc]
