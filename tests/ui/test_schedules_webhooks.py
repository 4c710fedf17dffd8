"""Schedules and webhooks in the dashboard, in a real browser, against a gateway and a dispatcher
of this run that may send webhooks to loopback, and the run's real worker.

Every scan targets 127.0.0.0/8; every webhook goes to a receiver on 127.0.0.1 that verifies the
Standard Webhooks signature with the secret the page showed.
"""

from __future__ import annotations

import re
import secrets
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from bench._stack import settings_env
from shared.settings import Settings
from tests.conftest import Process, base_url, start_api, variant, wait_final, wait_until
from tests.support.browser import Watch, shoot, signed_in_page, submit
from tests.support.webhook_receiver import Receiver, webhook_receiver

pytestmark = pytest.mark.e2e

LOOPBACK = ("127.0.0.0/8", "::1/128")


@pytest.fixture(scope="module")
def hooks_settings(settings: Settings, run_dir: Path) -> Settings:
    # The run's queue, so the session's worker runs this gateway's scans.
    return variant(
        settings,
        "ui-hooks",
        run_dir,
        queue_prefix=settings.queue_prefix,
        webhook_allow_networks=LOOPBACK,
        dispatcher_interval=0.2,
        dispatcher_heartbeat_file=str(run_dir / "ui-dispatcher.heartbeat"),
    )


@pytest.fixture(scope="module")
def hooks_api(hooks_settings: Settings, run_dir: Path, database: str) -> Iterator[str]:
    process = start_api(hooks_settings, run_dir / "api-ui-hooks.log")
    try:
        yield base_url(hooks_settings)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def dispatcher(hooks_settings: Settings, run_dir: Path, database: str) -> Iterator[Process]:
    heartbeat = Path(hooks_settings.dispatcher_heartbeat_file)
    heartbeat.unlink(missing_ok=True)
    process = Process(
        [sys.executable, "-m", "api_service.dispatcher"],
        settings_env(hooks_settings),
        run_dir / "ui-dispatcher.log",
    )
    try:
        wait_until(heartbeat.exists, "dispatcher heartbeat", process)
        yield process
    finally:
        process.stop()


@pytest.fixture
def hooks_page(browser: Browser, hooks_api: str, api_key: str) -> Iterator[Page]:
    with signed_in_page(browser, hooks_api, api_key) as page:
        page.context.set_default_timeout(15_000)
        yield page


def shown(moment: str) -> str:
    """A time as the dashboard shows it."""
    return datetime.fromisoformat(moment).strftime("%Y-%m-%d %H:%M:%S UTC")


def reload_until(page: Page, row: Locator, state: str, timeout: float = 20) -> None:
    """The delivery log is a plain page: reload it until ``row`` reaches ``state``."""
    deadline = time.monotonic() + timeout
    while row.get_attribute("data-state") != state:
        assert time.monotonic() < deadline, f"delivery never {state}: {row.inner_text()}"
        time.sleep(0.1)
        page.reload()


def test_a_schedule_is_listed_with_its_next_run_paused_resumed_and_run_now(
    hooks_page: Page,
    client: httpx.Client,
    worker: object,
    listeners: list[int],
    screenshots: Path | None,
) -> None:
    page = hooks_page
    name = f"nightly-{secrets.token_hex(3)}"
    page.goto("/ui/schedules")
    # A form post without the session's CSRF token is refused, as on every other page.
    forged = page.request.post("/ui/schedules", form={"target": "127.0.0.1", "cron": "* * * * *"})
    assert forged.status == 403
    # A cron expression the API refuses comes back with its message and the form filled in.
    page.locator("#s-name").fill(name)
    page.locator("#s-target").fill("127.0.0.1")
    page.locator("#s-ports").fill(",".join(map(str, listeners)))
    page.locator("#s-cron").fill("61 2 * * *")
    page.locator("#s-timezone").fill("Europe/Berlin")
    page.locator("#s-timeout").fill("0.5")
    page.locator("#s-exclude").fill("127.0.0.9")
    page.get_by_role("button", name="Create schedule").click()
    expect(page.locator("#form-error")).to_contain_text("cron")
    expect(page.locator("#s-name")).to_have_value(name)
    page.locator("#s-cron").fill("30 2 * * *")
    page.get_by_role("button", name="Create schedule").click()
    page.wait_for_url("**/ui/schedules")
    # From here on nothing may fail (the refused form's 422 is a console error in Chromium).
    watch = Watch(page.context)

    row = page.locator("tr[data-schedule-id]", has_text=name)
    expect(row).to_have_attribute("data-enabled", "true")
    schedule_id = row.get_attribute("data-schedule-id")
    stored = client.get(f"/api/schedules/{schedule_id}").json()
    assert stored["timezone"] == "Europe/Berlin"
    assert stored["exclude"] == ["127.0.0.9/32"]
    expect(row).to_contain_text("except 127.0.0.9/32")
    # 02:30 in Berlin in December is 01:30 UTC.
    assert shown(stored["next_run_at"]).endswith(" 01:30:00 UTC")
    expect(row.locator(".next-run")).to_have_text(shown(stored["next_run_at"]))

    row.get_by_role("button", name="Pause").click()
    expect(row).to_have_attribute("data-enabled", "false")
    expect(row.locator(".next-run")).to_have_text("paused")
    assert client.get(f"/api/schedules/{schedule_id}").json()["enabled"] is False
    row.get_by_role("button", name="Resume").click()
    expect(row).to_have_attribute("data-enabled", "true")
    resumed = client.get(f"/api/schedules/{schedule_id}").json()
    expect(row.locator(".next-run")).to_have_text(shown(resumed["next_run_at"]))
    shoot(page, screenshots, "schedules")

    page.goto("/ui/targets")
    # Exact: other tests of the run scan targets such as 127.0.0.16/28 under the same key.
    heading = page.get_by_role("heading", name="127.0.0.1", exact=True)
    section = page.locator("section.target", has=heading)
    expect(section.locator(".next-run")).to_contain_text(shown(resumed["next_run_at"]))

    # An ordinary scan of the same target, which the schedule's filter leaves out.
    other = client.post("/api/scan", json={"target": "127.0.0.1", "ports": "1"}).json()["task_id"]
    page.goto("/ui/schedules")
    row.get_by_role("button", name="Run now").click()
    page.wait_for_url(re.compile(rf"/ui/\?schedule_id={schedule_id}$"))
    expect(page.locator("#f-schedule")).to_have_value(str(schedule_id))
    runs = page.locator("tr[data-task-id]")
    expect(runs).to_have_count(1)
    expect(runs.locator("td.schedule")).to_have_text(name)
    task = runs.get_attribute("data-task-id")
    assert task is not None
    assert task != other
    # The list refreshes itself while the run is active.
    expect(runs).to_have_attribute("data-state", "completed", timeout=30_000)
    final = wait_final(client, task)
    assert sorted(p["port"] for p in final["result"]["open_ports"]) == sorted(listeners)
    listed = client.get("/api/scans", params={"schedule_id": schedule_id}).json()["items"]
    assert [(item["task_id"], item["schedule_id"]) for item in listed] == [(task, schedule_id)]

    page.goto("/ui/schedules")
    row.get_by_role("button", name="Delete").click()
    page.wait_for_url("**/ui/schedules")
    expect(row).to_have_count(0)
    assert client.get(f"/api/schedules/{schedule_id}").status_code == 404
    wait_final(client, other)
    assert watch.problems == []


