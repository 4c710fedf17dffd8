"""The key's scans: the list (refreshed while any is active), submitting one, cancelling one."""

from __future__ import annotations

import secrets
from typing import Any, get_args

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api_service.errors import ApiError
from api_service.routes import scans as api_scans
from api_service.routes import schedules as api_schedules
from api_service.routes.common import task_id_param
from api_service.ui.bridge import call, call_json
from api_service.ui.render import page, what_to_do
from api_service.ui.signin import SignedIn, redirect, signed_in
from shared.schemas import Priority, ScanState

PAGE_SIZE = 20
ACTIVE_STATES = ("queued", "running")
LIST_FILTERS = ("state", "target", "schedule_id", "cursor")


async def list_context(request: Request, user: SignedIn) -> dict[str, Any]:
    """The list as ``GET /api/scans`` gives it, with live status for the active scans."""
    filters = {
        name: request.query_params[name] for name in LIST_FILTERS if request.query_params.get(name)
    }
    filter_error = None
    try:
        body = await call_json(
            request,
            user.key_id,
            api_scans.list_scans,
            query={**filters, "limit": str(PAGE_SIZE)},
        )
    except ApiError as exc:
        if exc.status != 422:
            raise
        filter_error = exc.message
        body = {"items": [], "next_cursor": None}
    live: dict[str, Any] = {}
    for item in body["items"]:
        if item["state"] in ACTIVE_STATES:
            live[item["task_id"]] = await call_json(
                request,
                user.key_id,
                api_scans.scan_status,
                path_params={"task_id": item["task_id"]},
            )
    schedules = await call_json(request, user.key_id, api_schedules.list_schedules)
    return {
        "session": user.session,
        "items": body["items"],
        "schedules": {s["id"]: s for s in schedules["items"]},
        "next_cursor": body["next_cursor"],
        "live": live,
        "filters": filters,
        "filter_error": filter_error,
        "states": get_args(ScanState),
        "priorities": get_args(Priority),
        "table_query": {k: v for k, v in filters.items() if k != "cursor"},
        "submission": secrets.token_urlsafe(16),
    }


@signed_in
async def scan_list(request: Request, user: SignedIn) -> Response:
    return page(request, "scans.html", await list_context(request, user))


@signed_in
async def scan_table(request: Request, user: SignedIn) -> Response:
    return page(request, "_scan_table.html", await list_context(request, user))


def number(text: str, kind: type[int] | type[float]) -> int | float | str:
    """``text`` as a number, or left as text: the API's own validation then names the field."""
    try:
        return kind(text)
    except ValueError:
        return text


def scan_config(form: dict[str, str]) -> dict[str, Any]:
    """The scan ``config`` a form's connect fields describe (scans and schedules share them)."""
    config: dict[str, Any] = {"service_detection": form.get("service_detection") == "on"}
    if form.get("timeout"):
        config["timeout"] = number(form["timeout"], float)
    if form.get("max_concurrent"):
        config["max_concurrent"] = number(form["max_concurrent"], int)
    return config


def scan_request(form: dict[str, str]) -> dict[str, Any]:
    """The ``POST /api/scan`` body the submit form describes."""
    return {
        "target": form.get("target", "").strip(),
        "ports": form.get("ports", "").strip() or "1-1000",
        "priority": form.get("priority") or "normal",
        "config": scan_config(form),
    }


@signed_in
async def submit(request: Request, user: SignedIn) -> Response:
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    # Each rendering of the form has its own token, sent as the Idempotency-Key: a double click
    # or a resent form gives back the same scan instead of a second one.
    token = form.get("submission", "")
    headers = {"Idempotency-Key": token} if 0 < len(token) <= 64 else None
    try:
        response = await call(
            request,
            user.key_id,
            api_scans.submit_scan,
            method="POST",
            json_body=scan_request(form),
            headers=headers,
        )
    except ApiError as exc:
        context = await list_context(request, user)
        context.update(form_error=exc, form_advice=what_to_do(exc), form=form)
        failed = page(request, "scans.html", context, status_code=exc.status)
        if exc.headers and "Retry-After" in exc.headers:
            failed.headers["Retry-After"] = exc.headers["Retry-After"]
        return failed
    accepted = orjson.loads(response.body)
    return redirect(request, f"/ui/scans/{accepted['task_id']}")


@signed_in
async def cancel(request: Request, user: SignedIn) -> Response:
    task_id = str(task_id_param(request))
    await call(
        request,
        user.key_id,
        api_scans.cancel_scan,
        method="DELETE",
        path_params={"task_id": task_id},
    )
    return redirect(request, f"/ui/scans/{task_id}")


routes = [
    Route("/", scan_list, methods=["GET"]),
    Route("/scans/table", scan_table, methods=["GET"]),
    Route("/scans", submit, methods=["POST"]),
    Route("/scans/{task_id}/cancel", cancel, methods=["POST"]),
]
