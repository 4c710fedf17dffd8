"""A message built by the gateway's publisher runs on a real worker; stock Celery reads it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any
from uuid import UUID, uuid4

import pytest
from celery import Celery
from celery.result import AsyncResult

from api_service.publisher import AmqpPublisher
from shared import codec
from shared.ports import parse_port_spec
from shared.protocol import PRIORITIES, SCAN_TASK, LimitPolicy, build_scan_message
from shared.schemas import ScanConfig, ScanTaskPayload
from shared.settings import Settings
from shared.store import ScanStore

LIMITS = LimitPolicy.of(Settings())


@pytest.fixture
async def publisher(settings: Settings, broker_cleanup: None) -> AsyncIterator[AmqpPublisher]:
    pub = AmqpPublisher(settings)
    await pub.start()
    yield pub
    await pub.close()


@pytest.fixture
def stock_celery(settings: Settings) -> Iterator[Celery]:
    """A plain Celery client on the same backend, configured only with the shared codec."""
    codec.register_with_kombu()
    app = Celery("contract-client", set_as_current=False)
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.redis_url,
        result_backend_transport_options={"global_keyprefix": settings.redis_prefix},
        result_serializer=codec.CODEC_NAME,
        result_accept_content=[codec.CODEC_NAME],
        accept_content=[codec.CODEC_NAME],
    )
    yield app
    app.close()


async def record(
    store: ScanStore, payload: ScanTaskPayload, task_id: UUID, *, ports: str | None = None
) -> None:
    """The row the gateway writes before it publishes ``payload``."""
    await store.insert(
        scan_id=payload.scan_id,
        task_id=task_id,
        target=payload.target,
        ports=ports or payload.ports,
        config=payload.config,
        priority=payload.priority,
    )


async def test_published_message_runs_on_a_celery_worker(
    publisher: AmqpPublisher, worker: object, store: ScanStore, stock_celery: Celery
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        spec = f"{port - 1}-{port + 1}"
        scan_id, task_id = uuid4(), uuid4()
        config = ScanConfig(timeout=1.0, max_concurrent=10)
        payload = ScanTaskPayload(
            scan_id=scan_id, target="127.0.0.1", ports=spec, config=config, priority="critical"
        )
        await record(store, payload, task_id)
        message = build_scan_message(
            task_id, payload, port_count=len(parse_port_spec(spec)), limits=LIMITS
        )
        assert message.headers["task"] == SCAN_TASK
        assert message.priority == PRIORITIES["critical"]
        await publisher.publish(message)

        result: AsyncResult[dict[str, Any]] = AsyncResult(str(task_id), app=stock_celery)
        value = await asyncio.to_thread(result.get, timeout=30)
    assert result.state == "SUCCESS"
    assert result.successful()
    assert [p["port"] for p in value["open_ports"]] == [port]
    assert value["scan_id"] == str(scan_id)
    assert value["total_ports_scanned"] == 3


async def test_an_unforeseen_error_fails_the_scan_with_a_reason(
    publisher: AmqpPublisher, worker: object, store: ScanStore, stock_celery: Celery
) -> None:
    """A message published around the gateway, whose port spec the worker cannot parse: the
    task must end FAILURE and the row 'failed', not acked with the row 'running' forever."""
    scan_id, task_id = uuid4(), uuid4()
    config = ScanConfig(timeout=1.0, max_concurrent=10)
    payload = ScanTaskPayload(
        scan_id=scan_id, target="127.0.0.1", ports="not ports", config=config, priority="high"
    )
    await record(store, payload, task_id, ports="1")
    await publisher.publish(build_scan_message(task_id, payload, port_count=1, limits=LIMITS))

    result: AsyncResult[dict[str, Any]] = AsyncResult(str(task_id), app=stock_celery)
    with pytest.raises(Exception, match="unexpected error"):
        await asyncio.to_thread(result.get, timeout=30)
    assert result.state == "FAILURE"
    row = await store.get(scan_id)
    assert row is not None
    assert row.state == "failed"
    assert row.error is not None
    assert "unexpected error" in row.error


async def test_a_schedules_exclusions_are_denied_by_the_worker_itself(
    publisher: AmqpPublisher, worker: object, store: ScanStore, stock_celery: Celery
) -> None:
    """The dispatcher checks a schedule's exclusions against its own lookup; a name may
    resolve elsewhere by the time the worker runs, so the worker applies them again."""
    scan_id, task_id = uuid4(), uuid4()
    payload = ScanTaskPayload(
        version=2,
        scan_id=scan_id,
        target="127.0.0.1",
        ports="1",
        config=ScanConfig(timeout=1.0, max_concurrent=10),
        priority="high",
        exclude=("127.0.0.0/30",),
    )
    await record(store, payload, task_id)
    await publisher.publish(build_scan_message(task_id, payload, port_count=1, limits=LIMITS))

    result: AsyncResult[dict[str, Any]] = AsyncResult(str(task_id), app=stock_celery)
    with pytest.raises(Exception, match=r"denied|not allowed"):
        await asyncio.to_thread(result.get, timeout=30)
    row = await store.get(scan_id)
    assert row is not None
    assert row.state == "failed"
    assert row.result is None
