"""The console's dashboard, coupons, segments and audit log pages in Debian's Chromium, on both stores:
figures checked against the store after driving the real service (customers' messages, the outbox,
a redemption, a survey, a follow-up task), codes uploaded and redeemed at the till, segment counts,
previews and ad-hoc expressions, and the admins-only audit log with its filters and pages."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from playwright.async_api import Page
from sqlalchemy import func, select, update

from scrm import audit
from scrm.clock import local_midnight
from scrm.loyalty import jobs
from scrm.messages import InboundEvent
from scrm.rollups import INBOUND
from scrm.store.engine import writing
from scrm.store.models import (
    AuditEntry,
    Conversion,
    Coupon,
    CouponCode,
    Customer,
    CustomerTag,
    Delivery,
    FollowupTask,
    Redemption,
    Survey,
    Tag,
    Touchpoint,
)
from tests.console_support import Console, console, page, screenshot, serve, sign_in  # noqa: F401 (fixtures)

NAMES = {"amy": "Amy 艾米", "carl": "Carl 卡尔", "dan": "Dan 丹"}


class Shop:
    """Customers and staff talking to the running service through the console channel."""

    def __init__(self, console: Console) -> None:
        self.console = console

    async def say(self, user: str, text: str, kind: str = "text", **payload: Any) -> int | None:
        return await self.console.say(user, text, kind, NAMES.get(user), **payload)

    async def settle(self) -> None:
        await self.console.settle()

    async def code_of(self, customer_id: int) -> str:
        return str(await self.console.read(lambda s: s.scalar(
            select(CouponCode.code).where(CouponCode.customer_id == customer_id))))

    async def count(self, query: Any) -> int:
        return int(await self.console.read(lambda s: s.scalar(query)) or 0)


async def submit(page: Page, selector: str) -> int:
    """Click a form's button and wait for the page it answers with; returns its HTTP status."""
    async with page.expect_navigation() as navigation:
        await page.click(selector)
    response = await navigation.value
    assert response is not None
    return response.status


def local_day(moment: datetime, zone: ZoneInfo) -> date:
    return moment.replace(tzinfo=UTC).astimezone(zone).date()


async def figure(page: Page, key: str) -> str:
    return (await page.locator(f"[data-figure={key}] .value").inner_text()).strip()


async def test_dashboard_shows_the_store_figures_and_the_trend_chart(console: Console, page: Page) -> None:
    shop = Shop(console)
    amy = await shop.say("amy", "我想买奶粉")
    carl = await shop.say("carl", "你好")
    await shop.say("dan", "有优惠券吗")
    await shop.settle()  # three welcomes, each with a coupon
    assert amy is not None and carl is not None
    await shop.say("amy", f"我要用券 {await shop.code_of(amy)}")  # redeemed in chat: a conversion
    await shop.say("amy", "奶粉什么时候到货")
    assert "survey planned" in " ".join((await console.service.receive(InboundEvent(
        "console", "local", "bob", "text", text="/survey console:amy", platform_msg_id="bob-1"))).replies)
    await jobs.sweep(console.service)  # the survey goes out
    await shop.settle()
    await shop.say("amy", "5 很满意")
    await console.service.receive(InboundEvent("console", "local", "bob", "text", platform_msg_id="bob-2",
                                               text="/followup console:carl 明天 回访奶粉需求"))
    await shop.settle()

    await console.add_staff("mia", "manager")
    await sign_in(page, console, "mia")
    await page.goto(f"{console.url}/console/?period=7d")
    customers = await shop.count(select(func.count()).select_from(Customer))
    assert customers == 3  # staff are not customers
    assert await figure(page, "new_customers") == str(customers)
    assert await figure(page, "active_customers") == "3"
    assert await figure(page, "messages_in") == str(await shop.count(select(func.count()).where(INBOUND)))
    assert await figure(page, "campaign_sends") == str(await shop.count(
        select(func.count()).where(Delivery.status == "sent"))) == "3"
    assert await figure(page, "coupons_granted") == "3"
    assert await figure(page, "coupon_redemptions") == str(await shop.count(
        select(func.count()).select_from(Redemption))) == "1"
    assert await figure(page, "conversions") == str(await shop.count(select(func.count()).select_from(Conversion)))
    assert "before 上期 0" in await page.locator("[data-figure=new_customers]").inner_text()

    stages = dict((await console.read(lambda s: s.execute(
        select(Customer.stage, func.count()).group_by(Customer.stage)))).all())
    for stage, n in stages.items():
        assert (await page.locator(f"[data-stage='{stage}'] td").nth(1).inner_text()) == str(n)
    assert await page.locator("#stages tbody tr").count() == len(stages)
    moves = await shop.count(select(func.count()).where(Touchpoint.kind == "stage_changed"))
    shown = [int(await cell.inner_text()) for cell in await page.locator("#stage-moves [data-move] td:nth-child(2)").all()]
    assert sum(shown) == moves > 0
    held = dict((await console.read(lambda s: s.execute(
        select(Tag.name, func.count()).join(CustomerTag, CustomerTag.tag_id == Tag.id).group_by(Tag.name)))).all())
    for name, n in held.items():
        assert (await page.locator(f"[data-tag='{name}'] td").nth(1).inner_text()) == str(n)
    assert "奶粉" in held

    assert await shop.count(select(func.count()).where(Survey.status == "answered", Survey.score == 5)) == 1
    csat = await page.locator("[data-survey=csat] td").nth(1).inner_text()
    assert csat.startswith("100.0%") and "1 answer(s)" in csat and "avg 5" in csat
    [task] = await console.read(lambda s: s.scalars(select(FollowupTask)))
    assert task.customer_id == carl
    row = page.locator(f"[data-task='{task.id}']")
    assert "Carl 卡尔" in await row.inner_text() and "回访奶粉需求" in await row.inner_text()
    assert await page.locator("[data-open]").get_attribute("data-open") == "1"

    chart = page.locator("#trend-chart")
    await page.wait_for_function("() => { const i = document.getElementById('trend-chart');"
                                 " return i.complete && i.naturalWidth > 0; }")
    assert await chart.evaluate("i => i.naturalWidth") == 800
    png = await page.request.get(f"{console.url}{await chart.get_attribute('src')}")
    assert png.status == 200 and png.headers["content-type"] == "image/png"
    assert (await png.body()).startswith(b"\x89PNG\r\n\x1a\n")
    await screenshot(page, "dashboard")

    await page.goto(f"{console.url}/console/?period=2026-02-30..2026-03-01")
    assert "Not a period" in await page.locator("#period-error").inner_text()
    assert await page.locator("input[name=period]").get_attribute("aria-invalid") == "true"
    bad_chart = await page.request.get(f"{console.url}/console/charts/trend.png?period=yesterday")
    assert bad_chart.status == 400


