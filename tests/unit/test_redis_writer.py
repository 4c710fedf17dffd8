"""Redis writes of a threads-pool process: one writer thread, progress coalesced, and one
shared backoff, so a Redis that accepts and never answers cannot pile up work for the writer."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.retry import REDIS_RETRIES, async_redis_retry, redis_retry
from shared.settings import Settings
from worker_service.reporting import EventLog, RedisGate


@pytest.fixture
def writer() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown(wait=True)


def test_progress_waiting_for_the_writer_is_replaced_by_newer_progress(
    writer: ThreadPoolExecutor,
) -> None:
    events = EventLog(redis.Redis(), "t:", "task", 60, writer=writer)
    busy = threading.Event()
    writer.submit(busy.wait, 10)  # the writer is held, as by a slow Redis
    ran: list[int] = []
    for value in range(50):
        events.post_latest(partial(ran.append, value))
    busy.set()
    writer.submit(lambda: None).result(10)
    assert ran == [49]
    events.post_latest(partial(ran.append, 50))  # nothing waits now: it runs
    writer.submit(lambda: None).result(10)
    assert ran == [49, 50]


@pytest.fixture
def silent_redis() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP port that accepts and reads, and never answers: a hung Redis."""
    server = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            held.append(conn)
            conn.settimeout(0.1)
            threading.Thread(target=read, args=(conn,), daemon=True).start()

    def read(conn: socket.socket) -> None:
        while not stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            received.append(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], received
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_a_hung_redis_costs_no_progress_write_once_it_timed_out(
    writer: ThreadPoolExecutor, silent_redis: tuple[int, list[bytes]]
) -> None:
    port, received = silent_redis
    client = redis.Redis(
        port=port, socket_timeout=0.3, socket_connect_timeout=1, retry=redis_retry()
    )
    gate = RedisGate()
    scans = [EventLog(client, "t:", f"task-{n}", 60, writer=writer, gate=gate) for n in range(4)]
    for events in scans:
        events.hold_slot("owner", 60)  # each scan renews its slot once, at its start
    for step in range(25):
        for events in scans:
            events.post_latest(partial(events.write, ("progress", {"step": step})))
    writer.submit(lambda: None).result(30)
    client.close()
    assert not gate.available  # a timeout paused every scan's progress writes
    # The slot renewals each went out (1 + REDIS_RETRIES tries), however down Redis looked: a
    # slot left unrenewed would hold the key's capacity for a day. Not one of the 100
    # progress writes reached the hung server.
    assert len(received) == len(scans) * (1 + REDIS_RETRIES), [r[:60] for r in received]


async def test_a_gateway_client_tries_a_hung_redis_once_more_not_ten_times(
    silent_redis: tuple[int, list[bytes]],
) -> None:
    """redis-py 8's own default would send a command 11 times, each waiting its timeout."""
    port, received = silent_redis
    client = aioredis.Redis(
        port=port, socket_timeout=0.2, socket_connect_timeout=1, retry=async_redis_retry()
    )
    with pytest.raises(RedisTimeoutError):
        await client.ping()
    await client.aclose()
    assert 1 <= len(received) <= 1 + REDIS_RETRIES, [r[:60] for r in received]


def test_a_write_that_goes_through_ends_the_backoff(
    writer: ThreadPoolExecutor, settings: Settings
) -> None:
    """Redis is back: a new scan's slot renewal goes through, and progress resumes at once,
    not after the backoff of an earlier scan's failure."""
    gate = RedisGate()
    gate.failed()
    client = redis.Redis.from_url(settings.redis_url)
    events = EventLog(client, settings.redis_prefix, "task", 60, writer=writer, gate=gate)
    assert not events.available
    events.hold_slot("owner", 60)  # the real Redis answers (a ZADD XX of no member: a no-op)
    writer.submit(lambda: None).result(10)
    client.close()
    assert events.available
