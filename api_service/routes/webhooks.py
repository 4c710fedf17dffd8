"""/api/webhooks: endpoints of one key, their deliveries, and redelivery."""

from __future__ import annotations

from uuid import UUID

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api_service.errors import ApiError
from api_service.requests import read_json, validate_model
from api_service.responses import ORJSONResponse
from api_service.routes.common import caller, db_unavailable, services
from shared.retry import DATABASE_ERRORS as DB_ERRORS
from shared.schedule_store import ScheduleStore
from shared.webhook_store import WebhookStore
from shared.webhooks import (
    DeliveryList,
    Webhook,
    WebhookCreate,
    WebhookList,
    WebhookUrlError,
    allow_networks,
    parse_webhook_url,
    resolve_webhook_url,
)


def _store(request: Request) -> WebhookStore:
    return WebhookStore(services(request).store.pool)


def _webhook_id(request: Request) -> UUID:
    raw = request.path_params["webhook_id"]
    try:
        return UUID(raw)
    except ValueError:
        raise ApiError(404, f"no webhook with id {raw}") from None


async def _owned(request: Request) -> tuple[UUID, Webhook]:
    owner = await caller(request)
    webhook_id = _webhook_id(request)
    try:
        found = await _store(request).get(owner, webhook_id)
    except DB_ERRORS:
        raise db_unavailable() from None
    if found is None:
        raise ApiError(404, f"no webhook with id {webhook_id}")
    return owner, found


async def create_webhook(request: Request) -> Response:
    svc = services(request)
    owner = await caller(request)
    spec = validate_model(WebhookCreate, await read_json(request, svc.settings.max_request_bytes))
    try:
        await resolve_webhook_url(
            parse_webhook_url(spec.url),
            allow_networks(svc.settings.webhook_allow_networks),
            timeout=svc.settings.resolve_timeout,
        )
    except WebhookUrlError as exc:
        raise ApiError(422, str(exc), code="url_denied", field="url") from None
    try:
        schedules = ScheduleStore(svc.store.pool)
        if spec.schedule_id is not None and await schedules.get(owner, spec.schedule_id) is None:
            raise ApiError(422, "schedule_id: no such schedule", field="schedule_id")
        created = await _store(request).create(owner, spec, limit=svc.settings.max_webhooks_per_key)
    except DB_ERRORS:
        raise db_unavailable() from None
    if created is None:
        bound = svc.settings.max_webhooks_per_key
        raise ApiError(422, f"this key has {bound} webhooks; the bound is {bound}")
    return ORJSONResponse(
        created.model_dump(mode="json"),
        status_code=201,
        headers={"Location": f"/api/webhooks/{created.id}"},
    )


async def webhooks_collection(request: Request) -> Response:
    if request.method == "POST":
        return await create_webhook(request)
    owner = await caller(request)
    try:
        items = await _store(request).owned(owner)
    except DB_ERRORS:
        raise db_unavailable() from None
    return ORJSONResponse(WebhookList(items=items).model_dump(mode="json"))


async def webhook_resource(request: Request) -> Response:
    owner, found = await _owned(request)
    if request.method == "DELETE":
        try:
            await _store(request).delete(owner, found.id)
        except DB_ERRORS:
            raise db_unavailable() from None
        return Response(status_code=204)
    return ORJSONResponse(found.model_dump(mode="json"))


async def webhook_deliveries(request: Request) -> Response:
    _owner, found = await _owned(request)
    try:
        items = await _store(request).deliveries(found.id)
    except DB_ERRORS:
        raise db_unavailable() from None
    return ORJSONResponse(DeliveryList(items=items).model_dump(mode="json"))


async def redeliver(request: Request) -> Response:
    _owner, found = await _owned(request)
    message_id = request.path_params["message_id"]
    try:
        queued = await _store(request).redeliver(found.id, message_id)
    except DB_ERRORS:
        raise db_unavailable() from None
    if not queued:
        raise ApiError(404, f"no delivery {message_id} for this webhook")
    return ORJSONResponse({"id": message_id, "state": "pending"}, status_code=202)


routes = [
    Route("/api/webhooks", webhooks_collection, methods=["GET", "POST"]),
    Route("/api/webhooks/{webhook_id}", webhook_resource, methods=["GET", "DELETE"]),
    Route("/api/webhooks/{webhook_id}/deliveries", webhook_deliveries, methods=["GET"]),
    Route(
        "/api/webhooks/{webhook_id}/deliveries/{message_id}/redeliver",
        redeliver,
        methods=["POST"],
    ),
]
