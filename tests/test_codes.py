"""Channel codes (渠道活码) against fake WeChat, WeCom and Telegram servers: made on the platform with
the real request shapes, refused with the platforms' errcodes, rendered and read back, and what a
follow, scan, add or /start through one does (first touch, re-engagement, tags, welcome, coupon once).
The figures per code are checked against a generated history on both stores."""

from __future__ import annotations

import asyncio
import io
import random
import re
import sys
from datetime import timedelta
from typing import Any

import pytest
import xmltodict
import zxingcpp
from PIL import Image
from sqlalchemy import func, select

from scrm.acquisition import codes, figures, render
from scrm.acquisition.codes import CodeChange, CodeProblem, CodeSpec
from scrm.store.models import (
    AcquisitionCode,
    AuditEntry,
    CodeScan,
    Conversion,
    CouponCode,
    Customer,
    CustomerTag,
    Identity,
    Tag,
    Touchpoint,
    TrackedLink,
)
from scrm.web import SERVICE, create_app
from tests.conftest import applied, cli_env, eventually
from tests.fakes.telegram import FakeTelegram, Updates, user
from tests.fakes.wechat import FakeWeChat, event_xml, plaintext
from tests.fakes.wecom import CallbackSigner, FakeWeCom, contact_event

WX_TOKEN = "brandtoken2024"
CORP_ID, WECOM_SECRET, WECOM_TOKEN = "ww5f3c0d2e9a8b7c6d", "customer-contact-secret", "callbacktoken"
WECOM_AES = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
TG_TOKEN, TG_SECRET = "7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0", "wh_s3cret-Token_123"
POOL = {"poster": {"prefix": "PST", "value": 5, "valid_days": 30, "per_customer": 5}}


def decode(png: bytes) -> str:
    [found] = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))
    return found.text


async def tags_of(service, customer_id: int) -> set[str]:
    async with service.sessions() as s:
        return set((await s.scalars(select(Tag.name).join(CustomerTag)
                                    .where(CustomerTag.customer_id == customer_id))).all())


async def customer_by(service, channel: str, external_id: str) -> Customer | None:
    async with service.sessions() as s:
        return await s.scalar(select(Customer).join(Identity).where(Identity.channel == channel,
                                                                     Identity.external_id == external_id))


async def scans(service) -> list[tuple[str, int, bool]]:
    async with service.sessions() as s:
        return [(name, cid, new) for name, cid, new in await s.execute(
            select(AcquisitionCode.name, CodeScan.customer_id, CodeScan.new_customer).join(AcquisitionCode)
            .order_by(CodeScan.id))]


# -- WeChat: parametric QR codes ---------------------------------------------------------------------

@pytest.fixture
async def wechat(aiohttp_server) -> FakeWeChat:
    fake = FakeWeChat()
    fake.base_url = str((await aiohttp_server(fake.app())).make_url("/"))  # type: ignore[attr-defined]
    return fake


async def wechat_app(aiohttp_client, make_config, clock, fake: FakeWeChat):
    config = make_config({"coupons": POOL, "channels": {"wechat": {"brand": {
        "app_id": fake.app_id, "app_secret": fake.app_secret, "token": WX_TOKEN,
        "api_base_url": fake.base_url, "request_timeout_seconds": 2}}}})  # type: ignore[attr-defined]
    client = await aiohttp_client(create_app(config, clock))
    return client, client.app[SERVICE]


async def follow(client, openid: str, event: str, key: str, when: int) -> str:
    cb = plaintext(WX_TOKEN, event_xml(openid, event, key, create_time=when, extra={"Ticket": "gQ0"}))
    resp = await client.post("/wechat/brand", params=cb.query, data=cb.body, headers={"Content-Type": "text/xml"})
    assert resp.status == 200
    await applied(client.app[SERVICE])  # an unfollow is answered once durable, applied behind
    return await resp.text()


