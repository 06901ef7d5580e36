"""The console's Customers list and Customer page in Debian's Chromium, on both stores: the search box
(name, #id, channel:id, phone, tag, stage, segment expressions and their errors), pages by id, a tag
for a whole result after its count, the CSV of a result, the 360° view and its thread, tag edits,
merges, follow-up tasks, an admin's export and erasure, what a manager may not do, and the audit
entry each customer page writes. Customers are made by the real service from console messages."""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any
from urllib.parse import quote

from playwright.async_api import Page, Response
from sqlalchemy import func, select

from scrm import orders, segments
from scrm.customer_search import search
from scrm.loyalty import jobs
from scrm.store.engine import reading, writing
from scrm.store.models import (
    AuditEntry,
    CouponCode,
    Customer,
    CustomerTag,
    Delivery,
    FollowupTask,
    Identity,
    Tag,
    Touchpoint,
)
from scrm.tagging import tag_where
from tests.console_support import Console, console, page, screenshot, serve, sign_in  # noqa: F401 (fixtures)

PHONE = "13812345678"
XSS = "<script>alert(1)</script>"


class Shop:
    """Customers writing to the running service through the console channel."""

    def __init__(self, console: Console) -> None:
        self.console = console

    async def say(self, user: str, text: str, name: str | None = None, kind: str = "text", **payload: Any) -> int:
        customer_id = await self.console.say(user, text, kind, name, **payload)
        assert customer_id is not None
        return customer_id

    async def settle(self) -> None:
        await self.console.settle()

    async def count(self, query: Any) -> int:
        return int(await self.console.read(lambda s: s.scalar(query)) or 0)

    async def tags_of(self, customer_id: int) -> dict[str, str]:
        rows = await self.console.read(lambda s: s.execute(
            select(Tag.name, CustomerTag.source).join(CustomerTag, CustomerTag.tag_id == Tag.id)
            .where(CustomerTag.customer_id == customer_id)))
        return dict(rows.all())


async def people(shop: Shop) -> dict[str, int]:
    """Amy (asks for formula, shares her phone), Ben, Carl (two messages); all get the welcome."""
    ids = {"amy": await shop.say("amy", "我想买奶粉", "Amy 艾米"),
           "ben": await shop.say("ben", "你好", "Ben 本"),
           "carl": await shop.say("carl", "在吗", "Carl 卡尔")}
    await shop.say("amy", "", kind="contact_shared", phone=PHONE)
    await shop.say("carl", "有优惠券吗")
    await shop.settle()
    return ids


async def submit(page: Page, selector: str) -> int:
    """Click a form's button and wait for the page it answers with; returns its HTTP status."""
    async with page.expect_navigation() as navigation:
        await page.click(selector)
    response = await navigation.value
    assert response is not None
    return response.status


async def listed(page: Page) -> list[int]:
    return [int(v) for v in await page.locator("#customers [data-customer]").evaluate_all(
        "rows => rows.map(r => r.dataset.customer)")]


async def find(page: Page, console: Console, q: str) -> int:
    await page.fill("#q", q)
    return await submit(page, "#search button[type=submit]")


# -- the core behind the pages

async def test_the_search_box_reads_each_form(console: Console) -> None:
    shop = Shop(console)
    ids = await people(shop)
    svc = console.service

    async def found(text: str) -> tuple[str, list[int], str | None]:
        async with reading(svc.sessions) as session:
            result = await search(session, svc, text, svc.clock.now())
            rows = (await session.scalars(select(Customer.id).where(result.where).order_by(Customer.id))).all()
        return result.kind, list(rows), result.error or result.nobody

    everyone = sorted(ids.values())
    assert await found("") == ("all", everyone, None)
    assert await found("艾米") == ("name", [ids["amy"]], None)
    assert await found("ben") == ("name", [ids["ben"]], None)  # case-insensitive
    assert await found("name:Carl (VIP)") == ("name", [], None)  # brackets after name: are a name
    assert await found(f"#{ids['ben']}") == ("id", [ids["ben"]], None)
    assert await found(str(ids["carl"])) == ("id", [ids["carl"]], None)
    assert await found("console:carl") == ("identity", [ids["carl"]], None)
    assert await found("console:local:carl") == ("identity", [ids["carl"]], None)
    assert await found("+86 138-1234-5678") == ("phone", [ids["amy"]], None)
    assert await found(f"phone:{PHONE}") == ("phone", [ids["amy"]], None)
    assert await found("tag:奶粉") == ("tag", [ids["amy"]], None)
    stages = dict((await console.read(lambda s: s.execute(select(Customer.id, Customer.stage)))).all())
    assert await found(f"stage:{stages[ids['amy']]}") == (
        "stage", sorted(c for c, stage in stages.items() if stage == stages[ids["amy"]]), None)
    assert await found("stage:no-such-stage") == ("stage", [], None)
    assert (await found("tag('coupon-seeker') or tag('奶粉')"))[1] == sorted([ids["amy"], ids["carl"]])
    assert (await found("segment('formula_fans')"))[1] == [ids["amy"]]
    # Wrong text is an error; a well-formed reference to no one is an empty result with the core's words.
    assert await found("#999999") == ("id", [], "no customer #999999")
    assert await found("console:nobody") == ("identity", [], "no customer console:nobody")
    assert await found("13900000000") == ("phone", [], "no customer phone:…0000")
    kind, rows, error = await found("tag(")
    assert (kind, rows) == ("expression", []) and error is not None and error.startswith("syntax error")
    kind, rows, error = await found("days_silent >= 'x'")
    assert (kind, rows) == ("expression", []) and "days_* fields" in str(error)
    assert (await found("tag:"))[2] is not None


