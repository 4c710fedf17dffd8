"""The ``scans`` table, read and written with asyncpg by both services."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NamedTuple
from uuid import UUID

import asyncpg
import orjson

from shared.batching import Batcher
from shared.schemas import Priority, ScanConfig, ScanResult, ScanState

ShardOutcome = Literal["completed", "cancelled", "failed"]


@dataclass(frozen=True, slots=True)
class ShardRow:
    scan_id: UUID
    index: int
    addresses: tuple[str, ...]
    ports: str
    attempts: int
    released: int
    outcome: ShardOutcome | None
    result: dict[str, Any] | None
    error: str | None

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> ShardRow:
        return cls(
            scan_id=record["scan_id"],
            index=record["index"],
            addresses=tuple(record["addresses"]),
            ports=record["ports"],
            attempts=record["attempts"],
            released=record["released"],
            outcome=record["outcome"],
            result=record["result"],
            error=record["error"],
        )

    @property
    def lost_deliveries(self) -> int:
        return self.attempts - 1 - self.released


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
    api_key_id: UUID | None
    cancel_requested: bool
    released: int = 0
    """Deliveries that ended in order without finishing (retries, requeues)."""
    addresses: tuple[str, ...] = ()
    """A sharded scan's addresses, in order."""
    merge_attempts: int = 0
    merge_released: int = 0
    """Merge deliveries that ended in order (retries, requeues, a stopping worker)."""
    merge_task: str | None = None
    """The task id of the merge message that claimed the scan's merge."""
    shards_total: int | None = None
    shards_done: int = 0
    discovery: list[dict[str, Any]] | None = None
    """What the host discovery before a sharded scan's split found, address by address."""

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
            api_key_id=record["api_key_id"],
            cancel_requested=record["cancel_requested"],
            released=record["released"],
            addresses=tuple(record["addresses"] or ()),
            merge_attempts=record["merge_attempts"],
            merge_released=record["merge_released"],
            merge_task=record["merge_task"],
            shards_total=record["shards_total"],
            shards_done=record["shards_done"],
            discovery=record["discovery"],
        )

    @property
    def lost_deliveries(self) -> int:
        """Earlier deliveries that ended with their worker gone (this one not counted)."""
        return self.attempts - 1 - self.released

    @property
    def lost_merges(self) -> int:
        """Earlier merge deliveries that ended with their worker gone (this one not counted)."""
        return self.merge_attempts - 1 - self.merge_released


@dataclass(frozen=True, slots=True)
class ScanListing:
    """A row of a key's list of scans: no config, no result, the open ports counted."""

    id: UUID
    task_id: UUID
    target: str
    ports: str
    priority: Priority
    state: ScanState
    created_at: datetime
    finished_at: datetime | None
    error: str | None
    open_port_count: int | None
    schedule_id: UUID | None


_LISTING_COLUMNS = ", ".join(ScanListing.__dataclass_fields__)


async def _init_connection(conn: asyncpg.Connection[Any]) -> None:
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: b"\x01" + orjson.dumps(value),
        decoder=lambda data: orjson.loads(data[1:]),
        format="binary",
    )


async def _reset_connection(conn: asyncpg.Connection[Any]) -> None:
    """Nothing beyond what asyncpg always does on release (roll back an open transaction,
    drop listener callbacks). Its default reset query (advisory unlock, CLOSE ALL, UNLISTEN,
    RESET ALL) costs a round trip per query, and no code on a pool connection takes advisory
    locks, keeps cursors outside a transaction, LISTENs, or SETs session state."""


async def create_pool(
    dsn: str, *, max_size: int = 10, wait_for_flush: bool = True
) -> asyncpg.Pool[Any]:
    """``wait_for_flush=False``: commits return before their WAL reaches the disk
    (``synchronous_commit = off``); a database crash can undo the last few hundred ms of them.
    Only for writes whose loss costs nothing a later durable write does not restore."""
    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=max_size,
        init=_init_connection,
        reset=_reset_connection,
        command_timeout=10,
        server_settings=None if wait_for_flush else {"synchronous_commit": "off"},
    )
    return pool


