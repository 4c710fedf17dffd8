"""HTTP handlers: submit a scan, read its status, probes."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

import asyncpg
import orjson
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api_service.errors import ApiError
from api_service.publisher import PublishFailed
from api_service.responses import ORJSONResponse
from shared.ports import PortSpecError, parse_port_spec
from shared.protocol import build_scan_message
from shared.schemas import ScanAccepted, ScanRequest, ScanTaskPayload
from shared.targets import TargetError, network_hosts, parse_target

if TYPE_CHECKING:
    from api_service.app import Services

log = logging.getLogger(__name__)

DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


async def read_json(request: Request, limit: int) -> Any:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "send the body as application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise ApiError(413, f"body is larger than {limit} bytes")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None


def validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors(include_url=False, include_context=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    return ApiError(422, f"{field}: {message}" if field else message, field=field)


def parse_request(data: Any, request: Request) -> tuple[ScanRequest, list[int], int]:
    settings = services(request).settings
    if not isinstance(data, dict):
        raise ApiError(422, "body must be a JSON object")
    try:
        scan = ScanRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    try:
        ports = parse_port_spec(scan.ports)
        target = parse_target(scan.target, max_hosts=settings.max_hosts)
    except (PortSpecError, TargetError) as exc:
        field = "ports" if isinstance(exc, PortSpecError) else "target"
        raise ApiError(422, str(exc), field=field) from None
    if len(ports) > settings.max_ports:
        raise ApiError(
            422, f"{len(ports)} ports requested; the bound is {settings.max_ports}", field="ports"
        )
    if scan.config.max_concurrent > settings.max_concurrency:
        raise ApiError(
            422,
            f"max_concurrent {scan.config.max_concurrent} is over the bound "
            f"{settings.max_concurrency}",
            field="config.max_concurrent",
        )
    hosts = 1
    if target.kind == "network":
        import ipaddress

        hosts = len(network_hosts(ipaddress.ip_network(target.value)))
    return scan, ports, hosts


async def submit_scan(request: Request) -> Response:
    svc = services(request)
    data = await read_json(request, svc.settings.max_request_bytes)
    scan, ports, hosts = parse_request(data, request)
    scan_id, task_id = uuid4(), uuid4()
    payload = ScanTaskPayload(
        scan_id=scan_id,
        target=scan.target,
        ports=scan.ports,
        config=scan.config,
        priority=scan.priority,
    )
    try:
        await svc.store.insert(
            scan_id=scan_id,
            task_id=task_id,
            target=scan.target,
            ports=scan.ports,
            config=scan.config,
            priority=scan.priority,
        )
    except DB_ERRORS as exc:
        log.warning("cannot record scan: %r", exc)
        raise ApiError(503, "database unavailable", headers={"Retry-After": "5"}) from None
    message = build_scan_message(task_id, payload, port_count=len(ports), host_count=hosts)
    try:
        await svc.publisher.publish(message)
    except PublishFailed as exc:
        log.warning("scan %s not queued: %s", scan_id, exc)
        # Not accepted: remove the row so nothing waits for it. A worker that still gets the
        # message finds no row and drops it.
        await asyncio.shield(_forget(svc, scan_id))
        raise ApiError(503, "broker unavailable", headers={"Retry-After": "5"}) from None
    accepted = ScanAccepted(
        task_id=task_id,
        scan_id=scan_id,
        message=f"Scan of {scan.target} ({len(ports)} ports) queued with {scan.priority} priority",
    )
    return ORJSONResponse(
        accepted.model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/api/scan/{task_id}"},
    )


async def _forget(svc: Services, scan_id: UUID) -> None:
    try:
        await svc.store.delete(scan_id)
    except DB_ERRORS as exc:
        log.error("scan %s: could not remove the unqueued row: %r", scan_id, exc)


def path_uuid(request: Request, name: str) -> UUID:
    try:
        return UUID(request.path_params[name])
    except ValueError:
        raise ApiError(404, f"no scan with task id {request.path_params[name]}") from None


async def scan_status(request: Request) -> Response:
    task_id = path_uuid(request, "task_id")
    status = await services(request).status.read(task_id)
    return ORJSONResponse(status.model_dump(mode="json", exclude_none=True))


async def healthz(_request: Request) -> Response:
    return ORJSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    svc = services(request)
    checks: dict[str, bool] = {}
    checks["broker"] = await svc.publisher.ready()
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
    Route("/api/scan", submit_scan, methods=["POST"]),
    Route("/api/scan/{task_id}", scan_status, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
