"""Bad input gets a 4xx with one error body shape, never a 500."""

from __future__ import annotations

import base64
import socket
import time
from typing import Any
from uuid import uuid4

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

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
        # Unicode digits that str.isdigit() admits: "²" int() refuses, "٨٠" it reads as 80.
        ({"target": "127.0.0.1", "ports": "²"}, "ports"),
        ({"target": "127.0.0.1", "ports": "\u0668\u0660"}, "ports"),
        # IPv6 zones must be interface names; a hostname label may not end in a newline.
        ({"target": "::1%a b"}, "target"),
        ({"target": "::1%lo\nx"}, "target"),
        ({"target": "::1%\u0000"}, "target"),
        ({"target": "::1%\u0000/128"}, "target"),
        ({"target": "::1%" + "x" * 240}, "target"),
        ({"target": "localhost\n.x"}, "target"),
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


def cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


ZERO = "00000000-0000-0000-0000-000000000000"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=%C2%B2", "limit"),  # a superscript two: a digit to str.isdigit(), not to int()
        ("limit=%D9%A5", "limit"),  # an Arabic-Indic five, which int() reads as 5
        ("limit=" + "9" * 5000, "limit"),
        ("target=%00", "target"),
        ("target=127.0.0.1%00", "target"),
        # Well-formed cursors whose time is out of range once in UTC, as PostgreSQL reads it.
        ("cursor=" + cursor(f"0001-01-01T00:00:00+05:00|{ZERO}"), "cursor"),
        ("cursor=" + cursor(f"9999-12-31T23:59:59-05:00|{ZERO}"), "cursor"),
        ("cursor=" + cursor(f"2026-01-01T00:00:00|{ZERO}"), "cursor"),  # no zone
    ],
)
def test_bad_list_query_is_422_not_500_or_503(client: httpx.Client, query: str, field: str) -> None:
    assert_error(client.get(f"/api/scans?{query}"), 422, "validation_error", field)


def test_list_filter_matches_the_canonical_target(client: httpx.Client) -> None:
    accepted = client.post("/api/scan", json={"target": "::1", "ports": "9"})
    assert accepted.status_code == 202, accepted.text
    task_id = accepted.json()["task_id"]
    listed = client.get("/api/scans", params={"target": "0:0::1", "limit": 200}).json()
    assert task_id in {item["task_id"] for item in listed["items"]}


@pytest.mark.parametrize(
    "last_id",
    [b"1-", b"-1", b"1-2-3", b"99999999999999999999-0", b"0-18446744073709551616", b"\xb2-0"],
)
def test_last_event_id_redis_would_refuse_is_422(client: httpx.Client, last_id: bytes) -> None:
    accepted = client.post("/api/scan", json={"target": "127.0.0.1", "ports": "9"})
    assert accepted.status_code == 202, accepted.text
    task_id = accepted.json()["task_id"]
    response = client.get(f"/api/scan/{task_id}/events", headers={b"Last-Event-ID": last_id})
    assert_error(response, 422, "validation_error", "Last-Event-ID")


def test_405_on_a_scan_lists_every_method_of_it(client: httpx.Client) -> None:
    response = client.patch(f"/api/scan/{uuid4()}")
    assert_error(response, 405, "method_not_allowed", None)
    allowed = {m.strip() for m in response.headers["allow"].split(",")}
    assert {"GET", "DELETE"} <= allowed


def test_client_leaving_mid_body_is_a_client_error(client: httpx.Client, api: str) -> None:
    def served(status: str) -> float:
        text = client.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if (
                    sample.name == "cybersec_api_requests_total"
                    and labels.get("route") == "/api/scan"
                    and labels.get("method") == "POST"
                    and labels.get("status") == status
                ):
                    return sample.value
        return 0.0

    before_400, before_500 = served("400"), served("500")
    url = httpx.URL(api)
    key = client.headers["authorization"]
    with socket.create_connection((url.host, url.port or 80), timeout=5) as sock:
        sock.sendall(
            b"POST /api/scan HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: {key}\r\nContent-Length: 500\r\n\r\n".encode()
            + b'{"target":'
        )
    deadline = time.monotonic() + 10
    while served("400") == before_400 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served("400") == before_400 + 1
    assert served("500") == before_500


def test_a_limit_with_leading_zeros_is_still_a_number(client: httpx.Client) -> None:
    response = client.get("/api/scans?limit=0050")
    assert response.status_code == 200, response.text
    assert len(response.json()["items"]) <= 50