_INSERT_ONE = (
    "INSERT INTO scans (id, task_id, target, ports, config, priority, api_key_id,"
    " idempotency_key, request_hash, cache_key)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    " ON CONFLICT (api_key_id, idempotency_key) WHERE idempotency_key IS NOT NULL"
    " DO NOTHING RETURNING id"
)
_INSERT_MANY = (
    "INSERT INTO scans (id, task_id, target, ports, config, priority, api_key_id,"
    " idempotency_key, request_hash, cache_key)"
    " SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::jsonb[],"
    " $6::text[], $7::uuid[], $8::text[], $9::bytea[], $10::bytea[])"
    " ON CONFLICT (api_key_id, idempotency_key) WHERE idempotency_key IS NOT NULL"
    " DO NOTHING RETURNING id"
)
_ROW_ERRORS = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError)
"""Errors one row of a batch can cause; the batch is then retried row by row."""


class _NewScan(NamedTuple):
    id: UUID
    task_id: UUID
    target: str
    ports: str
    config: dict[str, Any]
    priority: Priority
    api_key_id: UUID | None
    idempotency_key: str | None
    request_hash: bytes | None
    cache_key: bytes | None


_LOCK_SCAN = "SELECT 1 FROM scans WHERE id = $1 FOR UPDATE"
"""Taken first by every transaction that locks a scan's row and its shards' rows: one lock
order (scans, then scan_shards), so two such transactions never deadlock."""


_EXTEND_REAP = (
    " reap_after = CASE WHEN $2::float8 IS NULL THEN reap_after"
    " ELSE GREATEST(reap_after, now() + make_interval(secs => $2)) END"
)
"""Push ``reap_after`` to ``$2`` seconds from now (NULL: leave it)."""


