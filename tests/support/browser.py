"""Driving the dashboard in Playwright: signing in, submitting, reading tables, watching for
anything that should not happen, and taking the README's screenshots."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
from playwright.sync_api import Browser, BrowserContext, Page, ViewportSize

PHONE: ViewportSize = {"width": 390, "height": 844}
DESKTOP: ViewportSize = {"width": 1280, "height": 900}

T = TypeVar("T")
TASK_URL = re.compile(r"/ui/scans/[0-9a-f-]{36}$")

# Runs before the page's own scripts, outside its Content-Security-Policy: it records what the
# server-sent events put on the page, since the live parts are gone once the result replaces them.
RECORDER = """
window.__seen = {progress: [], livePorts: 0};
document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver(() => {
    const bar = document.querySelector("#progress progress");
    if (bar) window.__seen.progress.push(Number(bar.value));
    const rows = document.querySelectorAll("#live-ports tbody tr").length;
    window.__seen.livePorts = Math.max(window.__seen.livePorts, rows);
  }).observe(document.body, {childList: true, subtree: true});
});
"""


def off_loop(function: Callable[..., T], *args: Any) -> T:
    """Run ``function`` in another thread: Playwright's sync API keeps an event loop running in
    this one, so code that runs its own (``asyncio.run``) cannot run here."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(function, *args).result()


class Watch:
    """Dialogs, uncaught errors and console errors (CSP violations among them) of a context."""

    def __init__(self, context: BrowserContext) -> None:
        self.problems: list[str] = []
        context.on("page", self.attach)
        for page in context.pages:
            self.attach(page)

    def attach(self, page: Page) -> None:
        page.on("dialog", lambda dialog: self._dialog(dialog.message, dialog))
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        page.on(
            "response",
            lambda r: self.problems.append(f"{r.status} {r.url}") if r.status >= 500 else None,
        )
        page.on(
            "console",
            lambda msg: (
                self.problems.append(f"console: {msg.text}") if msg.type == "error" else None
            ),
        )

    def _dialog(self, message: str, dialog: Any) -> None:
        self.problems.append(f"dialog: {message}")
        dialog.dismiss()


def submit(page: Page, target: str, ports: str, *, timeout: str = "1.0") -> str:
    page.goto("/ui/")
    page.locator("#target").fill(target)
    page.locator("#ports").fill(ports)
    page.locator("#timeout").fill(timeout)
    page.get_by_role("button", name="Start scan").click()
    page.wait_for_url(TASK_URL)
    return page.url.rsplit("/", 1)[1]


def result_rows(page: Page) -> list[list[str]]:
    page.locator("#result-table").wait_for(timeout=30_000)
    rows = page.locator("#result-table tbody tr")
    return [
        [cell.strip() for cell in rows.nth(i).locator("td").all_inner_texts()]
        for i in range(rows.count())
    ]


def api_rows(result: dict[str, Any]) -> list[list[str]]:
    fields = ("address", "port", "state", "service", "product", "version", "banner")
    return [[str(p.get(f) or "") for f in fields] for p in result["open_ports"]]


def shoot(page: Page, folder: Path | None, name: str) -> None:
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size(DESKTOP)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.screenshot(path=folder / f"{name}.png", full_page=True)
    page.set_viewport_size(PHONE)
    page.screenshot(path=folder / f"{name}-phone.png", full_page=True)
    page.set_viewport_size(DESKTOP)


def sign_in(page: Page, key: str) -> None:
    page.goto("/ui/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/ui/")


@contextmanager
def signed_in_page(browser: Browser, base_url: str, key: str) -> Iterator[Page]:
    """A page of a context of its own, signed in with ``key`` (another key's view)."""
    context = browser.new_context(base_url=base_url, viewport=DESKTOP)
    try:
        page = context.new_page()
        sign_in(page, key)
        yield page
    finally:
        context.close()


def wait_running(client: httpx.Client, task: str) -> None:
    deadline = time.monotonic() + 15
    while client.get(f"/api/scan/{task}").json()["state"] not in ("STARTED", "PROGRESS"):
        assert time.monotonic() < deadline, f"scan {task} never started"
        time.sleep(0.05)