async def test_coupon_pools_upload_and_redemption_at_the_till(console: Console, page: Page, tmp_path: Path) -> None:
    shop = Shop(console)
    amy = await shop.say("amy", "你好")
    carl = await shop.say("carl", "你好")
    await shop.settle()
    assert amy is not None and carl is not None
    amy_code, carl_code = await shop.code_of(amy), await shop.code_of(carl)
    async with writing(console.service.sessions) as session:  # carl's code lapsed yesterday
        await session.execute(update(CouponCode).where(CouponCode.code == carl_code)
                              .values(expires_at=console.service.clock.now() - timedelta(days=1)))

    await console.add_staff("olive", "operator")
    await sign_in(page, console, "olive")
    await page.goto(f"{console.url}/console/coupons")

    async def counts(pool: str) -> dict[str, str]:
        row = page.locator(f"[data-pool={pool}]")
        return {k: (await row.locator(f"[data-count={k}]").inner_text()).split()[0]
                for k in ("issued", "redeemed", "expired", "free")}

    assert await counts("welcome") == {"issued": "2", "redeemed": "0", "expired": "1", "free": "0"}
    assert await counts("winback") == {"issued": "0", "redeemed": "0", "expired": "0", "free": "0"}

    codes = tmp_path / "supplier.csv"
    codes.write_text("code,expires\nSUP-001,2027-01-31\nsup-002\n\"SUP-003\",x\nSUP-001\n", "utf-8")
    await page.select_option("#upload select[name=pool]", "winback")
    await page.set_input_files("#upload input[name=file]", str(codes))
    assert await submit(page, "#upload button[type=submit]") == 200
    notice = page.locator("#upload [role=status]")
    assert (await notice.get_attribute("data-imported"), await notice.get_attribute("data-duplicates")) == ("3", "1")
    stored = await console.read(lambda s: s.execute(
        select(CouponCode.code, CouponCode.customer_id).join(Coupon).where(Coupon.name == "winback")))
    assert sorted(stored.all()) == [("SUP-001", None), ("SUP-002", None), ("SUP-003", None)]
    assert (await counts("winback"))["free"] == "3"

    codes.write_text("OK-1\nnot a code!\n", "utf-8")  # refused whole: nothing imported
    await page.set_input_files("#upload input[name=file]", str(codes))
    assert await submit(page, "#upload button[type=submit]") == 400
    assert "line 2: 'NOT A CODE!'" in await page.locator("#file-error").inner_text()
    assert await shop.count(select(func.count()).where(CouponCode.code == "OK-1")) == 0
    assert await submit(page, "#upload button[type=submit]") == 400  # no file chosen
    assert "Choose a file" in await page.locator("#file-error").inner_text()

    await page.fill("#redeem input[name=code]", amy_code.lower())
    assert await submit(page, "#redeem button[type=submit]") == 200
    assert f"券码 {amy_code} 已核销" in await page.locator("#redeem [role=status]").inner_text()
    [redemption] = await console.read(lambda s: s.scalars(select(Redemption)))
    assert (redemption.customer_id, redemption.via) == (amy, "console")
    [touch] = await console.read(lambda s: s.scalars(select(Touchpoint).where(Touchpoint.kind == "coupon_redeemed")))
    assert (touch.customer_id, touch.actor, touch.payload) == (amy, "console:olive", {"code": amy_code})
    assert await counts("welcome") == {"issued": "2", "redeemed": "1", "expired": "1", "free": "0"}
    await screenshot(page, "coupons")

    for code, words in ((amy_code, "已经使用过了"), (carl_code, "已过期"), ("NOSUCH-1", "没有找到券码 NOSUCH-1")):
        await page.fill("#redeem input[name=code]", code)
        assert await submit(page, "#redeem button[type=submit]") == 409
        assert words in await page.locator("#code-error").inner_text()
        assert await page.locator("#redeem input[name=code]").get_attribute("aria-invalid") == "true"
    assert await shop.count(select(func.count()).select_from(Redemption)) == 1

    await console.add_staff("mia", "manager")  # managers read the counts; the forms are the operators'
    await page.context.clear_cookies()
    await sign_in(page, console, "mia")
    await page.goto(f"{console.url}/console/coupons")
    assert await page.locator("#redeem").count() == 0 and await page.locator("#pools").count() == 1
    csrf = await page.locator("input[name=_csrf]").first.get_attribute("value")
    refused = await page.request.post(f"{console.url}/console/coupons/redeem", form={"_csrf": csrf or "", "code": carl_code})
    assert refused.status == 403 and "operator role" in await refused.text()


