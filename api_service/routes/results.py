"""A finished scan's result in other formats, and what changed against another scan."""

from __future__ import annotations

from uuid import UUID

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api_service.errors import ApiError
from api_service.routes.common import caller, db_unavailable, services, task_id_param
from shared.diff import diff_results
from shared.exports import EXPORT_FORMATS, FILE_EXTENSIONS, MEDIA_TYPES, render
from shared.retry import DATABASE_ERRORS as DB_ERRORS
from shared.store import ScanRow


def _check_query(request: Request, allowed: set[str]) -> None:
    unknown = set(request.query_params) - allowed
    if unknown:
        name = sorted(unknown)[0]
        raise ApiError(422, f"{name}: unknown query parameter", field=name)


def _finished(row: ScanRow) -> ScanRow:
    if row.result is None:
        raise ApiError(409, f"scan is {row.state}; it has no result yet", code="not_finished")
    return row


async def scan_result(request: Request) -> Response:
    owner = await caller(request)
    _check_query(request, {"format"})
    fmt = request.query_params.get("format", "json")
    if fmt not in EXPORT_FORMATS:
        raise ApiError(422, f"format must be one of {', '.join(EXPORT_FORMATS)}", field="format")
    row = _finished(await services(request).status.row(task_id_param(request), owner))
    assert row.result is not None
    filename = f"scan-{row.task_id}.{FILE_EXTENSIONS[fmt]}"
    return Response(
        render(row.result, fmt),
        media_type=MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'inline; filename="{filename}"'},
    )


async def scan_diff(request: Request) -> Response:
    svc = services(request)
    owner = await caller(request)
    _check_query(request, {"against"})
    row = _finished(await svc.status.row(task_id_param(request), owner))
    against = request.query_params.get("against", "previous")
    if against == "previous":
        try:
            other = await svc.store.latest_completed(owner, row.target, row.created_at, row.id)
        except DB_ERRORS:
            raise db_unavailable() from None
        if other is None:
            raise ApiError(404, f"no earlier completed scan of {row.target} to compare with")
    else:
        try:
            other_id = UUID(against)
        except ValueError:
            raise ApiError(
                422, "against must be 'previous' or a task id", field="against"
            ) from None
        other = _finished(await svc.status.row(other_id, owner))
    assert row.result is not None
    assert other.result is not None
    diff = diff_results(
        other.result, row.result, old_task_id=other.task_id, new_task_id=row.task_id
    )
    return Response(diff.model_dump_json(), media_type="application/json")


routes = [
    Route("/api/scan/{task_id}/result", scan_result, methods=["GET"]),
    Route("/api/scan/{task_id}/diff", scan_diff, methods=["GET"]),
]
