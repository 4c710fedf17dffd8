"""A stopping worker's requeues are orderly, not lost workers.

Celery's soft shutdown waits ``shutdown_timeout`` s, then cancels the requests still running,
which requeues their messages. ``GuardedConsumer`` counts each such delivery as released
(``ScanStore.release``) just before, so the poison guard, which dead-letters a scan after five
deliveries that ended with their worker gone, does not count a rolling deploy against it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from uuid import UUID

from celery.worker import state

from shared.protocol import MERGE_TASK, SCAN_TASK, SHARD_TASK
from shared.retry import DATABASE_ERRORS
from shared.settings import Settings
from shared.store import ScanStore, create_pool

log = logging.getLogger(__name__)

RELEASE_SECONDS = 3.0


def running_deliveries() -> list[tuple[str, Any]]:
    """(task name, task id, (scan id, shard index) or a merge's scan id) of the requests this
    worker runs."""
    found: list[tuple[str, Any]] = []
    for request in tuple(state.active_requests):
        try:
            if request.name == SCAN_TASK:
                found.append((SCAN_TASK, UUID(str(request.id))))
            elif request.name == SHARD_TASK:
                payload, _parent, index = request.args
                found.append((SHARD_TASK, (UUID(str(payload["scan_id"])), int(index))))
            elif request.name == MERGE_TASK:
                payload, _parent = request.args
                found.append((MERGE_TASK, UUID(str(payload["scan_id"]))))
        except (TypeError, ValueError, KeyError) as exc:
            log.debug("request %s not counted: %r", request.id, exc)
    return found


async def release(dsn: str, deliveries: list[tuple[str, Any]]) -> None:
    async with asyncio.timeout(RELEASE_SECONDS):
        pool = await create_pool(dsn, max_size=1)
        try:
            store = ScanStore(pool)
            for name, key in deliveries:
                if name == SCAN_TASK:
                    await store.release(key)
                elif name == MERGE_TASK:
                    await store.release_merge(key)
                else:
                    await store.release_shard(*key)
        finally:
            await pool.close()


def release_running(settings: Settings) -> None:
    """Count this worker's running deliveries as released; never raises (it runs in the
    consumer's shutdown, which nothing may interrupt), bounded by ``RELEASE_SECONDS``."""
    deliveries = running_deliveries()
    if not deliveries:
        return
    try:
        asyncio.run(release(settings.database_url, deliveries))
    except DATABASE_ERRORS as exc:
        log.warning("requeued deliveries not counted as released: %r", exc)
