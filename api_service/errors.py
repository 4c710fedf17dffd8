"""Every error a client can see, as one JSON body shape: ``{"error": {code, message, field}}``."""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from api_service.responses import ORJSONResponse
from shared.retry import DATABASE_ERRORS

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """Raised by a handler to answer with a status and a machine-readable body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _CODES.get(status, "error")
        self.field = field
        self.headers = headers


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> ORJSONResponse:
    body = {
        "error": {"code": code or _CODES.get(status, "error"), "message": message, "field": field}
    }
    return ORJSONResponse(body, status_code=status, headers=headers)


async def api_error_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(
        exc.status, exc.message, code=exc.code, field=exc.field, headers=exc.headers
    )


async def http_error_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, str(exc.detail), headers=headers)


RETRY_AFTER_SECONDS = "5"


def db_unavailable() -> ApiError:
    """The one answer to "database unavailable": 503, ``unavailable``, Retry-After."""
    return ApiError(503, "database unavailable", headers={"Retry-After": RETRY_AFTER_SECONDS})


async def database_error_handler(request: Request, exc: Exception) -> Response:
    """A PostgreSQL error no handler caught (``shared.retry.DATABASE_ERRORS``): the same 503."""
    log.warning("database unavailable on %s %s: %r", request.method, request.url.path, exc)
    return await api_error_handler(request, db_unavailable())


async def unhandled_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ApiError: api_error_handler,
    HTTPException: http_error_handler,
    **dict.fromkeys(DATABASE_ERRORS, database_error_handler),
    Exception: unhandled_error_handler,
}
