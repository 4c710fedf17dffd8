"""Server-Sent Events of a scan, replayed from its Redis stream so a reconnect loses nothing.

Streams are bounded per key and per process (:class:`EventStreams`), read Redis through their
own connection pool, so that however many are open they cannot take the connections the limiter
and status reads need, and learn that a scan ended from one watcher per process that asks
PostgreSQL about every watched scan at once, never from a query per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from uuid import UUID

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api_service.errors import ApiError
from shared.redis_keys import events_key
from shared.retry import DATABASE_ERRORS as DB_ERRORS
from shared.scan_events import STREAM_MAXLEN, encode_event
from shared.schemas import ScanStatus
from shared.store import ScanStore

log = logging.getLogger(__name__)

FINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
BLOCK_MS = 1000
KEEPALIVE_SECONDS = 15
WATCH_SECONDS = 1.0
"""How often the one watcher asks PostgreSQL which watched scans ended."""


def sse(event: str, data: bytes | str, event_id: str | None = None) -> bytes:
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.insert(0, f"id: {event_id}")
    text = data.decode() if isinstance(data, bytes) else data
    lines.extend(f"data: {line}" for line in text.splitlines() or [""])
    return ("\n".join(lines) + "\n\n").encode()


class EventStreams:
    """This process's open event streams: counted per key and in all, ended by one watcher."""

    def __init__(
        self, redis: aioredis.Redis, store: ScanStore, *, per_key: int, total: int
    ) -> None:
        self.redis = redis
        """A client of its own, pool sized to ``total``: a blocked XREAD holds a connection."""
        self.store = store
        self.per_key = per_key
        self.total = total
        self._open: dict[UUID, int] = {}
        self._watched: dict[UUID, set[asyncio.Event]] = {}

    @property
    def open_count(self) -> int:
        return sum(self._open.values())

    def acquire(self, owner: UUID) -> Callable[[], None]:
        """Count one more stream of ``owner``; 429 over either bound. Returns the release,
        which may be called any number of times."""
        if self._open.get(owner, 0) >= self.per_key:
            raise ApiError(
                429,
                f"{self.per_key} event streams already open for this key",
                headers={"Retry-After": "5"},
            )
        if self.open_count >= self.total:
            raise ApiError(429, "too many event streams open", headers={"Retry-After": "5"})
        self._open[owner] = self._open.get(owner, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._open[owner] - 1
            if left:
                self._open[owner] = left
            else:
                del self._open[owner]

        return release

    def watch(self, task_id: UUID) -> asyncio.Event:
        ended = asyncio.Event()
        self._watched.setdefault(task_id, set()).add(ended)
        return ended

    def unwatch(self, task_id: UUID, ended: asyncio.Event) -> None:
        events = self._watched.get(task_id)
        if events is not None:
            events.discard(ended)
            if not events:
                del self._watched[task_id]

    async def watch_forever(self) -> None:
        """The one PostgreSQL poll of this process, whatever the number of open streams."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            try:
                await self.check_once()
            except Exception:
                # Streams still end on their own end event meanwhile; the watcher must not die.
                log.exception("event stream watcher failed; trying again")

    async def check_once(self) -> None:
        if not self._watched:
            return
        try:
            ended = await self.store.ended_among(list(self._watched))
        except DB_ERRORS as exc:
            log.debug("cannot check which streamed scans ended: %r", exc)
            return
        for task_id in ended:
            for event in self._watched.get(task_id, ()):
                event.set()

    def stream(
        self,
        owner: UUID,
        task_id: UUID,
        last_id: str,
        read_status: Callable[[], Awaitable[ScanStatus]],
        is_disconnected: Callable[[], Awaitable[bool]],
        *,
        prefix: str,
        ended_already: bool,
    ) -> AsyncIterator[bytes]:
        """A counted stream: 429 now if over a bound; the count is given back when the stream
        ends, is cancelled, or is dropped without ever being read."""
        release = self.acquire(owner)
        ended = self.watch(task_id)
        if ended_already:
            ended.set()

        def done() -> None:
            release()
            self.unwatch(task_id, ended)

        body = self._events(
            events_key(prefix, task_id), last_id, read_status, is_disconnected, ended, done
        )
        weakref.finalize(body, done)
        return body

    async def _events(
        self,
        stream: str,
        last_id: str,
        read_status: Callable[[], Awaitable[ScanStatus]],
        is_disconnected: Callable[[], Awaitable[bool]],
        ended: asyncio.Event,
        done: Callable[[], None],
    ) -> AsyncIterator[bytes]:
        try:
            async for chunk in scan_event_stream(
                self.redis, stream, last_id, read_status, is_disconnected, ended
            ):
                yield chunk
        finally:
            done()


async def scan_event_stream(
    redis: aioredis.Redis,
    stream: str,
    last_id: str,
    read_status: Callable[[], Awaitable[ScanStatus]],
    is_disconnected: Callable[[], Awaitable[bool]],
    ended: asyncio.Event,
) -> AsyncIterator[bytes]:
    """Yield stored events after ``last_id``, then live ones, ending with the final state.

    The stream's own ``end`` entry ends it; so does ``ended`` (set by the process's watcher
    when PostgreSQL says the scan is over), so a stream that expired or a Redis outage still
    ends with the right ``end`` event. PostgreSQL is read once, for that event.
    """
    idle_ms = 0
    draining = False
    while not await is_disconnected():
        entries: list[Any] = []
        try:
            # Once the scan ended, one more read without blocking drains what the worker wrote
            # just before it stored the result.
            block = None if draining else BLOCK_MS
            reply: Any = await redis.xread({stream: last_id}, block=block, count=200)
            entries = reply[0][1] if reply else []
        except (RedisError, OSError) as exc:
            log.debug("event stream unavailable: %r", exc)
            # A failed read returns at once: wait as long as a blocking read would have.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BLOCK_MS / 1000):
                    await ended.wait()
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
        if draining:
            yield sse("end", _status_json(await read_status()), last_id)
            return
        if ended.is_set():
            draining = True
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
