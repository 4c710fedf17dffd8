"""Several hosts in one sweep, on loopback: tier order across hosts, discovery with and without
ICMP."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from shared.schemas import ScanConfig
from worker_service.probe.discovery import discover, open_icmp
from worker_service.probe.runner import ScanProgressEvent, scan_hosts

Listeners = Callable[..., list[int]]
NAMED = [22, 80, 20, 53, 6379, 9200]  # two ports from each of the named tiers


async def test_every_hosts_named_tiers_go_before_any_hosts_low_tier(listeners: Listeners) -> None:
    low_one = listeners(2)
    low_two = listeners(2, address="127.0.0.2")
    ports = sorted({*low_one, *low_two, *NAMED})
    events: list[ScanProgressEvent] = []
    config = ScanConfig(timeout=1, discovery=False)
    found = await scan_hosts(["127.0.0.1", "127.0.0.2"], ports, config, events.append)
    tiers = [event.tier for event in events]
    assert sorted(set(tiers), key=tiers.index) == ["critical", "high", "medium", "low"]
    first_low = events[tiers.index("low")]
    assert first_low.ports_scanned == len(NAMED) * 2  # both hosts' named tiers, all done
    assert events[-1].ports_scanned == events[-1].total_ports == len(ports) * 2
    opened = {(a, o.port) for a, outs in found.outcomes.items() for o in outs if o.state == "open"}
    assert {("127.0.0.1", p) for p in low_one} | {("127.0.0.2", p) for p in low_two} <= opened
    assert {(a, p) for a, p in events[-1].open_pairs} == opened


def test_discovery_without_icmp_decides_by_tcp() -> None:
    states = discover(["127.0.0.1"], timeout=1, retries=1, inflight=10, min_timeout=0.1, icmp=False)
    assert states["127.0.0.1"].up
    assert states["127.0.0.1"].reason in ("syn-ack", "reset")
    assert states["127.0.0.1"].seed is not None  # its answer is the first RTT sample


@pytest.mark.parametrize(("address", "v6"), [("127.0.0.1", False), ("::1", True)])
def test_echo_requests_are_answered_on_both_families(address: str, v6: bool) -> None:
    ident = os.getpid() & 0xFFFF
    pinger = open_icmp(v6)
    assert pinger is not None, "the suite runs as root: a ping socket or a raw one"
    answered: set[str] = set()
    try:
        pinger.send(address, ident, 0)
        deadline = time.monotonic() + 2
        while address not in answered and time.monotonic() < deadline:
            answered |= pinger.replies(ident)
            time.sleep(0.01)
    finally:
        pinger.close()
    assert answered == {address}
