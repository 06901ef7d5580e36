"""The console's Inbox in Debian's Chromium, on both stores: a customer's message opens a conversation
that the list shows by waiting time; an operator reads its thread, replies (an outbox delivery of
``@reply`` with the staff member as actor, then a ``staff_reply`` touchpoint), is told at the reply box
why an empty reply or one outside the channel's reply window is refused (and may send the latter as
the notice template), assigns and resolves; a manager reads and can change nothing, not even with a
forged form. Customers write through the console channel of the real service."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from playwright.async_api import Page
from sqlalchemy import func, select, update

from scrm.store.engine import writing
from scrm.store.models import STAFF_REPLY, AuditEntry, Conversation, Delivery, Touchpoint
from tests.console_support import Console, page, screenshot, serve, sign_in  # noqa: F401 (fixtures)

AGENTS = ["console:olive", "console:tom"]
NOTICE = {"template_id": "tpl-service-reply", "fields": {"first": "{{ customer.name }}", "keyword1": "{{ text }}"}}


@pytest.fixture
async def console(make_config: Any) -> AsyncIterator[Console]:
    """The service with two agents to assign to and a notice template for replies outside the window."""
    async for running in serve(make_config({"staff": {"console:tom": "operator"},
                                            "conversations": {"agents": AGENTS, "notice": NOTICE}})):
        yield running


async def submit(page: Page, selector: str) -> int:
    """Click a form's button and wait for the page it answers with; returns its HTTP status."""
    async with page.expect_navigation() as navigation:
        await page.click(selector)
    response = await navigation.value
    assert response is not None
    return response.status


async def count(console: Console, query: Any) -> int:
    return int(await console.read(lambda s: s.scalar(query)) or 0)


async def conversation_of(console: Console, customer_id: int) -> Conversation:
    conv = await console.read(lambda s: s.scalar(select(Conversation).where(Conversation.customer_id == customer_id)))
    assert conv is not None
    return conv


async def replies(console: Console) -> list[Delivery]:
    return list(await console.read(lambda s: s.scalars(
        select(Delivery).where(Delivery.campaign == STAFF_REPLY).order_by(Delivery.id))))


async def amy_writes(console: Console) -> tuple[int, Conversation]:
    amy = await console.say("amy", "我的订单还没到", name="Amy 艾米")
    assert amy is not None
    await console.settle()
    return amy, await conversation_of(console, amy)


