"""The console under test: the real application (``scrm.web.create_app``) served on a loopback port, and
Debian's Chromium driven by Playwright's async API in the same event loop as the test.

Fixtures: ``console`` (the running service, its URL, helpers to add staff and read the store) and
``page`` (a fresh browser page). Screenshots go to ``docs/screenshots/``, which the README shows.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from playwright.async_api import Page, async_playwright
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.config import Config, Role
from scrm.console import accounts
from scrm.messages import InboundEvent
from scrm.service import Service
from scrm.store.engine import writing
from scrm.web import SERVICE, create_app
from tests.conftest import ROOT

T = TypeVar("T")
SCREENSHOTS = ROOT / "docs" / "screenshots"
PASSWORD = "correct horse battery"
#: Flags for a headless Chromium on a machine without a display or network (as root in CI).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium() -> str:
    """The system Chromium (Debian's package); tests never download a browser."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("the console's browser tests need Debian's chromium: apt-get install -y chromium (.ci/run does)")
    return found


@dataclass
class Console:
    """The service as ``scrm run`` serves it (its cleanup context starts the service and scheduler)."""

    url: str
    service: Service
    sent: int = 0

    async def say(self, user: str, text: str, kind: str = "text", name: str | None = None,
                  **payload: Any) -> int | None:
        """A customer (or staff member) writes through the console channel; their customer id."""
        self.sent += 1
        reaction = await self.service.receive(InboundEvent(
            "console", "local", user, kind, text=text, payload=payload, display_name=name,
            platform_msg_id=f"{user}-{self.sent}"))
        return reaction.customer_id

    async def settle(self) -> None:
        """The outbox until quiet (welcomes with their coupons), then the profile refresh (stages) the
        scheduler runs every few seconds."""
        while await self.service.outbox.tick():
            pass
        await self.service.refresh_touched()

    async def add_staff(self, name: str, role: Role, identity: str | None = None) -> None:
        async with writing(self.service.sessions) as session:
            await accounts.add_account(session, name, role, PASSWORD, self.service.clock.now(), identity)

    async def read(self, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
        async with self.service.sessions() as session:
            return await fn(session)


async def serve(config: Config) -> AsyncIterator[Console]:
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Console(f"http://127.0.0.1:{port}", app[SERVICE])
    finally:
        await runner.cleanup()


@pytest.fixture
async def console(make_config: Any) -> AsyncIterator[Console]:
    async for running in serve(make_config()):
        yield running


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS, headless=True)
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN")
            context.set_default_timeout(30_000)
            yield await context.new_page()
        finally:
            await browser.close()


async def sign_in(page: Page, console: Console, name: str, password: str = PASSWORD) -> None:
    await page.goto(f"{console.url}/console/login")
    await page.fill("input[name=name]", name)
    await page.fill("input[name=password]", password)
    await page.click("button[type=submit]")
    await page.wait_for_load_state()


async def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
