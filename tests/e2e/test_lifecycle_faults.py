"""A scan's lifecycle under faults that used to lose it: shards joined in PostgreSQL, their
limits, dead letters and cancels, and the reaper. Nothing here touches the machine's shared
services: Redis is stopped only in a private redis-server of the test's own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import aio_pika
import httpx
import pytest
import redis

from shared.protocol import MAX_DELIVERIES
from shared.reaper import REAPED
from shared.redis_keys import active_key, events_key
from shared.schemas import ScanConfig
from shared.settings import Settings
from shared.store import ScanRow, ScanStore
from tests.conftest import (
    Process,
    auth,
    base_url,
    delete_queues,
    start_api,
    start_worker,
    variant,
)
from tests.support.lifecycle import kill_children, private_redis, silent_listeners

pytestmark = pytest.mark.e2e

MERGE_SECONDS = 6
"""The stack's merge time limit; identifying the 14 silent hosts below takes about 28 s."""
SILENT_HOSTS = [f"127.0.0.{i}" for i in range(17, 31)]  # the hosts of 127.0.0.16/28


@dataclass
class Stack:
    settings: Settings
    url: str
    worker: Process


@contextmanager
def stack(settings: Settings, run_dir: Path, name: str, **changes: object) -> Iterator[Stack]:
    """A gateway and a worker (2 processes) of their own: same database, own queues."""
    own = variant(settings, name, run_dir, **changes)
    api = start_api(own, run_dir / f"api-{name}.log")
    worker = None
    try:
        worker = start_worker(own, run_dir / f"worker-{name}.log")
        yield Stack(own, base_url(own), worker)
    finally:
        if worker is not None:
            worker.discard()
        api.stop()
        # On a thread of its own: the async tests using a stack already run a loop.
        with ThreadPoolExecutor(1) as cleanup:
            cleanup.submit(asyncio.run, delete_queues(own)).result()


@pytest.fixture(scope="module")
def lifecycle(settings: Settings, run_dir: Path, database: str) -> Iterator[Stack]:
    with stack(
        settings,
        run_dir,
        "lifecycle",
        shard_min_ports=4,
        max_shards=3,
        merge_time_limit=MERGE_SECONDS,
        reap_interval=0.5,
        db_retry_seconds=1,
    ) as own:
        yield own


def submit(stack: Stack, key: str, target: str, ports: str, **config: Any) -> dict[str, Any]:
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=10) as client:
        response = client.post(
            "/api/scan", json={"target": target, "ports": ports, "config": config}
        )
    assert response.status_code == 202, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


async def row_when(
    store: ScanStore, scan_id: UUID, ready: Any, what: str, timeout: float = 30
) -> ScanRow:
    deadline = time.monotonic() + timeout
    while True:
        row = await store.get(scan_id)
        if row is not None and ready(row):
            return row
        assert time.monotonic() < deadline, f"{what}: {row}"
        await asyncio.sleep(0.05)


def final_status(stack: Stack, key: str, task_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=stack.url, headers=auth(key), timeout=10) as client:
        while True:
            body: dict[str, Any] = client.get(f"/api/scan/{task_id}").json()
            if body["state"] in ("SUCCESS", "FAILURE", "REVOKED"):
                return body
            assert time.monotonic() < deadline, body
            time.sleep(0.05)


async def test_cancel_during_a_long_merge_revokes_it_at_once(
    lifecycle: Stack, api_key: str, store: ScanStore
) -> None:
    with silent_listeners(SILENT_HOSTS) as port:
        accepted = submit(lifecycle, api_key, "127.0.0.16/28", str(port), timeout=30.0)
        scan_id = UUID(accepted["scan_id"])
        await row_when(store, scan_id, lambda r: r.merge_attempts >= 1, "merge started")
        async with httpx.AsyncClient(
            base_url=lifecycle.url, headers=auth(api_key), timeout=10
        ) as client:
            assert (await client.delete(f"/api/scan/{accepted['task_id']}")).status_code == 202
        # Identifying the 14 silent hosts would take ~28 s, past the 6 s merge limit: only the
        # cancel ends it this early, and as revoked rather than failed.
        final = await asyncio.to_thread(final_status, lifecycle, api_key, accepted["task_id"], 5)
    assert final["state"] == "REVOKED", final
    result = final["result"]
    assert result["status"] == "revoked"
    assert result["shards"] == 3
    assert sorted(p["address"] for p in result["open_ports"]) == sorted(SILENT_HOSTS)
    row = await store.get(scan_id)
    assert row is not None
    assert row.state == "revoked"


async def test_a_merge_past_its_time_limit_fails_the_scan(
    lifecycle: Stack, api_key: str, store: ScanStore
) -> None:
    with silent_listeners(SILENT_HOSTS) as port:
        accepted = submit(lifecycle, api_key, "127.0.0.16/28", str(port), timeout=30.0)
        final = await asyncio.to_thread(final_status, lifecycle, api_key, accepted["task_id"], 30)
    reason = f"the merge exceeded its time limit ({MERGE_SECONDS} s)"
    assert final["state"] == "FAILURE", final
    assert final["error"] == reason
    row = await store.get(UUID(accepted["scan_id"]))
    assert row is not None
    assert (row.state, row.error) == ("failed", reason)