async def test_segments_counts_preview_and_an_ad_hoc_expression(console: Console, page: Page) -> None:
    shop = Shop(console)
    amy = await shop.say("amy", "我想买奶粉")
    await shop.say("amy", "+86 139 1234 5678", kind="contact_shared", phone="+86 139 1234 5678")
    await shop.say("carl", "奶粉有货吗")
    await shop.say("dan", "你好")
    await shop.say("dan", "退订")  # opted out
    await shop.settle()
    await console.add_staff("mia", "manager")
    await sign_in(page, console, "mia")
    await page.goto(f"{console.url}/console/segments")
    fans = page.locator("[data-segment=formula_fans]")
    assert await fans.locator("[data-count]").inner_text() == "2"
    assert await page.locator("[data-segment=silent_30d] [data-count]").inner_text() == "0"
    assert await page.locator("#segments tbody tr").count() == len(console.service.config.segments)

    async with page.expect_navigation():
        await fans.locator("a").click()
    assert await page.locator("#preview [data-total]").get_attribute("data-total") == "2"
    preview = await page.locator("#preview").inner_text()
    assert "Amy 艾米" in preview and "Carl 卡尔" in preview and "Dan" not in preview
    assert "5678" not in await page.content()  # no phone numbers, not even masked

    await page.fill("#expr", "tag('奶粉') or opted_out")
    assert await submit(page, "form[action^='/console/segments'] button") == 200
    assert await page.locator("#preview [data-total]").get_attribute("data-total") == "3"
    assert await page.locator(f"#preview [data-customer='{amy}']").count() == 1
    await screenshot(page, "segments")

    for text, error in (("tag('奶粉') and", "syntax error at column"), ("vip_level > 3", "unknown name or value 'vip_level'"),
                        ("segment('nope')", "unknown segment 'nope'")):
        await page.fill("#expr", text)
        assert await submit(page, "form[action^='/console/segments'] button") == 400
        assert error in await page.locator("#expr-error").inner_text()
        assert await page.locator("#expr").input_value() == text  # kept in the box to fix
        assert await page.locator("#expr").get_attribute("aria-invalid") == "true"
        assert await page.locator("#preview").count() == 0
    deep = await page.request.get(f"{console.url}/console/segments", params={"expr": "not (" * 70 + "opted_out" + ")" * 70})
    assert deep.status == 400 and "nested too deeply" in await deep.text()


