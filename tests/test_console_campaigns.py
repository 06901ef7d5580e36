"""The console's campaign pages in Debian's Chromium, on both stores: the list and a campaign's funnel
(figures, the chart, skips) after real deliveries, pause and resume, a preview as a customer (audited),
the TOML editor (problems inline, nothing written until valid, reload, the audit log's diff), a new
campaign from a demo campaign, and a manager who may look but not change anything.

Every test serves a copy of the demo campaigns in its own folder: the editor writes campaign files, and
the repository's ``campaigns/`` (the ``console`` fixture's) must never change."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page
from sqlalchemy import select

from scrm import coupons
from scrm.campaigns.definitions import campaigns_folder
from scrm.messages import InboundEvent
from scrm.store.engine import writing
from scrm.store.models import AuditEntry, Campaign, CampaignRun, CouponCode, Customer, Delivery
from tests.conftest import ROOT, eventually
from tests.console_support import Console, page, screenshot, serve, sign_in  # noqa: F401 (fixtures)


@pytest.fixture
async def console(make_config: Any, tmp_path: Path) -> AsyncIterator[Console]:
    """The service on a copy of the demo campaigns in the test's folder (the editor writes there)."""
    folder = tmp_path / "campaigns"
    shutil.copytree(ROOT / "campaigns", folder)
    async for running in serve(make_config({"campaigns": {"path": str(folder)}})):
        yield running


def folder_of(console: Console) -> Path:
    folder = campaigns_folder(console.service.config)
    assert folder != ROOT / "campaigns"
    return folder


async def paused_in_store(console: Console, name: str) -> bool | None:
    return await console.read(lambda s: s.scalar(select(Campaign.paused).where(Campaign.name == name)))


async def edits(console: Console) -> list[AuditEntry]:
    return list(await console.read(lambda s: s.scalars(
        select(AuditEntry).where(AuditEntry.action == "campaign_edit").order_by(AuditEntry.id))))


async def say(console: Console, user: str, text: str, msg_id: str) -> None:
    await console.service.receive(InboundEvent("console", "local", user, "text", text=text, platform_msg_id=msg_id,
                                               display_name=user))


async def test_an_operator_pauses_and_resumes_a_campaign(console: Console, page: Page) -> None:
    now = console.service.clock.now()
    async with writing(console.service.sessions) as session:  # the weekly post failed to plan last Monday
        session.add(CampaignRun(campaign="weekly-groups", occurrence="2026-11-30", status="failed", scheduled_at=now,
                                ran_at=now, planned=0, error="OperationalError: disk I/O error"))
    await console.add_staff("olive", "operator")
    await sign_in(page, console, "olive")
    await page.goto(f"{console.url}/console/campaigns")
    assert "1 campaign(s) failed to plan" in await page.locator("p[role=alert]").inner_text()
    assert "FAILED" in await page.locator("tr[data-campaign=weekly-groups]").inner_text()
    await page.goto(f"{console.url}/console/campaigns/weekly-groups")
    failed = page.locator("table.runs tr[data-status=failed]")
    assert "OperationalError: disk I/O error" in await failed.inner_text()
    await page.goto(f"{console.url}/console/campaigns")
    row = page.locator("tr[data-campaign=winback]")
    assert await row.locator("[data-state]").get_attribute("data-state") == "active"
    await row.locator("a").first.click()
    await page.wait_for_url(f"{console.url}/console/campaigns/winback")

    await page.click("button:has-text('Pause')")
    await page.wait_for_url(f"{console.url}/console/campaigns/winback?notice=paused")
    assert await page.locator("dd[data-state]").get_attribute("data-state") == "paused"
    assert await paused_in_store(console, "winback") is True
    assert "winback" in console.service.paused
    await page.goto(f"{console.url}/console/campaigns")
    assert await row.locator("[data-state]").get_attribute("data-state") == "paused"

    await page.goto(f"{console.url}/console/campaigns/winback")
    await page.click("button:has-text('Resume')")
    await page.wait_for_url(f"{console.url}/console/campaigns/winback?notice=resumed")
    assert await page.locator("dd[data-state]").get_attribute("data-state") == "active"
    assert await paused_in_store(console, "winback") is False
    assert "winback" not in console.service.paused


