"""The console's channel codes page in Debian's Chromium, on both stores, against the fake WeChat and
WeCom servers: an operator makes a WeCom code (a mistake shown at its field and nothing written, the
platform's refusal said as such, then the code kept and made at the fake), downloads its images and
reads them back, and disables it after a confirmation; an operator changes a code's tags and welcome and
the next arrival through it gets them, and a change that cannot be (a cost that is not one, a campaign
no longer configured, staff WeCom cannot give the code, a disabled code) is said at its field with
nothing written; a manager reads the figures after real arrivals through the WeChat service (a new
follower, one who came back, one who left, a first message, an order) but finds no form, and a forged
post is refused by role; a post without the CSRF token is refused.
"""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
import xmltodict
from PIL import Image
from playwright.async_api import Page
from sqlalchemy import select

from scrm import orders
from scrm.acquisition import codes
from scrm.acquisition.codes import CodeSpec
from scrm.store.engine import writing
from scrm.store.models import AcquisitionCode, CodeScan, Customer
from tests.conftest import applied
from tests.console_support import Console, page, screenshot, serve, sign_in  # noqa: F401 (fixtures)
from tests.fakes.wechat import FakeWeChat, event_xml, message_xml, plaintext
from tests.fakes.wecom import FakeWeCom
from tests.test_codes import (CORP_ID, POOL, WECOM_AES, WECOM_SECRET, WECOM_TOKEN, WX_TOKEN, customer_by, decode,
                              tags_of)


@pytest.fixture
async def wechat(aiohttp_server: Any) -> FakeWeChat:
    fake = FakeWeChat()
    fake.base_url = str((await aiohttp_server(fake.app())).make_url("/"))  # type: ignore[attr-defined]
    return fake


@pytest.fixture
async def wecom(aiohttp_server: Any) -> FakeWeCom:
    fake = FakeWeCom(CORP_ID, WECOM_SECRET)
    fake.url = str((await aiohttp_server(fake.app)).make_url("/"))  # type: ignore[attr-defined]
    return fake


@pytest.fixture
async def console(make_config: Any, wechat: FakeWeChat, wecom: FakeWeCom) -> AsyncIterator[Console]:
    """The service with a WeChat Official Account and a WeCom corp, each at its fake."""
    config = make_config({"coupons": POOL, "channels": {
        "wechat": {"brand": {"app_id": wechat.app_id, "app_secret": wechat.app_secret, "token": WX_TOKEN,
                             "api_base_url": wechat.base_url, "request_timeout_seconds": 2}},  # type: ignore[attr-defined]
        "wecom": {"acme": {"corp_id": CORP_ID, "secret": WECOM_SECRET, "token": WECOM_TOKEN,
                           "encoding_aes_key": WECOM_AES, "api_base_url": wecom.url,  # type: ignore[attr-defined]
                           "sender": "zhangsan"}}}})
    async for running in serve(config):
        yield running


async def stored(console: Console) -> list[AcquisitionCode]:
    return list(await console.read(lambda s: s.scalars(select(AcquisitionCode).order_by(AcquisitionCode.id))))


async def submit(page: Page) -> int:
    """Send the new-code form; the status of the page it answers with."""
    async with page.expect_response(lambda r: r.request.method == "POST") as posted:
        await page.click("#new-code button[type=submit]")
    await page.wait_for_load_state()
    return (await posted.value).status


async def download(page: Page, which: str) -> tuple[str, bytes]:
    async with page.expect_download() as started:
        await page.click(f"a[data-download={which}]")
    done = await started.value
    return done.suggested_filename, Path(await done.path()).read_bytes()


