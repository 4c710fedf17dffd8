"""Reading and validating what a client sent: body limits, media type, JSON, schemas."""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from api_service.errors import ApiError
from shared.ports import PortSpecError, count_ports, parse_port_ranges
from shared.protocol import LimitPolicy, too_slow
from shared.schemas import ScanRequest
from shared.settings import Settings
from shared.targets import Target, TargetError, network_hosts, parse_target


async def read_json(request: Request, limit: int) -> Any:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "send the body as application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body is larger than {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise ApiError(413, f"body is larger than {limit} bytes")
    except ClientDisconnect:
        # Nobody will read the answer; a client error, not a server one, for logs and metrics.
        raise ApiError(400, "the client left before sending the whole body") from None
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


M = TypeVar("M", bound=BaseModel)


def validate_model(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise ApiError(422, "body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


class ParsedScan:
    """A validated scan request with everything derived from it."""

    def __init__(self, scan: ScanRequest, settings: Settings) -> None:
        self.scan = scan
        try:
            # Already canonical (the schema merged its ranges): counted, never expanded.
            self.port_count = count_ports(parse_port_ranges(scan.ports))
        except PortSpecError as exc:
            raise ApiError(422, str(exc), field="ports") from None
        try:
            self.target: Target = parse_target(scan.target, max_hosts=settings.max_hosts)
        except TargetError as exc:
            raise ApiError(422, str(exc), field="target") from None
        if self.port_count > settings.max_ports:
            raise ApiError(
                422,
                f"{self.port_count} ports requested; the bound is {settings.max_ports}",
                field="ports",
            )
        if scan.config.max_concurrent > settings.max_concurrency:
            raise ApiError(
                422,
                f"max_concurrent {scan.config.max_concurrent} is over the bound "
                f"{settings.max_concurrency}",
                field="config.max_concurrent",
            )
        self.hosts = 1
        if self.target.kind == "network":
            self.hosts = len(network_hosts(ipaddress.ip_network(self.target.value)))
        slow = too_slow(self.port_count, self.hosts, scan.config.rate, LimitPolicy.of(settings))
        if slow is not None:
            raise ApiError(422, slow, field="config.rate")

    def cache_key(self) -> bytes:
        """Identifies what the scan would find: target, ports and config (not priority)."""
        scan = self.scan.model_dump(mode="json", include={"target", "ports", "config"})
        return hashlib.sha256(orjson.dumps(scan, option=orjson.OPT_SORT_KEYS)).digest()

    def fingerprint(self) -> bytes:
        """Identifies the request's meaning, for Idempotency-Key replays."""
        return orjson.dumps(self.scan.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
