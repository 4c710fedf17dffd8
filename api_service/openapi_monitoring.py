"""The OpenAPI paths of schedules and webhooks, merged into ``build_openapi``'s document."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from shared.schedules import Schedule, ScheduleCreate, ScheduleList, ScheduleRun, ScheduleUpdate
from shared.webhooks import DeliveryList, Webhook, WebhookCreate, WebhookCreated, WebhookList

MODELS: list[tuple[type[BaseModel], Any]] = [
    (ScheduleCreate, "validation"),
    (ScheduleUpdate, "validation"),
    (Schedule, "serialization"),
    (ScheduleList, "serialization"),
    (ScheduleRun, "serialization"),
    (WebhookCreate, "validation"),
    (Webhook, "serialization"),
    (WebhookCreated, "serialization"),
    (WebhookList, "serialization"),
    (DeliveryList, "serialization"),
]

Json = Callable[[type[BaseModel], str], dict[str, Any]]
Errors = Callable[..., dict[str, Any]]
Ref = Callable[[type[BaseModel]], dict[str, str]]


def _id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def paths(
    json: Json, errors: Errors, ref: Ref, security: list[dict[str, list[str]]]
) -> dict[str, Any]:
    def op(
        summary: str, operation_id: str, responses: dict[str, Any], **extra: Any
    ) -> dict[str, Any]:
        return {
            "summary": summary,
            "operationId": operation_id,
            "security": security,
            "responses": responses,
            **extra,
        }

    def body(model: type[BaseModel]) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": ref(model)}}}

    empty = {"204": {"description": "Deleted"}}
    return {
        "/api/schedules": {
            "get": op(
                "This key's schedules",
                "listSchedules",
                {"200": json(ScheduleList, "Every schedule of the key"), **errors(401, 503)},
            ),
            "post": op(
                "Create a schedule",
                "createSchedule",
                {
                    "201": json(Schedule, "Created; next_run_at says when it first runs"),
                    **errors(400, 401, 403, 413, 415, 422, 503),
                },
                requestBody=body(ScheduleCreate),
            ),
        },
        "/api/schedules/{schedule_id}": {
            "parameters": [_id("schedule_id")],
            "get": op(
                "A schedule",
                "getSchedule",
                {"200": json(Schedule, "The schedule"), **errors(401, 404, 503)},
            ),
            "patch": op(
                "Change a schedule (pause, resume, retime, retarget)",
                "updateSchedule",
                {
                    "200": json(Schedule, "The schedule as it now is"),
                    **errors(400, 401, 403, 404, 413, 415, 422, 503),
                },
                requestBody=body(ScheduleUpdate),
            ),
            "delete": op(
                "Delete a schedule; its scans stay",
                "deleteSchedule",
                {**empty, **errors(401, 404, 503)},
            ),
        },
        "/api/schedules/{schedule_id}/run": {
            "parameters": [_id("schedule_id")],
            "post": op(
                "Run a schedule now, once",
                "runScheduleNow",
                {
                    "202": json(ScheduleRun, "Recorded; its scan is queued"),
                    **errors(401, 403, 404, 503),
                },
            ),
        },
        "/api/webhooks": {
            "get": op(
                "This key's webhooks",
                "listWebhooks",
                {"200": json(WebhookList, "Every webhook of the key"), **errors(401, 503)},
            ),
            "post": op(
                "Register a webhook; its secret is shown only now",
                "createWebhook",
                {
                    "201": json(WebhookCreated, "Created, with its whsec_ secret"),
                    **errors(400, 401, 413, 415, 422, 503),
                },
                requestBody=body(WebhookCreate),
            ),
        },
        "/api/webhooks/{webhook_id}": {
            "parameters": [_id("webhook_id")],
            "get": op(
                "A webhook",
                "getWebhook",
                {"200": json(Webhook, "The webhook"), **errors(401, 404, 503)},
            ),
            "delete": op("Delete a webhook", "deleteWebhook", {**empty, **errors(401, 404, 503)}),
        },
        "/api/webhooks/{webhook_id}/deliveries": {
            "parameters": [_id("webhook_id")],
            "get": op(
                "Recent messages and every attempt to deliver them",
                "listDeliveries",
                {"200": json(DeliveryList, "Newest first"), **errors(401, 404, 503)},
            ),
        },
        "/api/webhooks/{webhook_id}/deliveries/{message_id}/redeliver": {
            "parameters": [_id("webhook_id"), _id("message_id")],
            "post": op(
                "Send a message again from its first attempt",
                "redeliver",
                {"202": {"description": "Queued for delivery"}, **errors(401, 404, 503)},
            ),
        },
    }