class ScanStore:
    """Queries on ``scans``. Reads for a client take its key id; a scan of another key is
    indistinguishable from a missing one. Every write is idempotent by scan id."""

    def __init__(
        self, pool: asyncpg.Pool[Any], *, relaxed: asyncpg.Pool[Any] | None = None
    ) -> None:
        """``relaxed``: a pool made with ``wait_for_flush=False`` for :meth:`mark_running` and
        :meth:`cancel_requested`; without it they use ``pool``."""
        self.pool = pool
        self.relaxed = relaxed or pool
        self._inserts: Batcher[_NewScan, bool] = Batcher(self._insert_many)

    async def close(self) -> None:
        """Finish the inserts in flight; call before closing the pool."""
        await self._inserts.close()

    async def insert(
        self,
        *,
        scan_id: UUID,
        task_id: UUID,
        target: str,
        ports: str,
        config: ScanConfig,
        priority: Priority,
        owner: UUID | None = None,
        idempotency_key: str | None = None,
        request_hash: bytes | None = None,
        cache_key: bytes | None = None,
    ) -> bool:
        """Insert a queued scan; False when the owner already used this idempotency key.

        Concurrent inserts share one statement (see ``shared.batching``); each caller gets its
        own answer, or its own error. The row is not read back: the caller knows all of it
        that it needs, and decoding it was a tenth of a submission's cost."""
        return await self._inserts.submit(
            _NewScan(
                scan_id,
                task_id,
                target,
                ports,
                config.model_dump(mode="json"),
                priority,
                owner,
                idempotency_key,
                request_hash,
                cache_key,
            )
        )

    async def _insert_one(self, scan: _NewScan) -> bool:
        return await self.pool.fetchval(_INSERT_ONE, *scan) is not None

    async def _insert_many(self, scans: list[_NewScan]) -> Sequence[bool | Exception]:
        if len(scans) == 1:
            return [await self._insert_one(scans[0])]
        try:
            columns = [list(column) for column in zip(*scans, strict=True)]
            records = await self.pool.fetch(_INSERT_MANY, *columns)
        except _ROW_ERRORS:
            return [await self._insert_alone(scan) for scan in scans]
        # A row skipped on an idempotency conflict (with an earlier scan, or another row of
        # this batch) is not returned: its caller gets False, as from a single insert.
        inserted = {record["id"] for record in records}
        return [scan.id in inserted for scan in scans]

    async def _insert_alone(self, scan: _NewScan) -> bool | Exception:
        try:
            return await self._insert_one(scan)
        except _ROW_ERRORS as exc:
            return exc

    async def cached(self, owner: UUID, cache_key: bytes, max_age: int) -> ScanRow | None:
        """The owner's newest completed scan with this cache key, if it finished within
        max_age s. Newest by creation: the walk of ``scans_cache_idx`` stops at the first
        completed row, and goes back no further than a day before max_age (a scan that waited
        longer than that in the queue is not served from the cache; it costs a rescan)."""
        record = await self.pool.fetchrow(
            "SELECT * FROM (SELECT * FROM scans WHERE api_key_id = $1 AND cache_key = $2"
            " AND state = 'completed'"
            " AND created_at > now() - make_interval(secs => $3) - interval '1 day'"
            " ORDER BY created_at DESC LIMIT 1) AS newest"
            " WHERE finished_at > now() - make_interval(secs => $3)",
            owner,
            cache_key,
            float(max_age),
        )
        return ScanRow.from_record(record) if record is not None else None

    async def by_idempotency_key(self, owner: UUID, key: str) -> tuple[ScanRow, bytes] | None:
        record = await self.pool.fetchrow(
            "SELECT * FROM scans WHERE api_key_id = $1 AND idempotency_key = $2", owner, key
        )
        if record is None:
            return None
        return ScanRow.from_record(record), bytes(record["request_hash"] or b"")

    async def get_by_task(self, task_id: UUID, owner: UUID | None = None) -> ScanRow | None:
        """The scan with this task id; with ``owner``, only when that key created it."""
        if owner is None:
            record = await self.pool.fetchrow("SELECT * FROM scans WHERE task_id = $1", task_id)
        else:
            record = await self.pool.fetchrow(
                "SELECT * FROM scans WHERE task_id = $1 AND api_key_id = $2", task_id, owner
            )
        return ScanRow.from_record(record) if record is not None else None

    async def get(self, scan_id: UUID) -> ScanRow | None:
        record = await self.pool.fetchrow("SELECT * FROM scans WHERE id = $1", scan_id)
        return ScanRow.from_record(record) if record is not None else None

    async def list(
        self,
        owner: UUID,
        *,
        limit: int,
        before: tuple[datetime, UUID] | None = None,
        state: ScanState | None = None,
        target: str | None = None,
        schedule_id: UUID | None = None,
    ) -> list[ScanListing]:
        """The owner's scans, newest first, strictly older than the ``before`` cursor; their
        results are not read, only their stored open-port count."""
        conditions = ["api_key_id = $1"]
        args: list[Any] = [owner]
        if before is not None:
            args += [before[0], before[1]]
            conditions.append(f"(created_at, id) < (${len(args) - 1}, ${len(args)})")
        if state is not None:
            args.append(state)
            conditions.append(f"state = ${len(args)}")
        if target is not None:
            args.append(target)
            conditions.append(f"target = ${len(args)}")
        if schedule_id is not None:
            args.append(schedule_id)
            conditions.append(f"schedule_id = ${len(args)}")
        args.append(limit)
        records = await self.pool.fetch(
            f"SELECT {_LISTING_COLUMNS} FROM scans"  # noqa: S608 - fixed fragments
            f" WHERE {' AND '.join(conditions)}"
            f" ORDER BY created_at DESC, id DESC LIMIT ${len(args)}",
            *args,
        )
        return [ScanListing(**dict(r)) for r in records]

    async def latest_completed(
        self, owner: UUID, target: str, before: datetime, exclude: UUID
    ) -> ScanRow | None:
        record = await self.pool.fetchrow(
            "SELECT * FROM scans WHERE api_key_id = $1 AND target = $2 AND state = 'completed'"
            " AND created_at <= $3 AND id <> $4 ORDER BY created_at DESC, id DESC LIMIT 1",
            owner,
            target,
            before,
            exclude,
        )
        return ScanRow.from_record(record) if record is not None else None

    async def ended_among(self, task_ids: Sequence[UUID]) -> set[UUID]:
        """Which of these tasks' scans are over: one query for every open event stream."""
        records = await self.pool.fetch(
            "SELECT task_id FROM scans WHERE task_id = ANY($1::uuid[])"
            " AND state IN ('completed', 'failed', 'revoked')",
            list(task_ids),
        )
        return {record["task_id"] for record in records}

    async def request_cancel(self, task_id: UUID, owner: UUID) -> ScanRow | None:
        """Flag the scan for cancellation; a queued one is revoked at once, before any worker
        sees it. Finished scans are left as they are."""
        record = await self.pool.fetchrow(
            "UPDATE scans SET cancel_requested = (state IN ('queued', 'running')),"
            " state = CASE WHEN state = 'queued' THEN 'revoked' ELSE state END,"
            " finished_at = CASE WHEN state = 'queued' THEN now() ELSE finished_at END"
            " WHERE task_id = $1 AND api_key_id = $2 RETURNING *",
            task_id,
            owner,
        )
        return ScanRow.from_record(record) if record is not None else None

    async def should_stop(self, scan_id: UUID) -> bool:
        """Whether the scan should stop: cancelled, or ended meanwhile (a shard failed it, the
        reaper did)."""
        flag: bool | None = await self.relaxed.fetchval(
            "SELECT cancel_requested OR state NOT IN ('queued', 'running')"
            " FROM scans WHERE id = $1",
            scan_id,
        )
        return bool(flag)

    async def mark_running(
        self, scan_id: UUID, reap_seconds: float | None = None
    ) -> ScanRow | None:
        """Count a delivery and move a queued scan to running; returns the row as it now is.
        With ``reap_seconds``, the reaper may fail the scan that long from now if it is still
        running then (its hard limit plus the retry budget).

        On a relaxed pool its commit does not wait for the disk (~0.5 ms of a 1-port scan's
        ~4 ms here). A database crash can then undo it: the scan is back to queued with one
        delivery fewer counted, and its result, written durably later, is still stored (that
        write accepts a queued row, and its WAL flush makes this one durable too)."""
        record = await self.relaxed.fetchrow(
            "UPDATE scans SET attempts = attempts + 1,"
            " state = CASE WHEN state IN ('queued', 'running') THEN 'running' ELSE state END,"
            " started_at = CASE WHEN state IN ('queued', 'running')"
            " THEN COALESCE(started_at, now()) ELSE started_at END,"
            " reap_after = CASE WHEN $2::float8 IS NULL THEN reap_after"
            " ELSE GREATEST(reap_after, now() + make_interval(secs => $2)) END"
            " WHERE id = $1 RETURNING *",
            scan_id,
            reap_seconds,
        )
        return ScanRow.from_record(record) if record is not None else None

    async def release(self, task_id: UUID, reap_seconds: float | None = None) -> None:
        """Count a delivery that ended in order without finishing (a retry, a requeue), so the
        poison guard does not count it as a lost worker. With ``reap_seconds``, the reaper
        leaves the scan that long from now: its next delivery waits in the queue first."""
        await self.pool.execute(
            f"UPDATE scans SET released = released + 1,{_EXTEND_REAP} WHERE task_id = $1",  # noqa: S608
            task_id,
            reap_seconds,
        )

    async def complete(self, result: ScanResult) -> bool:
        """Store the result of a queued or running scan; True when this call ended the scan,
        or an earlier attempt of it did (the row holds this very result, by its finish time:
        a retry whose first commit landed with the reply lost). False when the scan had
        ended otherwise (failed, revoked, completed by another delivery): the caller then
        announces no end and counts nothing. A row that is gone (deleted) counts as ended
        here: the caller announces as it always did."""
        # One statement (the hot path's last write): the SELECT sees the row as it was before
        # the UPDATE, which is what tells a repeat of this write from another scan's end.
        ended: bool = await self.pool.fetchval(
            "WITH ended AS (UPDATE scans SET state = 'completed', progress = 100, result = $2,"
            " error = NULL, finished_at = $3, started_at = COALESCE(started_at, $4)"
            " WHERE id = $1 AND state IN ('queued', 'running') RETURNING true AS yes)"
            " SELECT COALESCE((SELECT yes FROM ended),"
            " (SELECT state = 'completed' AND finished_at = $3 FROM scans WHERE id = $1), true)",
            result.scan_id,
            result.model_dump(mode="json"),
            result.finished_at,
            result.started_at,
        )
        return ended

    async def revoke(self, result: ScanResult) -> bool:
        """Keep the partial result of a scan stopped on request; True when this call (or an
        earlier attempt of it) ended the scan, as for :meth:`complete`."""
        ended: bool = await self.pool.fetchval(
            "WITH ended AS (UPDATE scans SET state = 'revoked', result = $2, finished_at = $3"
            " WHERE id = $1 AND state IN ('queued', 'running') RETURNING true AS yes)"
            " SELECT COALESCE((SELECT yes FROM ended),"
            " (SELECT state = 'revoked' AND finished_at = $3 FROM scans WHERE id = $1), true)",
            result.scan_id,
            result.model_dump(mode="json"),
            result.finished_at,
        )
        return ended

    async def fail_by_task(self, task_id: UUID, error: str) -> bool:
        """Fail a queued or running scan; True when this call (or an earlier attempt of it,
        known by its reason) ended the scan, False when it had ended otherwise."""
        ended: bool = await self.pool.fetchval(
            "WITH ended AS (UPDATE scans SET state = 'failed', error = $2, finished_at = now()"
            " WHERE task_id = $1 AND state IN ('queued', 'running') RETURNING true AS yes)"
            " SELECT COALESCE((SELECT yes FROM ended),"
            " (SELECT state = 'failed' AND error = $2 FROM scans WHERE task_id = $1), true)",
            task_id,
            error,
        )
        return ended

    async def start_shards(
        self,
        scan_id: UUID,
        addresses: Sequence[str],
        plan: Sequence[tuple[Sequence[str], str]],
        reap_seconds: float,
        discovery: Sequence[dict[str, Any]] | None = None,
    ) -> Sequence[ShardRow]:
        """Record a scan's shards (once: a redelivery finds them); returns those with no
        outcome yet, to be published. Rows first, messages after: a crash between the two
        leaves a redelivered scan that publishes them again."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(_LOCK_SCAN, scan_id)  # the lock order: scans, then scan_shards
            planned = await conn.fetchval(
                "UPDATE scans SET addresses = COALESCE(addresses, $2),"
                " shards_total = COALESCE(shards_total, $3),"
                " reap_after = GREATEST(reap_after, now() + make_interval(secs => $4)),"
                " discovery = COALESCE(discovery, $5)"
                " WHERE id = $1 AND state = 'running' RETURNING shards_total",
                scan_id,
                list(addresses),
                len(plan),
                reap_seconds,
                discovery,
            )
            if planned is None:
                return []
            await conn.executemany(
                "INSERT INTO scan_shards (scan_id, index, addresses, ports)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                [(scan_id, i, list(a), p) for i, (a, p) in enumerate(plan)],
            )
            records = await conn.fetch(
                "SELECT * FROM scan_shards WHERE scan_id = $1 AND outcome IS NULL ORDER BY index",
                scan_id,
            )
        return [ShardRow.from_record(r) for r in records]

    async def shard_started(
        self, scan_id: UUID, index: int, reap_seconds: float
    ) -> tuple[ShardRow, ScanRow] | None:
        """Count a delivery of a shard and keep its scan from being reaped meanwhile."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(_LOCK_SCAN, scan_id)  # the lock order: scans, then scan_shards
            shard = await conn.fetchrow(
                "UPDATE scan_shards SET attempts = attempts + 1"
                " WHERE scan_id = $1 AND index = $2 RETURNING *",
                scan_id,
                index,
            )
            scan = await conn.fetchrow(
                "UPDATE scans SET reap_after ="
                " GREATEST(reap_after, now() + make_interval(secs => $2))"
                " WHERE id = $1 RETURNING *",
                scan_id,
                reap_seconds,
            )
        if shard is None or scan is None:
            return None
        return ShardRow.from_record(shard), ScanRow.from_record(scan)

    async def release_shard(self, scan_id: UUID, index: int) -> None:
        await self.pool.execute(
            "UPDATE scan_shards SET released = released + 1 WHERE scan_id = $1 AND index = $2",
            scan_id,
            index,
        )

    async def record_shard(
        self,
        scan_id: UUID,
        index: int,
        outcome: ShardOutcome,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> bool:
        """Store a shard's outcome; True when the scan is still running and every shard is
        recorded: for the one call that recorded the last, and for a repeat of a call whose
        commit landed but whose reply was lost (its retry must still publish the merge; a
        second merge finds the scan claimed or ended and changes nothing).

        The count is kept on the scan's row, locked first (the lock order everywhere: scans,
        then scan_shards): exactly one recording call sees the count reach the total. A shard
        recorded after the scan ended is stored but never makes it last."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(_LOCK_SCAN, scan_id)
            recorded = await conn.fetchval(
                "UPDATE scan_shards SET outcome = $3, result = $4, error = $5,"
                " finished_at = now() WHERE scan_id = $1 AND index = $2 AND outcome IS NULL"
                " RETURNING index",
                scan_id,
                index,
                outcome,
                result,
                error,
            )
            if recorded is None:
                # Recorded before: by a duplicate delivery, or by this very call on an attempt
                # whose reply was lost. Either way: last if the scan still waits for its merge.
                counts = await conn.fetchrow(
                    "SELECT state, shards_done, shards_total FROM scans WHERE id = $1", scan_id
                )
            else:
                counts = await conn.fetchrow(
                    "UPDATE scans SET shards_done = shards_done + 1 WHERE id = $1"
                    " RETURNING state, shards_done, shards_total",
                    scan_id,
                )
        return (
            counts is not None
            and counts["state"] == "running"
            and counts["shards_done"] == counts["shards_total"]
        )

    async def shards(self, scan_id: UUID) -> Sequence[ShardRow]:
        records = await self.pool.fetch(
            "SELECT * FROM scan_shards WHERE scan_id = $1 ORDER BY index", scan_id
        )
        return [ShardRow.from_record(r) for r in records]

    async def merge_started(
        self, scan_id: UUID, task_id: str, reap_seconds: float
    ) -> tuple[ScanRow, bool] | None:
        """Count a delivery of a scan's merge and claim the merge for this message (its
        redeliveries and retries keep its task id); returns the row and whether the claim is
        this message's. An unclaimed message is a duplicate: not counted, nothing changed."""
        async with self.pool.acquire() as conn, conn.transaction():
            record = await conn.fetchrow(
                "UPDATE scans SET merge_attempts = merge_attempts + 1,"
                " merge_task = COALESCE(merge_task, $2),"
                " reap_after = GREATEST(reap_after, now() + make_interval(secs => $3))"
                " WHERE id = $1 AND (merge_task IS NULL OR merge_task = $2) RETURNING *",
                scan_id,
                task_id,
                reap_seconds,
            )
            if record is not None:
                return ScanRow.from_record(record), True
            record = await conn.fetchrow("SELECT * FROM scans WHERE id = $1", scan_id)
        return (ScanRow.from_record(record), False) if record is not None else None

    async def release_merge(self, scan_id: UUID, reap_seconds: float | None = None) -> None:
        """Count a merge delivery that ended in order (a retry, a requeue); ``reap_seconds``
        as for :meth:`release`."""
        await self.pool.execute(
            f"UPDATE scans SET merge_released = merge_released + 1,{_EXTEND_REAP}"  # noqa: S608
            " WHERE id = $1",
            scan_id,
            reap_seconds,
        )

    async def delete(self, scan_id: UUID) -> None:
        await self.pool.execute("DELETE FROM scans WHERE id = $1", scan_id)
