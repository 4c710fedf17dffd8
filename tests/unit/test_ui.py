"""The dashboard's pieces that need no browser: its session cookie, form mapping, advice texts."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from uuid import uuid4

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from api_service.errors import ApiError
from api_service.openapi import build_openapi
from api_service.ui import ui_routes
from api_service.ui.headers import CONTENT_SECURITY_POLICY
from api_service.ui.render import what_to_do
from api_service.ui.scans import scan_request
from api_service.ui.session import COOKIE, Session, SessionCookies
from api_service.ui.targets import by_target


def request_with(cookie: str | None, scheme: str = "http") -> Request:
    headers = [(b"cookie", f"{COOKIE}={cookie}".encode())] if cookie else []
    return Request({"type": "http", "scheme": scheme, "headers": headers, "path": "/ui/"})


def issued(jar: SessionCookies, session: Session, scheme: str = "http") -> tuple[str, str]:
    """The cookie's value and its Set-Cookie header as a browser would get them."""
    response = Response()
    jar.store(request_with(None, scheme), response, session)
    header = response.headers["set-cookie"]
    value = header.split(";", 1)[0].split("=", 1)[1]
    return value, header


def test_a_signed_in_session_round_trips_and_holds_no_key() -> None:
    jar = SessionCookies("s" * 32, max_age=600)
    session = Session.anonymous().signed_in(uuid4())
    value, header = issued(jar, session)
    assert jar.load(request_with(value)) == session
    assert "httponly" in header.lower()
    assert "samesite=strict" in header.lower()
    assert "secure" not in header.lower()
    assert "Path=/ui" in header
    _, over_tls = issued(jar, session, scheme="https")
    assert "secure" in over_tls.lower()


def test_a_tampered_foreign_or_expired_cookie_is_no_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jar = SessionCookies("s" * 32, max_age=600)
    value, _ = issued(jar, Session.anonymous().signed_in(uuid4()))
    assert jar.load(request_with(value + "x")) is None
    assert SessionCookies("t" * 32, max_age=600).load(request_with(value)) is None
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 601)
    assert jar.load(request_with(value)) is None


def test_cookies_are_never_signed_with_an_empty_key() -> None:
    with pytest.raises(ValueError, match="signing key"):
        SessionCookies("", max_age=600)


def test_csrf_tokens_compare_whole() -> None:
    session = Session.anonymous()
    assert session.csrf_matches(session.csrf)
    assert not session.csrf_matches(session.csrf[:-1])
    assert not session.csrf_matches("")
    assert session.signed_in(uuid4()).csrf != session.csrf


def test_the_form_becomes_the_apis_body_and_leaves_bad_numbers_to_the_api() -> None:
    body = scan_request(
        {"target": " 127.0.0.1 ", "ports": "", "priority": "high", "timeout": "0.5"}
        | {"max_concurrent": "lots", "service_detection": "on"}
    )
    assert body == {
        "target": "127.0.0.1",
        "ports": "1-1000",
        "priority": "high",
        "config": {"service_detection": True, "timeout": 0.5, "max_concurrent": "lots"},
    }
    assert scan_request({"target": "h"})["config"] == {"service_detection": False}


def test_errors_say_what_to_do() -> None:
    limited = ApiError(429, "rate limited", headers={"Retry-After": "17"})
    assert "try again in 17 seconds" in what_to_do(limited)
    assert "try again in 5 seconds" in what_to_do(
        ApiError(503, "database unavailable", headers={"Retry-After": "5"})
    )
    assert "no such scan" in what_to_do(ApiError(404, "no scan"))


def test_targets_group_history_oldest_first() -> None:
    def item(target: str, when: str, state: str, open_ports: int | None) -> dict[str, object]:
        return {
            "task_id": str(uuid4()),
            "target": target,
            "created_at": when,
            "state": state,
            "open_ports": open_ports,
        }

    newest_first = [
        item("10.0.0.1", "2026-12-02T10:00:00Z", "completed", 3),
        item("10.0.0.2", "2026-12-02T09:00:00Z", "failed", None),
        item("10.0.0.1", "2026-12-02T08:00:00Z", "completed", 1),
    ]
    first, second = by_target(newest_first)
    assert (first["target"], first["scans"]) == ("10.0.0.1", 2)
    assert [count for _, count, _ in first["points"]] == [1, 3]
    eight, ten = (datetime(2026, 12, 2, h, tzinfo=UTC).timestamp() for h in (8, 10))
    assert orjson.loads(first["chart"]) == {"x": [eight, ten], "y": [1, 3]}
    assert (second["target"], second["points"]) == ("10.0.0.2", [])


def test_the_dashboard_is_not_in_the_api_document() -> None:
    paths = list(build_openapi()["paths"])
    assert "/api/scan" in paths
    assert all(not path.startswith("/ui") and path != "/" for path in paths)


async def test_static_files_ship_with_the_security_headers() -> None:
    app = Starlette(routes=ui_routes())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ui.test") as client:
        home = await client.get("/")
        assert (home.status_code, home.headers["location"]) == (307, "/ui/")
        missing = await client.get("/ui/no/such/page")
        assert missing.status_code == 404
        assert "text/html" in missing.headers["content-type"]
        assert missing.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        for path in ("app.js", "vendor/htmx.min.js", "vendor/sse.min.js", "vendor/uPlot.min.js"):
            response = await client.get(f"/ui/static/{path}")
            assert response.status_code == 200, path
            assert "javascript" in response.headers["content-type"]
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["cache-control"] == "no-cache"
            if path.startswith("vendor/"):
                # Each vendored file keeps a licence header naming where it came from.
                assert response.text.startswith("/*!"), path
