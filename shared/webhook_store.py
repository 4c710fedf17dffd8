"""The ``webhooks`` tables: endpoints, the messages owed to them, and every delivery attempt.

Scans that end leave a row in ``scan_event_outbox`` (a trigger, same transaction as the state
change). :meth:`WebhookStore.collect_events` turns each into one message per matching endpoint
and event; a dispatcher then claims due messages, sends them, and records each attempt here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeAlias
from uuid import UUID, uuid4

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from shared.diff import diff_results
from shared.ports import parse_port_ranges
from shared.schedule_store import lock_owner
from shared.schemas import PortResult, ScanResult
from shared.webhooks import (
    Delivery,
    DeliveryAttempt,
    EventType,
    Webhook,
    WebhookCreate,
    WebhookCreated,
    new_message_id,
    new_secret,
)

Conn: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"
Redelivery = Literal["queued", "missing", "disabled"]


def _webhook(record: asyncpg.Record) -> Webhook:
    return Webhook.model_validate({key: record[key] for key in Webhook.model_fields})


@dataclass(frozen=True, slots=True)
class DueMessage:
    id: str
    webhook_id: UUID
    url: str
    secret: str
    event_type: str
    payload: dict[str, Any]
    attempts: int
    failing_since: datetime | None


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """What one attempt came to; the sender decides, :meth:`WebhookStore.finish` writes."""

    status_code: int | None
    error: str | None
    duration_ms: int
    state: str
    """``delivered``, ``pending`` (retry at ``next_attempt_at``) or ``failed``."""
    next_attempt_at: datetime | None = None
    disable_reason: str | None = None


class WebhookStore:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def create(
        self, owner: UUID, spec: WebhookCreate, *, limit: int
    ) -> WebhookCreated | None:
        """The new webhook with its secret; None when the owner already has ``limit``."""
        secret = new_secret()
        async with self.pool.acquire() as conn, conn.transaction():
            await lock_owner(conn, owner, "webhooks")
            record = await conn.fetchrow(
                "INSERT INTO webhooks (id, api_key_id, url, events, schedule_id, target, secret)"
                " SELECT $1, $2, $3, $4, $5, $6, $7"
                " WHERE (SELECT count(*) FROM webhooks WHERE api_key_id = $2) < $8 RETURNING *",
                uuid4(),
                owner,
                spec.url,
                list(spec.events),
                spec.schedule_id,
                spec.target,
                secret,
                limit,
            )
        if record is None:
            return None
        return WebhookCreated(**_webhook(record).model_dump(), secret=secret)

    async def owned(self, owner: UUID) -> list[Webhook]:
        records = await self.pool.fetch(
            "SELECT * FROM webhooks WHERE api_key_id = $1 ORDER BY created_at DESC, id", owner
        )
        return [_webhook(r) for r in records]

    async def get(self, owner: UUID, webhook_id: UUID) -> Webhook | None:
        record = await self.pool.fetchrow(
            "SELECT * FROM webhooks WHERE id = $1 AND api_key_id = $2", webhook_id, owner
        )
        return _webhook(record) if record is not None else None

    async def delete(self, owner: UUID, webhook_id: UUID) -> bool:
        deleted = await self.pool.fetchval(
            "DELETE FROM webhooks WHERE id = $1 AND api_key_id = $2 RETURNING id", webhook_id, owner
        )
        return deleted is not None

    async def deliveries(self, webhook_id: UUID, limit: int = 50) -> list[Delivery]:
        messages = await self.pool.fetch(
            "SELECT * FROM webhook_messages WHERE webhook_id = $1"
            " ORDER BY created_at DESC, id LIMIT $2",
            webhook_id,
            limit,
        )
        attempts = await self.pool.fetch(
            "SELECT * FROM webhook_attempts WHERE message_id = ANY($1) ORDER BY id",
            [m["id"] for m in messages],
        )
        history: dict[str, list[DeliveryAttempt]] = {}
        for a in attempts:
            history.setdefault(a["message_id"], []).append(
                DeliveryAttempt(
                    attempted_at=a["attempted_at"],
                    status_code=a["status_code"],
                    error=a["error"],
                    duration_ms=a["duration_ms"],
                )
            )
        return [
            Delivery(
                id=m["id"],
                event_type=m["event_type"],
                scan_id=m["scan_id"],
                state=m["state"],
                attempts=m["attempts"],
                next_attempt_at=m["next_attempt_at"] if m["state"] == "pending" else None,
                created_at=m["created_at"],
                delivered_at=m["delivered_at"],
                payload=m["payload"],
                history=history.get(m["id"], []),
            )
            for m in messages
        ]

    async def redeliver(self, webhook_id: UUID, message_id: str) -> Redelivery:
        """Send a message again from its first attempt. A disabled endpoint sends nothing,
        so its messages are not queued again: re-enable it first."""
        async with self.pool.acquire() as conn, conn.transaction():
            enabled = await conn.fetchval(
                "SELECT enabled FROM webhooks WHERE id = $1 FOR SHARE", webhook_id
            )
            if enabled is None:
                return "missing"
            if not enabled:
                return "disabled"
            found = await conn.fetchval(
                "UPDATE webhook_messages SET state = 'pending', attempts = 0,"
                " next_attempt_at = now(), leased_until = NULL"
                " WHERE id = $1 AND webhook_id = $2 RETURNING id",
                message_id,
                webhook_id,
            )
        return "queued" if found is not None else "missing"

    async def set_enabled(self, owner: UUID, webhook_id: UUID, enabled: bool) -> Webhook | None:
        """Turn an endpoint on or off; turning it on forgets why it was disabled and since
        when it failed, so the automatic disabling counts afresh."""
        record = await self.pool.fetchrow(
            "UPDATE webhooks SET enabled = $3,"
            " disabled_reason = CASE WHEN $3 THEN NULL ELSE disabled_reason END,"
            " failing_since = CASE WHEN $3 THEN NULL ELSE failing_since END"
            " WHERE id = $1 AND api_key_id = $2 RETURNING *",
            webhook_id,
            owner,
            enabled,
        )
        return _webhook(record) if record is not None else None

    async def collect_events(self, limit: int = 100) -> int:
        """Turn finished scans into messages for the endpoints that want them; returns how
        many scans were handled. ``ports.changed`` goes out only when the diff against the
        key's previous completed scan of the target has something in it."""
        handled = 0
        async with self.pool.acquire() as conn, conn.transaction():
            events = await conn.fetch(
                "SELECT * FROM scan_event_outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                limit,
            )
            for event in events:
                scan = await conn.fetchrow("SELECT * FROM scans WHERE id = $1", event["scan_id"])
                if scan is not None:
                    await self._messages_for(conn, scan, event["state"])
                await conn.execute("DELETE FROM scan_event_outbox WHERE id = $1", event["id"])
                handled += 1
        return handled

    async def _messages_for(self, conn: Conn, scan: asyncpg.Record, state: str) -> None:
        hooks = await conn.fetch(
            "SELECT w.id, w.events FROM webhooks w JOIN api_keys k ON k.id = w.api_key_id"
            " WHERE w.api_key_id = $1 AND w.enabled AND k.revoked_at IS NULL"
            " AND (w.schedule_id IS NULL OR w.schedule_id = $2)"
            " AND (w.target IS NULL OR w.target = $3)",
            scan["api_key_id"],
            scan["schedule_id"],
            scan["target"],
        )
        if not hooks:
            return
        base = {
            "scan_id": str(scan["id"]),
            "task_id": str(scan["task_id"]),
            "schedule_id": str(scan["schedule_id"]) if scan["schedule_id"] else None,
            "target": scan["target"],
            "ports": scan["ports"],
            "finished_at": scan["finished_at"].isoformat() if scan["finished_at"] else None,
        }
        payloads: dict[EventType, dict[str, Any]] = {}
        if state == "failed":
            payloads["scan.failed"] = {**base, "error": scan["error"]}
        elif scan["result"] is not None:
            result = ScanResult.model_validate(scan["result"])
            payloads["scan.completed"] = {
                **base,
                "open_ports": [p.model_dump(mode="json") for p in result.open_ports],
            }
            changes = await self._changes(conn, scan, result)
            if changes is not None:
                payloads["ports.changed"] = {**base, "diff": changes}
        for hook in hooks:
            for event_type, data in payloads.items():
                if event_type not in hook["events"]:
                    continue
                await conn.execute(
                    "INSERT INTO webhook_messages (id, webhook_id, event_type, scan_id, payload)"
                    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    new_message_id(),
                    hook["id"],
                    event_type,
                    scan["id"],
                    {"type": event_type, "timestamp": _event_time(scan), "data": data},
                )

    async def _changes(
        self, conn: Conn, scan: asyncpg.Record, result: ScanResult
    ) -> dict[str, Any] | None:
        """The diff against the previous completed run of the same schedule (a scheduled
        scan), or else the key's previous completed scan of the target."""
        if scan["schedule_id"] is not None:
            previous = await conn.fetchrow(
                "SELECT task_id, result FROM scans WHERE schedule_id = $1"
                " AND state = 'completed' AND result IS NOT NULL AND created_at <= $2"
                " AND id <> $3 ORDER BY created_at DESC, id DESC LIMIT 1",
                scan["schedule_id"],
                scan["created_at"],
                scan["id"],
            )
        else:
            previous = await conn.fetchrow(
                "SELECT task_id, result FROM scans WHERE api_key_id = $1 AND target = $2"
                " AND state = 'completed' AND result IS NOT NULL AND created_at <= $3"
                " AND id <> $4 ORDER BY created_at DESC, id DESC LIMIT 1",
                scan["api_key_id"],
                scan["target"],
                scan["created_at"],
                scan["id"],
            )
        if previous is None:
            return None
        return alert_diff(
            ScanResult.model_validate(previous["result"]),
            result,
            old_task_id=previous["task_id"],
            new_task_id=scan["task_id"],
        )

    async def claim_due(
        self,
        now: datetime,
        send: Callable[[list[DueMessage]], Awaitable[list[AttemptOutcome]]],
        limit: int = 20,
        lease_seconds: float = 120.0,
    ) -> int:
        """Lease the messages due at ``now`` for ``lease_seconds``, let ``send`` try each with
        no transaction open, then write what came of each. A dispatcher that dies meanwhile
        leaves its messages to another once the lease ends."""
        async with self.pool.acquire() as conn, conn.transaction():
            records = await conn.fetch(
                "WITH due AS (SELECT m.id FROM webhook_messages m"
                " JOIN webhooks w ON w.id = m.webhook_id JOIN api_keys k ON k.id = w.api_key_id"
                " WHERE m.state = 'pending' AND m.next_attempt_at <= $1 AND w.enabled"
                " AND k.revoked_at IS NULL AND (m.leased_until IS NULL OR m.leased_until <= $1)"
                " ORDER BY m.next_attempt_at LIMIT $2 FOR UPDATE OF m SKIP LOCKED)"
                " UPDATE webhook_messages m SET leased_until = $1 + make_interval(secs => $3)"
                " FROM due, webhooks w WHERE m.id = due.id AND w.id = m.webhook_id"
                " RETURNING m.id, m.webhook_id, m.event_type, m.payload, m.attempts, w.url,"
                " w.secret, w.failing_since",
                now,
                limit,
                lease_seconds,
            )
        due = [
            DueMessage(
                id=r["id"],
                webhook_id=r["webhook_id"],
                url=r["url"],
                secret=r["secret"],
                event_type=r["event_type"],
                payload=r["payload"],
                attempts=r["attempts"],
                failing_since=r["failing_since"],
            )
            for r in records
        ]
        if not due:
            return 0
        outcomes = await send(due)
        for message, outcome in zip(due, outcomes, strict=True):
            async with self.pool.acquire() as conn, conn.transaction():
                await self._finish(conn, message, outcome, now)
        return len(due)

    async def _finish(
        self,
        conn: Conn,
        message: DueMessage,
        outcome: AttemptOutcome,
        now: datetime,
    ) -> None:
        await conn.execute(
            "INSERT INTO webhook_attempts (message_id, status_code, error, duration_ms)"
            " VALUES ($1, $2, $3, $4)",
            message.id,
            outcome.status_code,
            outcome.error,
            outcome.duration_ms,
        )
        await conn.execute(
            "UPDATE webhook_messages SET attempts = attempts + 1, state = $2, leased_until = NULL,"
            " next_attempt_at = COALESCE($3, next_attempt_at),"
            " delivered_at = CASE WHEN $2 = 'delivered' THEN now() END WHERE id = $1",
            message.id,
            outcome.state,
            outcome.next_attempt_at,
        )
        if outcome.state == "delivered":
            await conn.execute(
                "UPDATE webhooks SET failing_since = NULL WHERE id = $1", message.webhook_id
            )
            return
        await conn.execute(
            "UPDATE webhooks SET failing_since = COALESCE(failing_since, $2),"
            " enabled = enabled AND $3::text IS NULL,"
            " disabled_reason = COALESCE($3, disabled_reason) WHERE id = $1",
            message.webhook_id,
            now,
            outcome.disable_reason,
        )

    async def failing_since(self, webhook_id: UUID) -> datetime | None:
        value: datetime | None = await self.pool.fetchval(
            "SELECT failing_since FROM webhooks WHERE id = $1", webhook_id
        )
        return value


