"""How a scan is split into shards: over every address, or over the live hosts once host
discovery has run (``job.deliver_scan`` decides which), and discovery's answer as the scan row
keeps it for the shards and the merge."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.ports import order_by_tier
from shared.schemas import ScanConfig, ScanTaskPayload
from shared.settings import Settings
from worker_service.probe.discovery import HostState
from worker_service.probe.runner import discovery_wanted

Shard = tuple[list[str], list[int]]
"""The addresses and ports one shard probes (every port at every address)."""


def plan_shards(
    addresses: list[str],
    ports: list[int],
    min_probes: int,
    max_shards: int,
    rate: int | None = None,
) -> list[Shard] | None:
    """Split a scan into shards of at least ``min_probes`` probes, or None to run it whole.

    Many addresses are split by address. Otherwise ports are dealt round-robin in tier order,
    so every shard starts with its share of the critical ports and tiers still come first.
    A scan with a ``rate`` gets no more shards than its rate: each shard paces to its share
    (:func:`shard_payload`), at least one probe a second.
    """
    probes = len(addresses) * len(ports)
    count = min(max_shards, probes // min_probes)
    if rate:
        count = min(count, rate)
    if count < 2:
        return None
    if len(addresses) >= count:
        return [(addresses[i::count], ports) for i in range(count)]
    ordered = [port for _, tier in order_by_tier(ports) for port in tier]
    return [(addresses, sorted(ordered[i::count])) for i in range(count)]


def discover_first(
    addresses: list[str], ports: list[int], config: ScanConfig, settings: Settings
) -> bool:
    """Whether the delivery runs host discovery itself before planning: only when the whole
    target would be split and discovery is on. Shards of a /24 where three hosts are up would
    each wait out discovery of their share of the dead ones; planned over the live hosts, the
    scan is often small enough to need no split at all."""
    plan = plan_shards(addresses, ports, settings.shard_min_ports, settings.max_shards, config.rate)
    if plan is None:
        return False
    return len(addresses) > 1 and discovery_wanted(config, addresses)


def plan_live(
    addresses: list[str],
    ports: list[int],
    states: Mapping[str, HostState],
    min_probes: int,
    max_shards: int,
    rate: int | None = None,
) -> list[Shard] | None:
    """``plan_shards`` over the addresses discovery found up: the work that is really there."""
    live = [address for address in addresses if states[address].up]
    return plan_shards(live, ports, min_probes, max_shards, rate)


def shard_payload(job: ScanTaskPayload, shards: int, index: int) -> ScanTaskPayload:
    """What shard ``index`` of ``shards`` runs: the scan, paced to its share of the scan's
    rate. The shards may all run at once; their shares add up to the scan's rate exactly (the
    first ``rate % shards`` get one probe a second more)."""
    rate = job.config.rate
    if not rate or shards <= 1:
        return job
    share = rate // shards + (1 if index < rate % shards else 0)
    config = job.config.model_copy(update={"rate": max(1, share)})
    return job.model_copy(update={"config": config})


def discovery_record(addresses: list[str], states: Mapping[str, HostState]) -> list[dict[str, Any]]:
    """Discovery's answer as the scan row keeps it for its shards and merge."""
    return [
        {
            "address": address,
            "up": states[address].up,
            "reason": states[address].reason,
            "seed": list(seed) if (seed := states[address].seed) is not None else None,
        }
        for address in addresses
    ]


def known_states(record: list[dict[str, Any]]) -> dict[str, HostState]:
    """The states ``discovery_record`` kept, to probe without discovering again."""
    return {
        host["address"]: HostState(
            host["up"], host["reason"], tuple(host["seed"]) if host["seed"] else None
        )
        for host in record
    }