async def test_tagging_a_condition_is_set_based_and_recorded_like_one_customer(console: Console) -> None:
    shop = Shop(console)
    ids = await people(shop)
    svc = console.service
    now = svc.clock.now()
    everyone = Customer.id.in_(list(ids.values()))
    async with svc.sessions() as session, session.begin():
        # amy holds 奶粉 from her message: the others gain it, and the nurture campaign (tag_added 奶粉) is planned for them
        assert await tag_where(svc, session, everyone, "奶粉", True, "console:olive", now) == 2
        # the same again at the same moment: nothing new
        assert await tag_where(svc, session, everyone, "奶粉", True, "console:olive", now) == 0
    assert await shop.tags_of(ids["ben"]) == {"奶粉": "operator"}
    assert await shop.tags_of(ids["amy"]) == {"奶粉": "keyword"}  # kept as it was
    added = await console.read(lambda s: s.execute(
        select(Touchpoint.customer_id, Touchpoint.actor, Touchpoint.payload).where(
            Touchpoint.kind == "tag_added", Touchpoint.actor == "console:olive")))
    assert sorted(added.all()) == sorted([(ids["ben"], "console:olive", {"tag": "奶粉", "by": "console:olive"}),
                                          (ids["carl"], "console:olive", {"tag": "奶粉", "by": "console:olive"})])
    planned = await console.read(lambda s: s.scalars(select(Delivery.customer_id).where(
        Delivery.campaign == "nurture-formula", Delivery.created_at == now)))
    assert sorted(planned.all()) == sorted([ids["ben"], ids["carl"]])  # amy's came with her keyword tag
    async with svc.sessions() as session, session.begin():
        # the condition may read the tag being removed (a search for tag:奶粉 losing 奶粉)
        holders = segments.condition("tag('奶粉')", now) & (Customer.id != ids["carl"])
        assert await tag_where(svc, session, holders, "奶粉", False, "console:olive", now) == 2
        assert await tag_where(svc, session, everyone, "never-made", False, "console:olive", now) == 0
    assert await shop.tags_of(ids["amy"]) == {} and (await shop.tags_of(ids["carl"]))["奶粉"] == "operator"
    assert await shop.count(select(func.count()).where(Touchpoint.kind == "tag_removed",
                                                       Touchpoint.actor == "console:olive")) == 2
    assert await shop.count(select(func.count()).select_from(Tag).where(Tag.name == "never-made")) == 0


# -- the pages

