"""Break things for real and count: every scan the API accepted must finish or fail with a
stated reason; none may be lost or stored twice."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import aio_pika
import httpx
import orjson
import pytest

from shared import codec
from shared.protocol import LimitPolicy, build_scan_message
from shared.schemas import ScanConfig, ScanTaskPayload
from shared.settings import Settings
from tests.conftest import (
    auth,
    base_url,
    delete_queues,
    start_api,
    variant,
)
from tests.faults import services
from tests.support.faults import (
    FINAL_ROW_STATES,
    Batch,
    Stack,
    assert_nothing_lost,
    fault_stack,
    query,
    scan_ports,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def stack(settings: Settings, run_dir: Path, database: str) -> Iterator[Stack]:
    with fault_stack(
        settings,
        run_dir,
        "faults",
        shutdown_timeout=3,
        db_retry_seconds=120,
        publish_timeout=2.0,
    ) as created:
        yield created


def test_worker_processes_killed_mid_scan(
    stack: Stack,
    api_key: str,
    listeners: list[int],
    silent_port: int,
    report: list[dict[str, Any]],
) -> None:
    batch = Batch("worker child SIGKILL", stack, api_key, scan_ports(listeners, silent_port), 2.0)
    batch.submit(6)
    for _ in range(2):
        batch.wait_running()
        for pid in stack.children():
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    counts = batch.settle(report)
    assert_nothing_lost(counts)
    assert counts["completed"] == 6, counts
    assert max(r["attempts"] for r in batch.rows()) >= 2  # some scans really were redelivered


def test_whole_worker_killed_and_replaced(
    stack: Stack,
    api_key: str,
    listeners: list[int],
    silent_port: int,
    report: list[dict[str, Any]],
) -> None:
    batch = Batch(
        "worker SIGKILL, new worker", stack, api_key, scan_ports(listeners, silent_port), 2.0
    )
    batch.submit(6)
    batch.wait_running()
    assert stack.worker is not None
    children = stack.children()
    os.kill(stack.worker.popen.pid, signal.SIGKILL)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    stack.worker.stop()
    stack.start_worker()
    counts = batch.settle(report)
    assert_nothing_lost(counts)
    assert counts["completed"] == 6, counts


def test_sigterm_requeues_running_scans_within_the_bound(
    stack: Stack,
    api_key: str,
    listeners: list[int],
    silent_port: int,
    report: list[dict[str, Any]],
) -> None:
    # Each scan waits 5 s on its silent port, longer than the 3 s shutdown bound.
    batch = Batch("worker SIGTERM", stack, api_key, scan_ports(listeners, silent_port), 5.0)
    # One running in each worker process (prefetch 1 per process: nothing more is reserved).
    batch.submit(2)
    batch.wait_running(at_least=2)
    assert stack.worker is not None
    stack.worker.popen.send_signal(signal.SIGTERM)
    # Raises if the worker outlives its bound (plus start-up slack) instead of requeueing.
    code = stack.worker.popen.wait(stack.settings.shutdown_timeout + 15)
    log = stack.worker.output()
    assert "Soft Shutdown" in log, log[-2000:]
    stack.worker.stop()
    stack.start_worker()
    counts = batch.settle(report)
    assert_nothing_lost(counts)
    assert counts["completed"] == 2, counts
    assert code is not None


def test_broker_outage(
    stack: Stack,
    api_key: str,
    listeners: list[int],
    silent_port: int,
    report: list[dict[str, Any]],
) -> None:
    batch = Batch("RabbitMQ stopped", stack, api_key, scan_ports(listeners, silent_port), 1.0)
    batch.submit(4)
    first = next(iter(batch.accepted.values()))
    with services.outage(services.stop_rabbitmq, services.start_rabbitmq):
        # Answered at once while reconnecting: a gateway that waited for its publish
        # timeout instead would outlast the client's own timeout, which then raises.
        refused = httpx.post(
            f"{stack.url}/api/scan",
            headers=auth(api_key),
            json=batch.body,
            timeout=stack.settings.publish_timeout * 0.75,
        )
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "unavailable"
        assert batch.once("GET", f"/api/scan/{first}").status_code == 200
        ready = httpx.get(f"{stack.url}/readyz").json()
        assert ready["checks"]["broker"] is False
    # The gateway reconnects by itself: a client retrying after 503 gets its 202.
    batch.submit(4, deadline=90)
    counts = batch.settle(report)
    assert_nothing_lost(counts)
    assert counts["completed"] == 8, counts
    assert httpx.get(f"{stack.url}/readyz").status_code == 200


def test_database_outage_while_scans_finish(
    stack: Stack,
    api_key: str,
    listeners: list[int],
    silent_port: int,
    report: list[dict[str, Any]],
) -> None:
    batch = Batch("PostgreSQL stopped", stack, api_key, scan_ports(listeners, silent_port), 3.0)
    batch.submit(4)
    batch.wait_running(at_least=2)
    seen_from_redis = False
    with services.outage(services.stop_postgres, services.start_postgres):
        refused = batch.once("POST", "/api/scan", json=batch.body)
        assert refused.status_code == 503
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not seen_from_redis:
            for task_id in batch.accepted.values():
                answer = batch.once("GET", f"/api/scan/{task_id}")
                if answer.status_code == 200 and answer.json()["state"] == "SUCCESS":
                    assert answer.json()["result"]["open_ports"]
                    seen_from_redis = True
            time.sleep(0.2)
    assert seen_from_redis, (
        "no finished result was readable from Redis during the outage:\n"
        + (stack.worker.output()[-4000:] if stack.worker else "")
        + stack.api.output()[-3000:]
    )
    counts = batch.settle(report)
    assert_nothing_lost(counts)
    assert counts["completed"] == 4, counts


@pytest.fixture(scope="module")
def short_stack(settings: Settings, run_dir: Path, database: str) -> Iterator[Stack]:
    """Scans with a 5 s soft time limit (hard: 15 s), and a database retry far longer."""
    with fault_stack(
        settings,
        run_dir,
        "faults-short",
        max_scan_seconds=5,
        hard_limit_margin=10,
        db_retry_seconds=120,
    ) as created:
        yield created


def test_database_outage_longer_than_the_time_limit(
    short_stack: Stack,
    api_key: str,
    listeners: list[int],
    silent_port: int,
    report: list[dict[str, Any]],
) -> None:
    """The scan finishes while PostgreSQL is away, and its time limits pass before it is back:
    the delivery retries its result write only until shortly before its hard limit, then hands
    the message back (a retry), instead of waiting for the database until the hard limit kills
    it (which acks it, the row 'running' for ever)."""
    batch = Batch(
        "PostgreSQL away past the time limit",
        short_stack,
        api_key,
        scan_ports(listeners, silent_port),
        2.0,
    )
    batch.submit(1)
    batch.wait_running(at_least=1)
    worker = short_stack.worker
    assert worker is not None
    handed_back = "database unavailable while storing the result; retrying in"
    with services.outage(services.stop_postgres, services.start_postgres):
        # The database stays away past the soft limit (5 s) until the delivery has handed the
        # message back, which must come before its hard limit (15 s) would have killed it.
        deadline = time.monotonic() + 25
        while handed_back not in worker.output() and time.monotonic() < deadline:
            time.sleep(0.5)
    assert handed_back in worker.output(), worker.output()[-4000:]
    counts = batch.settle(report)
    assert_nothing_lost(counts)
    assert counts["completed"] == 1, (
        counts,
        short_stack.worker.output()[-4000:] if short_stack.worker else "",
    )


def test_redis_outage(
    stack: Stack,
    api_key: str,
    listeners: list[int],
    silent_port: int,
    report: list[dict[str, Any]],
) -> None:
    batch = Batch("Redis stopped", stack, api_key, scan_ports(listeners, silent_port), 2.0)
    batch.submit(2)
    with services.outage(services.stop_redis, services.start_redis):
        batch.submit(2)  # accepted: limits fail open, PostgreSQL records the scans
        for task_id in batch.accepted.values():
            answer = batch.once("GET", f"/api/scan/{task_id}")
            assert answer.status_code == 200  # answered from PostgreSQL
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(r["state"] in FINAL_ROW_STATES for r in batch.rows()):
                break
            time.sleep(0.2)
    counts = batch.settle(report)
    assert_nothing_lost(counts)
    assert counts["completed"] == 4, counts
    # Progress is back once Redis is: a new scan reports PROGRESS again.
    after = Batch("after Redis returned", stack, api_key, scan_ports(listeners, silent_port), 2.0)
    after.submit(1)
    task_id = next(iter(after.accepted.values()))
    states: set[str] = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "SUCCESS" not in states:
        states.add(after.client.get(f"/api/scan/{task_id}").json()["state"])
        time.sleep(0.05)
    assert "PROGRESS" in states, states
    assert_nothing_lost(after.settle([]))


async def _publish_raw(settings: Settings, body: bytes, content_type: str, task_id: UUID) -> None:
    connection = await aio_pika.connect(settings.broker_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        headers = build_scan_message(
            task_id, _payload(uuid4()), port_count=1, limits=LimitPolicy.of(settings)
        ).headers
        await channel.default_exchange.publish(
            aio_pika.Message(
                body=body,
                headers=headers,
                content_type=content_type,
                content_encoding="utf-8",
                correlation_id=str(task_id),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=settings.scan_queue,
        )


def _payload(scan_id: UUID) -> ScanTaskPayload:
    return ScanTaskPayload(
        scan_id=scan_id, target="127.0.0.1", ports="1", config=ScanConfig(), priority="normal"
    )


async def _dead_letters(settings: Settings) -> int:
    connection = await aio_pika.connect(settings.broker_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.dead_letter_queue, passive=True)
        return int(queue.declaration_result.message_count or 0)


def test_poison_messages_are_dead_lettered_and_the_worker_survives(
    stack: Stack,
    api_key: str,
    listeners: list[int],
    silent_port: int,
    report: list[dict[str, Any]],
) -> None:
    settings = stack.settings
    assert stack.worker is not None
    worker_pid = stack.worker.popen.pid
    before = asyncio.run(_dead_letters(settings))
    owner = query(settings, "SELECT id FROM api_keys WHERE key_prefix = $1", api_key[:10])
    bodies = [
        (codec.dumps([[_payload(uuid4()).model_dump(mode="json")], {}]), codec.CONTENT_TYPE),
        (b"\x00\xff not json", codec.CONTENT_TYPE),
        (orjson.dumps({"args": 1}), codec.CONTENT_TYPE),
        (codec.dumps([[{"bogus": True}], {}, {}]), codec.CONTENT_TYPE),
        (b"\x80\x04K\x01.", "application/x-python-serialize"),
    ]
    task_ids = []
    for body, content_type in bodies:
        task_id = uuid4()
        query(
            settings,
            "INSERT INTO scans (id, task_id, target, ports, config, priority, api_key_id)"
            " VALUES ($1, $2, '127.0.0.1', '1', '{}', 'normal', $3)",
            uuid4(),
            task_id,
            owner[0]["id"] if owner else None,
        )
        asyncio.run(_publish_raw(settings, body, content_type, task_id))
        task_ids.append(task_id)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if asyncio.run(_dead_letters(settings)) >= before + len(bodies):
            break
        time.sleep(0.2)
    assert asyncio.run(_dead_letters(settings)) == before + len(bodies), stack.worker.output()[
        -6000:
    ]
    rows = query(settings, "SELECT state, error FROM scans WHERE task_id = ANY($1)", task_ids)
    assert [r["state"] for r in rows] == ["failed"] * len(bodies)
    assert all(r["error"] for r in rows)
    assert stack.worker.alive()
    assert stack.worker.popen.pid == worker_pid

    # A scan whose worker dies on every delivery is given up after a bounded number.
    batch = Batch(
        "poison: kills its worker", stack, api_key, scan_ports(listeners, silent_port), 5.0
    )
    batch.submit(1)
    seen_attempts = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        row = batch.rows()[0]
        if row["state"] in FINAL_ROW_STATES:
            break
        if row["state"] == "running" and row["attempts"] > seen_attempts:
            seen_attempts = row["attempts"]
            time.sleep(0.3)
            for pid in stack.children():
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    counts = batch.settle(report)
    assert counts["failed"] == 1, counts
    assert "moved to the dead-letter queue" in counts["reasons"][0]
    assert asyncio.run(_dead_letters(settings)) == before + len(bodies) + 1

    # And the worker still scans.
    healthy = Batch("after poison", stack, api_key, ",".join(map(str, listeners)), 1.0)
    healthy.submit(1)
    assert healthy.settle([])["completed"] == 1


def test_keys_while_the_database_is_away(stack: Stack, api_key: str) -> None:
    """A key seen valid keeps authenticating; an unknown one cannot be checked: 503, not 500."""
    url = stack.url
    assert httpx.get(f"{url}/api/scans", headers=auth(api_key)).status_code == 200
    with services.outage(services.stop_postgres, services.start_postgres):
        listing = httpx.get(f"{url}/api/scans", headers=auth(api_key), timeout=10)
        assert listing.status_code == 503  # authenticated, but listing needs the database
        assert listing.json()["error"]["code"] == "unavailable"
        unknown = httpx.get(f"{url}/api/scans", headers=auth("x" * 40), timeout=10)
        assert unknown.status_code == 503
        assert unknown.headers["retry-after"]


def test_api_sigterm_finishes_requests_and_closes_cleanly(
    settings: Settings, run_dir: Path, api_key: str, database: str
) -> None:
    """SIGTERM on the gateway: requests in flight still get their answer, then it exits 0."""
    import threading

    own = variant(
        settings, "api-stop", run_dir, rate_limit_per_minute=100_000, max_active_scans=100_000
    )
    api = start_api(own, run_dir / "api-stop.log")
    answers: list[int] = []

    def submit_many() -> None:
        with httpx.Client(base_url=base_url(own), headers=auth(api_key), timeout=10) as client:
            for _ in range(2000):
                try:
                    answers.append(
                        client.post("/api/scan", json={"target": "127.0.0.1"}).status_code
                    )
                except httpx.TransportError:
                    return  # the server stopped taking new connections: expected

    sender = threading.Thread(target=submit_many)
    sender.start()
    time.sleep(0.3)
    api.popen.send_signal(signal.SIGTERM)
    code = api.popen.wait(own.shutdown_timeout + 10)
    sender.join(30)
    log = api.output()
    api.stop()
    asyncio.run(delete_queues(own))
    # uvicorn re-raises the signal once it has shut down cleanly.
    assert code in (0, -signal.SIGTERM), log[-2000:]
    assert answers, "no request was answered before the stop"
    assert set(answers) <= {202}, answers  # nothing cut off half-way: no 5xx
    assert "Application shutdown complete" in log
