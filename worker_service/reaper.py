"""The worker's reaper: every ``reap_interval`` s, the main process fails scans left 'running'.

``shared.reaper.reap`` claims the rows (``FOR UPDATE SKIP LOCKED``: any number of workers may
run this at once); here each reaped scan's task gets its FAILURE state in the result backend,
its event stream its ``end`` and its key's slot is released. It runs on a thread of the
worker's main process, on its own event loop and pool, so it needs no other process and holds
no prefork child.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Literal

import redis
from celery.signals import worker_ready, worker_shutdown

from shared.reaper import REAPED, Reaped, reap
from shared.retry import DATABASE_ERRORS, redis_retry
from shared.settings import Settings
from shared.store import create_pool
from worker_service.backend import ScanResultBackend
from worker_service.lifecycle import FAILURE
from worker_service.reporting import EventLog

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, settings: Settings, backend: ScanResultBackend | None = None) -> None:
        """``backend``: where a reaped scan's task gets its FAILURE state (the status route
        reads Redis first); by default the worker's own, taken from ``worker_ready``."""
        self.settings = settings
        self.backend = backend
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, sender: Any = None, **_: Any) -> None:
        app = getattr(sender, "app", None)  # worker_ready's sender: the worker's consumer
        if self.backend is None and isinstance(getattr(app, "backend", None), ScanResultBackend):
            self.backend = app.backend  # type: ignore[union-attr]
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
            self._thread.start()

    def stop(self, **_: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        # A daemon thread with a loop per pass: nothing here may hold up the worker's exit.
        client = redis.Redis.from_url(
            self.settings.redis_url,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            retry=redis_retry(),
        )
        try:
            while True:
                self.tick(client)
                if self._stop.wait(self.settings.reap_interval):
                    return
        finally:
            client.close()

    def tick(self, client: redis.Redis) -> list[Reaped]:
        """One pass; never raises: the thread must outlive any error (a bug included)."""
        try:
            reaped = asyncio.run(self._pass())
        except DATABASE_ERRORS as exc:
            log.warning("reaper: database unavailable: %r", exc)
            return []
        except Exception:
            log.exception("reaper: pass failed")
            return []
        for scan in reaped:
            log.warning("scan %s: reaped (left running)", scan.scan_id)
            try:
                self._release(client, scan)
            except Exception:
                log.exception("reaper: end of scan %s not announced", scan.scan_id)
        return reaped

    async def _pass(self) -> list[Reaped]:
        async with asyncio.timeout(30):
            pool = await create_pool(self.settings.database_url, max_size=1)
            try:
                return await reap(pool)
            finally:
                await pool.close()

    def _release(self, client: redis.Redis, scan: Reaped) -> None:
        """The task's FAILURE state (else the status route, which reads Redis first, would
        show its last progress for ever), its ``end`` event and its key's slot release."""
        prefix, ttl = self.settings.redis_prefix, self.settings.result_ttl
        events = EventLog(client, prefix, str(scan.task_id), ttl)
        end: tuple[Literal["end"], object] = ("end", {"state": FAILURE})
        if self.backend is None:
            events.write(end, release=scan.owner)
            return

        def rider(pipe: Any, _state: str) -> None:
            events.add_to(pipe, end, release=scan.owner)

        self.backend.finish(str(scan.task_id), FAILURE, REAPED, rider)


def install_reaper(settings: Settings) -> Reaper:
    """Run the reaper in this worker's main process from ready to shutdown."""
    reaper = Reaper(settings)
    worker_ready.connect(reaper.start, weak=False)
    worker_shutdown.connect(reaper.stop, weak=False)
    return reaper