async def test_an_operator_searches_tags_exports_merges_and_follows_up(console: Console, page: Page) -> None:
    shop = Shop(console)
    ids = await people(shop)
    customer_pages: list[str] = []

    def seen(response: Response) -> None:
        if re.search(r"/console/customers/\d+(\?|$)", response.url) and response.request.method == "GET":
            customer_pages.append(response.url)

    page.on("response", seen)
    await console.add_staff("olive", "operator")
    await sign_in(page, console, "olive")
    await page.goto(f"{console.url}/console/customers")
    assert await listed(page) == sorted(ids.values(), reverse=True)  # newest first
    assert "*******5678" in await page.locator(f"[data-customer='{ids['amy']}']").inner_text()
    assert PHONE not in await page.content()

    assert await find(page, console, "艾米") == 200 and await listed(page) == [ids["amy"]]
    assert await find(page, console, f"#{ids['ben']}") == 200 and await listed(page) == [ids["ben"]]
    assert await find(page, console, "console:carl") == 200 and await listed(page) == [ids["carl"]]
    assert await find(page, console, "138 1234 5678") == 200 and await listed(page) == [ids["amy"]]
    assert await find(page, console, "tag:coupon-seeker") == 200 and await listed(page) == [ids["carl"]]
    assert await find(page, console, "tag('奶粉') or tag('coupon-seeker')") == 200
    assert await listed(page) == [ids["carl"], ids["amy"]]
    assert await find(page, console, "tag('奶粉') and days_silent >=") == 400  # a bad expression
    error = page.locator("#q-error")
    assert (await error.inner_text()).startswith("syntax error")
    assert await page.locator("#q").get_attribute("aria-invalid") == "true"
    assert await page.locator("#customers, #bulk, #nobody").count() == 0  # nothing but the error
    assert await find(page, console, "console:nobody") == 200
    assert await page.locator("#nobody").inner_text() == "no customer console:nobody"

    # Open amy: add a tag, remove one; the store has what the page says.
    await find(page, console, "艾米")
    await page.click(f"[data-customer='{ids['amy']}'] td a >> nth=0")
    await page.wait_for_url(f"{console.url}/console/customers/{ids['amy']}")
    assert await page.locator("#phone").inner_text() == "*******5678"
    await page.fill("#add-tag input[name=tag]", "vip")
    assert await submit(page, "#add-tag button[type=submit]") == 200
    assert await page.locator("[role=status]").inner_text() == "Tag added. 已添加标签。"
    assert await shop.tags_of(ids["amy"]) == {"奶粉": "keyword", "vip": "operator"}
    assert await page.locator("#tags [data-tag=vip]").count() == 1
    assert await submit(page, "#tags [data-tag='奶粉'] button") == 200
    assert await shop.tags_of(ids["amy"]) == {"vip": "operator"}
    assert await shop.count(select(func.count()).where(Touchpoint.kind == "tag_removed",
                                                       Touchpoint.actor == "console:olive")) == 1

    # A follow-up task from the page.
    await page.fill("#add-task input[name=when]", "3d")
    await page.fill("#add-task input[name=note]", "回访 call back")
    assert await submit(page, "#add-task button[type=submit]") == 200
    [task] = await console.read(lambda s: s.scalars(select(FollowupTask)))
    assert (task.customer_id, task.note, task.created_by) == (ids["amy"], "回访 call back", "console:olive")
    assert await page.locator(f"[data-task='{task.id}']").count() == 1
    assert await submit(page, f"[data-task='{task.id}'] button") == 200
    assert await console.read(lambda s: s.scalar(select(FollowupTask.done_by))) == "console:olive"

    # Bulk: everyone not opted out gets "spring", after a page that counts them.
    await page.goto(f"{console.url}/console/customers")
    assert await find(page, console, "not opted_out") == 200
    await page.fill("#bulk input[name=tag]", "spring")
    assert await submit(page, "#bulk button[value=add]") == 200
    count = page.locator("#count")
    assert "This adds tag spring to 3 customer(s)" in " ".join((await count.inner_text()).split())
    assert await shop.count(select(func.count()).select_from(Tag).where(Tag.name == "spring")) == 0  # not yet
    assert await submit(page, "#confirm button[type=submit]") == 200
    assert "Tag spring added to 3 customer(s)" in await page.locator("[role=status]").inner_text()
    for cid in ids.values():
        assert (await shop.tags_of(cid)).get("spring") == "operator"
    assert await shop.count(select(func.count()).where(Touchpoint.kind == "tag_added",
                                                       Touchpoint.payload["tag"].as_string() == "spring")) == 3
    await page.fill("#bulk input[name=tag]", "spring")  # again: nobody is left to add it to
    await submit(page, "#bulk button[value=add]")
    assert "to 0 customer(s)" in await count.inner_text() and await page.locator("#confirm form").count() == 0

    # The CSV of a result.
    await page.goto(f"{console.url}/console/customers?q=tag%3Aspring")
    href = await page.locator("#csv").get_attribute("href")
    assert href is not None
    download = await page.request.get(f"{console.url}{href}")
    assert download.status == 200 and download.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO((await download.body()).decode("utf-8-sig"))))
    assert sorted(int(r["id"]) for r in rows) == sorted(ids.values())
    amy_row = next(r for r in rows if int(r["id"]) == ids["amy"])
    assert (amy_row["name"], amy_row["phone_last4"], amy_row["tags"]) == ("Amy 艾米", "5678", "spring;vip")
    assert amy_row["identity"] == "console:local:amy" and "phone" not in amy_row
    assert PHONE not in (await download.body()).decode("utf-8-sig")
    assert await shop.count(select(func.count()).where(AuditEntry.action == "export", AuditEntry.customer_id.is_(None),
                                                       AuditEntry.actor == "console:olive")) == 1

    # Merge carl into ben, after a page showing both.
    for other, problem in (("艾米", "Enter the other customer"), (f"#{ids['ben']}", "Both name the same customer"),
                           ("13900000000", "no customer phone:…0000")):
        refused = await page.goto(f"{console.url}/console/customers/{ids['ben']}/merge?other={quote(other)}")
        assert refused is not None and refused.status == 400
        assert problem in await page.locator("#other-error").inner_text()
        assert await page.locator("#other").count() == 0
    await page.goto(f"{console.url}/console/customers/{ids['ben']}")
    await page.fill("#actions input[name=other]", "console:carl")
    assert await submit(page, "#actions button[type=submit]") == 200
    assert "Carl 卡尔" in await page.locator("#other").inner_text()
    assert await shop.count(select(func.count()).where(Identity.customer_id == ids["ben"])) == 1  # not yet
    assert await submit(page, "form[method=post] button.danger") == 200
    assert page.url.endswith(f"/console/customers/{ids['ben']}?done=merged")
    owners = await console.read(lambda s: s.execute(select(Identity.external_id, Identity.customer_id)))
    assert dict(owners.all())["carl"] == ids["ben"]
    carl = await console.read(lambda s: s.get(Customer, ids["carl"]))
    assert carl is not None and carl.attributes == {"merged_into": ids["ben"]}
    assert await shop.count(select(func.count()).where(AuditEntry.action == "merge",
                                                       AuditEntry.customer_id == ids["ben"])) == 1
    assert "coupon-seeker" in await page.locator("#tags").inner_text()  # carl's tag came along

    # Every customer page view is an audit entry.
    views = await shop.count(select(func.count()).where(
        AuditEntry.action == "view", AuditEntry.via == "console", AuditEntry.detail == "console customer page",
        AuditEntry.actor == "console:olive", AuditEntry.role == "operator"))
    assert views == len(customer_pages) >= 7


