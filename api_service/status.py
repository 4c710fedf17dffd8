"""A scan's state: PostgreSQL says whether it exists and how it ended, Redis how it is going."""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api_service.errors import ApiError
from shared.redis_keys import result_key
from shared.schemas import ScanResult, ScanStatus
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
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise ApiError(503, "database unavailable", headers={"Retry-After": "5"}) from exc
        if row is None:
            raise ApiError(404, f"no scan with task id {task_id}")
        return row

    async def read(self, task_id: UUID, owner: UUID) -> ScanStatus:
        return await self.for_row(await self.row(task_id, owner))

    async def for_row(self, row: ScanRow) -> ScanStatus:
        task_id = row.task_id
        if row.state in ("completed", "failed", "revoked"):
            return from_row(row)
        meta = await self._meta(task_id)
        return from_meta(row, meta) if meta is not None else from_row(row)


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


def from_meta(row: ScanRow, meta: dict[str, Any]) -> ScanStatus:
    state = meta.get("status", "PENDING")
    payload = meta.get("result")
    status = ScanStatus(
        task_id=row.task_id,
        scan_id=row.id,
        state=state if state in _TASK_STATES else "PENDING",
        status=_ROW_STATES[row.state][1],
        progress=row.progress,
        created_at=row.created_at,
    )
    if state == "PROGRESS" and isinstance(payload, dict):
        status.status = str(payload.get("status", "Running"))
        status.progress = int(payload.get("progress", 0))
        status.tier = payload.get("tier")
        status.ports_scanned = payload.get("ports_scanned")
        status.total_ports = payload.get("total_ports")
        status.open_ports_found = payload.get("open_ports")
    elif state == "SUCCESS" and isinstance(payload, dict):
        status.status = "Scan completed"
        status.progress = 100
        status.result = ScanResult.model_validate(payload)
    elif state == "FAILURE":
        status.status = "Scan failed"
        status.error = _exception_text(payload)
    elif state == "RETRY":
        status.status = "Retrying after a transient failure"
    return status


_TASK_STATES = {"PENDING", "STARTED", "PROGRESS", "SUCCESS", "FAILURE", "RETRY", "REVOKED"}


def _exception_text(payload: Any) -> str:
    """Our own errors carry a message meant for users; anything else stays inside."""
    if isinstance(payload, dict) and str(payload.get("exc_module", "")).startswith("shared."):
        message = payload.get("exc_message")
        if isinstance(message, list | tuple):
            message = " ".join(str(m) for m in message)
        return str(message or payload.get("exc_type"))
    return "internal error in the worker"
