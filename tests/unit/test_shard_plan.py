from __future__ import annotations

import orjson

from shared.ports import TIER_OF
from shared.schemas import HostResult, ScanConfig
from shared.settings import Settings
from worker_service.plan import (
    discover_first,
    discovery_record,
    known_states,
    plan_live,
    plan_shards,
)
from worker_service.probe.discovery import HostState
from worker_service.sharding import ShardFindings, merge_hosts


def test_small_scans_are_not_sharded() -> None:
    assert plan_shards(["127.0.0.1"], list(range(1, 1000)), 16_384, 8) is None
    assert plan_shards(["127.0.0.1"], list(range(1, 30_000)), 16_384, 8) is None


def test_ports_are_dealt_so_every_shard_starts_with_critical_ports() -> None:
    ports = list(range(1, 65_536))
    plan = plan_shards(["127.0.0.1"], ports, 16_384, 8)
    assert plan is not None
    assert len(plan) == 3
    dealt = [port for _, shard_ports in plan for port in shard_ports]
    assert sorted(dealt) == ports
    for addresses, shard_ports in plan:
        assert addresses == ["127.0.0.1"]
        assert any(TIER_OF.get(p) == "critical" for p in shard_ports)


def test_many_addresses_are_split_by_address() -> None:
    addresses = [f"127.0.0.{i}" for i in range(1, 21)]
    plan = plan_shards(addresses, list(range(1, 1001)), 2_000, 4)
    assert plan is not None
    assert len(plan) == 4
    assert sorted(a for shard_addresses, _ in plan for a in shard_addresses) == sorted(addresses)
    assert all(len(ports) == 1000 for _, ports in plan)


SLASH_24 = [f"198.18.0.{i}" for i in range(1, 255)]
LIVE = {"198.18.0.10", "198.18.0.20", "198.18.0.30"}
DEFAULTS = Settings(shard_min_ports=16_384, max_shards=8)


def discovered(addresses: list[str]) -> dict[str, HostState]:
    return {
        a: HostState(True, "syn-ack", (0.001, 0.0005))
        if a in LIVE
        else HostState(False, "no-response")
        for a in addresses
    }


def test_a_network_that_would_be_split_is_discovered_first() -> None:
    ports = list(range(1, 1003))
    assert discover_first(SLASH_24, ports, ScanConfig(), DEFAULTS)
    # discovery: false (nmap's -Pn) plans over every address, as before.
    assert not discover_first(SLASH_24, ports, ScanConfig(discovery=False), DEFAULTS)
    # Too small to split anyway: the scan's own probe runs discovery.
    assert not discover_first(SLASH_24[:8], ports, ScanConfig(), DEFAULTS)
    # One address split by port: nothing to discover first.
    one = ["198.18.0.10"]
    assert not discover_first(one, list(range(1, 65_536)), ScanConfig(discovery=True), DEFAULTS)


def test_three_live_hosts_of_a_slash_24_need_no_split() -> None:
    ports = list(range(1, 1003))
    assert plan_shards(SLASH_24, ports, 16_384, 8) is not None
    assert plan_live(SLASH_24, ports, discovered(SLASH_24), 16_384, 8) is None


def test_only_live_hosts_are_sharded() -> None:
    plan = plan_live(SLASH_24, list(range(1, 1001)), discovered(SLASH_24), 1_000, 8)
    assert plan is not None
    assert len(plan) == 3
    assert sorted(a for shard_addresses, _ in plan for a in shard_addresses) == sorted(LIVE)


def test_discovery_survives_the_scan_row() -> None:
    record = discovery_record(SLASH_24, discovered(SLASH_24))
    states = known_states(orjson.loads(orjson.dumps(record)))
    assert {a for a, s in states.items() if s.up} == LIVE
    assert states["198.18.0.10"].seed == (0.001, 0.0005)
    assert states["198.18.0.1"].reason == "no-response"
    assert states["198.18.0.1"].seed is None


def test_merged_hosts_list_every_address_and_keep_tarpit_flags() -> None:
    addresses = ["198.18.0.1", "198.18.0.10", "198.18.0.20"]
    record = discovery_record(addresses, discovered(addresses))
    first = ShardFindings(
        hosts=[HostResult(address="198.18.0.10", state="up", reason="syn-ack", probes=5)]
    )
    # One host's ports split over two shards: counts add up, the tarpit flag of one stands.
    halves = [
        HostResult(address="198.18.0.20", state="up", reason="reset", probes=p, tarpit=t)
        for p, t in ((3, False), (4, True))
    ]
    second = ShardFindings(hosts=halves[:1])
    third = ShardFindings(hosts=halves[1:])
    hosts = merge_hosts(addresses, record, [first, second, third])
    assert [(h.address, h.state, h.reason) for h in hosts] == [
        ("198.18.0.1", "down", "no-response"),
        ("198.18.0.10", "up", "syn-ack"),
        ("198.18.0.20", "up", "reset"),
    ]
    assert [h.probes for h in hosts] == [0, 5, 7]
    assert [h.tarpit for h in hosts] == [False, False, True]
