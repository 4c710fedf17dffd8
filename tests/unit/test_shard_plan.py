from __future__ import annotations

from uuid import uuid4

import orjson
import pytest

from shared.ports import TIER_OF
from shared.protocol import LimitPolicy, time_limits
from shared.schemas import HostResult, ScanConfig, ScanTaskPayload
from shared.settings import Settings
from worker_service.job import shard_limits
from worker_service.plan import (
    discover_first,
    discovery_record,
    known_states,
    plan_live,
    plan_shards,
    shard_payload,
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


# --- a rated scan's shards share its rate ------------------------------------------------------


def rated_job(rate: int) -> ScanTaskPayload:
    return ScanTaskPayload(
        scan_id=uuid4(),
        target="127.0.0.1",
        ports="1-2000",
        config=ScanConfig(rate=rate),
        priority="normal",
    )


def test_a_rated_scan_gets_no_more_shards_than_probes_a_second() -> None:
    ports = list(range(1, 2001))
    assert len(plan_shards(["127.0.0.1"], ports, 250, 8) or []) == 8
    assert len(plan_shards(["127.0.0.1"], ports, 250, 8, rate=3) or []) == 3
    assert plan_shards(["127.0.0.1"], ports, 250, 8, rate=1) is None


@pytest.mark.parametrize(("rate", "shards"), [(100, 4), (10, 3), (23, 2), (15, 8), (7, 7)])
def test_the_shards_shares_add_up_to_the_scans_rate(rate: int, shards: int) -> None:
    job = rated_job(rate)
    shares = [shard_payload(job, shards, index).config.rate for index in range(shards)]
    assert all(share is not None and share >= 1 for share in shares)
    assert sum(share or 0 for share in shares) == rate
    assert max(share or 0 for share in shares) - min(share or 0 for share in shares) <= 1
    assert shard_payload(job, shards, 0).model_dump(exclude={"config"}) == job.model_dump(
        exclude={"config"}
    )
    unrated = rated_job(1).model_copy(update={"config": ScanConfig()})
    assert shard_payload(unrated, shards, 0) == unrated
    assert shard_payload(job, 1, 0) == job


def test_a_shards_time_limit_allows_for_its_share_of_the_rate() -> None:
    """Four shards of 500 probes at 25 probes/s each need the time of the whole scan's 2,000
    probes at 100/s, not a quarter of it: otherwise every rated shard meets its limit."""
    settings = Settings()
    job = rated_job(100)
    plan = plan_shards(["127.0.0.1"], list(range(1, 2001)), 500, 8, rate=100)
    assert plan is not None
    assert len(plan) == 4
    whole = time_limits(job, 2000, policy=LimitPolicy.of(settings))
    limits = {shard_limits(job, shard, settings, len(plan), i) for i, shard in enumerate(plan)}
    assert limits == {whole}
