"""The dashboard in a real browser, against the real gateway and worker of this test run.

Every scan targets listeners on 127.0.0.1 that the tests open themselves.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, expect

from shared.keys import KeyStore
from shared.settings import Settings
from shared.store import create_pool
from tests.conftest import base_url, own_stack, wait_final
from tests.support.banners import banner_listener
from tests.support.browser import (
    DESKTOP,
    RECORDER,
    TASK_URL,
    Watch,
    api_rows,
    off_loop,
    result_rows,
    shoot,
    sign_in,
    signed_in_page,
    submit,
    wait_running,
)

pytestmark = pytest.mark.e2e


def test_a_scan_runs_live_and_its_table_is_the_apis_result(
    context: BrowserContext,
    api_key: str,
    client: httpx.Client,
    worker: object,
    listeners: list[int],
    silent_port: int,
    screenshots: Path | None,
) -> None:
    watch = Watch(context)
    context.add_init_script(RECORDER)
    page = context.new_page()
    sign_in(page, api_key)
    # The silent port holds the scan for its timeout: long enough to watch it run.
    ports = ",".join(map(str, [*listeners, silent_port]))
    task = submit(page, "127.0.0.1", ports, timeout="4")
    expect(page.locator("#scan-live")).to_be_visible()
    # Recorded rather than looked at: the result may replace the live table at any moment.
    page.wait_for_function(
        "count => window.__seen.livePorts >= count", arg=len(listeners), timeout=10_000
    )
    shoot(page, screenshots, "scan-running")

    rows = result_rows(page)
    expect(page.locator("#final-state")).to_have_text("SUCCESS")
    seen = page.evaluate("window.__seen")
    assert seen["livePorts"] == len(listeners)
    assert any(0 <= value < 100 for value in seen["progress"]), seen
    final = wait_final(client, task)
    assert rows == api_rows(final["result"])
    assert [int(row[1]) for row in rows] == listeners
    assert watch.problems == []


def test_planted_banners_are_shown_as_text_and_never_run(
    context: BrowserContext, api_key: str, client: httpx.Client, worker: object
) -> None:
    watch = Watch(context)
    page = context.new_page()
    sign_in(page, api_key)
    script = b'<script>alert("xss-script")</script>'
    image = b'"><img src=x onerror=alert("xss-img")>'
    with banner_listener(script + b"\r\n") as first, banner_listener(image + b"\r\n") as second:
        task = submit(page, "127.0.0.1", f"{first},{second}")
        rows = result_rows(page)
    assert sorted(row[-1] for row in rows) == sorted([script.decode(), image.decode()])
    assert page.locator("#result-table img, #result-table script").count() == 0
    assert rows == api_rows(wait_final(client, task)["result"])
    # The same text on every page that shows it, including a fresh load of the finished scan.
    page.reload()
    result_rows(page)
    page.goto("/ui/targets")
    page.goto("/ui/")
    assert watch.problems == []


def test_a_port_that_opens_shows_in_the_diff_and_nmap_xml_downloads(
    context: BrowserContext,
    api_key: str,
    client: httpx.Client,
    worker: object,
    screenshots: Path | None,
) -> None:
    watch = Watch(context)
    page = context.new_page()
    sign_in(page, api_key)
    # An address of its own, so no other test's scan is "the previous scan" of this target.
    address = f"127.{secrets.randbelow(200) + 50}.{secrets.randbelow(250) + 1}.9"
    ssh = banner_listener(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", address=address)
    with ssh as steady, socket.socket() as later:
        # Bound but not listening: refused (closed) until the second scan.
        later.bind((address, 0))
        opened = later.getsockname()[1]
        ports = f"{steady},{opened}"
        first = submit(page, address, ports)
        result_rows(page)
        expect(page.locator("#diff")).to_contain_text("no earlier completed scan")
        with banner_listener(b"220 mail.example.test ESMTP Postfix\r\n", bound=later):
            second = submit(page, address, ports)
            rows = result_rows(page)
    assert sorted(int(row[1]) for row in rows) == sorted([steady, opened])
    expect(page.locator("#diff-table tr.diff-open")).to_have_count(1)
    expect(page.locator("#diff-table tr.diff-open td").nth(2)).to_have_text(str(opened))
    expect(page.locator(f'#diff a[href="/ui/scans/{first}"]')).to_be_visible()

    with page.expect_download() as download_info:
        page.get_by_role("link", name="nmap-xml").click()
    download = download_info.value
    assert download.suggested_filename == f"scan-{second}.xml"
    wait_final(client, second)
    expected = client.get(f"/api/scan/{second}/result", params={"format": "nmap-xml"})
    assert Path(download.path()).read_bytes() == expected.content
    shoot(page, screenshots, "scan-detail")

    page.goto("/ui/targets")
    chart = page.locator(".chart").first
    expect(chart.locator("canvas")).to_have_count(1)
    shoot(page, screenshots, "targets")
    page.goto("/ui/")
    expect(page.locator(f'tr[data-task-id="{second}"]')).to_be_visible()
    shoot(page, screenshots, "scans")
    assert watch.problems == []


def test_cancel_running_scans_the_list_follows_live_then_sign_out(
    context: BrowserContext,
    api_key: str,
    client: httpx.Client,
    worker: object,
    silent_port: int,
) -> None:
    watch = Watch(context)
    page = context.new_page()
    sign_in(page, api_key)
    task = submit(page, "127.0.0.1", str(silent_port), timeout="20")
    wait_running(client, task)
    page.goto("/ui/")
    row = page.locator(f'tr[data-task-id="{task}"]')
    expect(row).to_have_attribute("data-state", "running")
    expect(row.locator("progress")).to_have_count(1)
    row.get_by_role("button", name="Cancel").click()
    page.wait_for_url(TASK_URL)
    expect(page.locator("#final-state")).to_have_text("REVOKED", timeout=15_000)
    assert wait_final(client, task)["state"] == "REVOKED"

    # The list refreshes what is still active by itself: a scan cancelled elsewhere turns
    # revoked on the open page, without a reload.
    body = {"target": "127.0.0.1", "ports": str(silent_port), "config": {"timeout": 20}}
    other = client.post("/api/scan", json=body).json()["task_id"]
    page.goto("/ui/")
    page.evaluate("window.__notReloaded = true")
    row = page.locator(f'tr[data-task-id="{other}"]')
    expect(row).to_be_visible()
    assert client.delete(f"/api/scan/{other}").status_code == 202
    expect(row).to_have_attribute("data-state", "revoked", timeout=15_000)
    assert page.evaluate("window.__notReloaded") is True

    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/ui/login?reason=signed_out")
    expect(page.get_by_role("status")).to_contain_text("signed out")
    page.goto(f"/ui/scans/{task}")
    assert "/ui/login" in page.url
    assert watch.problems == []


def test_another_key_gets_a_404_page_and_the_session_is_locked_down(
    browser: Browser,
    context: BrowserContext,
    api: str,
    api_key: str,
    other_api_key: str,
    client: httpx.Client,
) -> None:
    accepted = client.post("/api/scan", json={"target": "127.0.0.1", "ports": "1"})
    assert accepted.status_code == 202, accepted.text
    task = accepted.json()["task_id"]

    urls: list[str] = []
    context.on("request", lambda request: urls.append(request.url))
    page = context.new_page()
    response = page.goto("/")
    assert response is not None
    assert page.url.endswith("/ui/login?reason=signed_out")
    headers = response.headers
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    sign_in(page, api_key)
    assert api_key not in page.content()
    assert not any(api_key in url for url in urls)
    (cookie,) = context.cookies()
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert api_key not in cookie["value"]
    # A form post without the session's CSRF token is refused.
    forged = page.request.post("/ui/scans", form={"target": "127.0.0.1", "ports": "1"})
    assert forged.status == 403
    # A request the API refuses comes back as the form with the API's own message, filled in.
    page.goto("/ui/")
    page.locator("#target").fill("127.0.0.66")
    page.locator("#ports").fill("80-20")
    page.get_by_role("button", name="Start scan").click()
    expect(page.locator("#form-error")).to_contain_text("runs backwards")
    expect(page.locator("#target")).to_have_value("127.0.0.66")
    page.locator("#ports").fill("80")
    page.get_by_role("button", name="Start scan").click()
    expect(page.locator("#form-error")).to_contain_text("not allowed by the target policy")
    # The same rendering of the form sent twice (a double click) is one scan.
    form: dict[str, str | float | bool] = {
        "csrf": page.locator("input[name=csrf]").first.input_value(),
        "submission": page.locator("input[name=submission]").input_value(),
        "target": "127.0.0.1",
        "ports": "2",
    }
    answers = [page.request.post("/ui/scans", form=form, max_redirects=0) for _ in range(2)]
    assert [a.status for a in answers] == [303, 303]
    assert answers[0].headers["location"] == answers[1].headers["location"]

    with signed_in_page(browser, api, other_api_key) as stranger:
        response = stranger.goto(f"/ui/scans/{task}")
        assert response is not None
        assert response.status == 404
        expect(stranger.get_by_role("heading", name="Not found")).to_be_visible()
        for suffix in ("/result?format=json", "/events"):
            assert stranger.request.get(f"/ui/scans/{task}{suffix}").status == 404
        stranger.goto("/ui/")
        expect(stranger.locator(f'tr[data-task-id="{task}"]')).to_have_count(0)
        token = stranger.locator("input[name=csrf]").first.input_value()
        cancel = stranger.request.post(f"/ui/scans/{task}/cancel", form={"csrf": token})
        assert cancel.status == 404
        assert client.get(f"/api/scan/{task}").json()["state"] != "REVOKED"


def test_a_revoked_key_ends_its_session(browser: Browser, api: str, database: str) -> None:
    async def keys(action: str, name: str) -> str:
        pool = await create_pool(database, max_size=1)
        try:
            store = KeyStore(pool)
            if action == "create":
                return await store.create(name)
            await store.revoke(name)
            return ""
        finally:
            await pool.close()

    name = f"ui-revoked-{secrets.token_hex(4)}"
    key = off_loop(asyncio.run, keys("create", name))
    context = browser.new_context(base_url=api, viewport=DESKTOP)
    try:
        page = context.new_page()
        # By keyboard alone: the key field has the focus, Enter signs in, Tab reaches the form.
        page.goto("/ui/login")
        page.keyboard.type(key)
        page.keyboard.press("Enter")
        page.wait_for_url("**/ui/")
        focused = []
        for _ in range(16):
            page.keyboard.press("Tab")
            focused.append(
                page.evaluate(
                    "document.activeElement.id || document.activeElement.textContent.trim()"
                )
            )
        assert focused.index("target") < focused.index("ports") < focused.index("Start scan")
        (signed_in,) = context.cookies()
        off_loop(asyncio.run, keys("revoke", name))
        page.goto("/ui/targets")
        assert page.url.endswith("/ui/login?reason=revoked")
        expect(page.get_by_role("status")).to_contain_text("revoked")
        # The signed-in cookie was replaced by the sign-in form's own, which signs nobody in.
        assert [c["value"] for c in context.cookies()] != [signed_in["value"]]
        page.goto("/ui/")
        assert "/ui/login" in page.url
    finally:
        context.close()


def test_rate_limited_then_gateway_gone_each_say_what_to_do(
    browser: Browser,
    settings: Settings,
    run_dir: Path,
    database: str,
    redis_client: object,  # removes this run's Redis keys, the ones under the own prefix too
    api_key: str,
) -> None:
    # A gateway of its own with a limit of one scan a minute, counted under its own prefix.
    stack = ExitStack()
    limited = off_loop(
        stack.enter_context,
        own_stack(
            settings,
            run_dir,
            "ui-limited",
            rate_limit_per_minute=1,
            redis_prefix=f"{settings.redis_prefix}ui-limited:",
        ),
    )
    context = browser.new_context(base_url=base_url(limited), viewport=DESKTOP)
    try:
        page = context.new_page()
        sign_in(page, api_key)
        submit(page, "127.0.0.1", "1")
        statuses: list[int] = []
        page.on("response", lambda response: statuses.append(response.status))
        error = page.locator("#form-error")
        # The limit counts per clock minute: the first two submissions may fall either side of
        # a minute's end, the third cannot.
        for _ in range(2):
            page.goto("/ui/")
            page.locator("#target").fill("127.0.0.1")
            page.get_by_role("button", name="Start scan").click()
            expect(error.or_(page.get_by_role("heading", name="Scan of 127.0.0.1"))).to_be_visible()
            if error.count():
                break
        expect(error).to_contain_text(re.compile(r"try again in \d+ seconds"))
        assert 429 in statuses

        # The list refreshes itself while a scan is queued; with the gateway gone it says so.
        page.goto("/ui/")
        expect(page.locator("#scan-table[hx-trigger]")).to_have_count(1)
        off_loop(stack.close)
        expect(page.locator("#net-error")).to_be_visible(timeout=10_000)
        expect(page.locator("#net-error")).to_contain_text("Cannot reach the API")
    finally:
        context.close()
        off_loop(stack.close)