async def test_a_shard_whose_worker_dies_on_every_delivery_is_dead_lettered(
    lifecycle: Stack, api_key: str, store: ScanStore, silent_port: int
) -> None:
    ports = ",".join(str(silent_port + i) for i in range(4))
    accepted = submit(lifecycle, api_key, "127.0.0.0/30", ports, timeout=20.0)
    scan_id = UUID(accepted["scan_id"])
    seen = kills = 0
    deadline = time.monotonic() + 90
    while True:
        row = await store.get(scan_id)
        assert row is not None
        if row.state != "running" and row.state != "queued":
            break
        # The shard of 127.0.0.1 waits 20 s on the silent port: its worker is killed each
        # time it starts it again.
        held = [s for s in await store.shards(scan_id) if s.addresses == ("127.0.0.1",)]
        # Killed on each of 5 deliveries; the 6th finds them lost and dead-letters itself.
        if held and held[0].outcome is None and seen < held[0].attempts <= MAX_DELIVERIES:
            seen = held[0].attempts
            kills += kill_children(lifecycle.worker.popen.pid)
        assert time.monotonic() < deadline, (row, held)
        await asyncio.sleep(0.05)
    assert row.state == "failed", row
    assert row.error is not None
    assert "delivered 5 times" in row.error, row.error
    assert "dead-letter" in row.error
    assert kills >= 5
    # The row is failed first, then the message rejected into the dead-letter queue.
    connection = await aio_pika.connect(lifecycle.settings.broker_url)
    async with connection:
        channel = await connection.channel()
        deadline = time.monotonic() + 10
        while True:
            dead = await channel.declare_queue(lifecycle.settings.dead_letter_queue, passive=True)
            if (dead.declaration_result.message_count or 0) >= 1:
                break
            assert time.monotonic() < deadline, "nothing dead-lettered"
            await asyncio.sleep(0.05)


async def test_a_scan_left_running_with_no_worker_is_reaped(
    lifecycle: Stack, store: ScanStore, settings: Settings
) -> None:
    """No delivery of it exists any more (its worker killed at the hard limit, say): the
    worker's reaper fails it with a reason and gives its key's slot back."""
    scan_id, task_id = uuid4(), uuid4()
    owner: UUID = await store.pool.fetchval("SELECT id FROM api_keys ORDER BY created_at LIMIT 1")
    await store.insert(
        scan_id=scan_id,
        task_id=task_id,
        target="127.0.0.1",
        ports="1",
        config=ScanConfig(),
        priority="normal",
        owner=owner,
    )
    client = redis.Redis.from_url(settings.redis_url)
    slots = active_key(settings.redis_prefix, owner)
    client.zadd(slots, {str(task_id): time.time() + 3600})
    try:
        await store.pool.execute(
            "UPDATE scans SET state = 'running', attempts = 1, started_at = now(),"
            " reap_after = now() - interval '1 second' WHERE id = $1",
            scan_id,
        )
        row = await row_when(store, scan_id, lambda r: r.state != "running", "reaped", 15)
        assert (row.state, row.error) == ("failed", REAPED)
        deadline = time.monotonic() + 5
        while client.zscore(slots, str(task_id)) is not None:
            assert time.monotonic() < deadline, "slot not released"
            await asyncio.sleep(0.05)
        events: list[Any] = client.xrange(events_key(settings.redis_prefix, task_id)) or []
        assert any(b"FAILURE" in fields[b"data"] for _id, fields in events), events
    finally:
        client.zrem(slots, str(task_id))
        client.close()


async def test_redis_stopped_while_shards_run_loses_no_scan(
    settings: Settings,
    run_dir: Path,
    database: str,
    api_key: str,
    store: ScanStore,
    listeners: list[int],
    silent_port: int,
) -> None:
    """Celery's Redis chord lost such a scan; the join in PostgreSQL does not need Redis."""
    ports = ",".join(str(p) for p in [*listeners, silent_port])
    with (
        private_redis(run_dir / "private-redis.log") as (url, server),
        stack(settings, run_dir, "noredis", redis_url=url, shard_min_ports=4, max_shards=3) as own,
    ):
        accepted = submit(own, api_key, "127.0.0.0/30", ports, timeout=3.0, service_detection=False)
        scan_id = UUID(accepted["scan_id"])
        deadline = time.monotonic() + 20
        while not await store.shards(scan_id):
            assert time.monotonic() < deadline, "no shards recorded"
            await asyncio.sleep(0.02)
        server.terminate()  # while the shard holding the silent port waits its 3 s
        server.wait(10)
        row = await row_when(store, scan_id, lambda r: r.state != "running", "scan ended")
    assert row.state == "completed", row
    assert row.result is not None
    assert row.result.shards == 3
    assert sorted({p.port for p in row.result.open_ports}) == listeners


async def test_a_graceful_shutdown_requeue_is_not_counted_as_a_lost_worker(
    settings: Settings,
    run_dir: Path,
    database: str,
    api_key: str,
    store: ScanStore,
    silent_port: int,
) -> None:
    """Five rolling deploys during one long scan must not dead-letter it as poison."""
    with stack(settings, run_dir, "shutdown", shutdown_timeout=1) as own:
        accepted = submit(own, api_key, "127.0.0.1", str(silent_port), timeout=20.0)
        scan_id = UUID(accepted["scan_id"])
        await row_when(store, scan_id, lambda r: r.state == "running", "scan running")
        own.worker.stop()
        row = await store.get(scan_id)
    assert row is not None
    # Its next delivery then counts attempts 2, released 1: no lost delivery.
    assert (row.state, row.attempts, row.released) == ("running", 1, 1)