async def test_wechat_code_made_rendered_and_honoured(aiohttp_client, make_config, clock, wechat):
    client, service = await wechat_app(aiohttp_client, make_config, clock, wechat)
    spec = CodeSpec("poster_mall", "wechat:brand", expires=timedelta(days=7), tags=("商场海报",),
                    welcome="{{ customer.name }}您好,海报专享券 {{ coupon.code }}", coupon="poster", cost=300.0)
    view = await codes.create(service, spec, "cli:tester")
    [call] = [c for c in wechat.calls if c.endpoint == "qrcode/create"]
    assert call.body == {"action_name": "QR_STR_SCENE", "expire_seconds": 7 * 86400,
                         "action_info": {"scene": {"scene_str": "poster_mall"}}}
    assert view.kind == "qr" and view.url == call.answer["url"] and view.state == "active"
    assert view.expires_at == clock.now() + timedelta(days=7)
    # the rendered code reads back as the URL WeChat gave; the poster is larger; the SVG is an SVG
    png, poster = render.image(view.url), render.image(view.url, poster=True)
    assert decode(png) == view.url and decode(poster) == view.url
    assert Image.open(io.BytesIO(poster)).size[0] > 4 * Image.open(io.BytesIO(png)).size[0]
    assert render.image(view.url, "svg").lstrip().startswith(b"<?xml") and b"<svg" in render.image(view.url, "svg")

    # a new follower through the code: first touch, tags, the welcome as the passive reply, one coupon
    reply = xmltodict.parse(await follow(client, "o_new", "subscribe", "qrscene_poster_mall", 1700000001))["xml"]
    alice = await customer_by(service, "wechat", "o_new")
    assert alice is not None and alice.acquisition_source == "code:poster_mall"
    assert "商场海报" in await tags_of(service, alice.id)
    async with service.sessions() as s:
        [coupon] = (await s.scalars(select(CouponCode.code).where(CouponCode.customer_id == alice.id,
                                                                   CouponCode.code.like("PST%")))).all()
    assert reply["MsgType"] == "text" and reply["Content"] == f"朋友您好,海报专享券 {coupon}"
    # someone who already follows scans it: a re-engagement, welcomed again, no second coupon
    await follow(client, "o_old", "subscribe", "", 1700000002)
    reply = xmltodict.parse(await follow(client, "o_old", "SCAN", "poster_mall", 1700000003))["xml"]
    bob = await customer_by(service, "wechat", "o_old")
    assert bob is not None and bob.acquisition_source == "wechat:brand"
    assert reply["Content"].startswith("朋友您好,海报专享券 PST")
    await follow(client, "o_new", "SCAN", "poster_mall", 1700000004)
    async with service.sessions() as s:
        assert await s.scalar(select(func.count()).select_from(CouponCode).where(
            CouponCode.customer_id == alice.id, CouponCode.code.like("PST%"))) == 1
    assert await scans(service) == [("poster_mall", alice.id, True), ("poster_mall", bob.id, False),
                                    ("poster_mall", alice.id, False)]
    # a scene no code has stays a plain source; a duplicate callback (WeChat's retry) counts once
    await follow(client, "o_other", "subscribe", "qrscene_spring_fair", 1700000005)
    await follow(client, "o_other", "subscribe", "qrscene_spring_fair", 1700000005)
    assert len(await scans(service)) == 3

    # once the code expires, a scan is counted and does nothing else
    clock.advance(timedelta(days=8))
    reply_text = await follow(client, "o_late", "subscribe", "qrscene_poster_mall", 1700000006)
    late = await customer_by(service, "wechat", "o_late")
    assert late is not None and late.acquisition_source == "code:poster_mall"
    assert "商场海报" not in await tags_of(service, late.id) and "海报专享券" not in reply_text
    assert (await scans(service))[-1] == ("poster_mall", late.id, True)
    async with service.sessions() as s:
        assert [v.state for v in await codes.listing(s, clock.now())] == ["expired"]


