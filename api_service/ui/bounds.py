"""Form posts to the dashboard are bounded like the API's bodies, before anything reads them."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api_service.errors import ApiError
from api_service.routes.common import services
from api_service.ui.render import error_page


class BoundedForms:
    """A POST must say its size (``Content-Length``, as browsers do for forms) and keep within
    ``max_request_bytes``; otherwise it is answered 411 or 413 with its body unread."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        limit = services(request).settings.max_request_bytes
        declared = Headers(scope=scope).get("content-length", "")
        if not (declared.isascii() and declared.isdigit()):
            error = ApiError(411, "a form must say its length (Content-Length)")
        elif int(declared) > limit:
            error = ApiError(413, f"the form is larger than {limit} bytes")
        else:
            await self.app(scope, receive, send)
            return
        await error_page(request, error)(scope, receive, send)
