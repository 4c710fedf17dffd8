"""Port states and reasons, tier-ordered progress, IPv6 and accuracy at high concurrency."""

from __future__ import annotations

import ast
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from tests import needs
from worker_service.probe import sweep
from worker_service.probe.runner import ScanProgressEvent, scan_host
from worker_service.probe.tiers import effective_concurrency

Listeners = Callable[..., list[int]]


async def test_open_and_refused_ports(listeners: Listeners) -> None:
    (open_port,) = listeners(1)
    (closed_port,) = listeners(1, listen=False)
    outcomes = await scan_host("127.0.0.1", [closed_port, open_port], timeout=1, concurrency=10)
    assert [(o.port, o.state, o.reason) for o in outcomes] == sorted(
        [(open_port, "open", "syn-ack"), (closed_port, "closed", "conn-refused")]
    )


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A listener whose accept queue is full: the kernel drops new SYNs, as a firewall would."""
    server = socket.socket()
    fillers: list[socket.socket] = []
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port: int = server.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


async def test_silent_port_is_filtered(silent_port: int) -> None:
    (outcome,) = await scan_host("127.0.0.1", [silent_port], timeout=0.5, concurrency=10)
    assert (outcome.state, outcome.reason) == ("filtered", "no-response")


def test_self_connect_check() -> None:
    assert sweep.is_self_connect(("127.0.0.1", 40000), ("127.0.0.1", 40000))
    assert sweep.is_self_connect(("::1", 40000, 0, 0), ("::1", 40000, 0, 0))
    assert not sweep.is_self_connect(("127.0.0.1", 40001), ("127.0.0.1", 40000))
    assert not sweep.is_self_connect(("127.0.0.2", 40000), ("127.0.0.1", 40000))


def test_a_real_self_connect_is_reported_closed() -> None:
    # Binding the source port to the destination port forces TCP simultaneous open with itself.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.connect(sock.getsockname())
        assert sweep.connected(sock) == ("closed", "self-connect")


def test_error_classification() -> None:
    import errno

    assert sweep.classify_error(errno.ECONNREFUSED) == ("closed", "conn-refused")
    assert sweep.classify_error(errno.EHOSTUNREACH) == ("filtered", "host-unreach")
    assert sweep.classify_error(errno.ETIMEDOUT) == ("filtered", "no-response")


async def test_progress_follows_tier_order(listeners: Listeners) -> None:
    low_ports = listeners(3)
    ports = [*low_ports, 6379, 20, 22, 80, 9200, 53]
    events: list[ScanProgressEvent] = []
    outcomes = await scan_host(
        "127.0.0.1", ports, timeout=1, concurrency=50, on_progress=events.append
    )
    tiers = [event.tier for event in events]
    first_seen = sorted(set(tiers), key=tiers.index)
    assert first_seen == ["critical", "high", "medium", "low"]
    scanned = [event.ports_scanned for event in events]
    assert scanned == sorted(scanned)
    assert events[-1].ports_scanned == events[-1].total_ports == len(ports)
    assert events[-1].open_ports == sorted(o.port for o in outcomes if o.state == "open")
    assert set(low_ports) <= set(events[-1].open_ports)


async def test_ipv6_loopback(listeners: Listeners) -> None:
    needs.ipv6()
    (open_port,) = listeners(1, address="::1")
    (closed_port,) = listeners(1, listen=False, address="::1")
    outcomes = await scan_host("::1", [open_port, closed_port], timeout=1, concurrency=10)
    states = {o.port: o.state for o in outcomes}
    assert states == {open_port: "open", closed_port: "closed"}


@pytest.mark.parametrize("probe_processes", [None, 2])
async def test_concurrency_beyond_capacity_stays_exact(
    listeners: Listeners, probe_processes: int | None
) -> None:
    opened = listeners(30)
    refused = listeners(3000, listen=False)
    assert effective_concurrency(5000) == 5000
    outcomes = await scan_host(
        "127.0.0.1",
        sorted(opened + refused),
        timeout=1,
        concurrency=5000,
        probe_processes=probe_processes,
    )
    assert {o.port for o in outcomes if o.state == "open"} == set(opened)
    assert {o.port for o in outcomes if o.state == "closed"} == set(refused)


def test_effective_concurrency_is_capped_by_open_files() -> None:
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert effective_concurrency(10**9) < soft
    assert effective_concurrency(0) == 1


def _engine_in(netns: str, address: str, spec: str, *extra: str) -> dict[str, object]:
    command = [sys.executable, "-m", "bench.engine_cli", address, spec, "--asyncio", *extra]
    result = subprocess.run(
        ["ip", "netns", "exec", netns, *command],
        capture_output=True,
        text=True,
        check=True,
        timeout=90,
    )
    report: dict[str, object] = ast.literal_eval(result.stdout)
    return report


@pytest.mark.netns
def test_full_range_in_a_namespace_finds_exactly_the_listeners(netns: str) -> None:
    expected = [1, 22, 80, 443, 1000, 4096, 6379, 32768, 45000, 60999, 61000, 65535]
    fixture = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "tests.support.lab_listen"]
        + [f"127.0.0.1:{port}" for port in expected],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fixture.stdout is not None
        assert fixture.stdout.readline().strip() == "ready"
        report = _engine_in(netns, "127.0.0.1", "1-65535")
        assert report["open"] == expected
        notable = report["notable"]
        assert isinstance(notable, dict)
        assert all(state in ("open", "closed") for state, _reason in notable.values())
    finally:
        fixture.communicate(timeout=10)


@pytest.mark.netns
def test_dropped_and_unreachable_targets_are_filtered(netns: str) -> None:
    # Both addresses exist only inside the namespace. Frames for 198.18.203.2 go out on a veth
    # whose peer has another MAC and drops them (silence); an "unreachable" route answers at
    # once with EHOSTUNREACH.
    for command in (
        "ip link add quiet0 type veth peer name quiet1",
        "ip addr add 198.18.203.1/24 dev quiet0",
        "ip link set quiet0 up",
        "ip link set quiet1 up",
        "ip neigh add 198.18.203.2 lladdr 02:00:00:00:00:02 dev quiet0",
        "ip route add unreachable 198.18.204.0/24",
    ):
        subprocess.run(["ip", "netns", "exec", netns, *command.split()], check=True, timeout=10)
    dropped = _engine_in(netns, "198.18.203.2", "22,80,443", "--timeout", "0.5")
    assert dropped["notable"] == {p: ("filtered", "no-response") for p in (22, 80, 443)}
    unreachable = _engine_in(netns, "198.18.204.2", "22,80", "--timeout", "0.5")
    assert unreachable["notable"] == {p: ("filtered", "host-unreach") for p in (22, 80)}