def _event_time(scan: asyncpg.Record) -> str:
    when: datetime = scan["finished_at"] or scan["created_at"]
    return when.isoformat().replace("+00:00", "Z")


def body_of(payload: dict[str, Any]) -> str:
    return orjson.dumps(payload).decode()


def alert_diff(
    old: ScanResult,
    new: ScanResult,
    *,
    old_task_id: UUID | None = None,
    new_task_id: UUID | None = None,
) -> dict[str, Any] | None:
    """The ``ports.changed`` diff, or None when nothing changed.

    A port open now that lay outside the old scan's ports or addresses was not scanned
    before: listed as ``not_scanned_before``, never as newly open. An address in either
    scan's ``capped_addresses`` (only part of its open ports listed) is not compared."""
    diff = diff_results(old, new, old_task_id=old_task_id, new_task_id=new_task_id)
    capped = {*old.capped_addresses, *new.capped_addresses}
    ranges = parse_port_ranges(old.ports)
    addresses = set(old.addresses)

    def scanned_before(port: PortResult) -> bool:
        in_ports = any(low <= port.port <= high for low, high in ranges)
        return in_ports and (not addresses or port.address in addresses)

    newly_open = [p for p in diff.newly_open if p.address not in capped]
    trimmed = diff.model_copy(
        update={
            "newly_open": [p for p in newly_open if scanned_before(p)],
            "newly_closed": [p for p in diff.newly_closed if p.address not in capped],
            "changed": [c for c in diff.changed if c.address not in capped],
        }
    )
    if not trimmed.has_changes:
        return None
    body = trimmed.model_dump(mode="json")
    body["not_scanned_before"] = [
        p.model_dump(mode="json") for p in newly_open if not scanned_before(p)
    ]
    return body
