"""Console sign-in, in Debian's Chromium: passwords (argon2id), throttling, sessions in HttpOnly
SameSite cookies with idle expiry, CSRF tokens, single-use links from chat."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from playwright.async_api import Page
from sqlalchemy import func, select

from scrm.clock import ManualClock
from scrm.console import accounts
from scrm.console.sessions import COOKIE
from scrm.messages import InboundEvent
from scrm.store.engine import writing
from scrm.store.models import ConsoleSession, SignInFailure, StaffAccount
from scrm.web import SERVICE, create_app
from tests.console_support import PASSWORD, Console, console, page, sign_in  # noqa: F401 (fixtures)


async def test_sign_in_cookie_and_sign_out(console: Console, page: Page) -> None:
    await console.add_staff("olive", "operator")
    await page.goto(f"{console.url}/console/?period=30d")
    assert "/console/login" in page.url  # not signed in: sent to sign in, then back
    await page.fill("input[name=name]", "olive")
    await page.fill("input[name=password]", PASSWORD)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{console.url}/console/?period=30d")
    assert await page.locator("h1").inner_text() == "Dashboard 概览"
    assert "olive · operator" in await page.locator("header").inner_text()
    [cookie] = [c for c in await page.context.cookies() if c["name"] == COOKIE]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == "/console"
    ids = await console.read(lambda s: s.scalars(select(ConsoleSession.id)))
    assert len(ids := list(ids)) == 1 and cookie["value"] not in ids  # the store keeps only a hash
    hashed = await console.read(lambda s: s.scalar(select(StaffAccount.password_hash)))
    assert hashed is not None and hashed.startswith("$argon2id$")
    await page.click("text=Sign out 退出")
    await page.wait_for_url(f"{console.url}/console/login")
    await page.goto(f"{console.url}/console/")
    assert "/console/login" in page.url


async def test_wrong_passwords_are_refused_then_throttled(console: Console, page: Page) -> None:
    await console.add_staff("olive", "operator")
    limit = console.service.config.console.max_failures_per_account
    for _ in range(limit):
        await sign_in(page, console, "olive", "not the password")
        assert await page.locator("[role=alert]").inner_text() == "Wrong name or password."
    await sign_in(page, console, "olive")  # the right password, but too late
    assert "Too many failed sign-ins" in await page.locator("[role=alert]").inner_text()
    assert "/console/login" in page.url
    assert await console.read(lambda s: s.scalar(select(func.count()).select_from(SignInFailure))) == limit
    await sign_in(page, console, "nobody", "whatever")  # an unknown name: the same answer as a wrong password
    assert await page.locator("[role=alert]").inner_text() == "Wrong name or password."
    metrics = await (await page.request.get(f"{console.url}/metrics")).text()
    assert 'scrm_console_sign_ins_total{outcome="throttled"}' in metrics


async def test_a_post_without_the_csrf_token_is_refused(console: Console, page: Page) -> None:
    await console.add_staff("olive", "operator")
    await sign_in(page, console, "olive")
    await page.wait_for_url(f"{console.url}/console/")
    refused = await page.request.post(f"{console.url}/console/logout", form={})
    assert refused.status == 403 and "security token" in await refused.text()
    forged = await page.request.post(f"{console.url}/console/logout", form={"_csrf": "guessed"})
    assert forged.status == 403
    await page.goto(f"{console.url}/console/")
    assert await page.locator("h1").inner_text() == "Dashboard 概览"  # still signed in: nothing happened


async def test_console_link_from_chat_signs_in_once(console: Console, page: Page) -> None:
    await console.add_staff("olive", "operator", identity="console:olive")  # [staff] in the demo config

    async def say(user: str, msg_id: str) -> str:
        reaction = await console.service.receive(InboundEvent("console", "local", user, "text", text="/console",
                                                              platform_msg_id=msg_id))
        return "\n".join(reaction.replies)

    link = (await say("olive", "c-1")).split()[-1]
    assert "/console/link/" in link and link.startswith("http://")
    path = link[link.index("/console/link/"):]
    await page.goto(console.url + path)  # a chat app's preview fetch stops here: the link is not used yet
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{console.url}/console/")
    assert "olive · operator" in await page.locator("header").inner_text()
    await page.context.clear_cookies()
    await page.goto(console.url + path)
    await page.click("button[type=submit]")
    assert "used already or has expired" in await page.locator("[role=alert]").inner_text()
    # a staff member with no console account is told how to get one
    assert "scrm staff add NAME --role manager --identity console:bob" in await say("bob", "c-2")


async def test_an_idle_session_ends(aiohttp_client: Any, make_config: Any) -> None:
    clock = ManualClock()
    client = await aiohttp_client(create_app(make_config(), clock))
    service = client.app[SERVICE]
    async with writing(service.sessions) as session:
        await accounts.add_account(session, "olive", "operator", PASSWORD, clock.now())
    form = await client.get("/console/login")
    pre = (await form.text()).split('name="pre" value="')[1].split('"')[0]
    signed = await client.post("/console/login", data={"name": "olive", "password": PASSWORD, "pre": pre},
                               allow_redirects=False)
    assert signed.status == 303
    for _ in range(3):  # each request restarts the idle time
        assert (await client.get("/console/", allow_redirects=False)).status == 200
        clock.advance(timedelta(minutes=29))
    clock.advance(timedelta(minutes=2))  # 31 minutes idle
    ended = await client.get("/console/", allow_redirects=False)
    assert ended.status == 303 and ended.headers["Location"].startswith("/console/login")