async def test_audit_log_for_admins_with_filters(console: Console, page: Page) -> None:
    shop = Shop(console)
    amy = await shop.say("amy", "你好")
    carl = await shop.say("carl", "你好")
    assert amy is not None and carl is not None
    now = console.service.clock.now()
    async with writing(console.service.sessions) as session:
        for i in reversed(range(7)):  # older reads, one a day, by the CLI
            await audit.audit(session, "cli:root", "admin", carl, "view", f"old read {i}", at=now - timedelta(days=10 + i))
        await audit.audit(session, "api:pos", None, amy, "export", "by the POS", at=now - timedelta(minutes=5))
    await console.service.receive(InboundEvent("console", "local", "bob", "text", text="/customer console:amy",
                                               platform_msg_id="bob-1"))  # audited: staff:console:bob views amy
    total = await shop.count(select(func.count()).select_from(AuditEntry))
    assert total == 9
    await console.add_staff("ada", "admin")
    await sign_in(page, console, "ada")
    await page.goto(f"{console.url}/console/audit")
    assert "Audit 审计" in await page.locator("header nav").inner_text()
    page_size = console.service.config.console.page_size
    ids = [int(x) for x in await page.locator("#entries [data-entry]").evaluate_all("rows => rows.map(r => r.dataset.entry)")]
    assert ids == sorted(ids, reverse=True) and len(ids) == min(total, page_size)
    await screenshot(page, "audit")

    await page.fill("input[name=customer]", f"#{amy}")
    assert await submit(page, "#filters button[type=submit]") == 200
    rows = page.locator("#entries [data-entry]")
    assert await rows.count() == 2
    assert {"staff:console:bob", "api:pos"} == {await r.locator("td").nth(2).inner_text() for r in await rows.all()}
    await page.fill("input[name=customer]", "")
    await page.fill("input[name=actor]", "bob")
    assert await submit(page, "#filters button[type=submit]") == 200
    assert [await r.locator("td").nth(6).inner_text() for r in await rows.all()] == ["view"]
    assert "/customer" in await rows.first.inner_text()
    await page.fill("input[name=actor]", "")
    zone = ZoneInfo(console.service.config.service.timezone)
    first, last = (local_day(now - timedelta(days=d), zone) for d in (13, 11))
    await page.fill("input[name=since]", first.isoformat())
    await page.fill("input[name=until]", last.isoformat())
    assert await submit(page, "#filters button[type=submit]") == 200
    details = [await r.locator("td").nth(7).inner_text() for r in await rows.all()]
    assert details == ["old read 1", "old read 2", "old read 3"]  # 11, 12 and 13 days ago, newest first
    async with console.service.sessions() as session:  # the same days, asked of the core `scrm audit` uses
        expected = await audit.entries(session, since=local_midnight(first, zone),
                                       until=local_midnight(last + timedelta(days=1), zone))
    assert [e.detail for e in reversed(expected)] == details

    await page.goto(f"{console.url}/console/audit?customer=console:nobody&since=2026-13-01")
    assert "no customer console:nobody" in await page.locator("#customer-error").inner_text()
    assert "Not a date" in await page.locator("#since-error").inner_text()
    await page.goto(f"{console.url}/console/audit?since=2026-03-02&until=2026-03-01")
    assert "comes before" in await page.locator("#until-error").inner_text()

    for name, role in (("olive", "operator"), ("mia", "manager")):
        await console.add_staff(name, role)
        await page.context.clear_cookies()
        await sign_in(page, console, name)
        response = await page.goto(f"{console.url}/console/audit")
        assert response is not None and response.status == 403
        assert "This needs the admin role" in await page.locator("[role=alert]").inner_text()
        assert "Audit" not in await page.locator("header nav").inner_text()


async def test_audit_log_pages_by_id(make_config: Any, page: Page) -> None:
    async for running in serve(make_config({"console": {"page_size": 4}})):
        now = running.service.clock.now()
        async with writing(running.service.sessions) as session:
            for i in range(10):
                await audit.audit(session, f"cli:user{i % 2}", "admin", None, "export", f"entry {i}",
                                  at=now - timedelta(hours=10 - i))
        await running.add_staff("ada", "admin")
        await sign_in(page, running, "ada")
        await page.goto(f"{running.url}/console/audit?actor=user0")
        seen: list[str] = []
        while True:
            seen += [await r.locator("td").nth(7).inner_text() for r in await page.locator("#entries [data-entry]").all()]
            older = page.locator("a[rel=next]")
            if not await older.count():
                break
            assert "actor=user0" in (await older.get_attribute("href") or "")
            async with page.expect_navigation():
                await older.click()
        assert seen == [f"entry {i}" for i in (8, 6, 4, 2, 0)]  # newest first, each once, filter kept
        assert await page.locator("text=← Newest").count() == 1
