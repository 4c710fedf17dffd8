"""Jinja2 templates of the dashboard (autoescaped: scanned text is untrusted) and error pages."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.templating import Jinja2Templates

from api_service.errors import ApiError

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")


def _when(value: str | datetime | None) -> str:
    if value is None:
        return "—"
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


templates.env.filters["when"] = _when


def page(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200
) -> HTMLResponse:
    response: HTMLResponse = templates.TemplateResponse(
        request, name, context, status_code=status_code
    )
    return response


def fragment(name: str, context: dict[str, Any]) -> str:
    """A template rendered on its own, for an SSE event."""
    return templates.env.get_template(name).render(context)


def what_to_do(error: ApiError) -> str:
    """The sentence under an error that tells the user what to do about it."""
    retry = (error.headers or {}).get("Retry-After")
    if error.status == 429:
        return f"Too many scans for this key right now: try again in {retry or 'a few'} seconds."
    if error.status == 503:
        return (
            "The service cannot reach its database or broker at the moment; "
            f"try again in {retry or 'a few'} seconds."
        )
    if error.status == 404:
        return "There is no such scan, schedule or webhook for the key you signed in with."
    if error.status == 409:
        return "Reload the page to see the scan's current state."
    return "Check the form and submit it again."


def error_page(request: Request, error: ApiError, session: Any = None) -> HTMLResponse:
    retry = (error.headers or {}).get("Retry-After")
    response = page(
        request,
        "error.html",
        {"session": session, "error": error, "advice": what_to_do(error)},
        status_code=error.status,
    )
    if retry is not None:
        response.headers["Retry-After"] = retry
    return response
