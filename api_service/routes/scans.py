"""/api/scan...: submit, read, list, cancel, and follow scans."""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from datetime import UTC, datetime
from typing import get_args
from uuid import UUID, uuid4

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from api_service.errors import ApiError
from api_service.publisher import PublishFailed
from api_service.requests import ParsedScan, read_json, validate_model
from api_service.responses import ORJSONResponse
from api_service.routes.common import (
    caller,
    db_unavailable,
    services,
    task_id_param,
)
from shared.errors import ResolutionFailed, TargetDenied
from shared.logging import bind_scan
from shared.protocol import LimitPolicy, build_scan_message
from shared.resolve import resolve_target
from shared.retry import DATABASE_ERRORS as DB_ERRORS
from shared.schemas import (
    ScanAccepted,
    ScanCached,
    ScanPage,
    ScanRequest,
    ScanState,
    ScanStatus,
    ScanSummary,
    ScanTaskPayload,
)
from shared.store import ScanListing
from shared.targets import MAX_HOSTS_LIMIT, TargetError, parse_target

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY = 255
SCAN_STATES = get_args(ScanState)


def accepted_response(
    task_id: UUID,
    scan_id: UUID,
    target: str,
    priority: str,
    port_count: int,
    *,
    replayed: bool = False,
) -> Response:
    body = ScanAccepted(
        task_id=task_id,
        scan_id=scan_id,
        message=f"Scan of {target} ({port_count} ports) queued with {priority} priority",
    )
    headers = {"Location": f"/api/scan/{task_id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return ORJSONResponse(body.model_dump(mode="json"), status_code=202, headers=headers)


async def replay(
    request: Request, owner: UUID, key: str, fingerprint: bytes, ports: int
) -> Response | None:
    """The earlier answer for this Idempotency-Key, 409 if its body differed, None if new."""
    try:
        found = await services(request).store.by_idempotency_key(owner, key)
    except DB_ERRORS:
        raise db_unavailable() from None
    if found is None:
        return None
    row, stored = found
    if stored != hashlib.sha256(fingerprint).digest():
        raise ApiError(
            409,
            "Idempotency-Key was already used with a different request",
            field="Idempotency-Key",
        )
    return accepted_response(row.task_id, row.id, row.target, row.priority, ports, replayed=True)


async def _parse(request: Request, owner: UUID) -> ParsedScan:
    """The request, parsed before any lookup or write; a refusal counts against the rate."""
    svc = services(request)
    try:
        data = await read_json(request, svc.settings.max_request_bytes)
        return ParsedScan(validate_model(ScanRequest, data), svc.settings)
    except ApiError:
        await svc.limiter.charge(owner)
        raise


async def submit_scan(request: Request) -> Response:
    svc = services(request)
    owner = await caller(request)
    parsed = await _parse(request, owner)
    scan = parsed.scan
    # Both keys are computed only when used: each is a model dump and a hash per request.
    fingerprint = b""
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None:
        if not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            raise ApiError(422, "Idempotency-Key must be 1-255 characters", field="Idempotency-Key")
        fingerprint = parsed.fingerprint()
        earlier = await replay(request, owner, idempotency_key, fingerprint, parsed.port_count)
        if earlier is not None:
            return earlier

    # Recorded only while the cache is on: turned on later, it starts empty, as caches do.
    cache_key = parsed.cache_key() if svc.settings.result_cache_ttl else None
    if cache_key is not None and not scan.force:
        cached = await _cached(request, owner, cache_key)
        if cached is not None:
            return cached

    scan_id, task_id = uuid4(), uuid4()
    bind_scan(scan_id=scan_id, task_id=task_id)
    payload = ScanTaskPayload(
        scan_id=scan_id,
        target=scan.target,
        ports=scan.ports,
        config=scan.config,
        priority=scan.priority,
    )
    if scan.priority == "critical":
        await svc.limiter.admit_critical(owner)
    # Admitted (and counted) before the lookup: a host name costs a resolution, so it costs
    # the key a submission whether or not it is then refused.
    # The slot lives while the scan is queued (up to result_ttl); its worker counts the hard
    # limit from the scan's start (EventLog.hold_slot), so a long queue never frees it early.
    await svc.limiter.admit(owner, task_id, scan_id, svc.settings.result_ttl)
    try:
        await resolve_target(
            parsed.target,
            svc.policy,
            timeout=svc.settings.resolve_timeout,
            lookups=svc.lookups,
        )
    except TargetDenied:
        await svc.limiter.release(owner, task_id)
        # Neither the address a name resolved to nor the rule that matched: both would map
        # the inside of the network for whoever asks.
        raise ApiError(
            403,
            f"{scan.target} is not allowed by the target policy",
            code="target_denied",
            field="target",
        ) from None
    except ResolutionFailed as exc:
        await svc.limiter.release(owner, task_id)
        raise ApiError(422, str(exc), code="unresolvable_target", field="target") from None
    try:
        inserted = await svc.store.insert(
            scan_id=scan_id,
            task_id=task_id,
            target=scan.target,
            ports=scan.ports,
            config=scan.config,
            priority=scan.priority,
            owner=owner,
            idempotency_key=idempotency_key,
            request_hash=hashlib.sha256(fingerprint).digest() if idempotency_key else None,
            cache_key=cache_key,
        )
    except DB_ERRORS as exc:
        log.warning("cannot record scan: %r", exc)
        await svc.limiter.release(owner, task_id)
        raise db_unavailable() from None
    if not inserted:
        # A concurrent request with the same Idempotency-Key won the insert.
        await svc.limiter.release(owner, task_id)
        assert idempotency_key is not None
        earlier = await replay(request, owner, idempotency_key, fingerprint, parsed.port_count)
        assert earlier is not None
        return earlier

    message = build_scan_message(
        task_id,
        payload,
        port_count=parsed.port_count,
        host_count=parsed.hosts,
        limits=LimitPolicy.of(svc.settings),
    )
    try:
        await svc.publisher.publish(message)
    except PublishFailed as exc:
        log.warning("scan %s not queued: %s", scan_id, exc)
        # Not accepted: remove the row so nothing waits for it. A worker that still gets the
        # message finds no row and drops it.
        await _forget(request, owner, scan_id, task_id)
        raise ApiError(503, "broker unavailable", headers={"Retry-After": "5"}) from None
    return accepted_response(task_id, scan_id, scan.target, scan.priority, parsed.port_count)


async def _cached(request: Request, owner: UUID, cache_key: bytes) -> Response | None:
    svc = services(request)
    try:
        row = await svc.store.cached(owner, cache_key, svc.settings.result_cache_ttl)
    except DB_ERRORS:
        raise db_unavailable() from None
    if row is None or row.result is None or row.finished_at is None:
        return None
    body = ScanCached(
        task_id=row.task_id,
        scan_id=row.id,
        cached_at=row.finished_at,
        message=f"Same scan completed at {row.finished_at.isoformat()}; send force=true to "
        "scan again",
        result=row.result,
    )
    return ORJSONResponse(
        body.model_dump(mode="json"), headers={"Location": f"/api/scan/{row.task_id}"}
    )


async def _forget(request: Request, owner: UUID, scan_id: UUID, task_id: UUID) -> None:
    svc = services(request)
    await svc.limiter.release(owner, task_id)
    try:
        await svc.store.delete(scan_id)
    except DB_ERRORS as exc:
        log.error("scan %s: could not remove the unqueued row: %r", scan_id, exc)


async def scan_status(request: Request) -> Response:
    owner = await caller(request)
    status = await services(request).status.read(task_id_param(request), owner)
    return ORJSONResponse(status.model_dump(mode="json", exclude_none=True))


def _encode_cursor(row: ScanListing) -> str:
    raw = f"{row.created_at.isoformat()}|{row.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, ident = raw.partition("|")
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            raise ValueError("naive cursor time")
        # In UTC, as PostgreSQL compares it: a time near datetime's ends overflows here, not there.
        return when.astimezone(UTC), UUID(ident)
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise ApiError(422, "cursor is not one this API gave out", field="cursor") from None


async def list_scans(request: Request) -> Response:
    owner = await caller(request)
    query = request.query_params
    unknown = set(query) - {"limit", "cursor", "state", "target", "schedule_id"}
    if unknown:
        name = sorted(unknown)[0]
        raise ApiError(422, f"{name}: unknown query parameter", field=name)
    limit_text = query.get("limit", "50")
    digits = limit_text.isascii() and limit_text.isdigit() and len(limit_text) <= 10
    if not digits or not 1 <= int(limit_text) <= 200:
        raise ApiError(422, "limit must be an integer from 1 to 200", field="limit")
    state = query.get("state")
    if state is not None and state not in SCAN_STATES:
        raise ApiError(422, f"state must be one of {', '.join(SCAN_STATES)}", field="state")
    cursor = query.get("cursor")
    before = _decode_cursor(cursor) if cursor else None
    target = query.get("target")
    if target is not None:
        # Stored targets are canonical; so is the filter, and what is no target is a 422.
        try:
            target = parse_target(target, max_hosts=MAX_HOSTS_LIMIT).value
        except TargetError as exc:
            raise ApiError(422, f"target: {exc}", field="target") from None
    schedule_id = _schedule_filter(query.get("schedule_id"))
    limit = int(limit_text)
    try:
        rows = await services(request).store.list(
            owner,
            limit=limit + 1,
            before=before,
            state=state,  # type: ignore[arg-type]
            target=target,
            schedule_id=schedule_id,
        )
    except DB_ERRORS:
        raise db_unavailable() from None
    page = ScanPage(
        items=[summary(row) for row in rows[:limit]],
        next_cursor=_encode_cursor(rows[limit - 1]) if len(rows) > limit else None,
    )
    return ORJSONResponse(page.model_dump(mode="json"))


def _schedule_filter(text: str | None) -> UUID | None:
    if text is None:
        return None
    try:
        return UUID(text)
    except ValueError:
        raise ApiError(422, "schedule_id must be a schedule's id", field="schedule_id") from None


def summary(row: ScanListing) -> ScanSummary:
    return ScanSummary(
        task_id=row.task_id,
        scan_id=row.id,
        target=row.target,
        ports=row.ports,
        priority=row.priority,
        state=row.state,
        created_at=row.created_at,
        finished_at=row.finished_at,
        open_ports=row.open_port_count,
        error=row.error,
        schedule_id=row.schedule_id,
    )


async def cancel_scan(request: Request) -> Response:
    svc = services(request)
    owner = await caller(request)
    task_id = task_id_param(request)
    try:
        row = await svc.store.request_cancel(task_id, owner)
    except DB_ERRORS:
        raise db_unavailable() from None
    if row is None:
        raise ApiError(404, f"no scan with task id {task_id}")
    if row.state in ("completed", "failed"):
        raise ApiError(409, f"scan already {row.state}; nothing to cancel")
    if row.state == "revoked":
        await svc.limiter.release(owner, task_id)
        await svc.events.end(task_id, "REVOKED")
    status = await svc.status.for_row(row)
    if row.state == "running":
        status.status = "Cancelling"
    return ORJSONResponse(status.model_dump(mode="json", exclude_none=True), status_code=202)


async def scan_events(request: Request) -> Response:
    svc = services(request)
    owner = await caller(request)
    row = await svc.status.row(task_id_param(request), owner)
    last_id = request.headers.get("last-event-id", "0-0").strip() or "0-0"
    if not _valid_stream_id(last_id):
        raise ApiError(
            422, "Last-Event-ID is not an id this stream gave out", field="Last-Event-ID"
        )

    async def read_status() -> ScanStatus:
        return await svc.status.for_row(await svc.status.row(row.task_id, owner))

    stream = svc.streams.stream(
        owner,
        row.task_id,
        last_id,
        read_status,
        request.is_disconnected,
        prefix=svc.settings.redis_prefix,
        ended_already=row.state in ("completed", "failed", "revoked"),
    )
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def scan_resource(request: Request) -> Response:
    if request.method == "DELETE":
        return await cancel_scan(request)
    return await scan_status(request)


_STREAM_ID_PART_MAX = 2**64 - 1


def _valid_stream_id(text: str) -> bool:
    """``<ms>`` or ``<ms>-<seq>``, each an unsigned 64-bit number: what Redis accepts in XREAD."""
    parts = text.split("-")
    return len(parts) <= 2 and all(_stream_id_part(part) for part in parts)


def _stream_id_part(part: str) -> bool:
    digits = 0 < len(part) <= 20 and part.isascii() and part.isdigit()
    return digits and int(part) <= _STREAM_ID_PART_MAX


routes = [
    Route("/api/scan", submit_scan, methods=["POST"]),
    Route("/api/scans", list_scans, methods=["GET"]),
    # One route for both methods, so a 405 on this path lists them all in its Allow header.
    Route("/api/scan/{task_id}", scan_resource, methods=["GET", "DELETE"]),
    Route("/api/scan/{task_id}/events", scan_events, methods=["GET"]),
]
