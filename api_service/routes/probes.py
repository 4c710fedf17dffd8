"""Probes for orchestrators, outside authentication: liveness and readiness."""

from __future__ import annotations

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api_service.responses import ORJSONResponse
from api_service.routes.common import services
from shared.retry import DATABASE_ERRORS as DB_ERRORS


async def healthz(_request: Request) -> Response:
    return ORJSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    svc = services(request)
    checks: dict[str, bool] = {"broker": await svc.publisher.ready()}
    try:
        checks["redis"] = bool(await svc.redis.ping())
    except (RedisError, OSError):
        checks["redis"] = False
    try:
        checks["database"] = await svc.store.pool.fetchval("SELECT 1", timeout=2) == 1
    except DB_ERRORS:
        checks["database"] = False
    ready = all(checks.values())
    return ORJSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