async def test_wechat_refusals_write_nothing(aiohttp_client, make_config, clock, wechat):
    client, service = await wechat_app(aiohttp_client, make_config, clock, wechat)
    wechat.permanent_limit = 0  # the account's permanent codes are used up
    with pytest.raises(CodeProblem) as refused:
        await codes.create(service, CodeSpec("forever", "wechat:brand", permanent=True), None)
    assert refused.value.status == 502 and "45029" in refused.value.message
    wechat.fail_next("qrcode/create", 45009)
    with pytest.raises(CodeProblem, match="45009"):
        await codes.create(service, CodeSpec("today", "wechat:brand"), None)
    for spec, field in ((CodeSpec("bad name!", "wechat:brand"), "name"),
                        (CodeSpec("x", "wechat:nope"), "channel"),
                        (CodeSpec("x", "wechat:brand", campaign="no_such"), "campaign"),
                        (CodeSpec("x", "wechat:brand", coupon="no_such"), "coupon"),
                        (CodeSpec("x", "wechat:brand", welcome="{{ nobody }}"), "welcome"),
                        (CodeSpec("x", "wechat:brand", staff=("zhangsan",)), "staff"),
                        (CodeSpec("x", "wechat:brand", expires=timedelta(days=31)), "expires")):
        with pytest.raises(CodeProblem) as problem:
            await codes.create(service, spec, None)
        assert (problem.value.field, problem.value.status) == (field, 400)
    await codes.create(service, CodeSpec("once", "wechat:brand"), None)
    with pytest.raises(CodeProblem) as taken:
        await codes.create(service, CodeSpec("once", "wechat:brand"), None)
    assert taken.value.status == 409
    async with service.sessions() as s:
        assert [c.name for c in await codes.listing(s, clock.now())] == ["once"]


# -- WeCom: contact-me ways and group join ways ------------------------------------------------------

@pytest.fixture
async def wecom(aiohttp_server) -> FakeWeCom:
    fake = FakeWeCom(CORP_ID, WECOM_SECRET)
    fake.url = str((await aiohttp_server(fake.app)).make_url("/"))  # type: ignore[attr-defined]
    return fake


async def test_wecom_contact_way_welcome_and_refusals(aiohttp_client, make_config, clock, wecom):
    config = make_config({"coupons": POOL, "channels": {"wecom": {"acme": {
        "corp_id": CORP_ID, "secret": WECOM_SECRET, "token": WECOM_TOKEN, "encoding_aes_key": WECOM_AES,
        "api_base_url": wecom.url, "sender": "zhangsan"}}}})  # type: ignore[attr-defined]
    client = await aiohttp_client(create_app(config, clock))
    service = client.app[SERVICE]
    # a staff member who left the corp: WeCom's 60111, said in words, nothing kept
    with pytest.raises(CodeProblem, match="not in the corp"):
        await codes.create(service, CodeSpec("store_b", "wecom:acme", staff=("wangwu",)), None)
    view = await codes.create(service, CodeSpec("store_b", "wecom:acme", staff=("zhangsan", "lisi"),
                                                tags=("B店",), coupon="poster",
                                                welcome="欢迎来到B店,券码 {{ coupon.code }}"), None)
    [_, body] = wecom.calls_to("externalcontact/add_contact_way")  # the refused one, then this
    assert body == {"type": 2, "scene": 2, "remark": "store_b", "skip_verify": True, "state": "store_b",
                    "user": ["zhangsan", "lisi"]}
    assert view.kind == "contact_way" and decode(render.image(view.url)) == view.url

    wecom.add_contact("wm_carol", "Carol")
    welcome_code = wecom.issue_welcome_code()
    params, body_xml = CallbackSigner(CORP_ID, WECOM_TOKEN, WECOM_AES).post(
        contact_event(CORP_ID, "add_external_contact", "wm_carol", state="store_b", welcome_code=welcome_code))
    resp = await client.post("/wecom/acme", params=params, data=body_xml)
    assert resp.status == 200
    await eventually(lambda: asyncio.sleep(0, wecom.welcomes))
    [(_, _, sent)] = wecom.welcomes
    carol = await customer_by(service, "wecom", "wm_carol")
    assert carol is not None and carol.acquisition_source == "code:store_b"
    async with service.sessions() as s:
        coupon = await s.scalar(select(CouponCode.code).where(CouponCode.customer_id == carol.id,
                                                              CouponCode.code.like("PST%")))
    assert sent["text"]["content"] == f"欢迎来到B店,券码 {coupon}" and "B店" in await tags_of(service, carol.id)
    assert await scans(service) == [("store_b", carol.id, True)]

    # a group join way for the corp's group chats; disabling deletes both ways in WeCom
    wecom.add_group("wrOgAAAA", "zhangsan", {"zhangsan": 1})
    group = await codes.create(service, CodeSpec("group_b", "wecom:acme", groups=("wrOgAAAA",)), None)
    assert group.kind == "join_way" and group.url.startswith("https://wework.qpic.cn/")
    assert len(wecom.ways) == 2

    # other staff members and group chats for the same printed codes: changed in WeCom first
    with pytest.raises(CodeProblem, match="not in the corp") as left:
        await codes.change(service, "store_b", CodeChange(staff=("lisi", "wangwu"), tags=("B店", "new")), "cli:ops")
    assert (left.value.field, left.value.status) == ("staff", 502)
    [before] = [v for v in await _listing(service, clock) if v.name == "store_b"]
    assert before.staff == ["zhangsan", "lisi"] and before.tags == ["B店"]  # nothing changed
    changed = await codes.change(service, "store_b", CodeChange(staff=("lisi",), tags=("B店", "new"),
                                                                 clear=frozenset({"coupon"})), "cli:ops")
    assert (changed.staff, changed.tags, changed.coupon, changed.url) == (["lisi"], ["B店", "new"], None, view.url)
    [way] = [w for w in wecom.ways.values() if w.get("user")]
    assert (way["user"], way["state"]) == (["lisi"], "store_b")
    wecom.add_group("wrOgBBBB", "lisi", {"lisi": 1})
    moved = await codes.change(service, "group_b", CodeChange(groups=("wrOgAAAA", "wrOgBBBB")), "cli:ops")
    assert moved.staff == ["wrOgAAAA", "wrOgBBBB"] and wecom.ways[wecom_ref(wecom, "join")]["chat_id_list"] == [
        "wrOgAAAA", "wrOgBBBB"]
    for name, change, field in (("group_b", CodeChange(staff=("lisi",)), "staff"),
                                ("store_b", CodeChange(groups=("wrOgAAAA",)), "groups"),
                                ("store_b", CodeChange(campaign="nope"), "campaign"),
                                ("store_b", CodeChange(clear=frozenset({"tags"})), "tags")):
        with pytest.raises(CodeProblem) as bad:
            await codes.change(service, name, change, "cli:ops")
        assert (bad.value.field, bad.value.status) == (field, 400), name
    await codes.disable(service, "store_b", "cli:ops")
    await codes.disable(service, "group_b", "cli:ops")
    # who made, changed and withdrew which code, in the audit log (a refused change records nothing)
    async with service.sessions() as s:
        logged = (await s.execute(select(AuditEntry.actor, AuditEntry.detail).where(AuditEntry.action == "code_edit")
                                  .order_by(AuditEntry.id))).all()
    assert [a for a, _ in logged] == ["cli:ops"] * 4 and [d.split(":")[0] for _, d in logged] == [
        "code change store_b", "code change group_b", "code disable store_b", "code disable group_b"]
    assert "tags: ['B店'] -> ['B店', 'new']" in logged[0][1] and "coupon_pool: 'poster' -> None" in logged[0][1]
    assert wecom.ways == {} and [v.state for v in await _listing(service, clock)] == ["disabled", "disabled"]
    wecom.fail_next["externalcontact/add_contact_way"] = [(45009, "api freq out of limit")]
    with pytest.raises(CodeProblem, match="quota"):
        await codes.create(service, CodeSpec("store_c", "wecom:acme", staff=("lisi",)), None)


