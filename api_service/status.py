"""A scan's state: PostgreSQL says whether it exists and how it ended, Redis how it is going."""

from __future__ import annotations

import logging
from typing import Any, get_args
from uuid import UUID

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api_service.errors import ApiError, db_unavailable
from shared.protocol import STORING
from shared.redis_keys import owner_key, parse_owner_value, result_key
from shared.retry import DATABASE_ERRORS
from shared.schemas import EndedScanState, ScanResult, ScanStatus, TaskState
from shared.store import ScanRow, ScanStore

log = logging.getLogger(__name__)


_ROW_STATES = {
    "queued": ("PENDING", "Waiting for a worker"),
    "running": ("STARTED", "Running"),
    "completed": ("SUCCESS", "Scan completed"),
    "failed": ("FAILURE", "Scan failed"),
    "revoked": ("REVOKED", "Scan cancelled"),
}


class StatusReader:
    def __init__(self, store: ScanStore, redis: aioredis.Redis, redis_prefix: str) -> None:
        self.store = store
        self.redis = redis
        self.redis_prefix = redis_prefix

    async def _meta(self, task_id: UUID) -> dict[str, Any] | None:
        try:
            raw = await self.redis.get(result_key(self.redis_prefix, task_id))
        except (RedisError, OSError) as exc:
            log.warning("result backend unreachable, answering from PostgreSQL: %s", exc)
            return None
        if raw is None:
            return None
        meta: dict[str, Any] = orjson.loads(raw)
        return meta

    async def row(self, task_id: UUID, owner: UUID) -> ScanRow:
        """The owner's scan; another key's scan is a 404 like a missing one."""
        try:
            row = await self.store.get_by_task(task_id, owner)
        except DATABASE_ERRORS as exc:
            raise db_unavailable() from exc
        if row is None:
            raise ApiError(404, f"no scan with task id {task_id}")
        return row

    async def read(self, task_id: UUID, owner: UUID) -> ScanStatus:
        try:
            row = await self.store.get_by_task(task_id, owner)
        except DATABASE_ERRORS as exc:
            log.warning("database unreachable, answering %s from Redis: %r", task_id, exc)
            return await self._read_from_redis(task_id, owner)
        if row is None:
            raise ApiError(404, f"no scan with task id {task_id}")
        return await self.for_row(row)

    async def _read_from_redis(self, task_id: UUID, owner: UUID) -> ScanStatus:
        unavailable = db_unavailable()
        try:
            raw = await self.redis.get(owner_key(self.redis_prefix, task_id))
        except (RedisError, OSError):
            raise unavailable from None
        if raw is None:
            raise unavailable
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        key_id, scan_id = parse_owner_value(text)
        if key_id != str(owner):
            raise ApiError(404, f"no scan with task id {task_id}")
        status = ScanStatus(
            task_id=task_id, scan_id=scan_id, state="PENDING", status="Waiting for a worker"
        )
        meta = await self._meta(task_id)
        if meta is not None:
            apply_meta(status, meta)
        return status

    async def for_row(self, row: ScanRow) -> ScanStatus:
        if row.state in _ENDED:
            return from_row(row)
        meta = await self._meta(row.task_id)
        status = from_row(row)
        if meta is not None:
            apply_meta(status, meta)
        return status


def from_row(row: ScanRow) -> ScanStatus:
    state, text = _ROW_STATES[row.state]
    return ScanStatus(
        task_id=row.task_id,
        scan_id=row.id,
        state=state,
        status=text if row.error is None else f"{text}: {row.error}",
        progress=100 if row.state == "completed" else row.progress,
        result=row.result,
        error=row.error,
        created_at=row.created_at,
    )


def apply_meta(status: ScanStatus, meta: dict[str, Any]) -> None:
    """Overlay what the result backend knows about a scan that has not ended in PostgreSQL."""
    state = meta.get("status", "PENDING")
    payload = meta.get("result")
    if state == STORING:
        state = "SUCCESS"
    if state not in _TASK_STATES:
        return
    status.state = state
    if state == "PROGRESS" and isinstance(payload, dict):
        status.status = str(payload.get("status", "Running"))
        status.progress = int(payload.get("progress", 0))
        status.tier = payload.get("tier")
        status.ports_scanned = payload.get("ports_scanned")
        status.total_ports = payload.get("total_ports")
        status.open_ports_found = payload.get("open_ports")
    elif state in ("SUCCESS", "REVOKED") and isinstance(payload, dict):
        status.status = "Scan completed" if state == "SUCCESS" else "Scan cancelled"
        status.progress = 100 if state == "SUCCESS" else status.progress
        status.result = ScanResult.model_validate(payload)
    elif state == "FAILURE":
        status.status = "Scan failed"
        status.error = _exception_text(payload)
    elif state == "RETRY":
        status.status = "Retrying after a transient failure"


_TASK_STATES = frozenset(get_args(TaskState))
_ENDED = frozenset(get_args(EndedScanState))


def _exception_text(payload: Any) -> str:
    """Our own errors carry a message meant for users; anything else stays inside."""
    if isinstance(payload, dict) and str(payload.get("exc_module", "")).startswith("shared."):
        message = payload.get("exc_message")
        if isinstance(message, list | tuple):
            message = " ".join(str(m) for m in message)
        return str(message or payload.get("exc_type"))
    return "internal error in the worker"
