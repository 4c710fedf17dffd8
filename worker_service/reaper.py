"""The worker's reaper: every ``reap_interval`` s, the main process fails scans left 'running'.

``shared.reaper.reap`` claims the rows (``FOR UPDATE SKIP LOCKED``: any number of workers may
run this at once); here each reaped scan's event stream gets its ``end`` and its key's slot is
released. It runs on a thread of the worker's main process, on its own event loop and pool, so
it needs no other process and holds no prefork child.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import asyncpg
import redis
from celery.signals import worker_ready, worker_shutdown

from shared.reaper import Reaped, reap
from shared.retry import DATABASE_ERRORS
from shared.settings import Settings
from shared.store import create_pool
from worker_service.reporting import EventLog

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, **_: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
            self._thread.start()

    def stop(self, **_: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        client = redis.Redis.from_url(
            self.settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        pool: asyncpg.Pool[Any] | None = None
        try:
            while not self._stop.is_set():
                try:
                    pool = pool or await create_pool(self.settings.database_url, max_size=1)
                    for scan in await reap(pool):
                        log.warning("scan %s: reaped (left running)", scan.scan_id)
                        self._release(client, scan)
                except DATABASE_ERRORS as exc:
                    log.warning("reaper: database unavailable: %r", exc)
                await asyncio.to_thread(self._stop.wait, self.settings.reap_interval)
        finally:
            client.close()
            if pool is not None:
                pool.terminate()

    def _release(self, client: redis.Redis, scan: Reaped) -> None:
        prefix, ttl = self.settings.redis_prefix, self.settings.result_ttl
        events = EventLog(client, prefix, str(scan.task_id), ttl)
        events.write(("end", {"state": "FAILURE"}), release=scan.owner)


def install_reaper(settings: Settings) -> Reaper:
    """Run the reaper in this worker's main process from ready to shutdown."""
    reaper = Reaper(settings)
    worker_ready.connect(reaper.start, weak=False)
    worker_shutdown.connect(reaper.stop, weak=False)
    return reaper
