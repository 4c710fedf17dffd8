"""One event loop and one asyncpg pool per worker process, made on first use after the fork."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis

from shared.policy import TargetPolicy
from shared.settings import Settings
from shared.store import ScanStore, create_pool

T = TypeVar("T")
log = logging.getLogger(__name__)


class WorkerRuntime:
    """The long-lived loop a process's tasks run on, and the pool that lives on that loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.policy = TargetPolicy(settings.target_allow, settings.target_deny)
        self._store: ScanStore | None = None
        self._redis: redis.Redis | None = None

    def redis(self) -> redis.Redis:
        """A Redis client for event streams; short timeouts, so an outage only costs progress."""
        if self._redis is None:
            self._redis = redis.Redis.from_url(
                self.settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
            )
        return self._redis

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    async def store(self) -> ScanStore:
        """The process's store; the pool is opened lazily so a database outage is retryable."""
        if self._store is None:
            pool = await create_pool(self.settings.database_url, max_size=2)
            try:
                relaxed = await create_pool(
                    self.settings.database_url, max_size=1, wait_for_flush=False
                )
            except BaseException:
                await pool.close()
                raise
            self._store = ScanStore(pool, relaxed=relaxed)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            for pool in (self._store.relaxed, self._store.pool):
                try:
                    self.loop.run_until_complete(asyncio.wait_for(pool.close(), timeout=5))
                except (TimeoutError, OSError) as exc:
                    log.warning("closing a database pool failed: %s", exc)
            self._store = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        self.loop.close()


_runtime: WorkerRuntime | None = None


def get_runtime(settings: Settings) -> WorkerRuntime:
    """This process's runtime; a forked child never reuses its parent's loop or sockets."""
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        _runtime = WorkerRuntime(settings)
    return _runtime


def close_runtime() -> None:
    global _runtime
    if _runtime is not None and _runtime.pid == os.getpid():
        _runtime.close()
    _runtime = None
