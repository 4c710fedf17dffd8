"""/api/schedules: recurring scans of one key, and run-now."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api_service.dispatcher import TargetCheck
from api_service.errors import ApiError
from api_service.publisher import PublishFailed
from api_service.requests import ParsedScan, read_json, validate_model, validation_error
from api_service.responses import ORJSONResponse
from api_service.routes.common import caller, db_unavailable, services
from shared.protocol import TaskMessage
from shared.retry import DATABASE_ERRORS as DB_ERRORS
from shared.schedule_store import ScheduleStore
from shared.schedules import Schedule, ScheduleCreate, ScheduleList, ScheduleRun, ScheduleUpdate
from shared.schemas import ScanRequest
from shared.settings import Settings


def _store(request: Request) -> ScheduleStore:
    return ScheduleStore(services(request).store.pool)


def schedule_id_param(request: Request) -> UUID:
    raw = request.path_params["schedule_id"]
    try:
        return UUID(raw)
    except ValueError:
        raise ApiError(404, f"no schedule with id {raw}") from None


async def _check(schedule: ScheduleCreate, settings: Settings) -> None:
    """The gateway's per-scan bounds (ports, hosts, concurrency) and target policy (with the
    schedule's exclusions) apply to every run: checked now, and again when each run fires."""
    ParsedScan(
        ScanRequest(
            target=schedule.target,
            ports=schedule.ports,
            config=schedule.config,
            priority=schedule.priority,
        ),
        settings,
    )
    refused = await TargetCheck(settings)(schedule)
    if refused is not None:
        raise ApiError(403, refused, code="target_denied", field="target")


def _answer(schedule: Schedule, status_code: int = 200) -> Response:
    return ORJSONResponse(schedule.model_dump(mode="json"), status_code=status_code)


async def create_schedule(request: Request) -> Response:
    svc = services(request)
    owner = await caller(request)
    spec = validate_model(ScheduleCreate, await read_json(request, svc.settings.max_request_bytes))
    await _check(spec, svc.settings)
    try:
        schedule = await _store(request).create(
            owner, spec, datetime.now(UTC), limit=svc.settings.max_schedules_per_key
        )
    except DB_ERRORS:
        raise db_unavailable() from None
    if schedule is None:
        bound = svc.settings.max_schedules_per_key
        raise ApiError(422, f"this key has {bound} schedules; the bound is {bound}")
    return _answer(schedule, 201)


async def schedules_collection(request: Request) -> Response:
    if request.method == "POST":
        return await create_schedule(request)
    return await list_schedules(request)


async def list_schedules(request: Request) -> Response:
    owner = await caller(request)
    try:
        items = await _store(request).owned(owner)
    except DB_ERRORS:
        raise db_unavailable() from None
    return ORJSONResponse(ScheduleList(items=items).model_dump(mode="json"))


async def schedule_resource(request: Request) -> Response:
    svc = services(request)
    owner = await caller(request)
    schedule_id = schedule_id_param(request)
    store = _store(request)
    try:
        if request.method == "GET":
            found = await store.get(owner, schedule_id)
        elif request.method == "DELETE":
            if not await store.delete(owner, schedule_id):
                raise ApiError(404, f"no schedule with id {schedule_id}")
            return Response(status_code=204)
        else:
            change = validate_model(
                ScheduleUpdate, await read_json(request, svc.settings.max_request_bytes)
            )
            try:
                found = await store.update(
                    owner,
                    schedule_id,
                    change,
                    datetime.now(UTC),
                    check=lambda merged: _check(merged, svc.settings),
                )
            except ValidationError as exc:
                raise validation_error(exc) from None
    except DB_ERRORS:
        raise db_unavailable() from None
    if found is None:
        raise ApiError(404, f"no schedule with id {schedule_id}")
    return _answer(found)


async def run_schedule_now(request: Request) -> Response:
    """One run now, outside the timing: recorded, then published like any scheduled run."""
    svc = services(request)
    owner = await caller(request)
    schedule_id = schedule_id_param(request)
    store = _store(request)

    async def publish(message: TaskMessage) -> bool:
        try:
            await svc.publisher.publish(message)
        except PublishFailed:
            return False  # left in the outbox: a dispatcher publishes it
        return True

    try:
        run = await store.run_now(owner, schedule_id, datetime.now(UTC), TargetCheck(svc.settings))
        if run is None:
            raise ApiError(404, f"no schedule with id {schedule_id}")
        if run.error is not None:
            raise ApiError(403, run.error, code="target_denied", field="target")
        await store.publish_pending(
            publish, max_seconds=svc.settings.max_scan_seconds, only=[run.scan_id]
        )
    except DB_ERRORS:
        raise db_unavailable() from None
    body = ScheduleRun(
        schedule_id=schedule_id,
        task_id=run.task_id,
        scan_id=run.scan_id,
        scheduled_for=run.scheduled_for,
    )
    return ORJSONResponse(
        body.model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/api/scan/{run.task_id}"},
    )


routes = [
    # One route per path, so a 405 lists every method in its Allow header.
    Route("/api/schedules", schedules_collection, methods=["GET", "POST"]),
    Route("/api/schedules/{schedule_id}", schedule_resource, methods=["GET", "PATCH", "DELETE"]),
    Route("/api/schedules/{schedule_id}/run", run_schedule_now, methods=["POST"]),
]
