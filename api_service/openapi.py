"""The OpenAPI 3.1 document, built from the same pydantic models the handlers validate with."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from api_service import openapi_monitoring
from shared.diff import ScanDiff
from shared.schemas import (
    ScanAccepted,
    ScanCached,
    ScanPage,
    ScanRequest,
    ScanState,
    ScanStatus,
)

VERSION = "0.1.0"


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str
    message: str
    field: str | None


class Error(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail


_DESCRIPTIONS = {
    400: "Malformed JSON",
    401: "Missing, unknown or revoked API key",
    403: "Target denied by the target policy",
    404: "No such scan for this API key",
    409: "Conflict with the scan's state or an earlier Idempotency-Key",
    413: "Body too large",
    415: "Body is not application/json",
    422: "Request violates the schema or a bound",
    429: "Over a per-key limit; see Retry-After",
    503: "Broker, database or limiter unavailable; see Retry-After",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _json(Error, _DESCRIPTIONS[code]) for code in codes}


_TASK_ID = {
    "name": "task_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]


def build_openapi() -> dict[str, Any]:
    _, defs = models_json_schema(
        [
            (ScanRequest, "validation"),
            (ScanAccepted, "serialization"),
            (ScanCached, "serialization"),
            (ScanStatus, "serialization"),
            (ScanPage, "serialization"),
            (ScanDiff, "serialization"),
            (Error, "serialization"),
            *openapi_monitoring.MODELS,
        ],
        ref_template="#/components/schemas/{model}",
    )
    health = {"type": "object", "properties": {"status": {"type": "string"}}}
    ready = {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["ready", "unavailable"]},
            "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cybersec-scan",
            "version": VERSION,
            "description": "Self-hosted TCP port scanning. Every /api route needs "
            "`Authorization: Bearer <key>`.",
        },
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/api/scan": {
                "post": {
                    "summary": "Submit a scan",
                    "operationId": "submitScan",
                    "security": _SECURITY,
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                            "description": "The same key and body return the same scan.",
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref(ScanRequest)}},
                    },
                    "responses": {
                        "200": _json(ScanCached, "The same scan finished within the cache TTL"),
                        "202": _json(ScanAccepted, "Queued; the broker confirmed the message"),
                        **_errors(400, 401, 403, 409, 413, 415, 422, 429, 503),
                    },
                }
            },
            "/api/scans": {
                "get": {
                    "summary": "List this key's scans, newest first",
                    "operationId": "listScans",
                    "security": _SECURITY,
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 200},
                        },
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "state",
                            "in": "query",
                            "schema": {
                                "type": "string",
                                "enum": list(get_args(ScanState)),
                            },
                        },
                        {"name": "target", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "schedule_id",
                            "in": "query",
                            "schema": {"type": "string", "format": "uuid"},
                        },
                    ],
                    "responses": {
                        "200": _json(ScanPage, "One page of scans"),
                        **_errors(401, 422, 503),
                    },
                }
            },
            "/api/scan/{task_id}": {
                "parameters": [_TASK_ID],
                "get": {
                    "summary": "A scan's state, progress and result",
                    "operationId": "getScan",
                    "security": _SECURITY,
                    "responses": {"200": _json(ScanStatus, "The scan"), **_errors(401, 404, 503)},
                },
                "delete": {
                    "summary": "Cancel a queued or running scan",
                    "operationId": "cancelScan",
                    "security": _SECURITY,
                    "responses": {
                        "202": _json(ScanStatus, "Cancelled, or cancelling"),
                        **_errors(401, 404, 409, 503),
                    },
                },
            },
            "/api/scan/{task_id}/events": {
                "parameters": [_TASK_ID],
                "get": {
                    "summary": "Server-Sent Events: progress, each open port, then the end",
                    "operationId": "scanEvents",
                    "security": _SECURITY,
                    "parameters": [
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": {
                            "description": "`progress`, `port` and a final `end` event",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_errors(401, 404, 422, 429, 503),
                    },
                },
            },
            "/api/scan/{task_id}/result": {
                "parameters": [_TASK_ID],
                "get": {
                    "summary": "A finished scan's result as JSON, CSV or nmap XML",
                    "operationId": "scanResult",
                    "security": _SECURITY,
                    "parameters": [
                        {
                            "name": "format",
                            "in": "query",
                            "schema": {"type": "string", "enum": ["json", "csv", "nmap-xml"]},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "The result in the asked format",
                            "content": {
                                "application/json": {"schema": {"type": "object"}},
                                "text/csv": {"schema": {"type": "string"}},
                                "application/xml": {"schema": {"type": "string"}},
                            },
                        },
                        **_errors(401, 404, 409, 422, 503),
                    },
                },
            },
            "/api/scan/{task_id}/diff": {
                "parameters": [_TASK_ID],
                "get": {
                    "summary": "Ports newly open or closed and changed services since another scan",
                    "operationId": "scanDiff",
                    "security": _SECURITY,
                    "parameters": [
                        {
                            "name": "against",
                            "in": "query",
                            "description": "`previous` (the key's last completed scan of the "
                            "same target) or a task id",
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": _json(ScanDiff, "What changed, old to new"),
                        **_errors(401, 404, 409, 422, 503),
                    },
                },
            },
            **openapi_monitoring.paths(_json, _errors, _ref, _SECURITY),
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "operationId": "healthz",
                    "responses": {
                        "200": {
                            "description": "Alive",
                            "content": {"application/json": {"schema": health}},
                        }
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: broker, Redis and PostgreSQL reachable",
                    "operationId": "readyz",
                    "responses": {
                        code: {
                            "description": text,
                            "content": {"application/json": {"schema": ready}},
                        }
                        for code, text in (("200", "Ready"), ("503", "A dependency is down"))
                    },
                }
            },
        },
    }
