"""What every handler reaches: the process's services, the caller's key, path parameters."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

from starlette.requests import Request

from api_service.errors import ApiError
from api_service.errors import db_unavailable as db_unavailable  # where handlers find it
from shared.logging import bind_scan

if TYPE_CHECKING:
    from api_service.app import Services


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


SIGNED_IN_KEY = "cybersec.signed_in_key"
"""Scope entry the dashboard sets, after checking its session, when it calls a route."""


async def caller(request: Request) -> UUID:
    """The id of the API key the request carries; 401 without a valid one."""
    signed_in = request.scope.get(SIGNED_IN_KEY)
    if isinstance(signed_in, UUID):
        return signed_in
    return await services(request).auth.authenticate(request)


def uuid_param(request: Request, name: str, what: str) -> UUID:
    """Path parameter ``name`` as a UUID; 404 ("no <what> <raw>") when it is not one."""
    raw = request.path_params[name]
    try:
        return UUID(raw)
    except ValueError:
        raise ApiError(404, f"no {what} {raw}") from None


def task_id_param(request: Request) -> UUID:
    task_id = uuid_param(request, "task_id", "scan with task id")
    bind_scan(task_id=task_id)
    return task_id