async def test_an_operator_makes_a_code_downloads_it_and_disables_it(console: Console, page: Page,
                                                                     wecom: FakeWeCom) -> None:
    await console.add_staff("olive", "operator")
    await sign_in(page, console, "olive")
    # a post without the form's token is refused before anything reaches the platform
    refused = await page.request.post(f"{console.url}/console/codes",
                                      form={"name": "forged", "channel": "wecom:acme", "staff": "zhangsan"})
    assert refused.status == 403 and "security token" in await refused.text()

    await page.goto(f"{console.url}/console/codes")
    assert "No channel codes yet" in await page.locator("#codes").inner_text()
    await page.click("#new-code summary")
    options = await page.locator("select[name=channel] option").all_inner_texts()
    assert options == ["wechat:brand", "wecom:acme"]  # the console's own channel makes no codes
    await page.fill("input[name=name]", "store_b")
    await page.select_option("select[name=channel]", "wecom:acme")
    await page.fill("input[name=tags]", "B店, walk-in")
    await page.fill("textarea[name=welcome]", "欢迎来到B店,{{ customer.name }}!券码 {{ coupon.code }}")
    await page.select_option("select[name=coupon]", "poster")
    await page.fill("input[name=cost]", "600")
    # a WeCom code without staff: said at the staff box, the rest of the form kept, nothing written
    assert await submit(page) == 400
    assert "needs staff members" in await page.locator("#staff-error").inner_text()
    assert await page.get_attribute("input[name=staff]", "aria-invalid") == "true"
    assert await page.get_attribute("input[name=name]", "aria-invalid") is None
    assert await page.input_value("input[name=name]") == "store_b"
    assert await page.input_value("input[name=tags]") == "B店, walk-in"
    assert await page.input_value("textarea[name=welcome]") == "欢迎来到B店,{{ customer.name }}!券码 {{ coupon.code }}"
    assert await page.input_value("select[name=channel]") == "wecom:acme"
    assert await page.input_value("select[name=coupon]") == "poster"
    # a cost that is not an amount, then a welcome that does not render: each at its own box
    await page.fill("input[name=staff]", "zhangsan，lisi")
    await page.fill("input[name=cost]", "six hundred")
    assert await submit(page) == 400
    assert "an amount" in await page.locator("#cost-error").inner_text()
    await page.fill("input[name=cost]", "600")
    await page.fill("textarea[name=welcome]", "欢迎 {{ nobody }}")
    assert await submit(page) == 400
    assert await page.locator("#welcome-error").count() == 1 and await page.locator("#cost-error").count() == 0
    assert await stored(console) == [] and wecom.calls_to("externalcontact/add_contact_way") == []

    # a staff member who left the corp: WeCom refuses (60111), said as the platform's answer
    await page.fill("textarea[name=welcome]", "欢迎来到B店,{{ customer.name }}!券码 {{ coupon.code }}")
    await page.fill("input[name=staff]", "wangwu")
    assert await submit(page) == 502
    assert "not in the corp" in await page.locator("#refused").inner_text()
    assert await page.input_value("input[name=staff]") == "wangwu"
    assert await stored(console) == []

    await page.fill("input[name=staff]", "zhangsan，lisi")
    await page.click("#new-code button[type=submit]")
    await page.wait_for_url(f"{console.url}/console/codes/store_b?notice=created")
    [row] = await stored(console)
    assert (row.channel, row.account, row.kind, row.staff, row.tags) == ("wecom", "acme", "contact_way",
                                                                        ["zhangsan", "lisi"], ["B店", "walk-in"])
    assert (row.coupon_pool, row.cost, row.created_by) == ("poster", 600.0, "console:olive")
    assert row.welcome == "欢迎来到B店,{{ customer.name }}!券码 {{ coupon.code }}" and row.expires_at is not None
    assert wecom.calls_to("externalcontact/add_contact_way")[-1] == {
        "type": 2, "scene": 2, "remark": "store_b", "skip_verify": True, "state": "store_b", "user": ["zhangsan", "lisi"]}
    [way] = wecom.ways.values()
    assert way["state"] == "store_b"
    assert await page.locator("#code-url").inner_text() == row.url
    assert await page.locator("[data-state]").get_attribute("data-state") == "active"

    # the images: the inline one (SVG, as Chromium draws it) and the three downloads read back as the URL
    qr = page.locator("#qr")
    await qr.scroll_into_view_if_needed()
    assert await qr.evaluate("img => img.complete && img.naturalWidth > 0")
    assert decode(await qr.screenshot()) == row.url
    name, png = await download(page, "png")
    assert name == "store_b.png" and decode(png) == row.url
    name, svg = await download(page, "svg")
    assert name == "store_b.svg" and svg.lstrip().startswith(b"<?xml") and b"<svg" in svg
    name, poster = await download(page, "poster")
    assert name == "store_b-poster.png" and decode(poster) == row.url
    assert Image.open(io.BytesIO(poster)).size[0] > 4 * Image.open(io.BytesIO(png)).size[0]

    # disabling asks first, then withdraws the way at WeCom; the figures' row stays
    await page.click("text=Disable 停用")
    await page.wait_for_url(f"{console.url}/console/codes/store_b/disable")
    assert wecom.ways and (await stored(console))[0].disabled_at is None  # asking changed nothing
    await page.click("#confirm button[type=submit]")
    await page.wait_for_url(f"{console.url}/console/codes/store_b?notice=disabled")
    assert await page.locator("[data-state]").get_attribute("data-state") == "disabled"
    assert await page.locator("text=Disable 停用").count() == 0
    assert wecom.ways == {} and (await stored(console))[0].disabled_at is not None
    await page.goto(f"{console.url}/console/codes")
    assert await page.locator("tr[data-code=store_b] [data-state]").get_attribute("data-state") == "disabled"
    assert (await page.goto(f"{console.url}/console/codes/store_c")).status == 404  # type: ignore[union-attr]


