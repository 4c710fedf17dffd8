"""Messages that could hurt a worker go to the dead-letter queue instead.

Celery's own handling would let a malformed protocol-v2 body (not ``[args, kwargs, embed]``)
raise out of the consumer and kill the worker's main process, and it acknowledges, so
silently drops, a body it cannot decode. Here both are rejected without requeue, which routes
them to ``<prefix>.scans.dead`` through the queue's dead-letter arguments, and their scan is
marked failed with the reason.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from uuid import UUID

from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer
from celery.worker.request import Request

from shared.errors import InvalidScan
from shared.protocol import MERGE_TASK, SHARD_TASK
from shared.settings import Settings
from shared.store import ScanStore, create_pool
from worker_service.pool import ThreadsPool
from worker_service.shutdown import release_running

log = logging.getLogger(__name__)


class GuardedRequest(Request):
    """A message that cannot be decoded into ``(args, kwargs)`` is an invalid task here.

    Celery enforces only the hard time limit: the soft one (still in the task's
    ``request.timelimit``) is the deadline the delivery runs under on its event loop. Celery's
    soft limit is a signal raising an exception wherever the process is, which could land in an
    event loop callback (and be logged there, lost) or in the middle of a final write."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(message, *args, **kwargs)
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidTaskError(f"malformed scan message: {exc}") from exc
        task_args, task_kwargs, _embed = self._payload  # type: ignore[attr-defined]
        if not isinstance(task_args, list | tuple) or not isinstance(task_kwargs, dict):
            raise InvalidTaskError("malformed scan message: args must be a list, kwargs a dict")
        hard, _soft = self.time_limits
        self.time_limits = (hard, None)

    # Celery ends a running request through ``pool.terminate_job(pid)``: in the threads pool
    # every request has the process's pid, so it is told which request is meant.
    def terminate(self, pool: Any, signal: Any = None) -> None:
        if not isinstance(pool, ThreadsPool):
            super().terminate(pool, signal)
            return
        with pool.only(self.id):
            super().terminate(pool, signal)

    def cancel(self, pool: Any, signal: Any = None, emit_retry: bool = True) -> None:
        if not isinstance(pool, ThreadsPool):
            super().cancel(pool, signal, emit_retry)
            return
        with pool.only(self.id):
            super().cancel(pool, signal, emit_retry)


class GuardedConsumer(Consumer):
    connection_errors: tuple[type[BaseException], ...]

    def cancel_active_requests(self) -> None:
        """At the end of a soft shutdown: the requeues that follow are not lost workers. (A
        threads-pool delivery counts its own as it hands its message back.)"""
        settings: Settings = self.app.conf.cybersec_settings
        if settings.worker_pool != "threads":
            release_running(settings)
        super().cancel_active_requests()

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        log.error("undecodable message dead-lettered: %r", exc)
        self._dead_letter(message, f"undecodable scan message: {type(exc).__name__}")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        log.error("invalid task message dead-lettered: %s", exc)
        self._dead_letter(message, str(exc), body)

    def _dead_letter(self, message: Any, reason: str, body: Any = None) -> None:
        message.reject_log_error(log, self.connection_errors, requeue=False)
        headers = getattr(message, "headers", None) or {}
        task_id = scan_task_id(headers, body)
        if task_id is None:
            return
        try:
            self.app.backend.mark_as_failure(task_id, InvalidScan(reason))
        except Exception as exc:  # the backend may be down too; the DLQ keeps the message
            log.warning("could not record the failure of %s: %r", task_id, exc)
        settings: Settings = self.app.conf.cybersec_settings
        try:
            asyncio.run(_fail(settings.database_url, task_id, reason))
        except Exception as exc:  # in the consumer itself: nothing may escape to its loop
            log.warning("could not mark scan of task %s failed: %r", task_id, exc)


def scan_task_id(headers: Any, body: Any) -> str | None:
    """The task id of the scan a message belongs to: its own for a scan, the parent's (its
    second argument) for a shard or a merge; None when that cannot be read (a shard's scan is
    then left to the reaper rather than a stranger's task id failed)."""
    if not isinstance(headers, dict):
        return None
    if headers.get("task") not in (SHARD_TASK, MERGE_TASK):
        task_id = headers.get("id")
        return str(task_id) if task_id is not None else None
    args = body[0] if isinstance(body, list | tuple) and body else None
    if isinstance(args, list | tuple) and len(args) >= 2 and isinstance(args[1], str):
        return args[1]
    return None


async def _fail(dsn: str, task_id: str, reason: str) -> None:
    async with asyncio.timeout(5):
        pool = await create_pool(dsn, max_size=1)
        try:
            await ScanStore(pool).fail_by_task(UUID(str(task_id)), reason)
        finally:
            await pool.close()