async def test_pages_go_by_id_and_the_thread_by_touchpoint(make_config: Any, page: Page) -> None:
    async for console in serve(make_config({"console": {"page_size": 4}})):
        shop = Shop(console)
        ids = [await shop.say(f"c{i}", "你好", f"Customer {i}") for i in range(10)]
        for i in range(9):
            await shop.say("c0", f"message {i}")
        await shop.settle()  # the welcomes and stage moves are written before the thread is read
        await console.add_staff("olive", "operator")
        await sign_in(page, console, "olive")
        await page.goto(f"{console.url}/console/customers")
        seen: list[int] = []
        while True:
            shown = await listed(page)
            assert 0 < len(shown) <= 4
            seen += shown
            older = page.locator("a[rel=next]")
            if not await older.count():
                break
            await older.click()
            await page.wait_for_load_state()
        assert seen == sorted(ids, reverse=True)
        await page.click("a[rel=prev]")  # back up from the last page
        await page.wait_for_load_state()
        assert await listed(page) == sorted(ids, reverse=True)[4:8]

        def thread(s: Any) -> Any:
            return s.scalars(select(Touchpoint.id).where(Touchpoint.customer_id == ids[0])
                             .order_by(Touchpoint.id.desc()))

        before_view = (await console.read(thread)).all()
        await page.goto(f"{console.url}/console/customers/{ids[0]}")
        while await page.locator("#thread-more a").count():
            before = await page.locator("#thread [data-touchpoint]").count()
            await page.click("#thread-more a")  # htmx swaps the next page in
            await page.wait_for_function(
                f"() => document.querySelectorAll('#thread [data-touchpoint]').length > {before}")
        shown = [int(v) for v in await page.locator("#thread [data-touchpoint]").evaluate_all(
            "items => items.map(i => i.dataset.touchpoint)")]
        # Newest first, each once: every touchpoint there was when the page was opened (the scheduler
        # runs on beside the test, so one may be written after it; the page shows it on a later view).
        assert len(before_view) > 8 and shown[0] >= before_view[0]
        expected = [t for t in (await console.read(thread)).all() if t <= shown[0]]
        assert shown == expected
        assert "message 8" in await page.locator("#thread .tp.in.message").first.inner_text()
        threads = await shop.count(select(func.count()).where(AuditEntry.detail == "console message thread"))
        assert threads == (len(expected) - 1) // 4