def wecom_ref(wecom: FakeWeCom, kind: str) -> str:
    """The config_id of the fake's only way of a kind (contact or join)."""
    [ref] = [k for k, w in wecom.ways.items() if ("chat_id_list" in w) == (kind == "join")]
    return ref


async def _listing(service, clock) -> list[codes.CodeView]:
    async with service.sessions() as s:
        return await codes.listing(s, clock.now())


# -- Telegram: deep links ----------------------------------------------------------------------------

async def test_telegram_deep_link_code(aiohttp_client, aiohttp_server, make_config, clock):
    fake = FakeTelegram(TG_TOKEN)
    fake.base_url = str((await aiohttp_server(fake.app())).make_url("/bot"))
    config = make_config({"coupons": POOL, "channels": {"telegram": {"main": {
        "token": TG_TOKEN, "webhook_secret": TG_SECRET, "api_base_url": fake.base_url}}}})
    client = await aiohttp_client(create_app(config, clock))
    service = client.app[SERVICE]
    view = await codes.create(service, CodeSpec("flyer_7", "telegram:main", tags=("flyer",),
                                                welcome="Hi {{ customer.name }}! Code {{ coupon.code }} "
                                                        "{{ track('https://shop.example.com/flyer') }}",
                                                coupon="poster"), None)
    assert view.url == "https://t.me/scrm_shop_bot?start=flyer_7" and decode(render.image(view.url)) == view.url
    updates = Updates(fake.bot_user)
    resp = await client.post("/telegram/main", json=updates.text(user(4242, "Dana"), "/start flyer_7"),
                             headers={"X-Telegram-Bot-Api-Secret-Token": TG_SECRET})
    assert resp.status == 200
    texts = await eventually(lambda: asyncio.sleep(0, [t for t in fake.texts_to(4242) if t.startswith("Hi ")]))
    dana = await customer_by(service, "telegram", "4242")
    assert dana is not None and dana.acquisition_source == "code:flyer_7" and "flyer" in await tags_of(service, dana.id)
    assert texts[0].startswith("Hi Dana! Code PST")
    [token] = re.findall(r"/l/([A-Za-z0-9_-]{24})$", texts[0])  # the welcome's link, counted for the code
    async with service.sessions() as s:
        link = await s.get(TrackedLink, token)
    assert link is not None and (link.target, link.rule, link.customer_id) == (
        "https://shop.example.com/flyer", "code:flyer_7", dana.id)