async def test_an_edit_is_saved_only_when_valid_then_reloaded_and_audited(console: Console, page: Page) -> None:
    path = folder_of(console) / "winback.toml"
    before = path.read_text("utf-8")
    await console.add_staff("olive", "operator")
    await sign_in(page, console, "olive")
    await page.goto(f"{console.url}/console/campaigns/winback")
    await page.click("text=Edit TOML")
    await page.wait_for_url(f"{console.url}/console/campaigns/winback/edit")
    assert await page.input_value("#toml") == before  # the file as it is, first line included

    broken = before.replace("days = 30", "days = 0").replace("[coupon]", "[coupon]\ncolour = 'red'")
    await page.fill("#toml", broken)
    await page.click("button:has-text('Save')")
    problems = page.locator("#toml-problems")
    assert await page.get_attribute("#toml", "aria-describedby") == "toml-problems"  # the problems belong to it
    assert await page.get_attribute("#toml", "aria-invalid") == "true"
    assert "winback.toml" in await problems.inner_text()
    assert "greater than 0" in await problems.locator("li[data-key='trigger.days']").inner_text()
    assert "unknown key" in await problems.locator("li[data-key='coupon.colour']").inner_text()
    assert await page.input_value("#toml") == broken  # the operator's text is kept to mend
    assert path.read_text("utf-8") == before
    assert console.service.campaigns["winback"].definition.trigger.days == 30
    assert await edits(console) == []

    fixed = broken.replace("days = 0", "days = 45").replace("\ncolour = 'red'", "")
    await page.fill("#toml", fixed)
    await page.click("button:has-text('Save')")
    await page.wait_for_url(f"{console.url}/console/campaigns/winback?notice=saved")
    assert path.read_text("utf-8") == fixed
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    loaded = console.service.campaigns["winback"]  # reloaded at once, not at the next 5 s check
    assert loaded.definition.trigger.days == 45
    assert loaded.digest == hashlib.sha256(fixed.encode()).hexdigest()
    assert await console.read(lambda s: s.scalar(select(Campaign.definition_hash).where(Campaign.name == "winback"))) \
        == loaded.digest
    assert await page.locator("#file-state").count() == 0  # what runs is the file on disk
    [entry] = await edits(console)
    assert (entry.actor, entry.role, entry.via, entry.customer_id) == ("console:olive", "operator", "console", None)
    assert entry.detail is not None
    assert entry.detail.startswith("edited campaign winback (winback.toml)\n--- a/winback.toml\n+++ b/winback.toml")
    assert "\n-days = 30\n+days = 45\n" in entry.detail

    # the page saw the file as it was: a change made since (by hand here) is not overwritten
    await page.goto(f"{console.url}/console/campaigns/winback/edit")
    path.write_text(fixed.replace("days = 45", "days = 50"), "utf-8")
    await page.fill("#toml", fixed.replace("days = 45", "days = 40"))
    await page.click("button:has-text('Save')")
    assert "changed since this page was opened" in await page.locator("#toml-problems").inner_text()
    assert "days = 50" in path.read_text("utf-8")
    assert len(await edits(console)) == 1


