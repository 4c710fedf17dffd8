"""The whole path: HTTP -> gateway -> RabbitMQ -> Celery worker -> Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from uuid import UUID

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from shared.redis_keys import active_key, events_key, result_key
from shared.settings import Settings
from shared.store import ScanStore

pytestmark = pytest.mark.e2e


def poll(client: httpx.Client, task_id: str, timeout: float = 30) -> list[dict[str, Any]]:
    """Every distinct state seen until a final one, polling with a deadline."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(f"/api/scan/{task_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        if not seen or seen[-1]["state"] != body["state"]:
            seen.append(body)
        if body["state"] in ("SUCCESS", "FAILURE", "REVOKED"):
            return seen
        time.sleep(0.05)
    pytest.fail(f"scan {task_id} did not finish: {seen}")


def test_scan_finds_exactly_the_ports_opened(
    client: httpx.Client, worker: object, listeners: list[int]
) -> None:
    spec = f"{listeners[0] - 2}-{listeners[-1] + 2}"
    response = client.post(
        "/api/scan",
        json={
            "target": "127.0.0.1",
            "ports": spec,
            "config": {"scan_type": "TCP", "timeout": 1.0, "max_concurrent": 500},
        },
    )
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert set(accepted) == {"task_id", "scan_id", "status", "message"}
    assert accepted["status"] == "queued"
    states = poll(client, accepted["task_id"])

    final = states[-1]
    assert final["state"] == "SUCCESS", final
    result = final["result"]
    assert [p["port"] for p in result["open_ports"]] == listeners
    assert all(p["state"] == "open" for p in result["open_ports"])
    assert result["total_ports_scanned"] == listeners[-1] - listeners[0] + 5
    assert result["status"] == "completed"
    assert result["progress"] == 100
    assert result["scan_id"] == accepted["scan_id"]
    assert result["started_at"] <= result["finished_at"]


async def test_finished_scan_is_stored_and_outlives_redis(
    aclient: httpx.AsyncClient,
    worker: object,
    listeners: list[int],
    settings: Settings,
    store: ScanStore,
    redis_client: aioredis.Redis,
) -> None:
    client = aclient
    response = await client.post(
        "/api/scan",
        json={"target": "127.0.0.1", "ports": ",".join(map(str, listeners))},
    )
    assert response.status_code == 202, response.text
    task_id = response.json()["task_id"]
    deadline = time.monotonic() + 30
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = (await client.get(f"/api/scan/{task_id}")).json()
        if body["state"] == "SUCCESS":
            break
    assert body["state"] == "SUCCESS", body

    row = await store.get_by_task(UUID(task_id))
    assert row is not None
    assert row.state == "completed"
    assert row.target == "127.0.0.1"
    assert row.ports == ",".join(map(str, listeners))
    assert row.priority == "normal"
    assert row.attempts == 1
    assert row.result is not None
    assert [p.port for p in row.result.open_ports] == listeners

    # The Redis entry expires after result_ttl; PostgreSQL still answers.
    assert await redis_client.delete(result_key(settings.redis_prefix, task_id)) == 1
    after = (await client.get(f"/api/scan/{task_id}")).json()
    assert after["state"] == "SUCCESS"
    assert [p["port"] for p in after["result"]["open_ports"]] == listeners


def test_progress_is_reported_while_scanning(
    client: httpx.Client, worker: object, listeners: list[int], silent_port: int
) -> None:
    # The silent port holds the scan for its whole timeout, long enough to see PROGRESS.
    ports = ",".join(map(str, [*listeners, silent_port]))
    response = client.post(
        "/api/scan",
        json={"target": "127.0.0.1", "ports": ports, "config": {"timeout": 2.0}},
    )
    assert response.status_code == 202
    states = poll(client, response.json()["task_id"], timeout=60)
    names = [s["state"] for s in states]
    assert names[-1] == "SUCCESS"
    progress = [s for s in states if s["state"] == "PROGRESS"]
    assert progress, names
    assert 0 <= progress[0]["progress"] < 100
    assert progress[0]["status"] == "Scanning low priority ports"
    assert progress[0]["tier"] == "low"
    assert progress[0]["total_ports"] == len(listeners) + 1
    result = states[-1]["result"]
    assert [p["port"] for p in result["open_ports"]] == listeners
    assert result["filtered_ports"] == 1


def test_unknown_task_is_404(client: httpx.Client) -> None:
    for task_id in ("00000000-0000-0000-0000-000000000000", "not-a-uuid"):
        response = client.get(f"/api/scan/{task_id}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


async def test_a_finished_scan_ends_its_stream_and_frees_its_slot_with_its_success(
    aclient: httpx.AsyncClient,
    worker: object,
    settings: Settings,
    store: ScanStore,
    redis_client: aioredis.Redis,
) -> None:
    """The end event and the slot release ride on the SUCCESS the worker stores: once the
    state is SUCCESS, both are there (one MULTI/EXEC), and neither came before it."""
    response = await aclient.post("/api/scan", json={"target": "127.0.0.1", "ports": "1"})
    assert response.status_code == 202, response.text
    task_id = response.json()["task_id"]
    row = await store.get_by_task(UUID(task_id))
    assert row is not None
    assert row.api_key_id is not None
    active = active_key(settings.redis_prefix, row.api_key_id)
    events = events_key(settings.redis_prefix, task_id)
    seen: list[tuple[bool, bool, bool]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with redis_client.pipeline(transaction=True) as pipe:
            pipe.get(result_key(settings.redis_prefix, task_id))
            pipe.xrevrange(events, count=1)
            pipe.zscore(active, task_id)
            meta, last, slot = await pipe.execute()
        succeeded = meta is not None and orjson.loads(meta)["status"] == "SUCCESS"
        ended = bool(last) and last[0][1][b"kind"] == b"end"
        seen.append((succeeded, ended, slot is None))
        if succeeded:
            break
        await asyncio.sleep(0.01)
    assert seen[-1] == (True, True, True), seen
    assert all(state in {(False, False, False), (True, True, True)} for state in seen), seen
    assert orjson.loads(last[0][1][b"data"]) == {"state": "SUCCESS"}


async def test_a_running_scan_holds_its_slot_from_its_start_not_its_submission(
    aclient: httpx.AsyncClient,
    worker: object,
    settings: Settings,
    store: ScanStore,
    redis_client: aioredis.Redis,
    silent_port: int,
) -> None:
    """The gateway's slot lives as long as a scan may wait in the queue (result_ttl); once a
    worker starts the scan, it counts from the start, bounded by the time the scan may take.
    Before, it counted from the submission, so a long queue freed slots of scans yet to run."""
    response = await aclient.post(
        "/api/scan",
        json={"target": "127.0.0.1", "ports": str(silent_port), "config": {"timeout": 2.0}},
    )
    assert response.status_code == 202, response.text
    task_id = response.json()["task_id"]
    row = await store.get_by_task(UUID(task_id))
    assert row is not None
    assert row.api_key_id is not None
    active = active_key(settings.redis_prefix, row.api_key_id)
    scores: list[float] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        score = await redis_client.zscore(active, task_id)
        if score is None:
            break
        left = score - time.time()
        if not scores or abs(left - scores[-1]) > 1:
            scores.append(left)
        if left < settings.result_ttl / 2:
            break
        await asyncio.sleep(0.02)
    assert scores, "the gateway took no slot"
    if len(scores) > 1:  # seen while queued: held for as long as a scan may wait
        assert scores[0] > settings.result_ttl / 2, scores
    assert scores[-1] < settings.result_ttl / 2, scores  # renewed from the start
    row = await store.get_by_task(UUID(task_id))
    assert row is not None
    assert row.state in ("running", "completed"), row.state
