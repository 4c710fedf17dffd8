"""/api/schedules: recurring scans of one key, and run-now."""

from __future__ import annotations

import contextlib
import functools
from datetime import UTC, datetime
from typing import TypeVar
from uuid import UUID, uuid4

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api_service.dispatcher import publish_or_leave
from api_service.errors import ApiError
from api_service.requests import read_json, validate_model, validation_error
from api_service.responses import ORJSONResponse
from api_service.routes.common import caller, db_unavailable, services, uuid_param
from shared.protocol import LimitPolicy
from shared.retry import DATABASE_ERRORS as DB_ERRORS
from shared.schedule_store import ScheduleBusy
from shared.schedules import (
    Refusal,
    Schedule,
    ScheduleCreate,
    ScheduleList,
    ScheduleRun,
    ScheduleUpdate,
)

M = TypeVar("M", bound=BaseModel)


def schedule_id_param(request: Request) -> UUID:
    return uuid_param(request, "schedule_id", "schedule with id")


def refusal_error(refused: Refusal) -> ApiError:
    if refused.code == "target_denied":
        return ApiError(403, refused.reason, code="target_denied", field=refused.field or "target")
    if refused.code == "unresolvable_target":
        return ApiError(422, refused.reason, code="unresolvable_target", field="target")
    return ApiError(422, refused.reason, field=refused.field)


async def _check(request: Request, owner: UUID, schedule: ScheduleCreate | Schedule) -> None:
    """The per-scan bounds, target policy and exclusions (``check_schedule``): checked when a
    schedule is written, again when each run fires. A refusal costs the key a submission."""
    svc = services(request)
    refused = await svc.schedule_check(schedule)
    if refused is not None:
        await svc.limiter.charge(owner)
        raise refusal_error(refused)


async def _read(request: Request, owner: UUID, model: type[M]) -> M:
    svc = services(request)
    try:
        return validate_model(model, await read_json(request, svc.settings.max_request_bytes))
    except ApiError:
        await svc.limiter.charge(owner)
        raise


def _answer(schedule: Schedule, status_code: int = 200) -> Response:
    return ORJSONResponse(schedule.model_dump(mode="json"), status_code=status_code)


async def create_schedule(request: Request) -> Response:
    svc = services(request)
    owner = await caller(request)
    spec = await _read(request, owner, ScheduleCreate)
    await _check(request, owner, spec)
    try:
        schedule = await svc.schedules.create(
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
        items = await services(request).schedules.owned(owner)
    except DB_ERRORS:
        raise db_unavailable() from None
    return ORJSONResponse(ScheduleList(items=items).model_dump(mode="json"))


async def schedule_resource(request: Request) -> Response:
    svc = services(request)
    owner = await caller(request)
    schedule_id = schedule_id_param(request)
    store = svc.schedules
    try:
        if request.method == "GET":
            found = await store.get(owner, schedule_id)
        elif request.method == "DELETE":
            if not await store.delete(owner, schedule_id):
                raise ApiError(404, f"no schedule with id {schedule_id}")
            return Response(status_code=204)
        else:
            change = await _read(request, owner, ScheduleUpdate)
            try:
                found = await store.update(
                    owner,
                    schedule_id,
                    change,
                    datetime.now(UTC),
                    check=lambda merged: _check(request, owner, merged),
                )
            except ValidationError as exc:
                await svc.limiter.charge(owner)
                raise validation_error(exc) from None
            except ScheduleBusy as exc:
                raise ApiError(409, str(exc), headers={"Retry-After": "1"}) from None
    except DB_ERRORS:
        raise db_unavailable() from None
    if found is None:
        raise ApiError(404, f"no schedule with id {schedule_id}")
    return _answer(found)


async def run_schedule_now(request: Request) -> Response:
    """One run now, outside the timing, under the same per-key limits as ``POST /api/scan``:
    checked before anything is recorded, then recorded and published like a timed run."""
    svc = services(request)
    owner = await caller(request)
    schedule_id = schedule_id_param(request)
    try:
        schedule = await svc.schedules.get(owner, schedule_id)
    except DB_ERRORS:
        raise db_unavailable() from None
    if schedule is None:
        raise ApiError(404, f"no schedule with id {schedule_id}")
    scan_id, task_id = uuid4(), uuid4()
    if schedule.priority == "critical":  # written before schedules refused it
        await svc.limiter.admit_critical(owner)
    # Admitted (and counted) before the check, as a submission is: a refusal costs the key a
    # submission. The slot is held like a queued scan's (the worker re-scores it at its start).
    await svc.limiter.admit(owner, task_id, scan_id, svc.settings.result_ttl)
    refused = await svc.schedule_check(schedule)
    if refused is not None:
        await svc.limiter.release(owner, task_id)
        raise refusal_error(refused)
    try:
        run = await svc.schedules.run_now(owner, schedule_id, datetime.now(UTC), (scan_id, task_id))
    except DB_ERRORS:
        await svc.limiter.release(owner, task_id)
        raise db_unavailable() from None
    if run == "missing" or run == "exists":
        await svc.limiter.release(owner, task_id)
        if run == "missing":
            raise ApiError(404, f"no schedule with id {schedule_id}")
        raise ApiError(409, "a run of this schedule at this instant exists already")
    # Recorded, so in the outbox: if the database went away just now, a dispatcher publishes it.
    with contextlib.suppress(*DB_ERRORS):
        await svc.schedules.publish_pending(
            functools.partial(publish_or_leave, svc.publisher),
            limits=LimitPolicy.of(svc.settings),
            only=[run.scan_id],
        )
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
