"""Publishing scan messages the way the gateway does, without the gateway; queue housekeeping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from uuid import UUID, uuid4

import aio_pika
from aio_pika.abc import AbstractChannel

from shared.protocol import LimitPolicy, TaskMessage, build_scan_message, queue_arguments
from shared.schemas import Priority, ScanConfig, ScanTaskPayload
from shared.store import ScanStore

BENCH_ORIGIN = "bench@localhost"
BENCH_LIMITS = LimitPolicy(cap=1500, margin=30, rate_ceiling=0)
"""The time-limit settings of the defaults (what the benchmarks' stacks run with)."""


def amqp_message(message: TaskMessage) -> aio_pika.Message:
    """Exactly the properties ``api_service.publisher.AmqpPublisher.publish`` sets."""
    return aio_pika.Message(
        body=message.body,
        headers=message.headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
    )


async def declare(channel: AbstractChannel, queue: str, dead: str) -> int:
    """Declare the scan queue as both services do; returns the messages it holds."""
    await channel.declare_queue(dead, durable=True)
    declared = await channel.declare_queue(queue, durable=True, arguments=queue_arguments(dead))
    count = declared.declaration_result.message_count
    return int(count or 0)


async def purge(url: str, *queues: str) -> None:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                channel = await connection.channel()
                continue
            await queue.purge()


async def depth(url: str, queue: str) -> int:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


def scan_payload(
    ports: str, priority: Priority = "normal", *, timeout: float = 1.0, detect: bool = True
) -> ScanTaskPayload:
    return ScanTaskPayload(
        scan_id=uuid4(),
        target="127.0.0.1",
        ports=ports,
        config=ScanConfig(timeout=timeout, max_concurrent=500, service_detection=detect),
        priority=priority,
    )


def port_count(spec: str) -> int:
    total = 0
    for part in spec.split(","):
        low, _, high = part.partition("-")
        total += int(high or low) - int(low) + 1
    return total


async def publish_pipelined(
    url: str,
    queue: str,
    dead: str,
    make: Callable[[], TaskMessage],
    *,
    inflight: int,
    limit: int,
    duration: float = 3600.0,
) -> tuple[int, float]:
    """Publish ``make()`` messages, ``inflight`` unconfirmed at a time, until ``limit`` or
    ``duration``; returns (messages confirmed, seconds). Each is built when it is sent."""
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel, queue, dead)
        exchange = channel.default_exchange
        sent = 0
        end = time.perf_counter() + duration

        async def pump() -> None:
            nonlocal sent
            while sent < limit and time.perf_counter() < end:
                sent += 1
                await exchange.publish(amqp_message(make()), routing_key=queue)

        start = time.perf_counter()
        await asyncio.gather(*(pump() for _ in range(inflight)))
        return sent, time.perf_counter() - start


def raw_scan_message(ports: str = "80") -> TaskMessage:
    """What the gateway publishes for one request: a fresh payload, built and encoded."""
    payload = scan_payload(ports)
    return build_scan_message(
        uuid4(), payload, port_count=port_count(ports), origin=BENCH_ORIGIN, limits=BENCH_LIMITS
    )


async def preload_scans(
    url: str,
    queue: str,
    dead: str,
    store: ScanStore,
    count: int,
    ports: str,
    priority: Priority = "normal",
    *,
    detect: bool = True,
) -> list[tuple[UUID, UUID]]:
    """Insert ``count`` queued scan rows and publish their messages; returns (scan, task) ids."""
    payloads = [scan_payload(ports, priority, detect=detect) for _ in range(count)]
    ids = [(p.scan_id, uuid4()) for p in payloads]
    semaphore = asyncio.Semaphore(8)

    async def insert(payload: ScanTaskPayload, task_id: UUID) -> None:
        async with semaphore:
            await store.insert(
                scan_id=payload.scan_id,
                task_id=task_id,
                target=payload.target,
                ports=payload.ports,
                config=payload.config,
                priority=payload.priority,
            )

    await asyncio.gather(*(insert(p, t) for p, (_s, t) in zip(payloads, ids, strict=True)))
    messages = iter(
        build_scan_message(
            t, p, port_count=port_count(ports), origin=BENCH_ORIGIN, limits=BENCH_LIMITS
        )
        for p, (_s, t) in zip(payloads, ids, strict=True)
    )
    sent, _seconds = await publish_pipelined(
        url, queue, dead, lambda: next(messages), inflight=128, limit=count
    )
    assert sent == count
    return ids