async def test_an_operator_answers_assigns_and_resolves(console: Console, page: Page) -> None:
    amy, conv = await amy_writes(console)
    assert conv.state == "open" and conv.waiting_since is not None
    await console.add_staff("olive", "operator")
    await sign_in(page, console, "olive")
    await page.click("header nav a:has-text('Inbox 会话')")
    await page.wait_for_url(f"{console.url}/console/inbox")
    row = page.locator(f"#inbox [data-conversation='{conv.id}']")
    assert "Amy 艾米" in await row.inner_text() and "我的订单还没到" in await row.inner_text()
    assert "open" in await row.inner_text() and "min" in await row.locator("[data-waiting]").inner_text()
    await page.goto(f"{console.url}/console/inbox?view=mine")  # unassigned or olive's: still listed
    assert await page.locator(f"#inbox [data-conversation='{conv.id}']").count() == 1
    polled = await page.request.get(f"{console.url}/console/inbox/rows?view=all")
    assert polled.status == 200 and "我的订单还没到" in await polled.text()

    await page.click(f"#inbox [data-conversation='{conv.id}'] a")
    await page.wait_for_url(f"{console.url}/console/inbox/{conv.id}")
    assert "我的订单还没到" in await page.locator("#thread .tp.in").last.inner_text()
    assert await count(console, select(func.count()).where(
        AuditEntry.action == "view", AuditEntry.customer_id == amy, AuditEntry.actor == "console:olive",
        AuditEntry.detail == f"console conversation {conv.id}")) == 1

    # An empty reply: the refusal at the box, nothing written.
    assert await submit(page, "#reply button[type=submit]") == 400
    assert await page.locator("#reply-error").inner_text() == "the reply is empty"
    assert await page.locator("#reply-text").get_attribute("aria-invalid") == "true"
    await page.fill("#reply-text", "   \n ")
    assert await submit(page, "#reply button[type=submit]") == 400
    assert await page.locator("#reply-error").get_attribute("data-code") == "empty_reply"
    assert await replies(console) == []
    assert (await conversation_of(console, amy)).state == "open"

    # Assign to the other agent; one outside the agents is refused at the field.
    await page.select_option("#assignee-select", "console:tom")
    assert await submit(page, "#assign button[type=submit]") == 200
    assert (await conversation_of(console, amy)).assignee == "console:tom"
    assert await count(console, select(func.count()).where(Touchpoint.kind == "conversation_assigned",
                                                           Touchpoint.actor == "console:olive")) == 1
    token = await page.locator("#resolve input[name=_csrf]").input_value()
    refused = await page.request.post(f"{console.url}/console/inbox/{conv.id}/assign",
                                      form={"_csrf": token, "assignee": "telegram:666"})
    assert refused.status == 400 and "Choose one of the agents" in await refused.text()
    assert (await conversation_of(console, amy)).assignee == "console:tom"
    await page.goto(f"{console.url}/console/inbox?view=mine")  # console:tom's now, not olive's
    assert await page.locator(f"#inbox [data-conversation='{conv.id}']").count() == 0

    # The reply: queued in the outbox with its author, then sent and recorded as a staff_reply.
    await page.goto(f"{console.url}/console/inbox/{conv.id}")
    await page.fill("#reply-text", "您好，正在为您查询物流 <b>稍等</b>")
    assert await submit(page, "#reply button[type=submit]") == 200
    assert await page.locator("[role=status]").inner_text() == "Reply queued: it goes out in a moment. 回复已排队发送。"
    [queued] = await replies(console)
    assert (queued.actor, queued.text, queued.customer_id, queued.channel) == (
        "console:olive", "您好，正在为您查询物流 <b>稍等</b>", amy, "console")
    after = await conversation_of(console, amy)
    assert after.state == "pending" and after.assignee == "console:tom" and after.waiting_since is None
    await console.settle()
    [sent] = await console.read(lambda s: s.scalars(select(Touchpoint).where(Touchpoint.kind == "staff_reply")))
    assert (sent.actor, sent.customer_id, sent.text, sent.direction) == (
        "console:olive", amy, "您好，正在为您查询物流 <b>稍等</b>", "out")
    await page.goto(f"{console.url}/console/inbox/{conv.id}")
    shown = page.locator("#thread [data-kind='staff_reply']")
    assert "console:olive" in await shown.locator(".actor").inner_text()
    assert await shown.locator(".text").inner_text() == "您好，正在为您查询物流 <b>稍等</b>"  # text, not markup
    assert await page.locator("#state").get_attribute("data-state") == "pending"

    assert await submit(page, "#resolve button[type=submit]") == 200
    assert await page.locator("[role=status]").inner_text() == "Conversation resolved. 会话已解决。"
    resolved = await conversation_of(console, amy)
    assert (resolved.state, resolved.resolved_by) == ("resolved", "console:olive")
    assert await page.locator("#reply, #assign, #resolve").count() == 0
    assert await page.locator("#resolved-note").count() == 1
    # A reply posted to the resolved conversation (an old tab) is refused at the box, nothing written.
    late = await page.request.post(f"{console.url}/console/inbox/{conv.id}/reply", form={"_csrf": token, "text": "hi"})
    assert late.status == 409 and "is resolved" in await late.text()
    assert len(await replies(console)) == 1
    await page.goto(f"{console.url}/console/inbox")
    assert await page.locator(f"#inbox [data-conversation='{conv.id}']").count() == 0  # off the list

    # Her next message reopens it.
    await console.say("amy", "还是没收到")
    await console.settle()
    await page.goto(f"{console.url}/console/inbox")
    assert "还是没收到" in await page.locator(f"#inbox [data-conversation='{conv.id}']").inner_text()


async def test_outside_the_reply_window_the_notice_is_offered(console: Console, page: Page) -> None:
    amy, conv = await amy_writes(console)
    channel = console.service.channel("console", "local")
    assert channel is not None
    channel.reply_window = timedelta(hours=48)  # as WeChat's customer-service messages
    async with writing(console.service.sessions) as session:
        await session.execute(update(Conversation).where(Conversation.id == conv.id).values(
            last_customer_at=console.service.clock.now() - timedelta(days=3)))
    await console.add_staff("olive", "operator")
    await sign_in(page, console, "olive")
    await page.goto(f"{console.url}/console/inbox/{conv.id}")
    assert await page.locator("#as-notice").count() == 0  # offered once the reply is refused
    await page.fill("#reply-text", "您的包裹已发出")
    assert await submit(page, "#reply button[type=submit]") == 409
    error = await page.locator("#reply-error").inner_text()
    assert "within 48 hours" in error and "notice template" in error
    assert await page.locator("#reply-text").input_value() == "您的包裹已发出"  # the text is kept
    assert await replies(console) == []
    await page.check("#as-notice")
    assert await submit(page, "#reply button[type=submit]") == 200
    [queued] = await replies(console)
    assert (queued.variant, queued.actor, queued.text) == ("notice", "console:olive", "您的包裹已发出")