async def test_a_manager_sees_masked_data_and_changes_nothing(console: Console, page: Page) -> None:
    shop = Shop(console)
    ids = await people(shop)
    await console.add_staff("mia", "manager")
    await sign_in(page, console, "mia")
    await page.goto(f"{console.url}/console/customers")
    assert await page.locator("#bulk").count() == 0
    await page.goto(f"{console.url}/console/customers/{ids['amy']}")
    assert await page.locator("#phone").inner_text() == "*******5678"
    assert PHONE not in await page.content() and "5678" in await page.content()
    assert await page.locator("main form[method=post]").count() == 0  # no edit controls
    assert await page.locator("#add-tag, #add-task, #actions, #export, #erase").count() == 0
    csrf = await page.locator("body").get_attribute("hx-headers")
    assert csrf is not None
    token = json.loads(csrf)["X-CSRF-Token"]
    before = await shop.tags_of(ids["amy"])
    for path, form in ((f"/customers/{ids['amy']}/tags", {"op": "add", "tag": "forged"}),
                       ("/customers/tag", {"q": "", "op": "add", "tag": "forged"}),
                       (f"/customers/{ids['amy']}/merge", {"other_id": str(ids["ben"])}),
                       (f"/customers/{ids['amy']}/tasks", {"when": "3d", "note": "x"}),
                       (f"/customers/{ids['amy']}/erase", {})):
        forged = await page.request.post(f"{console.url}/console{path}", form={"_csrf": token, **form})
        assert forged.status == 403, path
    assert (await page.request.get(f"{console.url}/console/customers/export")).status == 403
    beyond = await page.request.get(f"{console.url}/console/customers/9999999999")  # no id is that large
    assert beyond.status == 404 and "no customer #9999999999" in await beyond.text()
    assert (await page.request.get(f"{console.url}/console/customers?before=9999999999")).status == 200
    assert await shop.tags_of(ids["amy"]) == before
    assert await shop.count(select(func.count()).select_from(Tag).where(Tag.name == "forged")) == 0
    assert await shop.count(select(func.count()).select_from(FollowupTask)) == 0
    assert await shop.count(select(func.count()).where(Identity.customer_id == ids["amy"])) == 1
    assert await shop.count(select(func.count()).where(AuditEntry.action == "view", AuditEntry.role == "manager",
                                                       AuditEntry.customer_id == ids["amy"])) == 1


async def test_an_admin_exports_and_erases_after_confirming(console: Console, page: Page) -> None:
    shop = Shop(console)
    ids = await people(shop)
    amy = ids["amy"]
    await console.add_staff("ada", "admin")
    await sign_in(page, console, "ada")
    await page.goto(f"{console.url}/console/customers/{amy}")
    await page.click("#export")
    await page.wait_for_url(f"{console.url}/console/customers/{amy}/export")
    assert await shop.count(select(func.count()).where(AuditEntry.action == "export")) == 0  # not yet
    async with page.expect_download() as downloading:
        await page.click("#confirm button[type=submit]")
    download = await downloading.value
    assert download.suggested_filename == f"customer-{amy}.json"
    data = json.loads(open(await download.path(), encoding="utf-8").read())
    assert data["personal"]["phone"] == "+86" + PHONE and data["customer"]["display_name"] == "Amy 艾米"
    assert any(t["text"] == "我想买奶粉" for t in data["customer"]["touchpoints"])
    [exported] = await console.read(lambda s: s.scalars(select(AuditEntry).where(AuditEntry.action == "export")))
    assert (exported.actor, exported.role, exported.via, exported.customer_id) == (
        "console:ada", "admin", "console", amy)

    await page.goto(f"{console.url}/console/customers/{amy}")
    await page.click("#erase")
    await page.wait_for_url(f"{console.url}/console/customers/{amy}/erase")
    assert (await console.read(lambda s: s.get(Customer, amy))).display_name == "Amy 艾米"  # type: ignore[union-attr]
    assert await submit(page, "#confirm button.danger") == 200
    assert await page.locator("[role=status]").inner_text() == "Personal data erased. 个人数据已删除。"
    row = await console.read(lambda s: s.get(Customer, amy))
    assert row is not None
    assert (row.display_name, row.phone_enc, row.phone_hash, row.phone_last4) == (None, None, None, None)
    assert "erased_at" in row.attributes and row.opted_out
    assert await shop.count(select(func.count()).where(Touchpoint.customer_id == amy,
                                                       Touchpoint.text.is_not(None))) == 0
    assert (await console.read(lambda s: s.scalar(select(Identity.external_id).where(
        Identity.customer_id == amy)))).startswith("erased:")  # type: ignore[union-attr]
    [erased] = await console.read(lambda s: s.scalars(select(AuditEntry).where(AuditEntry.action == "erase")))
    assert (erased.actor, erased.via, erased.customer_id) == ("console:ada", "console", amy)
    assert "texts=" in str(erased.detail)
    assert await page.locator("#phone").inner_text() == "–" and "erased" in await page.locator("h1").inner_text()
    assert "我想买奶粉" not in await page.content()
    # The erased number no longer finds anyone.
    await page.goto(f"{console.url}/console/customers?q={PHONE}")
    assert await page.locator("#nobody").inner_text() == "no customer phone:…5678"