# -- figures on a generated history ------------------------------------------------------------------

async def test_figures_on_a_generated_history(aiohttp_client, make_config, clock):
    """Three codes, 300 arrivals over 20 days, unfollows, messages and orders drawn at random; the
    figures must equal what this test counts from the same draws by hand."""
    client = await aiohttp_client(create_app(make_config(), clock))
    service = client.app[SERVICE]
    rng = random.Random(7)
    now = clock.now()
    names = {"mall": 500.0, "ad": 1200.0, "staff_li": None}
    expected: dict[str, dict[str, Any]] = {n: {"scans": 0, "new": 0, "again": 0, "left": set(), "wrote": set(),
                                               "converted": set(), "orders": 0, "revenue": 0.0,
                                               "lt_orders": 0, "lt_revenue": 0.0} for n in names}
    async with service.sessions() as s, s.begin():
        ids = {}
        for name, cost in names.items():
            row = AcquisitionCode(name=name, channel="wechat", account="brand", kind="qr", scene=name,
                                  url=f"http://weixin.qq.com/q/{name}", staff=[], tags=[], cost=cost,
                                  created_at=now - timedelta(days=40))
            s.add(row)
            await s.flush()
            ids[name] = row.id
        people: list[tuple[int, str, Any]] = []  # customer, the code that brought them, when
        history: list[tuple[int, str, Any]] = []  # every scan: customer, code, when
        for _ in range(300):
            at = now - timedelta(days=rng.uniform(0, 20))
            name = rng.choice(list(names))
            if people and rng.random() < 0.3:  # someone already brought by a code scans again
                cid = rng.choice(people)[0]
                s.add(CodeScan(code_id=ids[name], customer_id=cid, new_customer=False, scanned_at=at))
                expected[name]["again"] += 1
            else:
                customer = Customer(display_name=None, acquisition_source=f"code:{name}", first_seen_at=at,
                                    last_seen_at=at, attributes={})
                s.add(customer)
                await s.flush()
                cid = customer.id
                s.add(CodeScan(code_id=ids[name], customer_id=cid, new_customer=True, scanned_at=at))
                people.append((cid, name, at))
                expected[name]["new"] += 1
            expected[name]["scans"] += 1
            history.append((cid, name, at))
        for cid, name, at in people:
            gap = timedelta(days=rng.uniform(0, 14))
            if rng.random() < 0.3:
                s.add(Touchpoint(customer_id=cid, channel="wechat", account="brand", direction="in",
                                 kind="unsubscribe", payload={}, created_at=at + gap))
                if gap <= timedelta(days=7):
                    expected[name]["left"].add(cid)
            if rng.random() < 0.5:
                s.add(Touchpoint(customer_id=cid, channel="wechat", account="brand", direction="in", kind="text",
                                 text="hi", payload={}, created_at=at + timedelta(hours=1)))
                expected[name]["wrote"].add(cid)
            for _ in range(rng.choice([0, 0, 1, 2])):
                when = min(at + timedelta(days=rng.uniform(0, 3)), now - timedelta(seconds=1))
                amount = round(rng.uniform(10, 300), 2)
                s.add(Conversion(customer_id=cid, kind="order", amount=amount, created_at=when))
                expected[name]["converted"].add(cid)
                expected[name]["orders"] += 1
                expected[name]["revenue"] += amount
                last = max((h for h in history if h[0] == cid and h[2] <= when), key=lambda h: h[2])
                expected[last[1]]["lt_orders"] += 1
                expected[last[1]]["lt_revenue"] += amount
    async with service.sessions() as s:
        found = {f.name: f for f in await figures.code_figures(s, now - timedelta(days=21), now, "Asia/Shanghai", now)}
    for name, e in expected.items():
        f = found[name]
        assert (f.scans, f.new_customers, f.reengaged) == (e["scans"], e["new"], e["again"]), name
        assert (f.unfollowed_7d, f.first_messages) == (len(e["left"]), len(e["wrote"])), name
        assert (f.converted, f.conversions) == (len(e["converted"]), e["orders"]), name
        assert f.revenue == pytest.approx(e["revenue"]) and f.last_touch_revenue == pytest.approx(e["lt_revenue"])
        assert f.last_touch_conversions == e["lt_orders"]
        assert sum(d.new_customers for d in f.days) == e["new"] and sum(d.scans for d in f.days) == e["scans"]
        cost = names[name]
        assert f.cost_per_new == (cost / e["new"] if cost else None)
        assert f.cost_per_converted == (cost / len(e["converted"]) if cost else None)
    # staff ask in chat: the text names each code, and a chart goes with it
    from scrm.staff.reports import _codes  # noqa: PLC0415 - the chat command's own function
    from scrm.staff import StaffContext  # noqa: PLC0415
    from scrm.messages import InboundEvent  # noqa: PLC0415

    async with service.sessions() as s:
        reply = await _codes(StaffContext(service, s, InboundEvent("console", "local", "boss", "text"), "console:boss",
                                          "manager", now), "21")
    assert all(name in reply.text for name in names) and len(reply.images) == 1
    assert (await reply.images[0].png()).startswith(b"\x89PNG")


