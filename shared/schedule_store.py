"""The ``schedules`` table, and turning due schedules into ordinary scans exactly once.

A run is a scan row with ``(schedule_id, scheduled_for)`` unique, written in the same
transaction that advances the schedule's ``next_run_at``, with the schedule row locked
(``FOR UPDATE SKIP LOCKED``) and still as it was when the run was checked: any number of
dispatchers can tick at once and each due run is recorded once. The scan's message is
published after that commit, from ``scan_publish_outbox``, so a dispatcher that dies in
between leaves it for another.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, TypeAlias
from uuid import UUID, uuid4

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from shared.ports import count_ports, parse_port_ranges
from shared.protocol import LimitPolicy, TaskMessage, build_scan_message
from shared.schedules import (
    TIMING_FIELDS,
    Refusal,
    Schedule,
    ScheduleCreate,
    ScheduleUpdate,
    Timing,
    plan_tick,
)
from shared.schemas import EXCLUDE_VERSION, PAYLOAD_VERSION, ScanConfig, ScanTaskPayload
from shared.targets import network_hosts, parse_target

log = logging.getLogger(__name__)

CheckTarget = Callable[[Schedule], Awaitable[Refusal | None]]
"""Checks a schedule when a run fires: None when it may run, else why not."""

UPDATE_ATTEMPTS = 5
"""Reads, merges and checks of one edit before it gives up on a row that keeps changing."""


class ScheduleBusy(Exception):
    """The schedule changed under every attempt of an edit (answered as a conflict)."""


RunNow: TypeAlias = "FiredRun | Literal['missing', 'exists']"
"""What run-now came to: the run, no such schedule, or a run at that instant exists already."""

_NEXT_DUE = (
    "SELECT s.* FROM schedules s JOIN api_keys k ON k.id = s.api_key_id"
    " WHERE s.enabled AND s.next_run_at <= $1 AND k.revoked_at IS NULL"
    " AND s.id <> ALL($2::uuid[]) ORDER BY s.next_run_at LIMIT 1"
)
_STILL_DUE = (
    "SELECT 1 FROM schedules WHERE id = $1 AND enabled AND updated_at = $2"
    " AND next_run_at = $3 FOR UPDATE SKIP LOCKED"
)


Conn: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"


def schedule_from_record(record: asyncpg.Record) -> Schedule:
    return Schedule.model_validate(
        {key: record[key] for key in Schedule.model_fields}, from_attributes=False
    )


def timing_of(schedule: Schedule | ScheduleCreate) -> Timing:
    return Timing(
        cron=schedule.cron, timezone=schedule.timezone, interval_seconds=schedule.interval_seconds
    )


@dataclass(frozen=True, slots=True)
class FiredRun:
    schedule_id: UUID
    scan_id: UUID
    task_id: UUID
    scheduled_for: datetime
    error: str | None
    """Why the run was refused at once (its scan is recorded as failed), or None."""


_INSERT_RUN = (
    "INSERT INTO scans (id, task_id, target, ports, config, priority, api_key_id,"
    " schedule_id, scheduled_for) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    " ON CONFLICT (schedule_id, scheduled_for) WHERE schedule_id IS NOT NULL DO NOTHING"
    " RETURNING id"
)


class ScheduleStore:
    """Queries on ``schedules``; reads and edits take the caller's key id, like scans."""

    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def create(
        self, owner: UUID, spec: ScheduleCreate, now: datetime, *, limit: int
    ) -> Schedule | None:
        """The new schedule; None when the owner already has ``limit`` of them."""
        next_run = timing_of(spec).next_after(now, anchor=now) if spec.enabled else None
        async with self.pool.acquire() as conn, conn.transaction():
            await lock_owner(conn, owner, "schedules")
            record = await conn.fetchrow(
                "INSERT INTO schedules (id, api_key_id, name, target, ports, config, priority,"
                " cron, timezone, interval_seconds, enabled, misfire_policy, misfire_grace_seconds,"
                " exclude, anchor_at, next_run_at, created_at, updated_at)"
                " SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,"
                " $15, $15 WHERE (SELECT count(*) FROM schedules WHERE api_key_id = $2) < $17"
                " RETURNING *",
                uuid4(),
                owner,
                spec.name,
                spec.target,
                spec.ports,
                spec.config.model_dump(mode="json"),
                spec.priority,
                spec.cron,
                spec.timezone,
                spec.interval_seconds,
                spec.enabled,
                spec.misfire_policy,
                spec.misfire_grace_seconds,
                spec.exclude,
                now,
                next_run,
                limit,
            )
        return schedule_from_record(record) if record is not None else None

    async def get(self, owner: UUID, schedule_id: UUID) -> Schedule | None:
        record = await self.pool.fetchrow(
            "SELECT * FROM schedules WHERE id = $1 AND api_key_id = $2", schedule_id, owner
        )
        return schedule_from_record(record) if record is not None else None

    async def owned(self, owner: UUID) -> list[Schedule]:
        records = await self.pool.fetch(
            "SELECT * FROM schedules WHERE api_key_id = $1 ORDER BY created_at DESC, id", owner
        )
        return [schedule_from_record(r) for r in records]

    async def delete(self, owner: UUID, schedule_id: UUID) -> bool:
        deleted = await self.pool.fetchval(
            "DELETE FROM schedules WHERE id = $1 AND api_key_id = $2 RETURNING id",
            schedule_id,
            owner,
        )
        return deleted is not None

    async def update(
        self,
        owner: UUID,
        schedule_id: UUID,
        change: ScheduleUpdate,
        now: datetime,
        *,
        check: Callable[[ScheduleCreate], Awaitable[None]] | None = None,
    ) -> Schedule | None:
        """Apply the fields given. A change of timing (or enabling) counts from ``now``: a run
        that was due under the old timing and not yet fired is dropped. An edit and a
        dispatcher's tick each write only a row still as they read it: the run fired before the
        edit, or not at all.

        ``check`` may refuse the merged schedule by raising, before anything is written.
        Raises pydantic's ``ValidationError`` when the result has both or neither of cron and
        interval."""
        fields = change.model_dump(exclude_unset=True)
        async with self.pool.acquire() as conn:
            for _attempt in range(UPDATE_ATTEMPTS):
                # Merged and checked (perhaps a name lookup) with no lock held, then written
                # only if the row is still as read; else merged again from the new row.
                read = await conn.fetchrow(
                    "SELECT * FROM schedules WHERE id = $1 AND api_key_id = $2",
                    schedule_id,
                    owner,
                )
                if read is None:
                    return None
                merged = _merged(read, fields)
                if check is not None:
                    await check(merged)
                async with conn.transaction():
                    record = await _locked(conn, owner, schedule_id)
                    if record is None:
                        return None
                    if (record["updated_at"], record["next_run_at"]) != (
                        read["updated_at"],
                        read["next_run_at"],
                    ):
                        continue
                    return await self._write(conn, record, merged, fields, now)
        raise ScheduleBusy(f"schedule {schedule_id} kept changing while it was edited")

    async def _write(
        self,
        conn: Conn,
        record: asyncpg.Record,
        merged: ScheduleCreate,
        fields: dict[str, Any],
        now: datetime,
    ) -> Schedule:
        schedule_id = record["id"]
        anchor: datetime = record["anchor_at"]
        next_run: datetime | None = record["next_run_at"]
        if fields.keys() & TIMING_FIELDS:
            anchor = now
            next_run = timing_of(merged).next_after(now, anchor=now)
        if not merged.enabled:
            next_run = None
        updated = await conn.fetchrow(
            "UPDATE schedules SET name = $2, target = $3, ports = $4, config = $5,"
            " priority = $6, cron = $7, timezone = $8, interval_seconds = $9, enabled = $10,"
            " misfire_policy = $11, misfire_grace_seconds = $12, exclude = $13,"
            " anchor_at = $14, next_run_at = $15, updated_at = $16, parked_reason = NULL"
            " WHERE id = $1 RETURNING *",
            schedule_id,
            merged.name,
            merged.target,
            merged.ports,
            merged.config.model_dump(mode="json"),
            merged.priority,
            merged.cron,
            merged.timezone,
            merged.interval_seconds,
            merged.enabled,
            merged.misfire_policy,
            merged.misfire_grace_seconds,
            merged.exclude,
            anchor,
            next_run,
            now,
        )
        assert updated is not None
        return schedule_from_record(updated)

    async def fire_due(self, now: datetime, check: CheckTarget, limit: int = 50) -> list[FiredRun]:
        """Record the runs due at ``now`` and advance each schedule, one schedule at a time.

        A schedule's run is checked (bounds, policy, a name lookup) with no lock held; then
        its row is locked, only if it is still as it was read (not edited, not handled by
        another dispatcher meanwhile: else the next tick sees it afresh), and the run recorded
        with the advance of ``next_run_at`` in one short transaction.

        Runs missed beyond a schedule's grace period collapse into the latest one, which
        ``skip`` drops and ``run_once`` fires (see ``misfire_decision``). Schedules of revoked
        keys are left alone. A row that cannot be handled is parked, the rest still fire."""
        fired: list[FiredRun] = []
        seen: list[UUID] = []
        async with self.pool.acquire() as conn:
            for _ in range(limit):
                record = await conn.fetchrow(_NEXT_DUE, now, seen)
                if record is None:
                    break
                seen.append(record["id"])
                try:
                    run = await self._fire_one(conn, record, now, check)
                except (ValueError, LookupError, TypeError) as exc:
                    # ZoneInfoNotFoundError (a KeyError) when the time zone database lost a
                    # zone, ValidationError when a row no longer validates: never crash-loop.
                    await self._park(conn, record["id"], f"{type(exc).__name__}: {exc}")
                    continue
                if run is not None:
                    fired.append(run)
        return fired

    async def _fire_one(
        self, conn: Conn, record: asyncpg.Record, now: datetime, check: CheckTarget
    ) -> FiredRun | None:
        schedule = schedule_from_record(record)
        plan = plan_tick(
            timing_of(schedule),
            record["next_run_at"],
            now,
            anchor=record["anchor_at"],
            policy=schedule.misfire_policy,
            grace_seconds=schedule.misfire_grace_seconds,
        )
        reason = None
        if plan.fire_at is not None:
            refused = await check(schedule)
            grace = timedelta(seconds=schedule.misfire_grace_seconds)
            if refused is not None and refused.transient and now - plan.fire_at <= grace:
                log.info("schedule %s: %s; retrying next tick", schedule.id, refused.reason)
                return None  # next_run_at stays: the next tick tries this run again
            reason = None if refused is None else f"schedule run refused: {refused.reason}"
        run = None
        async with conn.transaction():
            if (
                await conn.fetchrow(
                    _STILL_DUE, schedule.id, record["updated_at"], record["next_run_at"]
                )
                is None
            ):
                return None
            if plan.fire_at is not None:
                run = await self._record_run(conn, record, schedule, plan.fire_at, reason)
            await conn.execute(
                "UPDATE schedules SET next_run_at = $2,"
                " last_run_at = COALESCE($3, last_run_at) WHERE id = $1",
                schedule.id,
                plan.next_run_at,
                plan.fire_at,
            )
        return run

    async def _park(self, conn: Conn, schedule_id: UUID, reason: str) -> None:
        log.error("schedule %s parked, not firing it: %s", schedule_id, reason)
        await conn.execute(
            "UPDATE schedules SET next_run_at = NULL, parked_reason = $2 WHERE id = $1",
            schedule_id,
            reason[:500],
        )

    async def run_now(
        self, owner: UUID, schedule_id: UUID, now: datetime, ids: tuple[UUID, UUID]
    ) -> RunNow:
        """One extra run at ``now``, outside the timing, as scan ``ids`` (scan id, task id)
        that the caller has checked and admitted."""
        async with self.pool.acquire() as conn, conn.transaction():
            record = await _locked(conn, owner, schedule_id)
            if record is None:
                return "missing"
            schedule = schedule_from_record(record)
            run = await self._record_run(conn, record, schedule, now, None, ids=ids)
            if run is None:
                return "exists"
            await conn.execute(
                "UPDATE schedules SET last_run_at = $2 WHERE id = $1", schedule.id, now
            )
        return run

    async def _record_run(
        self,
        conn: Conn,
        record: asyncpg.Record,
        schedule: Schedule,
        due: datetime,
        refused: str | None,
        *,
        ids: tuple[UUID, UUID] | None = None,
    ) -> FiredRun | None:
        scan_id, task_id = ids or (uuid4(), uuid4())
        inserted = await conn.fetchval(
            _INSERT_RUN,
            scan_id,
            task_id,
            schedule.target,
            schedule.ports,
            schedule.config.model_dump(mode="json"),
            schedule.priority,
            record["api_key_id"],
            schedule.id,
            due,
        )
        if inserted is None:
            return None  # this run exists already
        if refused is not None:
            await conn.execute(
                "UPDATE scans SET state = 'failed', error = $2, finished_at = now() WHERE id = $1",
                scan_id,
                refused,
            )
        else:
            await conn.execute("INSERT INTO scan_publish_outbox (scan_id) VALUES ($1)", scan_id)
        return FiredRun(schedule.id, scan_id, task_id, due, refused)

    async def publish_pending(
        self,
        publish: Callable[[TaskMessage], Awaitable[bool]],
        *,
        limits: LimitPolicy,
        limit: int = 100,
        only: Sequence[UUID] | None = None,
    ) -> int:
        """Publish recorded runs whose message the broker has not confirmed yet; each outbox
        row is locked while its message is published and removed once confirmed. ``publish``
        answers whether the broker confirmed; a refusal leaves that row and the rest for the
        next tick. Returns how many were sent."""
        sent = 0
        async with self.pool.acquire() as conn, conn.transaction():
            records = await conn.fetch(
                "SELECT s.*, coalesce(sc.exclude, '{}') AS exclude FROM scan_publish_outbox o"
                " JOIN scans s ON s.id = o.scan_id LEFT JOIN schedules sc ON sc.id = s.schedule_id"
                " WHERE ($2::uuid[] IS NULL OR o.scan_id = ANY($2))"
                " ORDER BY o.created_at LIMIT $1 FOR UPDATE OF o SKIP LOCKED",
                limit,
                None if only is None else list(only),
            )
            for record in records:
                # A scan cancelled before its message left needs none.
                if record["state"] == "queued" and not await publish(scan_message(record, limits)):
                    break
                await conn.execute(
                    "DELETE FROM scan_publish_outbox WHERE scan_id = $1", record["id"]
                )
                sent += 1
        return sent