async def test_a_manager_reads_and_changes_nothing(console: Console, page: Page) -> None:
    amy, conv = await amy_writes(console)
    await console.add_staff("mia", "manager")
    await sign_in(page, console, "mia")
    await page.goto(f"{console.url}/console/inbox")
    assert await page.locator(f"#inbox [data-conversation='{conv.id}']").count() == 1
    await page.goto(f"{console.url}/console/inbox/{conv.id}")
    assert "我的订单还没到" in await page.locator("#thread").inner_text()
    assert await page.locator("#reply, #reply-text, #assign, #resolve").count() == 0
    assert await page.locator("main form[method=post]").count() == 0
    assert await page.locator("#read-only").count() == 1
    await page.goto(f"{console.url}/console/inbox")  # the list refreshes itself
    ben = await console.say("ben", "转人工", name="Ben 本")
    await page.locator(f"#inbox [data-customer='{ben}']").wait_for(timeout=30_000)
    assert page.url == f"{console.url}/console/inbox"
    token = await page.locator("header form.who input[name=_csrf]").input_value()  # the sign-out form's
    headers = await page.locator("body").get_attribute("hx-headers")
    assert headers is not None and json.loads(headers)["X-CSRF-Token"] == token
    for action, form in (("reply", {"text": "forged"}), ("assign", {"assignee": "console:olive"}), ("resolve", {})):
        forged = await page.request.post(f"{console.url}/console/inbox/{conv.id}/{action}",
                                         form={"_csrf": token, **form})
        assert forged.status == 403, action
        assert "operator" in await forged.text()
    assert await replies(console) == []
    assert (await conversation_of(console, amy)).state == "open"
    assert await count(console, select(func.count()).where(Touchpoint.kind.in_(
        ["conversation_assigned", "conversation_resolved"]), Touchpoint.actor == "console:mia")) == 0
    assert (await page.request.get(f"{console.url}/console/inbox/9999999999")).status == 404


async def test_the_thread_pages_by_touchpoint_id(make_config: Any, page: Page) -> None:
    async for console in serve(make_config({"console": {"page_size": 3}})):
        amy, conv = await amy_writes(console)
        for n in range(5):
            await console.say("amy", f"message {n}")
        await console.add_staff("mia", "manager")
        await sign_in(page, console, "mia")
        await page.goto(f"{console.url}/console/inbox/{conv.id}")
        assert "message 4" in await page.locator("#thread .tp.in").last.inner_text()  # the newest at the bottom
        seen: list[int] = []
        while True:
            shown = [int(v) for v in await page.locator("#thread [data-touchpoint]").evaluate_all(
                "items => items.map(i => i.dataset.touchpoint)")]
            assert shown == sorted(shown) and len(shown) <= 3  # oldest first within a page
            seen = shown + seen
            if await page.locator("#older").count() == 0:
                break
            await page.click("#older")
            await page.wait_for_load_state()
        # Each once: a page's cursor is a touchpoint id, so one written meanwhile (the job that assigns the
        # conversation) is on the newest page, which was read first; compare with the store as it is now.
        expected = list(await console.read(lambda s: s.scalars(select(Touchpoint.id).where(
            Touchpoint.customer_id == amy, Touchpoint.channel == "console", Touchpoint.account == "local",
            Touchpoint.id <= seen[-1]).order_by(Touchpoint.id))))
        assert seen == expected and len(expected) > 6


async def test_inbox_screenshot(console: Console, page: Page) -> None:
    """docs/screenshots/inbox.png: a conversation with an answered question, and the list."""
    amy = await console.say("amy", "我的订单还没到,单号 1001", name="Amy 艾米")
    await console.say("ben", "转人工", name="Ben 本")
    await console.say("carl", "奶粉有货吗?", name="Carl 卡尔")
    await console.settle()
    assert amy is not None
    conv = await conversation_of(console, amy)
    await console.add_staff("olive", "operator")
    await sign_in(page, console, "olive")
    await page.goto(f"{console.url}/console/inbox/{conv.id}")
    await page.fill("#reply-text", "您好 Amy，已为您查询：包裹今天下午送达。")
    await submit(page, "#reply button[type=submit]")
    await console.settle()
    await console.say("amy", "好的，谢谢！")
    await console.settle()
    await page.goto(f"{console.url}/console/inbox/{conv.id}")
    await page.fill("#reply-text", "不客气，还有其他问题随时找我们。")
    await screenshot(page, "inbox")
    await page.goto(f"{console.url}/console/inbox")
    assert await page.locator("#inbox [data-conversation]").count() == 3
    await screenshot(page, "inbox_list")