async def test_a_new_campaign_from_a_demo_campaign(console: Console, page: Page) -> None:
    folder = folder_of(console)
    await console.add_staff("olive", "operator")
    await sign_in(page, console, "olive")
    await page.goto(f"{console.url}/console/campaigns")
    await page.select_option("select[name=template]", "winback")
    await page.click("button:has-text('New campaign')")
    await page.wait_for_url(f"{console.url}/console/campaigns/_new?template=winback")
    template = await page.input_value("#toml")
    assert template == (ROOT / "campaigns" / "winback.toml").read_text("utf-8")
    assert await page.is_checked("input[name=paused]")  # a new campaign starts paused unless told otherwise

    await page.click("button:has-text('Create')")  # the template as it is: its name is taken
    taken = page.locator("#toml-problems li[data-key=name]")
    assert "already" in await taken.inner_text() and "winback.toml" in await taken.inner_text()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (ROOT / "campaigns").iterdir())

    text = template.replace('name = "winback"', 'name = "winback-60"').replace("days = 30", "days = 60")
    await page.fill("#toml", text)
    await page.click("button:has-text('Create')")
    await page.wait_for_url(f"{console.url}/console/campaigns/winback-60?notice=created")
    assert (folder / "winback-60.toml").read_text("utf-8") == text
    assert console.service.campaigns["winback-60"].definition.trigger.days == 60
    assert await page.locator("dd[data-state]").get_attribute("data-state") == "paused"
    assert await paused_in_store(console, "winback-60") is True and "winback-60" in console.service.paused
    [entry] = await edits(console)
    assert entry.customer_id is None and entry.actor == "console:olive" and entry.detail is not None
    assert entry.detail.startswith("new campaign winback-60 (winback-60.toml) from the demo campaign winback\n"
                                   "--- /dev/null\n+++ b/winback-60.toml")
    assert '\n+name = "winback-60"\n' in entry.detail and "\n+days = 60\n" in entry.detail
    await page.goto(f"{console.url}/console/campaigns")
    assert await page.locator("tr[data-campaign=winback-60] [data-state]").get_attribute("data-state") == "paused"


async def test_a_manager_looks_and_previews_but_changes_nothing(console: Console, page: Page) -> None:
    folder = folder_of(console)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    await say(console, "alice", "你好", "m-alice")
    alice = await console.read(lambda s: s.scalar(select(Customer.id).where(Customer.display_name == "alice")))
    assert alice is not None
    await console.add_staff("maria", "manager")
    await sign_in(page, console, "maria")
    await page.goto(f"{console.url}/console/campaigns")
    assert await page.locator("tr[data-campaign]").count() == len(console.service.campaigns)
    assert await page.locator("select[name=template]").count() == 0  # no new-campaign form
    await page.goto(f"{console.url}/console/campaigns/winback")
    assert await page.locator("form[action$='/pause'], form[action$='/resume'], a[href$='/edit']").count() == 0

    # preview as a customer: the manager sees her name in the text, and the log has the view
    await page.fill("input[name=customer]", "console:alice")
    await page.click("button:has-text('Preview')")
    await page.locator("#preview pre.message").first.wait_for()
    assert "alice,好久不见" in await page.locator("#preview").inner_text()
    assert page.url == f"{console.url}/console/campaigns/winback"  # htmx swapped the part in
    views = await console.read(lambda s: s.execute(select(AuditEntry.actor, AuditEntry.customer_id, AuditEntry.detail)
                                                   .where(AuditEntry.action == "view")))
    assert list(views) == [("console:maria", alice, "campaign preview winback")]
    await page.fill("input[name=customer]", "console:nobody")
    await page.click("button:has-text('Preview')")
    await page.locator("#preview [role=alert]").wait_for()
    assert await page.locator("#preview [role=alert]").inner_text() == "no customer console:nobody"

    # a forged post with the manager's own valid CSRF token is refused by role
    csrf = await page.locator("input[name=_csrf]").first.get_attribute("value")
    assert csrf
    edited = files["winback.toml"].decode().replace("days = 30", "days = 45")
    base = hashlib.sha256(files["winback.toml"]).hexdigest()
    for path, form in [("/console/campaigns/winback/pause", {}),
                       ("/console/campaigns/winback/edit", {"toml": edited, "base": base}),
                       ("/console/campaigns/_new", {"toml": edited.replace('"winback"', '"forged"'), "paused": "on"})]:
        refused = await page.request.post(f"{console.url}{path}", form={"_csrf": csrf, **form})
        assert refused.status == 403, path
        assert "needs the operator role" in await refused.text()
    refused = await page.request.get(f"{console.url}/console/campaigns/winback/edit")
    assert refused.status == 403
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    assert await paused_in_store(console, "winback") is False and not console.service.paused
    assert "forged" not in console.service.campaigns and await edits(console) == []


WELCOME_AB = '''# Welcome with a coupon, two wordings
name = "welcome"
title = "欢迎 + 新人券 Welcome with a coupon"
kind = "lifecycle"

[trigger]
event = "first_message"

[coupon]
pool = "welcome"

[message]
text = "{{ customer.name }},欢迎!送您 {{ coupon.value }} 元新人券:{{ coupon.code }}"
variants = [
  { name = "A", weight = 50, text = "{{ customer.name }},欢迎!送您 {{ coupon.value }} 元新人券:{{ coupon.code }}" },
  { name = "B", weight = 50, text = "{{ customer.name }},新人专享 {{ coupon.value }} 元券:{{ coupon.code }},下单即用" },
]
'''


