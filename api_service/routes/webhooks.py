"""/api/webhooks: endpoints of one key, their deliveries, redelivery, and re-enabling."""

from __future__ import annotations

from uuid import UUID

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api_service.errors import ApiError
from api_service.requests import read_json, validate_model
from api_service.responses import ORJSONResponse
from api_service.routes.common import caller, db_unavailable, services, uuid_param
from shared.retry import DATABASE_ERRORS as DB_ERRORS
from shared.webhooks import (
    DeliveryList,
    Webhook,
    WebhookCreate,
    WebhookList,
    WebhookUpdate,
    WebhookUrlError,
    parse_webhook_url,
    resolve_webhook_url,
)


async def _owned(request: Request) -> tuple[UUID, Webhook]:
    owner = await caller(request)
    webhook_id = uuid_param(request, "webhook_id", "webhook with id")
    try:
        found = await services(request).webhooks.get(owner, webhook_id)
    except DB_ERRORS:
        raise db_unavailable() from None
    if found is None:
        raise ApiError(404, f"no webhook with id {webhook_id}")
    return owner, found


async def create_webhook(request: Request) -> Response:
    svc = services(request)
    owner = await caller(request)
    try:
        data = await read_json(request, svc.settings.max_request_bytes)
        spec = validate_model(WebhookCreate, data)
        await resolve_webhook_url(
            parse_webhook_url(spec.url),
            svc.webhook_addresses,
            timeout=svc.settings.resolve_timeout,
            lookups=svc.lookups,
        )
    except WebhookUrlError as exc:
        await svc.limiter.charge(owner)  # a lookup costs the key, like a refused scan
        raise ApiError(422, str(exc), code="url_denied", field="url") from None
    except ApiError:
        await svc.limiter.charge(owner)
        raise
    try:
        if (
            spec.schedule_id is not None
            and await svc.schedules.get(owner, spec.schedule_id) is None
        ):
            raise ApiError(422, "schedule_id: no such schedule", field="schedule_id")
        created = await svc.webhooks.create(owner, spec, limit=svc.settings.max_webhooks_per_key)
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
        items = await services(request).webhooks.owned(owner)
    except DB_ERRORS:
        raise db_unavailable() from None
    return ORJSONResponse(WebhookList(items=items).model_dump(mode="json"))


async def webhook_resource(request: Request) -> Response:
    svc = services(request)
    owner, found = await _owned(request)
    try:
        if request.method == "DELETE":
            await svc.webhooks.delete(owner, found.id)
            return Response(status_code=204)
        if request.method == "PATCH":
            change = validate_model(
                WebhookUpdate, await read_json(request, svc.settings.max_request_bytes)
            )
            updated = await svc.webhooks.set_enabled(owner, found.id, change.enabled)
            if updated is None:
                raise ApiError(404, f"no webhook with id {found.id}")
            found = updated
    except DB_ERRORS:
        raise db_unavailable() from None
    return ORJSONResponse(found.model_dump(mode="json"))


async def webhook_deliveries(request: Request) -> Response:
    _owner, found = await _owned(request)
    try:
        items = await services(request).webhooks.deliveries(found.id)
    except DB_ERRORS:
        raise db_unavailable() from None
    return ORJSONResponse(DeliveryList(items=items).model_dump(mode="json"))


async def redeliver(request: Request) -> Response:
    _owner, found = await _owned(request)
    message_id = request.path_params["message_id"]
    try:
        outcome = await services(request).webhooks.redeliver(found.id, message_id)
    except DB_ERRORS:
        raise db_unavailable() from None
    if outcome == "disabled":
        raise ApiError(
            409,
            'this webhook is disabled; re-enable it (PATCH {"enabled": true}) first',
            code="webhook_disabled",
        )
    if outcome == "missing":
        raise ApiError(404, f"no delivery {message_id} for this webhook")
    return ORJSONResponse({"id": message_id, "state": "pending"}, status_code=202)


routes = [
    Route("/api/webhooks", webhooks_collection, methods=["GET", "POST"]),
    Route("/api/webhooks/{webhook_id}", webhook_resource, methods=["GET", "PATCH", "DELETE"]),
    Route("/api/webhooks/{webhook_id}/deliveries", webhook_deliveries, methods=["GET"]),
    Route(
        "/api/webhooks/{webhook_id}/deliveries/{message_id}/redeliver",
        redeliver,
        methods=["POST"],
    ),
]
