"""The dashboard calls the API's own route handlers, as the signed-in key, never a copy of them.

A handler gets a request built from the page's own (same app, same services) with its method,
path parameters, query and body replaced, and the key id in the scope, where ``caller()``
finds it. An :class:`~api_service.errors.ApiError` the handler raises reaches the page as is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from api_service.routes.common import SIGNED_IN_KEY

Handler = Callable[[Request], Awaitable[Response]]


async def call(
    request: Request,
    key_id: UUID,
    handler: Handler,
    *,
    method: str = "GET",
    path_params: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
    json_body: Any = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """Run an API route handler for the signed-in key and return its response."""
    raw_headers = [(b"host", request.headers.get("host", "localhost").encode())]
    receive = request.receive
    if json_body is not None:
        body = orjson.dumps(json_body)
        raw_headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        receive = _body_receiver(body)
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {
        **request.scope,
        "method": method,
        "path_params": dict(path_params or {}),
        "query_string": urlencode(query or {}).encode(),
        "headers": raw_headers,
        SIGNED_IN_KEY: key_id,
    }
    return await handler(Request(scope, receive))


async def call_json(request: Request, key_id: UUID, handler: Handler, **kwargs: Any) -> Any:
    """:func:`call`, answering the JSON body the API would have sent."""
    response = await call(request, key_id, handler, **kwargs)
    return orjson.loads(response.body)


def _body_receiver(body: bytes) -> Callable[[], Awaitable[Message]]:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
