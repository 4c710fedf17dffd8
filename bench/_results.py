"""Watches Celery's Redis result backend by subscription, so finishing times cost no polling.

Celery's Redis backend publishes every state it stores on a channel named like the key
(``<prefix>celery-task-meta-<id>``); one pattern subscription sees every PROGRESS and SUCCESS
of a run, stamped when it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import orjson
import redis.asyncio as aioredis

from shared.redis_keys import result_key

_MARK = "celery-task-meta-"


class ResultWatcher:
    def __init__(self, redis_url: str, prefix: str) -> None:
        self.client = aioredis.Redis.from_url(redis_url)
        self.pubsub = self.client.pubsub()
        self.pattern = result_key(prefix, "*")
        self.first_progress: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.states: dict[str, str] = {}
        self.results: dict[str, Any] = {}
        self._waiters: dict[str, asyncio.Future[float]] = {}
        self._expected: set[str] | None = None
        self._all_done = asyncio.Event()
        self._any_done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ResultWatcher:
        await self.pubsub.psubscribe(self.pattern)
        self._task = asyncio.ensure_future(self._listen())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.client.aclose()

    async def _listen(self) -> None:
        async for message in self.pubsub.listen():
            if message["type"] != "pmessage":
                continue
            now = time.time()
            channel = message["channel"].decode()
            task_id = channel.rsplit(_MARK, 1)[-1]
            meta = orjson.loads(message["data"])
            state = meta.get("status")
            if state == "PROGRESS":
                self.first_progress.setdefault(task_id, now)
                continue
            if state not in ("SUCCESS", "FAILURE", "REVOKED"):
                continue
            self.finished[task_id] = now
            self.states[task_id] = state
            self.results[task_id] = meta.get("result")
            self._any_done.set()
            waiter = self._waiters.pop(task_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(now)
            if self._expected is not None:
                self._expected.discard(task_id)
                if not self._expected:
                    self._all_done.set()

    def expect(self, task_ids: Collection[str]) -> None:
        """Start counting these ids (ones already finished count at once)."""
        self._expected = {t for t in task_ids if t not in self.finished}
        self._all_done = asyncio.Event()
        if not self._expected:
            self._all_done.set()

    async def wait_all(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._all_done.wait(), timeout)
        except TimeoutError:
            left = len(self._expected or ())
            raise TimeoutError(f"{left} tasks still unfinished after {timeout:.0f}s") from None

    async def wait(self, task_id: str, timeout: float) -> float:
        """Arrival time (``time.time()``) of the task's final state."""
        if task_id in self.finished:
            return self.finished[task_id]
        waiter = self._waiters.setdefault(task_id, asyncio.get_running_loop().create_future())
        return await asyncio.wait_for(waiter, timeout)

    async def wait_any(self, task_ids: Collection[str], timeout: float) -> None:
        """Until one of these ids has finished."""
        async with asyncio.timeout(timeout):
            while not self.finished.keys() & set(task_ids):
                self._any_done.clear()
                await self._any_done.wait()

    def span(self, task_ids: Collection[str]) -> tuple[float, float]:
        """(first, last) finishing time among these ids."""
        times = [self.finished[t] for t in task_ids]
        return min(times), max(times)


async def wait_stored(
    client: aioredis.Redis, prefix: str, task_ids: Sequence[str], timeout: float
) -> None:
    """Until every task's result key exists; one EXISTS a quarter second, so the watching
    costs the measured services (and the 2 cores) next to nothing."""
    keys = [result_key(prefix, t) for t in task_ids]
    deadline = time.monotonic() + timeout
    while True:
        present = 0
        for start in range(0, len(keys), 5000):
            present += int(await client.exists(*keys[start : start + 5000]))
        if present == len(keys):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(keys) - present} tasks unfinished after {timeout:.0f}s")
        await asyncio.sleep(0.25)


async def stored_span(
    client: aioredis.Redis, prefix: str, task_ids: Sequence[str]
) -> tuple[float, float, dict[str, int]]:
    """(first, last) ``date_done`` among the tasks' stored results, and a count per state."""
    keys = [result_key(prefix, t) for t in task_ids]
    stamps: list[float] = []
    states: dict[str, int] = {}
    for start in range(0, len(keys), 1000):
        for raw in await client.mget(keys[start : start + 1000]):
            if raw is None:
                raise RuntimeError("a result key expired before it was read")
            meta = orjson.loads(raw)
            states[meta["status"]] = states.get(meta["status"], 0) + 1
            done = meta["date_done"]
            if isinstance(done, dict):  # kombu's tagged datetime
                done = done["__value__"]
            stamp = datetime.fromisoformat(done)
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=UTC)
            stamps.append(stamp.timestamp())
    return min(stamps), max(stamps), states
