"""A stopping worker's requeues are orderly, not lost workers.

Celery's soft shutdown waits ``shutdown_timeout`` s, then cancels the requests still running,
which requeues their messages. Each such delivery is counted as released
(``ScanStore.release``), so the poison guard, which dead-letters a scan after five deliveries
that ended with their worker gone, does not count a rolling deploy against it: in prefork by
``GuardedConsumer`` just before (the children are then killed), in the threads pool by each
cancelled delivery itself as it hands its message back (``tasks.delivered``), which also covers
a lost broker connection and a ``revoke --terminate``.
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


def delivery_key(name: str, task_id: Any, args: Any) -> tuple[str, Any] | None:
    """(task name, the row its deliveries are counted on) of one request: a scan's task id, a
    shard's (scan id, index), a merge's scan id; None for another task or unreadable
    arguments."""
    try:
        if name == SCAN_TASK:
            return SCAN_TASK, UUID(str(task_id))
        if name == SHARD_TASK:
            payload, _parent, index = args
            return SHARD_TASK, (UUID(str(payload["scan_id"])), int(index))
        if name == MERGE_TASK:
            payload, _parent = args
            return MERGE_TASK, UUID(str(payload["scan_id"]))
    except (TypeError, ValueError, KeyError) as exc:
        log.debug("request %s not counted: %r", task_id, exc)
    return None


def running_deliveries() -> list[tuple[str, Any]]:
    """:func:`delivery_key` of each request this worker runs."""
    found = (delivery_key(r.name, r.id, r.args) for r in tuple(state.active_requests))
    return [key for key in found if key is not None]


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


def release_deliveries(settings: Settings, deliveries: list[tuple[str, Any]]) -> None:
    """Count ``deliveries`` (:func:`delivery_key`) as released, on a connection of their own
    (not the runtime's, which may be closing or stuck); never raises, bounded by
    ``RELEASE_SECONDS``."""
    if not deliveries:
        return
    try:
        asyncio.run(release(settings.database_url, deliveries))
    except DATABASE_ERRORS as exc:
        log.warning("requeued deliveries not counted as released: %r", exc)


def release_running(settings: Settings) -> None:
    """Count this worker's running deliveries as released (it runs in the consumer's
    shutdown, which nothing may interrupt)."""
    release_deliveries(settings, running_deliveries())