def test_a_webhook_shows_its_secret_once_and_its_deliveries_which_redeliver(
    browser: Browser,
    hooks_page: Page,
    hooks_api: str,
    other_api_key: str,
    client: httpx.Client,
    worker: object,
    dispatcher: Process,
    screenshots: Path | None,
) -> None:
    page = hooks_page
    watch = Watch(page.context)
    # An address of its own: no other test's scan is one this webhook listens for.
    address = f"127.{secrets.randbelow(200) + 50}.{secrets.randbelow(250) + 1}.17"
    receiver: Receiver
    with webhook_receiver() as receiver:
        page.goto("/ui/webhooks")
        page.locator("#w-url").fill(receiver.url)
        page.get_by_label("scan.completed").check()
        page.locator("#w-target").fill(address)
        page.get_by_role("button", name="Create webhook").click()
        secret = page.locator("#webhook-secret").inner_text()
        assert secret.startswith("whsec_")
        receiver.secret = secret
        page.goto("/ui/webhooks")
        assert secret not in page.content()
        hook = page.locator("tr[data-webhook-id]", has_text=receiver.url)
        expect(hook).to_contain_text("scan.completed, ports.changed")
        webhook_id = hook.get_attribute("data-webhook-id")

        task = submit(page, address, "1")
        wait_final(client, task)
        receiver.wait_for(1)
        (event,) = receiver.events()
        assert event["type"] == "scan.completed"
        assert event["data"]["task_id"] == task

        page.goto("/ui/webhooks")
        hook.get_by_role("link", name="Deliveries").click()
        page.wait_for_url(f"**/ui/webhooks/{webhook_id}")
        delivery = page.locator("#delivery-log tr[data-message-id]")
        expect(delivery).to_have_count(1)
        reload_until(page, delivery, "delivered")
        expect(delivery.locator(".answer")).to_have_text("200")
        expect(delivery).to_contain_text("scan.completed")
        shoot(page, screenshots, "webhook-deliveries")

        delivery.get_by_role("button", name="Redeliver").click()
        page.wait_for_url(f"**/ui/webhooks/{webhook_id}")
        receiver.wait_for(2)
        first, again = receiver.received
        assert again.headers["webhook-id"] == first.headers["webhook-id"]
        assert [e["data"]["task_id"] for e in receiver.events()] == [task, task]
        reload_until(page, delivery, "delivered")
        expect(delivery).to_have_count(1)

    # Another key sees neither the webhook nor its log, and cannot redeliver from it.
    with signed_in_page(browser, hooks_api, other_api_key) as other:
        response = other.goto(f"/ui/webhooks/{webhook_id}")
        assert response is not None
        assert response.status == 404
        other.goto("/ui/webhooks")
        expect(other.locator(f'tr[data-webhook-id="{webhook_id}"]')).to_have_count(0)
        token = other.locator("input[name=csrf]").first.input_value()
        message_id = delivery.get_attribute("data-message-id")
        url = f"/ui/webhooks/{webhook_id}/deliveries/{message_id}/redeliver"
        assert other.request.post(url, form={"csrf": token}).status == 404

    page.goto("/ui/webhooks")
    hook.get_by_role("button", name="Delete").click()
    page.wait_for_url("**/ui/webhooks")
    expect(hook).to_have_count(0)
    assert client.get(f"/api/webhooks/{webhook_id}").status_code == 404
    assert watch.problems == []
