"""The reaper: scans left 'running' past their hard limit plus the retry budget end failed.

Every delivery pushes its scan's ``reap_after`` forward (``ScanStore.mark_running`` and the
shard and merge counterparts); a row still running past it has no delivery that can end it any
more: its worker was killed at the hard limit, a message was lost with the broker, a merge was
never published. Pure asyncpg, so a worker or a dispatcher process may run it; rows are claimed
with ``FOR UPDATE SKIP LOCKED``, so any number of replicas can run it at once and each row is
reaped exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

REAPED = "no worker finished this scan within its time limit and retry budget (reaped)"

_REAP = (
    "WITH stuck AS ("
    " SELECT id FROM scans WHERE state = 'running' AND reap_after < now()"
    " ORDER BY reap_after LIMIT $1 FOR UPDATE SKIP LOCKED)"
    " UPDATE scans SET state = 'failed', error = $2, finished_at = now()"
    " FROM stuck WHERE scans.id = stuck.id"
    " RETURNING scans.id, scans.task_id, scans.api_key_id"
)


@dataclass(frozen=True, slots=True)
class Reaped:
    scan_id: UUID
    task_id: UUID
    owner: UUID | None


async def reap(pool: asyncpg.Pool[Any], *, limit: int = 100) -> list[Reaped]:
    """Fail up to ``limit`` stuck scans in one statement; returns them (their key slots and
    event streams are the caller's to release: this module knows nothing of Redis)."""
    records = await pool.fetch(_REAP, limit, REAPED)
    return [Reaped(r["id"], r["task_id"], r["api_key_id"]) for r in records]