async def save(page: Page) -> int:
    """Send a code's edit form; the status of the page it answers with."""
    async with page.expect_response(lambda r: r.request.method == "POST") as posted:
        await page.click("#edit-code button[type=submit]")
    await page.wait_for_load_state()
    return (await posted.value).status


async def csrf_of(page: Page) -> str:
    """The signed-in staff member's own form token, as the page carries it for htmx."""
    headers = await page.locator("body").get_attribute("hx-headers")
    assert headers is not None
    return headers.split('"')[3]


def what_it_does(row: AcquisitionCode) -> tuple[Any, ...]:
    return row.staff, row.tags, row.welcome, row.campaign, row.coupon_pool, row.cost, row.disabled_at


async def test_an_operator_changes_what_a_code_does(console: Console, page: Page, wechat: FakeWeChat) -> None:
    svc = console.service
    await codes.create(svc, CodeSpec("window_1", "wechat:brand", permanent=True, tags=("橱窗",), welcome="欢迎光临",
                                     coupon="poster", cost=80.0), "cli:tester")
    await console.add_staff("olive", "operator")
    await sign_in(page, console, "olive")
    await page.goto(f"{console.url}/console/codes/window_1")
    form = page.locator("#edit-code")
    assert await form.get_attribute("open") is None  # folded until asked for
    await page.click("#edit-code summary")
    assert await page.locator("#edit-code input[name=staff]").count() == 0  # a WeChat code adds no staff
    assert (await page.input_value("#edit-code input[name=tags]"), await page.input_value("#edit-code textarea"),
            await page.input_value("#edit-code select[name=coupon]"),
            await page.input_value("#edit-code input[name=cost]")) == ("橱窗", "欢迎光临", "poster", "80")
    await page.fill("#edit-code input[name=tags]", "橱窗，vip")
    await page.fill("#edit-code textarea[name=welcome]", "{{ customer.name }},欢迎回到橱窗\n第二行")
    await page.select_option("#edit-code select[name=coupon]", "")
    await page.fill("#edit-code input[name=cost]", "")  # unknown from now on
    await page.click("#edit-code button[type=submit]")
    await page.wait_for_url(f"{console.url}/console/codes/window_1?notice=changed")
    assert "Changed" in await page.locator(".notice").inner_text()
    [row] = await stored(console)
    assert what_it_does(row) == ([], ["橱窗", "vip"], "{{ customer.name }},欢迎回到橱窗\n第二行", None, None, None, None)
    assert await page.locator("[data-fact=tags] .tag").all_inner_texts() == ["橱窗", "vip"]
    assert await page.locator("[data-fact=cost]").inner_text() == "–"
    # the page's form holds what the code does now
    assert await page.input_value("#edit-code input[name=tags]") == "橱窗, vip"
    assert await page.input_value("#edit-code input[name=cost]") == ""

    # the next follower through the printed code gets the new tag and the new welcome, and no coupon
    cb = plaintext(WX_TOKEN, event_xml("o_dora", "subscribe", "qrscene_window_1", create_time=int(time.time()),
                                       extra={"Ticket": "gQ0"}))
    async with aiohttp.ClientSession() as http, http.post(
            f"{console.url}/wechat/brand", params=cb.query, data=cb.body, headers={"Content-Type": "text/xml"}) as resp:
        assert resp.status == 200
        reply = xmltodict.parse(await resp.text())["xml"]
    dora = await customer_by(svc, "wechat", "o_dora")
    assert dora is not None and dora.acquisition_source == "code:window_1"
    assert await tags_of(svc, dora.id) >= {"橱窗", "vip"}
    assert reply["Content"] == "朋友,欢迎回到橱窗\n第二行"

    # a post without the form's token changes nothing
    refused = await page.request.post(f"{console.url}/console/codes/window_1", form={"tags": "forged"})
    assert refused.status == 403 and "security token" in await refused.text()
    assert (await stored(console))[0].tags == ["橱窗", "vip"]


