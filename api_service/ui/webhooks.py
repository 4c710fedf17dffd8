"""The key's webhooks: the list, creating one (its secret shown once), deleting one, and each
one's delivery log with a redeliver button. Every action is the API's own handler."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api_service.errors import ApiError
from api_service.routes import webhooks as api_webhooks
from api_service.ui.bridge import call, call_json
from api_service.ui.render import page, what_to_do
from api_service.ui.schedules import owned as owned_schedules
from api_service.ui.signin import SignedIn, redirect, signed_in
from shared.webhooks import EVENT_TYPES


def webhook_request(form: list[tuple[str, str]]) -> dict[str, Any]:
    """The ``POST /api/webhooks`` body the form describes (``events`` is a repeated field)."""
    fields = dict(form)
    body: dict[str, Any] = {
        "url": fields.get("url", "").strip(),
        "events": [value for name, value in form if name == "events"],
    }
    if fields.get("schedule_id"):
        body["schedule_id"] = fields["schedule_id"]
    if fields.get("target", "").strip():
        body["target"] = fields["target"].strip()
    return body


def _path(request: Request) -> dict[str, str]:
    return {"webhook_id": request.path_params["webhook_id"]}


async def _render(
    request: Request, user: SignedIn, extra: dict[str, Any] | None = None, status_code: int = 200
) -> Response:
    body = await call_json(request, user.key_id, api_webhooks.webhooks_collection)
    context = {
        "session": user.session,
        "items": body["items"],
        "schedules": {s["id"]: s for s in await owned_schedules(request, user)},
        "event_types": EVENT_TYPES,
        **(extra or {}),
    }
    return page(request, "webhooks.html", context, status_code=status_code)


@signed_in
async def webhook_list(request: Request, user: SignedIn) -> Response:
    return await _render(request, user)


@signed_in
async def create(request: Request, user: SignedIn) -> Response:
    form = [(k, v) for k, v in (await request.form()).multi_items() if isinstance(v, str)]
    try:
        response = await call(
            request,
            user.key_id,
            api_webhooks.webhooks_collection,
            method="POST",
            json_body=webhook_request(form),
        )
    except ApiError as exc:
        extra = {
            "form_error": exc,
            "form_advice": what_to_do(exc),
            "form": dict(form),
            "chosen": [v for k, v in form if k == "events"],
        }
        return await _render(request, user, extra, status_code=exc.status)
    # Rendered, not redirected: the secret is in this answer only and never shown again.
    created = orjson.loads(response.body)
    return await _render(request, user, {"created": created}, status_code=201)


@signed_in
async def webhook_page(request: Request, user: SignedIn) -> Response:
    hook = await call_json(
        request, user.key_id, api_webhooks.webhook_resource, path_params=_path(request)
    )
    log = await call_json(
        request, user.key_id, api_webhooks.webhook_deliveries, path_params=_path(request)
    )
    schedules = {s["id"]: s for s in await owned_schedules(request, user)}
    context = {
        "session": user.session,
        "hook": hook,
        "deliveries": log["items"],
        "schedules": schedules,
    }
    return page(request, "webhook.html", context)


@signed_in
async def delete(request: Request, user: SignedIn) -> Response:
    await call(
        request,
        user.key_id,
        api_webhooks.webhook_resource,
        method="DELETE",
        path_params=_path(request),
    )
    return redirect(request, "/ui/webhooks")


@signed_in
async def redeliver(request: Request, user: SignedIn) -> Response:
    params = {**_path(request), "message_id": request.path_params["message_id"]}
    await call(request, user.key_id, api_webhooks.redeliver, method="POST", path_params=params)
    return redirect(request, f"/ui/webhooks/{params['webhook_id']}")


routes = [
    Route("/webhooks", webhook_list, methods=["GET"]),
    Route("/webhooks", create, methods=["POST"]),
    Route("/webhooks/{webhook_id}", webhook_page, methods=["GET"]),
    Route("/webhooks/{webhook_id}/delete", delete, methods=["POST"]),
    Route("/webhooks/{webhook_id}/deliveries/{message_id}/redeliver", redeliver, methods=["POST"]),
]