def _merged(record: asyncpg.Record, fields: dict[str, Any]) -> ScheduleCreate:
    """The stored schedule with the edited fields; cron and interval replace each other."""
    current = schedule_from_record(record).model_dump()
    if fields.get("cron") is not None:
        current["interval_seconds"] = None
    if fields.get("interval_seconds") is not None:
        current["cron"] = None
    current.update(fields)
    return ScheduleCreate.model_validate(
        {k: v for k, v in current.items() if k in ScheduleCreate.model_fields}
    )


async def lock_owner(conn: Conn, owner: UUID, what: str) -> None:
    """Serialise one key's creates of ``what`` until the transaction ends, so that a count
    checked inside it stays true until the insert commits."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"{what}:{owner}")


async def _locked(conn: Conn, owner: UUID, schedule_id: UUID) -> asyncpg.Record | None:
    """The owner's schedule, locked until the transaction ends (a tick skips it meanwhile)."""
    return await conn.fetchrow(
        "SELECT * FROM schedules WHERE id = $1 AND api_key_id = $2 FOR UPDATE", schedule_id, owner
    )


def scan_message(record: asyncpg.Record, limits: LimitPolicy) -> TaskMessage:
    """The task message of a recorded scan; ``record`` carries its schedule's ``exclude``."""
    exclude = tuple(record["exclude"])
    payload = ScanTaskPayload(
        version=EXCLUDE_VERSION if exclude else PAYLOAD_VERSION,
        exclude=exclude,
        scan_id=record["id"],
        target=record["target"],
        ports=record["ports"],
        config=ScanConfig.model_validate(record["config"]),
        priority=record["priority"],
    )
    target = parse_target(record["target"], max_hosts=2**32)
    hosts = 1
    if target.kind == "network":
        hosts = len(network_hosts(ipaddress.ip_network(target.value)))
    return build_scan_message(
        record["task_id"],
        payload,
        port_count=count_ports(parse_port_ranges(record["ports"])),
        host_count=hosts,
        limits=limits,
        origin=None,
    )