async def test_a_change_that_cannot_be_is_said_at_its_field_and_writes_nothing(
        console: Console, page: Page, wecom: FakeWeCom) -> None:
    svc = console.service
    await codes.create(svc, CodeSpec("store_b", "wecom:acme", staff=("zhangsan",), tags=("B店",), coupon="poster",
                                     cost=600.0), "cli:tester")
    [before] = await stored(console)
    await console.add_staff("olive", "operator")
    await sign_in(page, console, "olive")
    await page.goto(f"{console.url}/console/codes/store_b")
    await page.click("#edit-code summary")
    assert await page.input_value("#edit-code input[name=staff]") == "zhangsan"
    assert await page.locator("#edit-code input[name=groups]").count() == 0
    await page.fill("#edit-code input[name=tags]", "B店, 新")

    # a cost that is not an amount: at the cost box, the rest of the form as it was sent
    await page.fill("#edit-code input[name=cost]", "six hundred")
    assert await save(page) == 400
    assert await page.get_attribute("#edit-code", "open") is not None
    assert "an amount" in await page.locator("#cost-error").inner_text()
    assert await page.get_attribute("#edit-code input[name=cost]", "aria-invalid") == "true"
    assert await page.get_attribute("#edit-code input[name=tags]", "aria-invalid") is None
    assert await page.input_value("#edit-code input[name=tags]") == "B店, 新"
    assert await page.input_value("#edit-code input[name=cost]") == "six hundred"

    # a campaign the configuration no longer has (the page was older than the file's removal)
    await page.fill("#edit-code input[name=cost]", "650")
    await page.evaluate("""() => {
        const select = document.querySelector('#edit-code select[name=campaign]');
        select.add(new Option('spring_sale', 'spring_sale', true, true));
    }""")
    assert await save(page) == 400
    assert "no campaign 'spring_sale'" in await page.locator("#campaign-error").inner_text()
    assert await page.get_attribute("#edit-code select[name=campaign]", "aria-invalid") == "true"
    assert await page.input_value("#edit-code select[name=campaign]") == "spring_sale"  # as it was sent
    assert await page.locator("#cost-error").count() == 0
    assert await page.input_value("#edit-code input[name=cost]") == "650"

    # a code made for one staff member cannot become several people's (WeCom's rule, the core's check)
    await page.select_option("#edit-code select[name=campaign]", "")
    await page.fill("#edit-code input[name=staff]", "zhangsan, lisi")
    assert await save(page) == 400
    assert "one staff member" in await page.locator("#staff-error").inner_text()
    # someone WeCom does not know: the platform's refusal, said as such
    await page.fill("#edit-code input[name=staff]", "wangwu")
    assert await save(page) == 502
    assert "not in the corp" in await page.locator("#refused").inner_text()
    assert await page.input_value("#edit-code input[name=staff]") == "wangwu"
    [after] = await stored(console)
    assert what_it_does(after) == what_it_does(before)
    assert [c for c in wecom.calls_to("externalcontact/update_contact_way") if c and c.get("user") != ["wangwu"]] == []

    # another staff member in the same one-person way: changed at WeCom first, then kept
    await page.fill("#edit-code input[name=staff]", "lisi")
    await page.click("#edit-code button[type=submit]")
    await page.wait_for_url(f"{console.url}/console/codes/store_b?notice=changed")
    [after] = await stored(console)
    assert what_it_does(after) == (["lisi"], ["B店", "新"], None, None, "poster", 650.0, None)
    assert wecom.calls_to("externalcontact/update_contact_way")[-1]["user"] == ["lisi"]  # type: ignore[index]
    assert await page.locator("[data-fact=staff]").inner_text() == "lisi"

    # a disabled code: no form, and a post from an older page is refused with the reason, nothing written
    csrf = await csrf_of(page)
    await codes.disable(svc, "store_b", "cli:ops")
    [before] = await stored(console)
    refused = await page.request.post(f"{console.url}/console/codes/store_b",
                                      form={"_csrf": csrf, "staff": "lisi", "tags": "late"})
    assert refused.status == 409 and "disabled" in await refused.text()
    assert what_it_does((await stored(console))[0]) == what_it_does(before)
    await page.goto(f"{console.url}/console/codes/store_b")
    assert await page.locator("#edit-code").count() == 0
    missing = await page.request.post(f"{console.url}/console/codes/store_c", form={"_csrf": csrf, "tags": "x"})
    assert missing.status == 404


