"""The OpenAPI document and a page that renders it."""

from __future__ import annotations

from functools import cache

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from api_service.openapi import build_openapi
from api_service.responses import ORJSONResponse

# Swagger UI from a CDN, pinned to one release and checked by the browser against these digests
# (Subresource Integrity): a changed or compromised file is refused, never run. The digests are
# those of the files in the npm package swagger-ui-dist of that version, which the CDN serves.
SWAGGER_UI = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0"
_BUNDLE_SRI = "sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9"
_CSS_SRI = "sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I"

_PAGE = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>cybersec-scan API</title>
<link rel="stylesheet" href="{SWAGGER_UI}/swagger-ui.css"
 integrity="{_CSS_SRI}" crossorigin="anonymous" referrerpolicy="no-referrer">
</head><body><div id="ui"></div>
<script src="{SWAGGER_UI}/swagger-ui-bundle.js"
 integrity="{_BUNDLE_SRI}" crossorigin="anonymous" referrerpolicy="no-referrer"></script>
<script src="/docs/init.js"></script>
<noscript>The API is described by <a href="/openapi.json">/openapi.json</a>.</noscript>
</body></html>"""

# No inline script at all: the page's own code is /docs/init.js, so script-src needs no
# 'unsafe-inline'. Swagger UI sets style attributes, hence 'unsafe-inline' for styles only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self' https://cdn.jsdelivr.net; "
    "style-src https://cdn.jsdelivr.net 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_INIT = b'SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});\n'


@cache
def _document() -> bytes:
    return bytes(ORJSONResponse(build_openapi()).body)


async def openapi(_request: Request) -> Response:
    return Response(_document(), media_type="application/json")


async def docs(_request: Request) -> Response:
    return HTMLResponse(_PAGE, headers=_HEADERS)


async def docs_init(_request: Request) -> Response:
    return Response(_INIT, media_type="text/javascript", headers=_HEADERS)


routes = [
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
    Route("/docs/init.js", docs_init, methods=["GET"]),
]