# -- the command line --------------------------------------------------------------------------------

async def test_cli_create_list_image_report_disable(store, wechat, tmp_path):
    """``scrm codes`` as a user runs it, in a process of its own, against the fake WeChat on this loop."""
    env = cli_env(store, SCRM_CHANNELS__WECHAT__BRAND__APP_ID=wechat.app_id,
                  SCRM_CHANNELS__WECHAT__BRAND__APP_SECRET=wechat.app_secret,
                  SCRM_CHANNELS__WECHAT__BRAND__TOKEN=WX_TOKEN,
                  SCRM_CHANNELS__WECHAT__BRAND__API_BASE_URL=wechat.base_url)  # type: ignore[attr-defined]

    async def scrm(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "scrm", *args, cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(process.communicate(), 120)
        return await process.wait(), output.decode()

    assert (await scrm("init"))[0] == 0
    code, output = await scrm("codes", "create", "window_1", "--channel", "wechat:brand", "--expires", "12h",
                              "--tags", "橱窗,walk-in", "--cost", "80")
    assert code == 0 and "window_1 (qr)" in output, output
    code, output = await scrm("codes", "create", "window 2", "--channel", "wechat:brand")
    assert code == 2 and "name:" in output
    code, output = await scrm("codes", "list")
    assert code == 0 and "window_1" in output and "active" in output
    code, output = await scrm("codes", "image", "window_1", "-o", "w.png")
    assert code == 0 and decode((tmp_path / "w.png").read_bytes()).startswith("http://weixin.qq.com/q/")
    code, output = await scrm("codes", "report", "--days", "7")
    assert code == 0 and "window_1" in output
    code, output = await scrm("codes", "update", "window_1", "--tags", "橱窗,vip", "--cost", "")
    assert code == 0 and "tags 橱窗, vip" in output and "cost -" in output, output
    code, output = await scrm("codes", "update", "window_1", "--staff", "zhangsan")
    assert code == 2 and "staff:" in output and "WeCom" in output, output
    assert (await scrm("codes", "disable", "window_1"))[0] == 0
    code, output = await scrm("codes", "update", "window_1", "--tags", "late")
    assert code == 2 and "is disabled" in output
    code, output = await scrm("codes", "show", "window_1")
    assert code == 0 and "disabled" in output and "橱窗, vip" in output
    code, output = await scrm("codes", "show", "nope")
    assert code == 2 and "no code named" in output
