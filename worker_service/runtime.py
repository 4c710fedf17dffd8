"""One event loop and one asyncpg pool per worker process, made on first use after the fork."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

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
        self._store: ScanStore | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    async def store(self) -> ScanStore:
        """The process's store; the pool is opened lazily so a database outage is retryable."""
        if self._store is None:
            pool = await create_pool(self.settings.database_url, max_size=2)
            self._store = ScanStore(pool)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            try:
                self.loop.run_until_complete(asyncio.wait_for(self._store.pool.close(), timeout=5))
            except (TimeoutError, OSError) as exc:
                log.warning("closing the database pool failed: %s", exc)
            self._store = None
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
