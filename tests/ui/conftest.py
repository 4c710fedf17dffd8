"""One Chromium (Debian's, driven by Playwright) for the dashboard's tests, and signed-in pages."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests import needs
from tests.support.browser import DESKTOP, sign_in


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = needs.tool("chromium")
    # Chromium's sandbox needs user namespaces it cannot have as root (CI runs as root).
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=args)
        yield browser
        browser.close()


@pytest.fixture
def context(browser: Browser, api: str) -> Iterator[BrowserContext]:
    context = browser.new_context(base_url=api, viewport=DESKTOP, accept_downloads=True)
    context.set_default_timeout(15_000)
    yield context
    context.close()


@pytest.fixture
def page(context: BrowserContext, api_key: str) -> Page:
    """A page signed in with the run's first key."""
    page = context.new_page()
    sign_in(page, api_key)
    return page


@pytest.fixture(scope="session")
def screenshots() -> Path | None:
    """Where ``make screenshots`` wants the README's pictures; None in ordinary runs."""
    target = os.environ.get("UI_SCREENSHOTS_DIR")
    return Path(target) if target else None
