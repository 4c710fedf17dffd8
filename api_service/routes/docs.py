"""The OpenAPI document and a page that renders it."""

from __future__ import annotations

from functools import cache

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from api_service.openapi import build_openapi
from api_service.responses import ORJSONResponse

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>cybersec-scan API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
<noscript>The API is described by <a href="/openapi.json">/openapi.json</a>.</noscript>
</body></html>"""


@cache
def _document() -> bytes:
    return bytes(ORJSONResponse(build_openapi()).body)


async def openapi(_request: Request) -> Response:
    return Response(_document(), media_type="application/json")


async def docs(_request: Request) -> Response:
    return HTMLResponse(_PAGE)


routes = [
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
]
