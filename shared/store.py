"""The ``scans`` table, read and written with asyncpg by both services."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from shared.schemas import Priority, ScanConfig, ScanResult, ScanState


@dataclass(frozen=True, slots=True)
class ScanRow:
    id: UUID
    task_id: UUID
    target: str
    ports: str
    config: ScanConfig
    priority: Priority
    state: ScanState
    progress: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: ScanResult | None
    error: str | None
    attempts: int

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> ScanRow:
        result = record["result"]
        return cls(
            id=record["id"],
            task_id=record["task_id"],
            target=record["target"],
            ports=record["ports"],
            config=ScanConfig.model_validate(record["config"]),
            priority=record["priority"],
            state=record["state"],
            progress=record["progress"],
            created_at=record["created_at"],
            started_at=record["started_at"],
            finished_at=record["finished_at"],
            result=ScanResult.model_validate(result) if result is not None else None,
            error=record["error"],
            attempts=record["attempts"],
        )


async def _init_connection(conn: asyncpg.Connection[Any]) -> None:
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: b"\x01" + orjson.dumps(value),
        decoder=lambda data: orjson.loads(data[1:]),
        format="binary",
    )


async def create_pool(dsn: str, *, max_size: int = 10) -> asyncpg.Pool[Any]:
    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
        dsn, min_size=1, max_size=max_size, init=_init_connection, command_timeout=10
    )
    return pool


class ScanStore:
    """Queries on ``scans``; every write is idempotent by scan id."""

    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def insert(
        self,
        *,
        scan_id: UUID,
        task_id: UUID,
        target: str,
        ports: str,
        config: ScanConfig,
        priority: Priority,
    ) -> datetime:
        created: datetime = await self.pool.fetchval(
            "INSERT INTO scans (id, task_id, target, ports, config, priority)"
            " VALUES ($1, $2, $3, $4, $5, $6) RETURNING created_at",
            scan_id,
            task_id,
            target,
            ports,
            config.model_dump(mode="json"),
            priority,
        )
        return created

    async def get_by_task(self, task_id: UUID) -> ScanRow | None:
        record = await self.pool.fetchrow("SELECT * FROM scans WHERE task_id = $1", task_id)
        return ScanRow.from_record(record) if record is not None else None

    async def get(self, scan_id: UUID) -> ScanRow | None:
        record = await self.pool.fetchrow("SELECT * FROM scans WHERE id = $1", scan_id)
        return ScanRow.from_record(record) if record is not None else None

    async def mark_running(self, scan_id: UUID) -> ScanState | None:
        """Count a delivery and move a queued scan to running; returns the state it now has."""
        state: ScanState | None = await self.pool.fetchval(
            "UPDATE scans SET attempts = attempts + 1,"
            " state = CASE WHEN state IN ('queued', 'running') THEN 'running' ELSE state END,"
            " started_at = COALESCE(started_at, now())"
            " WHERE id = $1 RETURNING state",
            scan_id,
        )
        return state

    async def complete(self, result: ScanResult) -> None:
        await self.pool.execute(
            "UPDATE scans SET state = 'completed', progress = 100, result = $2, error = NULL,"
            " finished_at = $3 WHERE id = $1",
            result.scan_id,
            result.model_dump(mode="json"),
            result.finished_at,
        )

    async def fail(self, scan_id: UUID, error: str) -> None:
        await self.pool.execute(
            "UPDATE scans SET state = 'failed', error = $2, finished_at = now()"
            " WHERE id = $1 AND state <> 'completed'",
            scan_id,
            error,
        )

    async def delete(self, scan_id: UUID) -> None:
        await self.pool.execute("DELETE FROM scans WHERE id = $1", scan_id)
