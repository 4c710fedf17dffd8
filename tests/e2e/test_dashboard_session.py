"""The dashboard's session against a real gateway, over plain HTTP: what a browser does not show.

A cookie copied before sign-out no longer opens a page; a form post is bounded before it is
read; the cookie is ``Secure`` when a trusted proxy says the client came over https.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.settings import Settings
from tests.conftest import base_url, own_stack

pytestmark = pytest.mark.e2e

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(page: httpx.Response) -> str:
    found = CSRF.search(page.text)
    assert found is not None, page.text[:500]
    return found.group(1)


def sign_in(client: httpx.Client, key: str) -> str:
    """Signs ``client`` in with ``key``; returns the session cookie it got."""
    form = client.get("/ui/login")
    assert form.status_code == 200
    answer = client.post("/ui/login", data={"csrf": csrf_of(form), "api_key": key})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/ui/"
    cookie = client.cookies.get("cybersec_session")
    assert cookie
    return cookie


def test_a_cookie_kept_from_before_sign_out_opens_no_page(api: str, api_key: str) -> None:
    with httpx.Client(base_url=api, timeout=10) as client:
        kept = sign_in(client, api_key)
        home = client.get("/ui/")
        assert home.status_code == 200
        out = client.post("/ui/logout", data={"csrf": csrf_of(home)})
        assert out.status_code == 303
        assert out.headers["location"] == "/ui/login?reason=signed_out"
    # Another client presenting the copy: before, the signed cookie stayed good for 8 hours.
    with httpx.Client(base_url=api, timeout=10) as replay:
        replay.cookies.set("cybersec_session", kept, path="/ui")
        again = replay.get("/ui/")
        assert again.status_code == 303
        assert again.headers["location"] == "/ui/login?reason=signed_out"
    # Signing in again is a new session, which works.
    with httpx.Client(base_url=api, timeout=10) as client:
        sign_in(client, api_key)
        assert client.get("/ui/").status_code == 200


def test_a_form_post_is_bounded_before_it_is_read(api: str, settings: Settings) -> None:
    with httpx.Client(base_url=api, timeout=10) as client:
        form = client.get("/ui/login")
        huge = {"csrf": csrf_of(form), "api_key": "x" * (settings.max_request_bytes + 1)}
        answer = client.post("/ui/login", data=huge)
        assert answer.status_code == 413
        assert "text/html" in answer.headers["content-type"]
        assert "content-security-policy" in answer.headers

        def unsized() -> Iterator[bytes]:
            yield b"csrf=" + csrf_of(form).encode()
            yield b"&api_key=x"

        chunked = client.post(
            "/ui/login",
            content=unsized(),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert chunked.status_code == 411


@pytest.mark.parametrize(("source", "secure"), [("127.0.0.2", True), ("127.0.0.3", False)])
def test_the_cookie_is_secure_behind_a_trusted_tls_proxy(
    settings: Settings, run_dir: Path, source: str, secure: bool
) -> None:
    with own_stack(settings, run_dir, "proxy", forwarded_allow_ips="127.0.0.2") as own:
        transport = httpx.HTTPTransport(local_address=source)
        with httpx.Client(base_url=base_url(own), timeout=10, transport=transport) as client:
            form = client.get("/ui/login", headers={"x-forwarded-proto": "https"})
        assert form.status_code == 200
        cookie = form.headers["set-cookie"].lower()
        assert ("; secure" in cookie) is secure, cookie
