"""The key's schedules: the list with each one's next run, creating one, pause and resume,
run now, delete. Every action is the API's own ``/api/schedules`` handler, called as the key."""

from __future__ import annotations

from typing import Any, get_args
from zoneinfo import available_timezones

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api_service.errors import ApiError
from api_service.routes import schedules as api_schedules
from api_service.routes.schedules import schedule_id_param
from api_service.ui.bridge import call, call_json
from api_service.ui.render import page, what_to_do
from api_service.ui.scans import number, scan_config
from api_service.ui.signin import SignedIn, redirect, signed_in
from shared.schedules import MisfirePolicy
from shared.schemas import Priority

TIMEZONES = sorted(available_timezones())


async def owned(request: Request, user: SignedIn) -> list[dict[str, Any]]:
    """The key's schedules as ``GET /api/schedules`` answers them."""
    body = await call_json(request, user.key_id, api_schedules.list_schedules)
    items: list[dict[str, Any]] = body["items"]
    return items


def schedule_request(form: dict[str, str]) -> dict[str, Any]:
    """The ``POST /api/schedules`` body the form describes: a cron expression with its time
    zone, or an interval, whichever the form's ``timing`` picks."""
    body: dict[str, Any] = {
        "target": form.get("target", "").strip(),
        "ports": form.get("ports", "").strip() or "1-1000",
        "priority": form.get("priority") or "normal",
        "config": scan_config(form),
        "misfire_policy": form.get("misfire_policy") or "skip",
    }
    if form.get("name", "").strip():
        body["name"] = form["name"].strip()
    exclude = [entry.strip() for entry in form.get("exclude", "").split(",") if entry.strip()]
    if exclude:
        body["exclude"] = exclude
    if form.get("misfire_grace_seconds"):
        body["misfire_grace_seconds"] = number(form["misfire_grace_seconds"], int)
    if form.get("timing") == "interval":
        body["interval_seconds"] = number(form.get("interval_seconds", ""), int)
    else:
        body["cron"] = form.get("cron", "").strip()
        body["timezone"] = form.get("timezone", "").strip() or "UTC"
    return body


async def _render(
    request: Request, user: SignedIn, extra: dict[str, Any] | None = None, status_code: int = 200
) -> Response:
    context = {
        "session": user.session,
        "items": await owned(request, user),
        "priorities": get_args(Priority),
        "policies": get_args(MisfirePolicy),
        "timezones": TIMEZONES,
        **(extra or {}),
    }
    return page(request, "schedules.html", context, status_code=status_code)


@signed_in
async def schedule_list(request: Request, user: SignedIn) -> Response:
    return await _render(request, user)


@signed_in
async def create(request: Request, user: SignedIn) -> Response:
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    try:
        await call(
            request,
            user.key_id,
            api_schedules.schedules_collection,
            method="POST",
            json_body=schedule_request(form),
        )
    except ApiError as exc:
        extra = {"form_error": exc, "form_advice": what_to_do(exc), "form": form}
        return await _render(request, user, extra, status_code=exc.status)
    return redirect(request, "/ui/schedules")


async def _change(request: Request, user: SignedIn, enabled: bool) -> Response:
    await call(
        request,
        user.key_id,
        api_schedules.schedule_resource,
        method="PATCH",
        path_params={"schedule_id": str(schedule_id_param(request))},
        json_body={"enabled": enabled},
    )
    return redirect(request, "/ui/schedules")


@signed_in
async def pause(request: Request, user: SignedIn) -> Response:
    return await _change(request, user, enabled=False)


@signed_in
async def resume(request: Request, user: SignedIn) -> Response:
    return await _change(request, user, enabled=True)


@signed_in
async def run_now(request: Request, user: SignedIn) -> Response:
    schedule_id = str(schedule_id_param(request))
    await call(
        request,
        user.key_id,
        api_schedules.run_schedule_now,
        method="POST",
        path_params={"schedule_id": schedule_id},
    )
    return redirect(request, f"/ui/?schedule_id={schedule_id}")


@signed_in
async def delete(request: Request, user: SignedIn) -> Response:
    await call(
        request,
        user.key_id,
        api_schedules.schedule_resource,
        method="DELETE",
        path_params={"schedule_id": str(schedule_id_param(request))},
    )
    return redirect(request, "/ui/schedules")


routes = [
    Route("/schedules", schedule_list, methods=["GET"]),
    Route("/schedules", create, methods=["POST"]),
    Route("/schedules/{schedule_id}/pause", pause, methods=["POST"]),
    Route("/schedules/{schedule_id}/resume", resume, methods=["POST"]),
    Route("/schedules/{schedule_id}/run", run_now, methods=["POST"]),
    Route("/schedules/{schedule_id}/delete", delete, methods=["POST"]),
]
