"""The scan pages: the key's list, submit, a scan's detail with live progress, cancel, exports."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any, get_args

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from api_service.errors import ApiError
from api_service.events import FINAL_STATES, sse
from api_service.routes import results as api_results
from api_service.routes import scans as api_scans
from api_service.routes.common import services, task_id_param
from api_service.ui.bridge import call, call_json
from api_service.ui.render import fragment, page, what_to_do
from api_service.ui.signin import SignedIn, redirect, signed_in
from shared.exports import EXPORT_FORMATS
from shared.schemas import Priority, ScanState, ScanStatus
from shared.store import ScanRow

PAGE_SIZE = 20
ACTIVE_STATES = ("queued", "running")
LIST_FILTERS = ("state", "target", "cursor")


async def list_context(request: Request, user: SignedIn) -> dict[str, Any]:
    """The list as ``GET /api/scans`` gives it, with live status for the active scans."""
    filters = {
        name: request.query_params[name] for name in LIST_FILTERS if request.query_params.get(name)
    }
    filter_error = None
    try:
        _, body = await call_json(
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
            _, live[item["task_id"]] = await call_json(
                request,
                user.key_id,
                api_scans.scan_status,
                path_params={"task_id": item["task_id"]},
            )
    return {
        "session": user.session,
        "items": body["items"],
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


def _number(text: str, kind: type[int] | type[float]) -> int | float | str:
    # Left as text when it is no number: the API's own validation then names the field.
    try:
        return kind(text)
    except ValueError:
        return text


def scan_request(form: dict[str, str]) -> dict[str, Any]:
    """The ``POST /api/scan`` body the submit form describes."""
    config: dict[str, Any] = {"service_detection": form.get("service_detection") == "on"}
    if form.get("timeout"):
        config["timeout"] = _number(form["timeout"], float)
    if form.get("max_concurrent"):
        config["max_concurrent"] = _number(form["max_concurrent"], int)
    return {
        "target": form.get("target", "").strip(),
        "ports": form.get("ports", "").strip() or "1-1000",
        "priority": form.get("priority") or "normal",
        "config": config,
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


def hosts(status: ScanStatus) -> dict[str, int]:
    result = status.result
    if result is None:
        return {"scanned": 0, "with_open": 0}
    with_open = {port.address for port in result.open_ports}
    return {"scanned": len(result.addresses) or len(with_open), "with_open": len(with_open)}


async def finished_context(
    request: Request, user: SignedIn, row: ScanRow, status: ScanStatus
) -> dict[str, Any]:
    diff = diff_error = None
    if status.result is not None:
        try:
            _, diff = await call_json(
                request,
                user.key_id,
                api_results.scan_diff,
                path_params={"task_id": str(row.task_id)},
                query={"against": "previous"},
            )
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise
            # 409: the result is in Redis but not yet in PostgreSQL, where diffs read it.
            diff_error = exc.message if exc.status == 404 else "Reload the page in a moment."
    return {
        "row": row,
        "status": status,
        "hosts": hosts(status),
        "diff": diff,
        "diff_error": diff_error,
        "formats": EXPORT_FORMATS,
        "session": user.session,
    }


async def _scan(request: Request, user: SignedIn) -> tuple[ScanRow, ScanStatus]:
    reader = services(request).status
    row = await reader.row(task_id_param(request), user.key_id)
    return row, await reader.for_row(row)


@signed_in
async def scan_detail(request: Request, user: SignedIn) -> Response:
    row, status = await _scan(request, user)
    context = await finished_context(request, user, row, status)
    context["active"] = row.state in ACTIVE_STATES and status.state not in FINAL_STATES
    context["progress"] = {
        "status": status.status,
        "progress": status.progress,
        "tier": status.tier,
        "ports_scanned": status.ports_scanned or 0,
        "total_ports": status.total_ports or 0,
        "open_ports": status.open_ports_found or [],
    }
    return page(request, "scan.html", context)


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


@signed_in
async def download(request: Request, user: SignedIn) -> Response:
    fmt = request.query_params.get("format", "json")
    response = await call(
        request,
        user.key_id,
        api_results.scan_result,
        path_params={"task_id": str(task_id_param(request))},
        query={"format": fmt},
    )
    disposition = response.headers["content-disposition"].replace("inline", "attachment", 1)
    response.headers["Content-Disposition"] = disposition
    return response


def _parse_sse(chunk: bytes) -> tuple[str | None, str | None, str]:
    event = event_id = None
    data: list[str] = []
    for line in chunk.decode().splitlines():
        name, _, value = line.partition(": ")
        if name == "event":
            event = value
        elif name == "id":
            event_id = value
        elif name == "data":
            data.append(value)
    return event, event_id, "\n".join(data)


async def _final_html(request: Request, user: SignedIn) -> str:
    try:
        row, status = await _scan(request, user)
        return fragment("_finished.html", await finished_context(request, user, row, status))
    except ApiError as exc:
        return fragment("_stream_error.html", {"error": exc, "advice": what_to_do(exc)})


@signed_in
async def events(request: Request, user: SignedIn) -> Response:
    """The API's event stream of the scan, each event turned into the HTML it updates."""
    task_id = str(task_id_param(request))
    upstream = await call(
        request,
        user.key_id,
        api_scans.scan_events,
        path_params={"task_id": task_id},
        headers={"Last-Event-ID": request.headers["last-event-id"]}
        if "last-event-id" in request.headers
        else None,
    )
    assert isinstance(upstream, StreamingResponse)

    async def html_events() -> AsyncIterator[bytes]:
        async for chunk in upstream.body_iterator:
            raw = chunk if isinstance(chunk, bytes) else str(chunk).encode()
            event, event_id, data = _parse_sse(raw)
            if event == "progress":
                html = fragment("_progress.html", {"progress": orjson.loads(data)})
            elif event == "port":
                html = fragment("_live_port.html", {"port": orjson.loads(data)})
            elif event == "end":
                html = await _final_html(request, user)
            else:
                yield raw  # keepalive comments
                continue
            yield sse(event, html, event_id)

    return StreamingResponse(
        html_events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


routes = [
    Route("/", scan_list, methods=["GET"]),
    Route("/scans/table", scan_table, methods=["GET"]),
    Route("/scans", submit, methods=["POST"]),
    Route("/scans/{task_id}", scan_detail, methods=["GET"]),
    Route("/scans/{task_id}/cancel", cancel, methods=["POST"]),
    Route("/scans/{task_id}/result", download, methods=["GET"]),
    Route("/scans/{task_id}/events", events, methods=["GET"]),
]
