"""Server-Sent Events of a scan, replayed from its Redis stream so a reconnect loses nothing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.redis_keys import events_key
from shared.scan_events import STREAM_MAXLEN, encode_event
from shared.schemas import ScanStatus

log = logging.getLogger(__name__)

FINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
BLOCK_MS = 1000
KEEPALIVE_SECONDS = 15


def sse(event: str, data: bytes | str, event_id: str | None = None) -> bytes:
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.insert(0, f"id: {event_id}")
    text = data.decode() if isinstance(data, bytes) else data
    lines.extend(f"data: {line}" for line in text.splitlines() or [""])
    return ("\n".join(lines) + "\n\n").encode()


async def scan_event_stream(
    redis: aioredis.Redis,
    stream: str,
    last_id: str,
    read_status: Callable[[], Awaitable[ScanStatus]],
    is_disconnected: Callable[[], Awaitable[bool]],
) -> AsyncIterator[bytes]:
    """Yield stored events after ``last_id``, then live ones, ending with the final state.

    PostgreSQL is asked for the state whenever the stream is quiet, so a stream that expired or
    a Redis outage still ends with the right ``end`` event.
    """
    idle_ms = 0
    final: ScanStatus | None = None
    while not await is_disconnected():
        entries: list[Any] = []
        try:
            # Once PostgreSQL says the scan ended, one more read without blocking drains what
            # the worker wrote just before it stored the result.
            block = None if final is not None else BLOCK_MS
            reply: Any = await redis.xread({stream: last_id}, block=block, count=200)
            entries = reply[0][1] if reply else []
        except (RedisError, OSError) as exc:
            log.debug("event stream unavailable: %r", exc)
            # A failed read returns at once: wait as long as a blocking read would have.
            await asyncio.sleep(BLOCK_MS / 1000)
        for entry_id, fields in entries:
            last_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            kind = fields[b"kind"].decode()
            if kind == "end":
                yield sse("end", _status_json(await read_status()), last_id)
                return
            yield sse(kind, fields[b"data"], last_id)
        if entries:
            idle_ms = 0
            continue
        if final is not None:
            yield sse("end", _status_json(final), last_id)
            return
        status = await read_status()
        if status.state in FINAL_STATES:
            final = status
            continue
        idle_ms += BLOCK_MS
        if idle_ms >= KEEPALIVE_SECONDS * 1000:
            idle_ms = 0
            yield b": keepalive\n\n"


class EventWriter:
    """The gateway's few writes to event streams: the end of a scan it cancelled itself."""

    def __init__(self, redis: aioredis.Redis, prefix: str, ttl: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl = ttl

    async def end(self, task_id: object, state: str) -> None:
        key = events_key(self.prefix, str(task_id))
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(key, encode_event("end", {"state": state}), maxlen=STREAM_MAXLEN)  # type: ignore[arg-type]
                pipe.expire(key, self.ttl)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not write the end event of %s: %r", task_id, exc)


def _status_json(status: ScanStatus) -> bytes:
    return orjson.dumps(status.model_dump(mode="json", exclude_none=True))