async def history(console: Console, name: str, new_per_day: list[int]) -> None:
    """Earlier new customers through a code, a count a day going back from yesterday (as an import of
    last week's arrivals would leave them): lines beside today's for the chart."""
    now = console.service.clock.now()
    async with writing(console.service.sessions) as session:
        code_id = await session.scalar(select(AcquisitionCode.id).where(AcquisitionCode.name == name))
        for back, count in enumerate(new_per_day, start=1):
            at = now - timedelta(days=back)
            for _ in range(count):
                customer = Customer(acquisition_source=f"code:{name}", first_seen_at=at, last_seen_at=at, attributes={})
                session.add(customer)
                await session.flush()
                session.add(CodeScan(code_id=code_id, customer_id=customer.id, new_customer=True, scanned_at=at))


async def arrive(console: Console, http: aiohttp.ClientSession, openid: str, xml: str) -> None:
    """One callback from WeChat to the running service, signed as WeChat signs it."""
    cb = plaintext(WX_TOKEN, xml)
    async with http.post(f"{console.url}/wechat/brand", params=cb.query, data=cb.body,
                         headers={"Content-Type": "text/xml"}) as resp:
        assert resp.status == 200, openid


async def test_a_manager_reads_the_figures_after_arrivals_but_may_not_change_codes(
        console: Console, page: Page, wechat: FakeWeChat) -> None:
    svc = console.service
    poster = await codes.create(svc, CodeSpec("poster_mall", "wechat:brand", expires=timedelta(days=7),
                                              tags=("商场海报",), coupon="poster", cost=300.0), "cli:tester")
    await codes.create(svc, CodeSpec("mall_east", "wechat:brand", tags=("商场海报", "东区"), cost=1200.0), "cli:tester")
    await history(console, "mall_east", [3, 5, 2, 4, 6, 3])
    await codes.create(svc, CodeSpec("flyer_q4", "wechat:brand", permanent=True, welcome="欢迎 {{ customer.name }}"),
                       "cli:tester")
    # two new followers through the poster, one of whom leaves again; someone who already followed scans
    # it; the one who stayed writes (WeChat tells events apart by who and when: each its own second)
    events = [("o_amy", "subscribe", "qrscene_poster_mall"), ("o_ben", "subscribe", "qrscene_poster_mall"),
              ("o_ben", "unsubscribe", None), ("o_cat", "subscribe", ""), ("o_cat", "SCAN", "poster_mall")]
    now = int(time.time())
    async with aiohttp.ClientSession() as http:
        for at, (openid, event, key) in enumerate(events, start=now):
            await arrive(console, http, openid, event_xml(openid, event, key, create_time=at,
                                                          extra={"Ticket": "gQ0"} if key else {}))
        await arrive(console, http, "o_amy", message_xml("o_amy", "text", {"Content": "有没有新款?"}, msg_id=9001,
                                                         create_time=now + len(events)))
    await applied(svc)  # the unfollow and the text are answered once durable, applied behind
    amy = await customer_by(svc, "wechat", "o_amy")
    assert amy is not None and amy.acquisition_source == "code:poster_mall"
    async with writing(svc.sessions) as session:
        await orders.record_order(session, amy, orders.Order("shop-1001", 268.0, "CNY"), svc.clock.now(),
                                  "api", "pos")
    qr_calls = len([c for c in wechat.calls if c.endpoint == "qrcode/create"])

    await console.add_staff("mona", "manager")
    await sign_in(page, console, "mona")
    await page.goto(f"{console.url}/console/codes?period=7d")
    row = page.locator("tr[data-code=poster_mall]")

    async def figure(key: str, where: Any = row) -> str:
        return (await where.locator(f"[data-figure={key}]").inner_text()).strip()

    expected = {"scans": "3", "new_customers": "2", "reengaged": "1", "unfollowed_7d": "1", "first_messages": "1",
                "converted": "1", "conversions": "1", "revenue": "268.00", "last_touch_conversions": "1",
                "last_touch_revenue": "268.00", "cost": "300.00", "cost_per_new": "150.00",
                "cost_per_converted": "300.00"}
    assert {key: await figure(key) for key in expected} == expected
    assert "商场海报" in await row.inner_text() and "poster" in await row.locator(".does").inner_text()
    flyer = page.locator("tr[data-code=flyer_q4]")
    assert (await figure("scans", flyer), await figure("cost_per_new", flyer)) == ("0", "–")
    assert "欢迎" in await flyer.locator(".does").inner_text()
    east = page.locator("tr[data-code=mall_east]")
    assert (await figure("new_customers", east), await figure("cost_per_new", east)) == ("23", "52.17")
    chart = page.locator("#codes-chart")
    await chart.scroll_into_view_if_needed()
    assert await chart.evaluate("img => img.complete && img.naturalWidth > 0")
    assert await page.locator("#new-code").count() == 0  # a manager reads
    await screenshot(page, "codes")

    await page.click("tr[data-code=poster_mall] a")
    await page.wait_for_url(f"{console.url}/console/codes/poster_mall")
    cards = {key: await page.locator(f"[data-figure={key}] .value").inner_text() for key in expected if key != "cost"}
    assert cards == {key: value for key, value in expected.items() if key != "cost"}
    today = svc.clock.now().replace(tzinfo=UTC).astimezone(ZoneInfo(svc.config.service.timezone)).date().isoformat()
    assert (await page.locator(f"tr[data-day='{today}']").inner_text()).split() == [today, "3", "2", "1"]
    assert await page.locator("#code-url").inner_text() == poster.url
    assert await page.locator("text=Disable 停用").count() == 0 and await page.locator("#edit-code").count() == 0
    assert decode(await page.locator("#qr").screenshot()) == poster.url

    # the role is the route's, not the button's: a manager's own valid token does not make a post theirs
    csrf = await csrf_of(page)
    for path, form in (("/console/codes", {"name": "forged", "channel": "wechat:brand"}),
                       ("/console/codes/poster_mall/disable", {}), ("/console/codes/poster_mall", {"tags": "forged"})):
        forged = await page.request.post(f"{console.url}{path}", form={"_csrf": csrf, **form})
        assert forged.status == 403, path
    assert (await page.request.get(f"{console.url}/console/codes/poster_mall/disable")).status == 403
    assert [(c.name, c.disabled_at, c.tags) for c in await stored(console)] == [
        ("poster_mall", None, ["商场海报"]), ("mall_east", None, ["商场海报", "东区"]), ("flyer_q4", None, [])]
    assert len([c for c in wechat.calls if c.endpoint == "qrcode/create"]) == qr_calls
