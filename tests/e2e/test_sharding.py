"""A large scan runs as shards on several worker processes under one task id."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest

from shared.settings import Settings
from shared.store import ScanStore
from tests.conftest import auth, base_url, own_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sharding_api(settings: Settings, run_dir: Path, database: str) -> Iterator[str]:
    with own_stack(
        settings, run_dir, "shards", workers=2, shard_min_ports=40, max_shards=5
    ) as sharded:
        yield base_url(sharded)


@dataclass(frozen=True)
class Window:
    low: int
    """The first of 200 loopback ports around the listeners."""
    taken: frozenset[int]
    """Ports of the window something else had already: they may be open, theirs."""

    def ours(self, open_ports: list[int]) -> list[int]:
        return [port for port in open_ports if port not in self.taken]


@pytest.fixture
def window(listeners: list[int]) -> Iterator[Window]:
    """200 loopback ports around ``listeners``, the others held bound (not listening: still
    closed to a connect) for the test, so a gateway, metrics server or stand-in that another
    test starts on a free port cannot land among them and show up as open."""
    low = min(listeners) - 60
    held: list[socket.socket] = []
    taken: set[int] = set()
    try:
        for port in range(low, low + 200):
            if port in listeners:
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                taken.add(port)
                continue
            held.append(sock)
        yield Window(low, frozenset(taken))
    finally:
        for sock in held:
            sock.close()


def follow(client: httpx.Client, task_id: str, timeout: float = 60) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/api/scan/{task_id}").json()
        if not seen or seen[-1] != body:
            seen.append(body)
        if body["state"] in ("SUCCESS", "FAILURE", "REVOKED"):
            return seen
        time.sleep(0.05)
    pytest.fail(f"{task_id} did not finish: {seen[-1:]}")


def follow_sync(url: str, key: str, task_id: str) -> list[dict[str, Any]]:
    with httpx.Client(base_url=url, headers=auth(key), timeout=10) as client:
        return follow(client, task_id)


async def test_sharded_scan_has_one_task_combined_progress_and_one_result(
    sharding_api: str,
    api_key: str,
    listeners: list[int],
    window: Window,
    silent_port: int,
    store: ScanStore,
) -> None:
    low = window.low
    spec = f"{low}-{low + 199},{silent_port}"
    total = len({*range(low, low + 200), silent_port})
    async with httpx.AsyncClient(
        base_url=sharding_api, headers=auth(api_key), timeout=10
    ) as client:
        response = await client.post(
            "/api/scan",
            json={
                "target": "127.0.0.1",
                "ports": spec,
                "config": {"timeout": 2.0, "service_detection": False},
            },
        )
        assert response.status_code == 202
        task_id = response.json()["task_id"]
        states = await asyncio.to_thread(follow_sync, sharding_api, api_key, task_id)
        events = (await client.get(f"/api/scan/{task_id}/events", timeout=30)).text
    final = states[-1]
    assert final["state"] == "SUCCESS", final
    result = final["result"]
    assert result["shards"] == 5
    assert result["total_ports_scanned"] == total
    assert window.ours([p["port"] for p in result["open_ports"]]) == listeners
    assert result["filtered_ports"] == 1
    shard_progress = [s for s in states if s["state"] == "PROGRESS"]
    assert shard_progress, [s["state"] for s in states]
    assert all(s["total_ports"] == total for s in shard_progress if "total_ports" in s)
    assert events.count("event: end") == 1
    row = await store.get(UUID(final["scan_id"]))
    assert row is not None
    assert row.state == "completed"
    assert row.result is not None
    assert row.result.shards == 5


def test_sharded_scan_can_be_cancelled(
    sharding_api: str, api_key: str, window: Window, silent_port: int
) -> None:
    low = window.low
    with httpx.Client(base_url=sharding_api, headers=auth(api_key), timeout=10) as client:
        task_id = client.post(
            "/api/scan",
            json={
                "target": "127.0.0.1",
                "ports": f"{low}-{low + 199},{silent_port}",
                # No retries: the 20 s timeout stays whole (no adaptive shortening).
                "config": {"timeout": 20.0, "service_detection": False, "retries": 0},
            },
        ).json()["task_id"]
        deadline = time.monotonic() + 20
        while client.get(f"/api/scan/{task_id}").json()["state"] != "PROGRESS":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.delete(f"/api/scan/{task_id}").status_code == 202
        final = follow(client, task_id, timeout=20)[-1]
    assert final["state"] == "REVOKED"
    assert final["result"]["status"] == "revoked"
    # Stopped before the silent port's 20 s timeout could settle it.
    assert final["result"]["total_ports_scanned"] < 201


async def test_cancel_after_the_shards_finished_still_revokes(
    sharding_api: str, api_key: str, listeners: list[int], window: Window, store: ScanStore
) -> None:
    """Shards of closed ports finish in milliseconds; the merge, which would identify the open
    ports for up to 3 s, must honour a cancel that came after them."""
    low = window.low
    async with httpx.AsyncClient(
        base_url=sharding_api, headers=auth(api_key), timeout=10
    ) as client:
        accepted = (
            await client.post(
                "/api/scan",
                json={
                    "target": "127.0.0.1",
                    "ports": f"{low}-{low + 199}",
                    "config": {"timeout": 2.0},
                },
            )
        ).json()
        scan_id = UUID(accepted["scan_id"])
        deadline = time.monotonic() + 20
        while True:
            shards = await store.shards(scan_id)
            if shards and all(s.outcome is not None for s in shards):
                break
            assert time.monotonic() < deadline, shards
            await asyncio.sleep(0.02)
        cancelling = await client.delete(f"/api/scan/{accepted['task_id']}")
        assert cancelling.status_code == 202, cancelling.text
        states = await asyncio.to_thread(follow_sync, sharding_api, api_key, accepted["task_id"])
    final = states[-1]
    assert final["state"] == "REVOKED", final
    result = final["result"]
    assert result["status"] == "revoked"
    assert window.ours([p["port"] for p in result["open_ports"]]) == listeners
    assert all(p.get("banner") is None for p in result["open_ports"])
