"""One handler answers every "database unavailable" with the same 503."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api_service.errors import EXCEPTION_HANDLERS, db_unavailable


@pytest.mark.parametrize(
    "error",
    [
        db_unavailable(),
        asyncpg.CannotConnectNowError("starting up"),
        asyncpg.InterfaceError("pool is closing"),
        ConnectionRefusedError("refused"),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_every_database_error_is_the_same_503(error: Exception) -> None:
    async def fails(_request: Request) -> Response:
        raise error

    app = Starlette(routes=[Route("/", fails)], exception_handlers=EXCEPTION_HANDLERS)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        response = await client.get("/")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert response.json() == {
        "error": {"code": "unavailable", "message": "database unavailable", "field": None}
    }
