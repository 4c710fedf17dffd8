from __future__ import annotations

from shared.ports import TIER_OF
from worker_service.job import plan_shards


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