async def test_the_campaign_page_shows_the_funnel_after_deliveries(console: Console, page: Page) -> None:
    (folder_of(console) / "welcome.toml").write_text(WELCOME_AB, "utf-8")  # by hand, as an operator would
    assert await console.service.reload_campaigns()
    people = ["amy", "bo", "cai", "dan", "eve", "fang", "gus", "hua"]
    for name in people:
        await say(console, name, "你好", f"hi-{name}")
    await say(console, "zoe", "退订", "td-zoe")  # her first message opts her out: her welcome is skipped

    async def all_finished() -> bool:
        await console.service.outbox.tick()
        statuses = await console.read(lambda s: s.scalars(select(Delivery.status).where(Delivery.campaign == "welcome")))
        return sorted(statuses) == ["sent"] * len(people) + ["skipped"]

    await eventually(all_finished)
    for name in people[:3]:
        await say(console, name, "谢谢", f"thanks-{name}")
    async with writing(console.service.sessions) as session:
        code = await session.scalar(select(CouponCode.code).join(Customer, Customer.id == CouponCode.customer_id)
                                    .where(Customer.display_name == "amy"))
        assert code is not None
        assert (await coupons.redeem(session, code, console.service.clock.now(), via="cli")).status == "redeemed"
    variants = dict(list(await console.read(lambda s: s.execute(
        select(Delivery.variant, Delivery.id).where(Delivery.campaign == "welcome", Delivery.status == "sent")))))
    assert set(variants) == {"A", "B"}  # eight customers split between the two wordings

    await console.add_staff("maria", "manager")
    await sign_in(page, console, "maria")
    await page.goto(f"{console.url}/console/campaigns")
    welcome = page.locator("tr[data-campaign=welcome]")
    assert [await welcome.locator(f"td[data-step={s}]").inner_text()
            for s in ("audience", "sent", "delivered", "replied", "clicked", "redeemed", "converted")] == \
        ["9", "8", "8", "3", "0", "1", "1"]
    await welcome.locator("a").first.click()
    await page.wait_for_url(f"{console.url}/console/campaigns/welcome")
    figure = page.locator(".figure[data-figure=delivered]")
    assert (await figure.inner_text()).startswith("8") and "100%" in await figure.inner_text()
    assert (await page.locator(".figure[data-figure=replied]").inner_text()).startswith("3")
    assert (await page.locator(".figure[data-figure=clicked]").inner_text()).startswith("0")
    groups = page.locator("table[data-split=variant] tr[data-group]")
    # the skipped welcome never got a variant: it is counted apart, in the audience only
    assert sorted(await groups.evaluate_all("rows => rows.map(r => r.dataset.group)")) == ["-", "A", "B"]
    assert (await page.locator("tr[data-group='-'] td").all_inner_texts())[:3] == ["-", "1", "0 0%"]
    assert "console" in await page.locator("table[data-split=channel]").inner_text()
    assert await page.locator("table.skips tr[data-reason=opted_out] td.num").inner_text() == "1"

    chart = page.locator("img.chart").first
    await page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=await chart.element_handle())
    png = await page.request.get(f"{console.url}{await chart.get_attribute('src')}")
    assert png.status == 200 and png.headers["content-type"] == "image/png"
    assert (await png.body()).startswith(b"\x89PNG\r\n\x1a\n")
    by_channel = await page.request.get(f"{console.url}/console/campaigns/welcome/funnel.png?by=channel")
    assert by_channel.status == 200 and (await by_channel.body()).startswith(b"\x89PNG")
    nothing = await page.request.get(f"{console.url}/console/campaigns/winback/funnel.png")
    assert nothing.status == 404  # planned nothing yet: no chart, and the page says so
    await page.fill("input[name=customer]", "console:amy")
    await page.click("button:has-text('Preview')")
    await page.locator("#preview pre.message").first.wait_for()
    await screenshot(page, "campaign")
