"""Bad input gets a 4xx with one error body shape, never a 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e


def assert_error(response: httpx.Response, status: int, code: str, field: str | None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] == code
    assert body["error"]["field"] == field
    assert body["error"]["message"]


def test_malformed_json_is_400(client: httpx.Client) -> None:
    response = client.post(
        "/api/scan",
        content=b'{"target": "127.0.0.1",',
        headers={"content-type": "application/json"},
    )
    assert_error(response, 400, "bad_request", None)


def test_wrong_media_type_is_415(client: httpx.Client) -> None:
    response = client.post("/api/scan", content=b"target=127.0.0.1")
    assert_error(response, 415, "unsupported_media_type", None)


def test_oversized_body_is_413(client: httpx.Client) -> None:
    body = b'{"target": "127.0.0.1", "ports": "' + b"1," * 40_000 + b'1"}'
    response = client.post("/api/scan", content=body, headers={"content-type": "application/json"})
    assert_error(response, 413, "payload_too_large", None)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"target": "not a host!"}, "target"),
        ({"target": "300.1.2.3"}, "target"),
        ({"target": ""}, "target"),
        ({"target": "127.0.0.1", "ports": "0-70000"}, "ports"),
        ({"target": "127.0.0.1", "ports": "80-20"}, "ports"),
        ({"target": "127.0.0.1", "ports": "abc"}, "ports"),
        ({"target": "127.0.0.1", "ports": "0"}, "ports"),
        ({"target": "127.0.0.1", "ports": "65536"}, "ports"),
        ({"target": "127.0.0.1", "surprise": 1}, "surprise"),
        ({"target": "127.0.0.1", "config": {"scan_type": "UDP"}}, "config.scan_type"),
        ({"target": "127.0.0.1", "config": {"timeout": -1}}, "config.timeout"),
        ({"target": "127.0.0.1", "config": {"extra": True}}, "config.extra"),
        ({"target": "127.0.0.1", "priority": "urgent"}, "priority"),
        ({"ports": "80"}, "target"),
        ({"target": 12}, "target"),
    ],
)
def test_invalid_request_is_422_naming_the_field(
    client: httpx.Client, body: dict[str, Any], field: str
) -> None:
    assert_error(client.post("/api/scan", json=body), 422, "validation_error", field)


def test_body_that_is_not_an_object_is_422(client: httpx.Client) -> None:
    assert_error(client.post("/api/scan", json=["127.0.0.1"]), 422, "validation_error", None)


def test_unknown_route_and_method_use_the_error_shape(client: httpx.Client) -> None:
    assert_error(client.get("/api/nothing-here"), 404, "not_found", None)
    assert_error(client.delete("/api/scan"), 405, "method_not_allowed", None)
