"""The web dashboard under ``/ui``: server-rendered pages over the API's own handlers."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.staticfiles import StaticFiles

from api_service.errors import ApiError
from api_service.ui import scan_page, scans, schedules, signin, targets, webhooks
from api_service.ui.bounds import BoundedForms
from api_service.ui.headers import SecurityHeaders
from api_service.ui.render import HERE, page


async def home(_request: Request) -> Response:
    return RedirectResponse("/ui/", status_code=307)


async def no_such_page(request: Request) -> Response:
    error = ApiError(404, f"there is no page {request.url.path}")
    return page(request, "error.html", {"session": None, "error": error, "advice": ""}, 404)


def ui_routes() -> list[BaseRoute]:
    """``/`` redirects to the dashboard; everything under ``/ui`` carries the security headers."""
    pages = Router(
        routes=[
            *signin.routes,
            *scans.routes,
            *scan_page.routes,
            *targets.routes,
            *schedules.routes,
            *webhooks.routes,
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
            Route("/{path:path}", no_such_page, methods=["GET"]),
        ]
    )
    return [
        Route("/", home, methods=["GET"]),
        Mount("/ui", app=SecurityHeaders(BoundedForms(pages))),
    ]