async def test_a_name_with_markup_is_text(console: Console, page: Page) -> None:
    shop = Shop(console)
    evil = await shop.say("eve", XSS, XSS)
    await shop.settle()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    await console.add_staff("olive", "operator")
    await sign_in(page, console, "olive")
    await page.goto(f"{console.url}/console/customers")
    assert await page.locator(f"[data-customer='{evil}'] td").nth(1).inner_text() == XSS
    await page.goto(f"{console.url}/console/customers?q=" + "name%3A%3Cscript%3E")  # name:<script>
    assert await listed(page) == [evil]
    assert await page.locator("#q").input_value() == "name:<script>"
    await page.goto(f"{console.url}/console/customers?q=" + "%3Cscript%3E")  # read as an expression: its error
    assert "syntax error" in await page.locator("#q-error").inner_text()
    await page.goto(f"{console.url}/console/customers/{evil}")
    assert (await page.locator("#name").inner_text()).startswith(XSS)
    assert XSS in await page.locator("#thread").inner_text()
    assert await page.locator("main script").count() == 0
    await page.fill("#add-tag input[name=tag]", "<b>x</b>")
    await submit(page, "#add-tag button[type=submit]")
    assert await page.locator("#tags .tag").filter(has_text="<b>x</b>").count() == 1
    assert dialogs == []


async def test_customer_page_screenshot(console: Console, page: Page) -> None:
    """docs/screenshots/customer.png: tags of every source, a welcome coupon, orders, a thread."""
    shop = Shop(console)
    amy = await shop.say("amy", "你好,我想买奶粉,有优惠券吗?", "Amy 艾米")
    await shop.say("amy", "", kind="contact_shared", phone=PHONE)
    await shop.settle()
    await shop.say("amy", "收到券了,谢谢!明天下单")
    async with writing(console.service.sessions) as session:  # her order at the till, with the welcome coupon
        customer = await session.get(Customer, amy)
        code = await session.scalar(select(CouponCode.code).where(CouponCode.customer_id == amy))
        assert customer is not None and code is not None
        await orders.record_order(session, customer, orders.Order("shop-1001", 268.0, "CNY", code),
                                  console.service.clock.now(), "api", "pos")
    await jobs.sweep(console.service)  # the order earns points
    await shop.settle()  # and moves her stage on
    await console.add_staff("olive", "operator")
    await sign_in(page, console, "olive")
    await page.goto(f"{console.url}/console/customers/{amy}")
    await page.fill("#add-tag input[name=tag]", "vip")
    await submit(page, "#add-tag button[type=submit]")
    await page.fill("#add-task input[name=when]", "明天")
    await page.fill("#add-task input[name=note]", "确认奶粉段数 confirm the formula stage")
    await submit(page, "#add-task button[type=submit]")
    await page.goto(f"{console.url}/console/customers/{amy}")
    assert await page.locator("#coupons [data-coupon]").count() == 1
    assert await page.locator("#thread .tp.out").count() >= 1
    assert "shop-1001" in await page.locator("#orders").inner_text()
    assert int(await page.locator("#points").inner_text()) > 0
    assert await page.locator("#stages li").count() > 1
    await screenshot(page, "customer")
