"""Results are bounded: text from the network is cut, open ports per address are capped."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

from shared.schemas import (
    MAX_BANNER_CHARS,
    MAX_FIELD_CHARS,
    MAX_OPEN_PORTS_PER_HOST,
    PortResult,
    ScanResult,
)


def result(open_ports: list[PortResult]) -> ScanResult:
    now = datetime.now(UTC)
    return ScanResult(
        scan_id=uuid4(),
        target="127.0.0.0/30",
        ports="1-65535",
        total_ports_scanned=65_535,
        open_ports=open_ports,
        started_at=now,
        finished_at=now,
        duration_seconds=0.0,
    )


def test_text_from_the_network_is_cut() -> None:
    port = PortResult(
        port=80,
        state="open",
        banner="B" * 4096,
        product="P" * 4096,
        version="V" * 4096,
        service="S" * 4096,
        reason="R" * 4096,
    )
    assert len(port.banner or "") == MAX_BANNER_CHARS
    for text in (port.product, port.version, port.service, port.reason):
        assert len(text or "") == MAX_FIELD_CHARS


def test_a_host_that_accepts_every_port_is_capped_and_flagged() -> None:
    every = [PortResult(port=p, state="open", address="127.0.0.1") for p in range(1, 3001)]
    few = [PortResult(port=p, state="open", address="127.0.0.2") for p in (22, 80)]
    capped = result(every + few)
    listed = [p for p in capped.open_ports if p.address == "127.0.0.1"]
    assert len(listed) == MAX_OPEN_PORTS_PER_HOST
    assert [p.port for p in listed] == list(range(1, MAX_OPEN_PORTS_PER_HOST + 1))
    assert [p.port for p in capped.open_ports if p.address == "127.0.0.2"] == [22, 80]
    assert capped.capped_addresses == ["127.0.0.1"]
    assert capped.open_ports_omitted == 3000 - MAX_OPEN_PORTS_PER_HOST
    # Stored and read back (JSON, as PostgreSQL and Redis keep it), it stays the same.
    again = ScanResult.model_validate_json(capped.model_dump_json())
    assert again == capped


def test_an_ordinary_result_is_untouched() -> None:
    ports = [PortResult(port=p, state="open", address="127.0.0.1") for p in (22, 80)]
    plain = result(ports)
    assert plain.open_ports == ports
    assert plain.capped_addresses == []
    assert plain.open_ports_omitted == 0
