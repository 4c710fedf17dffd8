"""A /24 of mostly dropped hosts through the service with a low shard threshold: the delivery
discovers first and shards only the live hosts' work; the merged result still lists every
address up or down."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest

from shared.settings import Settings
from shared.store import ScanStore
from tests.conftest import auth, wait_final
from tests.support.lab import BLOCK, LabSpec
from tests.support.lab_service import lab_service

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

OPEN, CLOSED, TARPIT = "198.19.0.10", "198.19.0.30", "198.19.0.40"
SPEC = LabSpec(
    up={OPEN: [22, 80], "198.19.0.20": [53], CLOSED: []},
    tarpits={TARPIT: "1-100"},
    banner="SSH-2.0-OpenSSH_9.6\\r\\n",
)
LIVE = {*SPEC.up, *SPEC.tarpits}


@pytest.fixture(scope="module")
def sharding_lab_api(settings: Settings, run_dir: Path, database: str) -> Iterator[str]:
    # 100 probes a shard: the /24's 25,400 would make 8 shards, its live hosts' 400 make 4.
    with lab_service(
        SPEC, settings, run_dir, "labshards", shard_min_ports=100, max_shards=8
    ) as url:
        yield url


def scan(url: str, key: str) -> dict[str, Any]:
    with httpx.Client(base_url=url, headers=auth(key), timeout=10) as client:
        response = client.post(
            "/api/scan",
            json={"target": BLOCK, "ports": "1-100", "config": {"timeout": 1}},
        )
        assert response.status_code == 202, response.text
        return wait_final(client, response.json()["task_id"], timeout=90)


async def test_a_slash_24_is_sharded_over_its_live_hosts_only(
    sharding_lab_api: str, api_key: str, store: ScanStore
) -> None:
    body = await asyncio.to_thread(scan, sharding_lab_api, api_key)
    assert body["state"] == "SUCCESS", body
    result = body["result"]
    hosts = {host["address"]: host for host in result["hosts"]}
    every = {str(a) for a in ipaddress.ip_network(BLOCK).hosts()}
    assert set(hosts) == every
    assert {a for a, h in hosts.items() if h["state"] == "up"} == LIVE
    assert {h["reason"] for a, h in hosts.items() if a not in LIVE} == {"no-response"}
    assert hosts[OPEN]["reason"] == "syn-ack"
    assert hosts[CLOSED]["reason"] in ("reset", "syn-ack")
    found = {(p["address"], p["port"]): p for p in result["open_ports"]}
    assert set(found) == SPEC.truth
    # The tarpit flag of its shard survives the merge: its ports are not identified.
    assert hosts[TARPIT]["tarpit"]
    assert not hosts[OPEN]["tarpit"]
    assert found[(OPEN, 22)]["product"] == "OpenSSH"
    assert all(found[(TARPIT, port)].get("banner") is None for port in range(1, 101))
    assert result["total_ports_scanned"] == 100 * len(LIVE)
    assert result["probes_sent"] == sum(h["probes"] for h in hosts.values()) >= 100 * len(LIVE)
    assert result["retransmissions"] == sum(h["retransmissions"] for h in hosts.values())
    shards = await store.shards(UUID(body["scan_id"]))
    assert result["shards"] == len(shards) == 4
    assert sorted(a for shard in shards for a in shard.addresses) == sorted(LIVE)
    assert all(shard.outcome == "completed" for shard in shards)
