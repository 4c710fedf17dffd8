"""One scan's page: live progress and open ports over SSE while it runs, then its result,
downloads and the diff against the previous scan of its target."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

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
from api_service.ui.scans import ACTIVE_STATES
from api_service.ui.signin import SignedIn, signed_in
from shared.exports import EXPORT_FORMATS
from shared.schemas import ScanStatus
from shared.store import ScanRow


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
            diff = await call_json(
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
    Route("/scans/{task_id}", scan_detail, methods=["GET"]),
    Route("/scans/{task_id}/result", download, methods=["GET"]),
    Route("/scans/{task_id}/events", events, methods=["GET"]),
]
