"""The WeChat Official Account channel through the real app, against a fake WeChat API on loopback:
callbacks in plaintext and safe mode, dedupe of WeChat's retries, campaign sends inside and outside
the 48-hour window, token refresh and errcode handling, report charts as image messages, and bad
input that writes nothing."""

from __future__ import annotations

import asyncio
import logging
import struct
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import xmltodict
from sqlalchemy import func, select

from handlers.wechat import MAX_REPLY_BYTES, WeChatApiError, cut_utf8
from scrm.config import ConfigError
from scrm.messages import Chart, OutboundMessage
from scrm.store.models import Customer, CustomerTag, Delivery, Identity, Tag, Touchpoint
from scrm.web import SERVICE, create_app
from tests.conftest import ROOT, applied, eventually
from tests.fakes.wechat import (
    Callback,
    FakeWeChat,
    event_xml,
    message_xml,
    open_reply,
    plaintext,
    safe_mode,
    signature,
    text_xml,
)

TOKEN = "brandtoken2024"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"  # 43 characters, like an EncodingAESKey
GH = "gh_0123456789ab"


@pytest.fixture
async def fake(aiohttp_server) -> FakeWeChat:
    fake = FakeWeChat()
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("/"))  # type: ignore[attr-defined]
    return fake


def account(fake: FakeWeChat, **extra: Any) -> dict[str, Any]:
    return {"app_id": fake.app_id, "app_secret": fake.app_secret, "token": TOKEN, "encoding_aes_key": AES_KEY,
            "api_base_url": fake.base_url, "request_timeout_seconds": 2, "quota_retry_seconds": 60,  # type: ignore[attr-defined]
            "retry_backoff_seconds": 1, **extra}


async def start(aiohttp_client, make_config, clock, fake: FakeWeChat, overrides: dict[str, Any] | None = None,
                **settings: Any):
    config = make_config({"channels": {"wechat": {"brand": account(fake, **settings)}}, **(overrides or {})})
    client = await aiohttp_client(create_app(config, clock))
    return client, client.app[SERVICE]


async def post(client, cb: Callback, path: str = "/wechat/brand", *, wait: bool = True):
    """Post a callback; once WeChat is answered 200 (most callbacks once durable: scrm.ingest), wait until the
    journal holds nothing unapplied, unless ``wait`` is False (a test that holds the consumer)."""
    resp = await client.post(path, params=cb.query, data=cb.body, headers={"Content-Type": "text/xml"})
    if wait and resp.status == 200:
        await applied(client.app[SERVICE])
    return resp


async def count(service, model, *where) -> int:
    async with service.sessions() as s:
        return await s.scalar(select(func.count()).select_from(model).where(*where))


async def customer_of(service, openid: str) -> Customer:
    async with service.sessions() as s:
        return await s.scalar(select(Customer).join(Identity).where(Identity.channel == "wechat",
                                                                     Identity.external_id == openid))


async def inbound(service) -> list[Touchpoint]:
    async with service.sessions() as s:
        return list((await s.scalars(select(Touchpoint).where(Touchpoint.direction == "in").order_by(Touchpoint.id))).all())


async def deliveries(service) -> dict[str, Delivery]:
    async with service.sessions() as s:
        return {d.campaign: d for d in (await s.scalars(select(Delivery))).all()}


# -- URL verification -----------------------------------------------------------------------------


async def test_url_verification_echoes_or_refuses(aiohttp_client, make_config, clock, fake):
    client, _ = await start(aiohttp_client, make_config, clock, fake)
    good = {"signature": signature(TOKEN, "1700000000", "n0nce"), "timestamp": "1700000000", "nonce": "n0nce",
            "echostr": "5837392748562"}
    resp = await client.get("/wechat/brand", params=good)
    assert (resp.status, await resp.text()) == (200, "5837392748562")
    resp = await client.get("/wechat/brand", params={**good, "signature": signature("other", "1700000000", "n0nce")})
    assert resp.status == 403
    resp = await client.get("/wechat/brand", params={"echostr": "1"})
    assert resp.status == 403


# -- inbound messages ---------------------------------------------------------------------------------


async def test_plaintext_text_captures_customer_with_tags(aiohttp_client, make_config, clock, fake):
    client, service = await start(aiohttp_client, make_config, clock, fake)
    resp = await post(client, plaintext(TOKEN, text_xml("o_alice", "你好,我想买奶粉,有优惠券吗", 6200000000000000001),
                                        openid="o_alice"))
    assert (resp.status, await resp.text()) == (200, "success")
    customer = await customer_of(service, "o_alice")
    assert customer.acquisition_source == "wechat:brand" and customer.last_inbound_at == clock.now()
    [tp] = await inbound(service)
    assert (tp.kind, tp.text, tp.platform_msg_id, tp.account) == ("text", "你好,我想买奶粉,有优惠券吗",
                                                                  "6200000000000000001", "brand")
    async with service.sessions() as s:
        tags = set((await s.scalars(select(Tag.name).join(CustomerTag).where(CustomerTag.customer_id == customer.id))).all())
    assert tags == {"奶粉", "coupon-seeker"}


async def test_safe_mode_text_is_decrypted_and_reply_encrypted(aiohttp_client, make_config, clock, fake):
    client, service = await start(aiohttp_client, make_config, clock, fake,
                                  overrides={"staff": {"wechat:o_manager": "manager"}})
    resp = await post(client, safe_mode(TOKEN, AES_KEY, fake.app_id, text_xml("o_bob", "有没有配方奶的折扣", 501)))
    assert (resp.status, await resp.text()) == (200, "success")
    bob = await customer_of(service, "o_bob")
    async with service.sessions() as s:
        tags = set((await s.scalars(select(Tag.name).join(CustomerTag).where(CustomerTag.customer_id == bob.id))).all())
    assert tags == {"奶粉", "coupon-seeker"}

    # a customer asking for a staff command gets the core's refusal as an encrypted passive reply
    resp = await post(client, safe_mode(TOKEN, AES_KEY, fake.app_id, text_xml("o_bob", "/report", 502)))
    assert resp.status == 200 and resp.content_type == "application/xml"
    reply = open_reply(TOKEN, AES_KEY, fake.app_id, await resp.text())
    assert (reply["MsgType"], reply["ToUserName"], reply["FromUserName"]) == ("text", "o_bob", GH)
    assert "仅限员工" in reply["Content"]

    # a manager gets the report
    resp = await post(client, safe_mode(TOKEN, AES_KEY, fake.app_id, text_xml("o_manager", "/report 7d", 503)))
    report = open_reply(TOKEN, AES_KEY, fake.app_id, await resp.text())["Content"]
    assert "新客户" in report and "1" in report
    assert await count(service, Customer) == 1  # staff are not customers


async def test_plaintext_reply_is_plain_xml(aiohttp_client, make_config, clock, fake):
    client, _ = await start(aiohttp_client, make_config, clock, fake)
    resp = await post(client, plaintext(TOKEN, text_xml("o_carl", "退订", 9001)))
    assert resp.content_type == "application/xml"
    body = await resp.text()
    assert "<ToUserName><![CDATA[o_carl]]></ToUserName>" in body and "<MsgType><![CDATA[text]]></MsgType>" in body


async def test_wechat_retries_make_one_touchpoint_and_one_reaction(aiohttp_client, make_config, clock, fake):
    client, service = await start(aiohttp_client, make_config, clock, fake)
    message = plaintext(TOKEN, text_xml("o_dora", "/report", 777))
    first = await post(client, message)
    assert "仅限员工" in await first.text()
    for _ in range(2):  # WeChat tries 3 times in all; retries carry new signatures, same MsgId
        again = await post(client, plaintext(TOKEN, text_xml("o_dora", "/report", 777)))
        assert again.status == 200 and "仅限员工" in await again.text()  # the recorded answer, given again
    event = event_xml("o_dora", "CLICK", "MENU_COUPONS", create_time=1700000123)
    for _ in range(3):
        assert await (await post(client, plaintext(TOKEN, event))).text() == "success"
    kinds = [(t.kind, t.platform_msg_id) for t in await inbound(service)]
    assert kinds == [("text", "777"), ("menu_click", "o_dora:1700000123")]
    assert await count(service, Touchpoint, Touchpoint.kind == "reply") == 1


async def test_follow_scan_and_unfollow(aiohttp_client, make_config, clock, fake):
    client, service = await start(aiohttp_client, make_config, clock, fake)
    await post(client, plaintext(TOKEN, event_xml("o_erin", "subscribe", "qrscene_spring_fair", create_time=1700000001,
                                                  extra={"Ticket": "gQH47joAAAAAAAAAASxodHRw"})))
    erin = await customer_of(service, "o_erin")
    assert erin.acquisition_source == "wechat:qr:spring_fair" and not erin.opted_out
    await post(client, plaintext(TOKEN, event_xml("o_erin", "SCAN", "store_42", create_time=1700000002,
                                                  extra={"Ticket": "gQH47joAAAAAAAAAASxodHRx"})))
    await post(client, plaintext(TOKEN, event_xml("o_erin", "unsubscribe", create_time=1700000003)))
    await applied(service)  # acknowledged once durable: no passive reply to wait for
    assert (await customer_of(service, "o_erin")).opted_out is True
    await post(client, plaintext(TOKEN, event_xml("o_erin", "subscribe", "", create_time=1700000004)))
    erin = await customer_of(service, "o_erin")
    assert erin.opted_out is False and erin.acquisition_source == "wechat:qr:spring_fair"
    seen = [(t.kind, t.payload) for t in await inbound(service)]
    assert seen == [
        ("subscribe", {"scene": "spring_fair", "ticket": "gQH47joAAAAAAAAAASxodHRw"}),
        ("scan", {"scene": "store_42", "ticket": "gQH47joAAAAAAAAAASxodHRx"}),
        ("unsubscribe", {}),
        ("subscribe", {}),
    ]


async def test_message_and_event_kinds(aiohttp_client, make_config, clock, fake):
    client, service = await start(aiohttp_client, make_config, clock, fake)
    o = "o_fay"
    bodies = [
        message_xml(o, "image", {"PicUrl": "http://mmbiz.qpic.cn/x.jpg", "MediaId": "m-img"}, msg_id=1),
        message_xml(o, "voice", {"MediaId": "m-voice", "Format": "amr", "Recognition": "我要奶粉"}, msg_id=2),
        message_xml(o, "video", {"MediaId": "m-video", "ThumbMediaId": "m-thumb"}, msg_id=3),
        message_xml(o, "shortvideo", {"MediaId": "m-short", "ThumbMediaId": "m-thumb2"}, msg_id=4),
        message_xml(o, "location", {"Location_X": 31.2304, "Location_Y": 121.4737, "Scale": 15,
                                    "Label": "上海市黄浦区"}, msg_id=5),
        message_xml(o, "link", {"Title": "奶粉测评", "Description": "d", "Url": "https://example.com/a"}, msg_id=6),
        event_xml(o, "VIEW", "https://shop.example.com/", create_time=1700000010),
        event_xml(o, "LOCATION", create_time=1700000011,
                  extra={"Latitude": 23.137466, "Longitude": 113.352425, "Precision": 119.385040}),
        # a notice WeChat pushes after a template send: acknowledged, not a customer interaction
        event_xml(o, "TEMPLATESENDJOBFINISH", create_time=1700000012, extra={"MsgID": 200163836, "Status": "success"}),
    ]
    for body in bodies:
        resp = await post(client, plaintext(TOKEN, body))
        assert (resp.status, await resp.text()) == (200, "success")
    await applied(service)  # acknowledged once durable: their effects follow
    seen = [(t.kind, t.payload) for t in await inbound(service)]
    assert seen == [
        ("image", {"media_id": "m-img", "pic_url": "http://mmbiz.qpic.cn/x.jpg"}),
        ("voice", {"media_id": "m-voice", "format": "amr", "recognition": "我要奶粉"}),
        ("video", {"media_id": "m-video", "thumb_media_id": "m-thumb", "short": False}),
        ("video", {"media_id": "m-short", "thumb_media_id": "m-thumb2", "short": True}),
        ("location", {"latitude": 31.2304, "longitude": 121.4737, "scale": "15", "label": "上海市黄浦区"}),
        ("link", {"title": "奶粉测评", "description": "d", "url": "https://example.com/a"}),
        ("menu_view", {"url": "https://shop.example.com/"}),
        ("location_report", {"latitude": 23.137466, "longitude": 113.352425, "precision": 119.38504}),
    ]
    assert (await customer_of(service, o)).last_inbound_at == clock.now()


async def test_slow_commit_answers_success_and_reply_follows_as_customer_message(
        aiohttp_client, make_config, clock, fake):
    client, service = await start(aiohttp_client, make_config, clock, fake, reply_timeout_seconds=1e-6)
    resp = await post(client, plaintext(TOKEN, text_xml("o_gus", "/report", 31)))
    assert (resp.status, await resp.text()) == (200, "success")

    async def late_reply():
        return [m for m in fake.custom_messages if "仅限员工" in m["text"]["content"]]

    [late] = await eventually(late_reply)
    assert late["touser"] == "o_gus"
    assert [t.kind for t in await inbound(service)] == ["text"]


# -- bad input --------------------------------------------------------------------------------------


async def test_bad_input_is_refused_and_writes_nothing(aiohttp_client, make_config, clock, fake):
    config = make_config({"service": {"max_body_bytes": 4096},
                          "channels": {"wechat": {"brand": account(fake),
                                                  "plain": account(fake, encoding_aes_key=None)}}})
    client = await aiohttp_client(create_app(config, clock))
    service = client.app[SERVICE]
    good = text_xml("o_mal", "奶粉", 1)
    bad_sig = plaintext(TOKEN, good)
    bad_sig.query["signature"] = signature("not-the-token", bad_sig.query["timestamp"], bad_sig.query["nonce"])
    forged = safe_mode(TOKEN, AES_KEY, fake.app_id, good)
    forged.query["msg_signature"] = "0" * 40
    wrong_app = safe_mode(TOKEN, AES_KEY, "wx_some_other_app", good)
    doctype = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
               + good.replace("奶粉", "&lol2;"))
    cases = [
        (bad_sig, "/wechat/brand", 403),
        (Callback({**bad_sig.query, "signature": "签名"}, good.encode()), "/wechat/brand", 403),
        (Callback({}, good.encode()), "/wechat/brand", 403),
        (forged, "/wechat/brand", 403),
        (wrong_app, "/wechat/brand", 403),
        (plaintext(TOKEN, "<xml><ToUserName>gh</ToUserName><FromUserName>o_mal"), "/wechat/brand", 400),
        (plaintext(TOKEN, "not xml at all"), "/wechat/brand", 400),
        (plaintext(TOKEN, "<xml><FromUserName>o_mal</FromUserName><MsgType>text</MsgType></xml>"), "/wechat/brand", 400),
        (plaintext(TOKEN, good.replace("<MsgId>1</MsgId>", "<MsgId>x1</MsgId>")), "/wechat/brand", 400),
        (plaintext(TOKEN, good.replace("<![CDATA[o_mal]]>", "<a>o_mal</a>")), "/wechat/brand", 400),
        (plaintext(TOKEN, good.replace("<![CDATA[奶粉]]>", "<b>奶粉</b><b>奶粉</b>")), "/wechat/brand", 400),
        (plaintext(TOKEN, good.replace("<CreateTime>", "<Created>").replace("</CreateTime>", "</Created>")),
         "/wechat/brand", 400),
        (safe_mode(TOKEN, AES_KEY, fake.app_id, good), "/wechat/plain", 400),  # safe mode not configured
        (plaintext(TOKEN, text_xml("o_mal", "奶" * 2000, 2)), "/wechat/brand", 413),
        (plaintext(TOKEN, good), "/wechat/unknown", 404),
    ]
    for cb, path, status in cases:
        resp = await post(client, cb, path)
        answer = await resp.text()
        assert resp.status == status, (path, cb.body[:80], resp.status, answer)
    for cb in (plaintext(TOKEN, doctype), safe_mode(TOKEN, AES_KEY, fake.app_id, doctype)):
        resp = await post(client, cb)
        assert (resp.status, await resp.text()) == (400, "XML with DOCTYPE or ENTITY declarations is not accepted")
    assert await count(service, Touchpoint) == 0
    assert await count(service, Customer) == 0
    # the same message, well signed, is accepted on both accounts
    assert (await post(client, plaintext(TOKEN, good), "/wechat/plain")).status == 200
    assert await count(service, Touchpoint, Touchpoint.direction == "in") == 1


async def test_account_settings_are_validated(make_config, fake):
    with pytest.raises(ConfigError) as exc:
        make_config({"channels": {"wechat": {"brand": account(fake, token="x", encoding_aes_key="short", colour=1)}}})
    problems = "\n".join(exc.value.problems)
    for key in ("channels.wechat.brand.token", "channels.wechat.brand.encoding_aes_key",
                "channels.wechat.brand.colour: unknown key"):
        assert key in problems


def test_long_replies_are_cut_on_character_boundaries():
    text = "奶粉" * 2000
    cut = cut_utf8(text)
    assert len(cut.encode("utf-8")) <= MAX_REPLY_BYTES and cut.endswith("…") and text.startswith(cut[:-1])
    assert cut_utf8("short") == "short"


# -- sending ------------------------------------------------------------------------------------------


async def test_welcome_campaign_reaches_wechat_as_customer_service_message(aiohttp_client, make_config, clock, fake):
    client, service = await start(aiohttp_client, make_config, clock, fake)
    await post(client, plaintext(TOKEN, text_xml("o_hana", "你好", 11)))
    await eventually(lambda: _status(service, "welcome", "sent"))
    [sent] = fake.custom_messages
    assert sent["touser"] == "o_hana" and sent["msgtype"] == "text"
    assert sent["text"]["content"].startswith("朋友,欢迎") and "WEL" in sent["text"]["content"]
    assert fake.count("token") == 1
    assert await count(service, Touchpoint, Touchpoint.kind == "campaign_message") == 1


async def test_following_opens_the_window_for_the_welcome(aiohttp_client, make_config, clock, fake):
    client, service = await start(aiohttp_client, make_config, clock, fake)
    await post(client, plaintext(TOKEN, event_xml("o_ivy", "subscribe", create_time=1700000100)))
    assert (await customer_of(service, "o_ivy")).last_inbound_at == clock.now()  # a follow is an interaction
    await eventually(lambda: _status(service, "welcome", "sent"))
    assert [m["touser"] for m in fake.custom_messages] == ["o_ivy"]


LATER = """name = "formula-followup"
kind = "marketing"
[trigger]
event = "tag_added"
tag = "奶粉"
delay = "3d"
[message]
text = "{{ customer.name }},奶粉新品到店"
"""

NOTICE = """name = "coupon-notice"
title = "优惠券提醒"
kind = "marketing"
[trigger]
event = "tag_added"
tag = "coupon-seeker"
delay = "3d"
[message]
text = "{{ customer.name }},您的优惠券快到期了"
[message.template]
template_id = "TPL_NOTICE"
url = "https://shop.example.com/coupons"
fields = { first = "{{ customer.name }},您有优惠券待使用", remark = "活动:{{ campaign.title }}" }
"""


def campaigns_dir(tmp_path: Path, delay: str = "3d") -> str:
    """The demo welcome plus two tag-triggered campaigns, one of them with a template for outside the window."""
    folder = tmp_path / "campaigns"
    folder.mkdir()
    (folder / "welcome.toml").write_text((ROOT / "campaigns" / "welcome.toml").read_text("utf-8"), "utf-8")
    (folder / "later.toml").write_text(LATER.replace('"3d"', f'"{delay}"'), "utf-8")
    (folder / "notice.toml").write_text(NOTICE.replace('"3d"', f'"{delay}"'), "utf-8")
    return str(folder)


async def test_outside_48h_skips_or_falls_back_to_template(aiohttp_client, make_config, clock, fake, tmp_path):
    client, service = await start(aiohttp_client, make_config, clock, fake,
                                  overrides={"campaigns": {"path": campaigns_dir(tmp_path)}})
    await post(client, plaintext(TOKEN, text_xml("o_jade", "奶粉有优惠吗", 21)))
    await eventually(lambda: _status(service, "welcome", "sent"))
    clock.advance(timedelta(days=3, minutes=1))
    await service.outbox.tick()
    found = await deliveries(service)
    assert (found["formula-followup"].status, found["formula-followup"].reason) == ("skipped", "outside_48h_window")
    assert (found["coupon-notice"].status, found["coupon-notice"].reason) == ("sent", None)
    assert len(fake.custom_messages) == 1  # only the welcome: nothing was attempted outside the window
    [notice] = fake.template_messages
    assert notice["touser"] == "o_jade" and notice["template_id"] == "TPL_NOTICE"
    assert notice["url"] == "https://shop.example.com/coupons"
    assert notice["data"] == {"first": {"value": "朋友,您有优惠券待使用"}, "remark": {"value": "活动:优惠券提醒"}}
    async with service.sessions() as s:
        skipped = await s.scalar(select(Touchpoint).where(Touchpoint.kind == "delivery_skipped"))
    assert (skipped.delivery_id, skipped.payload) == (found["formula-followup"].id,
                                                      {"step": 0, "reason": "outside_48h_window"})


async def test_wechat_refusals_are_recorded_as_skips(aiohttp_client, make_config, clock, fake, tmp_path):
    client, service = await start(aiohttp_client, make_config, clock, fake,
                                  overrides={"campaigns": {"path": campaigns_dir(tmp_path, delay="0s")}})
    fake.window_closed.add("o_kim")  # WeChat's own view of the window disagrees with ours: 45015
    fake.unsubscribed.add("o_lou")  # unfollowed meanwhile: 43004
    await post(client, plaintext(TOKEN, text_xml("o_kim", "你好,有优惠吗", 41)))
    await post(client, plaintext(TOKEN, text_xml("o_lou", "你好", 42)))

    async def outcomes():
        async with service.sessions() as s:
            rows = (await s.scalars(select(Delivery).where(Delivery.finished_at.is_not(None)))).all()
            return sorted((d.external_id, d.campaign, d.status, d.reason) for d in rows) if len(rows) == 3 else None

    assert await eventually(outcomes) == [
        ("o_kim", "coupon-notice", "sent", None),  # 45015 on the customer message: the template went instead
        ("o_kim", "welcome", "skipped", "outside_48h_window"),
        ("o_lou", "welcome", "skipped", "not_subscribed"),
    ]
    assert fake.custom_messages == []
    assert [(m["touser"], m["template_id"]) for m in fake.template_messages] == [("o_kim", "TPL_NOTICE")]


async def test_expired_token_is_refreshed_and_message_sent_once(aiohttp_client, make_config, clock, fake):
    client, service = await start(aiohttp_client, make_config, clock, fake)
    await post(client, plaintext(TOKEN, text_xml("o_max", "你好", 51)))
    await eventually(lambda: _count_sent(service, 1))
    fake.expire_tokens()
    await post(client, plaintext(TOKEN, text_xml("o_ned", "你好", 52)))
    await eventually(lambda: _count_sent(service, 2))
    assert [m["touser"] for m in fake.custom_messages] == ["o_max", "o_ned"]
    assert fake.count("token") == 2
    answers = [c.answer["errcode"] for c in fake.calls if c.endpoint == "message/custom/send"]
    assert answers == [0, 42001, 0]


async def _replanned(service, attempts: int = 1) -> Delivery | None:
    d = (await deliveries(service)).get("welcome")
    return d if d is not None and d.attempts == attempts and d.status == "planned" else None


@pytest.mark.parametrize(("errcode", "wait"), [(45009, 60), (45047, 60), (-1, 1)])
async def test_throttling_and_busy_answers_replan_the_delivery(aiohttp_client, make_config, clock, fake, errcode, wait):
    client, service = await start(aiohttp_client, make_config, clock, fake)
    fake.fail_next("message/custom/send", errcode)
    await post(client, plaintext(TOKEN, text_xml("o_oli", "你好", 61)))
    reason = f"wechat:{errcode}"
    d = await eventually(lambda: _replanned(service))
    assert d.reason == reason and d.due_at == clock.now() + timedelta(seconds=wait)
    assert await count(service, Touchpoint, Touchpoint.kind == "delivery_failed") == 0
    clock.advance(wait)
    await service.outbox.tick()
    d = (await deliveries(service))["welcome"]
    assert (d.status, d.attempts) == ("sent", 2)
    assert [m["touser"] for m in fake.custom_messages] == ["o_oli"]


async def test_busy_wechat_backs_off_doubling(aiohttp_client, make_config, clock, fake):
    client, service = await start(aiohttp_client, make_config, clock, fake)
    fake.fail_next("message/custom/send", -1, times=2)
    await post(client, plaintext(TOKEN, text_xml("o_oma", "你好", 62)))
    first = await eventually(lambda: _replanned(service))
    assert first.due_at == clock.now() + timedelta(seconds=1)
    clock.advance(1)
    await service.outbox.tick()
    second = await _replanned(service, attempts=2)
    assert second is not None and second.due_at == clock.now() + timedelta(seconds=2)
    clock.advance(2)
    await service.outbox.tick()
    assert (await deliveries(service))["welcome"].status == "sent"


async def test_unreachable_wechat_is_retried(aiohttp_client, make_config, clock, fake, unused_tcp_port):
    client, service = await start(aiohttp_client, make_config, clock, fake,
                                  api_base_url=f"http://127.0.0.1:{unused_tcp_port}/")
    await post(client, plaintext(TOKEN, text_xml("o_pam", "你好", 63)))
    d = await eventually(lambda: _replanned(service))
    assert d.reason == "network:ConnectionError" and d.due_at == clock.now() + timedelta(seconds=1)


async def test_lost_answer_is_never_resent(aiohttp_client, make_config, clock, fake):
    client, service = await start(aiohttp_client, make_config, clock, fake, request_timeout_seconds=0.3)
    fake.stall_next("token", 0.6)  # no message went out yet: safe to retry
    await post(client, plaintext(TOKEN, text_xml("o_quin", "你好", 64)))
    d = await eventually(lambda: _replanned(service))
    assert d.reason == "network:ReadTimeout"
    fake.stall_next("message/custom/send", 0.6)  # WeChat got the message, its answer came too late
    clock.advance(1)
    await service.outbox.tick()
    d = (await deliveries(service))["welcome"]
    assert (d.status, d.reason, d.attempts) == ("failed", "unknown_outcome:ReadTimeout", 2)

    async def delivered():
        return fake.custom_messages

    assert [m["touser"] for m in await eventually(delivered)] == ["o_quin"]
    clock.advance(3600)
    await service.outbox.tick()
    assert len(fake.custom_messages) == 1 and fake.count("message/custom/send") == 1


async def test_chart_image_upload_and_send(aiohttp_client, make_config, clock, fake):
    _, service = await start(aiohttp_client, make_config, clock, fake)
    channel = service.channel("wechat", "brand")
    png = _png()
    media_id = await channel.upload_image(png)
    assert fake.media[media_id] == png
    [upload] = [c for c in fake.calls if c.endpoint == "media/upload"]
    assert upload.query["type"] == "image" and upload.body["filename"] == "chart.png"
    result = await channel.send_image("o_pia", media_id)
    assert result.status == "sent"
    assert fake.custom_messages == [{"touser": "o_pia", "msgtype": "image", "image": {"media_id": media_id}}]
    with pytest.raises(WeChatApiError, match="^wechat:40005$"):  # WeChat checks the file really is an image
        await channel.upload_image(b"GIF-not-really")


# -- report charts as image messages ------------------------------------------------------------------

MANAGER = {"staff": {"wechat:o_manager": "manager"}}
#: How long a test waits for a report chart to be drawn: the first drawing in a fresh HOME builds
#: matplotlib's font cache, which takes seconds on a slow machine. A bound for a hang, not a speed.
CHART_WAIT = 120.0


@pytest.fixture(autouse=True, scope="module")
def _charts_loaded() -> None:
    """matplotlib's first import and font scan can take seconds on a loaded machine, longer than WeChat's
    passive-reply wait; these tests are about what follows the reply, so the cost is paid up front."""
    from scrm import charts

    assert charts.text_png("新客户").startswith(b"\x89PNG")


def images_to(fake: FakeWeChat, openid: str | None = None) -> list[dict[str, Any]]:
    return [m for m in fake.custom_messages if m["msgtype"] == "image" and openid in (None, m["touser"])]


def uploads(fake: FakeWeChat) -> list[Any]:
    return [c for c in fake.calls if c.endpoint == "media/upload"]


async def test_staff_report_gets_passive_text_then_chart_image(aiohttp_client, make_config, clock, fake):
    client, _ = await start(aiohttp_client, make_config, clock, fake, overrides=MANAGER, request_timeout_seconds=5)
    fake.stall_next("media/upload", 1.5)  # the passive reply must not wait for the upload
    resp = await post(client, plaintext(TOKEN, text_xml("o_manager", "/report 30d", 801)))
    assert resp.status == 200 and resp.content_type == "application/xml"
    reply = xmltodict.parse(await resp.text())["xml"]
    assert (reply["MsgType"], reply["ToUserName"]) == ("text", "o_manager") and "新客户" in reply["Content"]
    assert images_to(fake) == []  # answered while the chart is still uploading

    async def image():
        return images_to(fake)

    [sent] = await eventually(image)
    [upload] = uploads(fake)
    assert upload.query["type"] == "image" and upload.answer["type"] == "image"
    media_id = upload.answer["media_id"]
    assert fake.media[media_id].startswith(b"\x89PNG\r\n\x1a\n")
    assert sent == {"touser": "o_manager", "msgtype": "image", "image": {"media_id": media_id}}
    assert [m["msgtype"] for m in fake.custom_messages] == ["image"]  # the text went as the passive reply


async def test_customers_get_no_images(aiohttp_client, make_config, clock, fake):
    client, _ = await start(aiohttp_client, make_config, clock, fake, overrides=MANAGER)
    refused = await post(client, plaintext(TOKEN, text_xml("o_rita", "/report 30d", 811)))
    assert "仅限员工" in await refused.text()
    await post(client, plaintext(TOKEN, text_xml("o_rita", "你好,有奶粉吗", 812)))
    await post(client, plaintext(TOKEN, text_xml("o_manager", "/report 7d", 813)))  # a chart follows this one

    async def manager_image():
        return images_to(fake, "o_manager")

    await eventually(manager_image)
    assert images_to(fake, "o_rita") == [] and len(uploads(fake)) == 1


async def test_failed_chart_upload_is_logged_and_harmless(aiohttp_client, make_config, clock, fake, caplog):
    caplog.set_level(logging.WARNING, logger="handlers.wechat")
    client, _ = await start(aiohttp_client, make_config, clock, fake, overrides=MANAGER)
    fake.fail_next("media/upload", 45009)  # daily API quota reached
    resp = await post(client, plaintext(TOKEN, text_xml("o_manager", "/report", 821)))
    assert resp.status == 200 and "新客户" in await resp.text()

    async def logged():
        return [r for r in caplog.records if "not uploaded: wechat:45009" in r.getMessage()]

    [record] = await eventually(logged)
    assert record.levelno == logging.WARNING and "o_manager" in record.getMessage()
    assert images_to(fake) == [] and fake.count("message/custom/send") == 0
    # the channel still works: the next report's chart goes out
    resp = await post(client, plaintext(TOKEN, text_xml("o_manager", "/report 7d", 822)))
    assert "新客户" in await resp.text()

    async def image():
        return images_to(fake, "o_manager")

    await eventually(image)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_refused_chart_message_is_logged(aiohttp_client, make_config, clock, fake, caplog):
    caplog.set_level(logging.WARNING, logger="handlers.wechat")
    client, _ = await start(aiohttp_client, make_config, clock, fake, overrides=MANAGER)
    fake.fail_next("message/custom/send", 45047)  # customer-service message quota for this user
    resp = await post(client, plaintext(TOKEN, text_xml("o_manager", "/report", 831)))
    assert "新客户" in await resp.text()

    async def logged():
        return [r for r in caplog.records if "not sent: retry wechat:45047" in r.getMessage()]

    await eventually(logged)
    assert len(uploads(fake)) == 1 and images_to(fake) == []


async def test_late_reaction_sends_text_then_chart(aiohttp_client, make_config, clock, fake):
    client, _ = await start(aiohttp_client, make_config, clock, fake, overrides=MANAGER, reply_timeout_seconds=1e-6)
    resp = await post(client, plaintext(TOKEN, text_xml("o_manager", "/report 30d", 841)))
    assert (resp.status, await resp.text()) == (200, "success")

    async def both():
        return fake.custom_messages if len(fake.custom_messages) == 2 else None

    text, image = await eventually(both)
    assert (text["touser"], text["msgtype"]) == ("o_manager", "text") and "新客户" in text["text"]["content"]
    [upload] = uploads(fake)
    assert image == {"touser": "o_manager", "msgtype": "image", "image": {"media_id": upload.answer["media_id"]}}


async def test_stop_waits_for_a_chart_in_flight(aiohttp_client, make_config, clock, fake):
    client, service = await start(aiohttp_client, make_config, clock, fake, overrides=MANAGER)
    hold = fake.hold_next("media/upload")
    await post(client, plaintext(TOKEN, text_xml("o_manager", "/report", 851)))
    await asyncio.wait_for(hold.arrived.wait(), CHART_WAIT)  # drawn (however long a cold start takes), uploading
    stopping = asyncio.ensure_future(service.channel("wechat", "brand").stop())
    hold.released.set()  # WeChat answers the upload while stop() waits: the image still goes out
    await stopping
    assert [m["touser"] for m in images_to(fake)] == ["o_manager"]


async def test_stop_ends_a_chart_send_that_outlasts_its_grace(aiohttp_client, make_config, clock, fake, caplog):
    """WeChat never answers the upload: stop() still returns (the client's timeout or stop's own grace
    ends the follow-up, whichever comes first), nothing more is sent, and nothing is logged as an error."""
    caplog.set_level(logging.WARNING, logger="handlers.wechat")
    client, service = await start(aiohttp_client, make_config, clock, fake, overrides=MANAGER,
                                  request_timeout_seconds=0.5)
    hold = fake.hold_next("media/upload")
    await post(client, plaintext(TOKEN, text_xml("o_manager", "/report", 861)))
    await asyncio.wait_for(hold.arrived.wait(), CHART_WAIT)
    await service.channel("wechat", "brand").stop()
    hold.released.set()  # too late: the follow-up is over
    assert len(uploads(fake)) == 1 and fake.count("message/custom/send") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_send_with_image_sends_text_then_image(aiohttp_client, make_config, clock, fake):
    _, service = await start(aiohttp_client, make_config, clock, fake)
    channel = service.channel("wechat", "brand")
    png = _png()
    digest = OutboundMessage("wechat", "brand", "o_sam", "周报:新客户 3", image=Chart(lambda: png), last_inbound_at=clock.now())
    result = await channel.send(digest)
    assert result.status == "sent"
    [upload] = uploads(fake)
    assert fake.custom_messages == [
        {"touser": "o_sam", "msgtype": "text", "text": {"content": "周报:新客户 3"}},
        {"touser": "o_sam", "msgtype": "image", "image": {"media_id": upload.answer["media_id"]}},
    ]
    assert fake.media[upload.answer["media_id"]] == png


async def test_send_image_failure_keeps_the_text_sent(aiohttp_client, make_config, clock, fake, caplog):
    caplog.set_level(logging.WARNING, logger="handlers.wechat")
    _, service = await start(aiohttp_client, make_config, clock, fake)
    channel = service.channel("wechat", "brand")
    digest = OutboundMessage("wechat", "brand", "o_tia", "周报", image=Chart(_png), last_inbound_at=clock.now())
    fake.fail_next("media/upload", -1)  # system busy: a retry would send the text twice
    result = await channel.send(digest)
    assert result.status == "sent"
    assert [m["msgtype"] for m in fake.custom_messages] == ["text"] and fake.count("message/custom/send") == 1
    assert any("not uploaded: wechat:-1" in r.getMessage() for r in caplog.records)
    # an image the fake refuses as a file (not a PNG) is logged the same way
    result = await channel.send(OutboundMessage("wechat", "brand", "o_tia", "周报", image=Chart(lambda: b"not a png"),
                                                last_inbound_at=clock.now()))
    assert result.status == "sent" and any("wechat:40005" in r.getMessage() for r in caplog.records)
    # outside the window nothing is tried, as before
    stale = OutboundMessage("wechat", "brand", "o_tia", "周报", image=Chart(_png),
                            last_inbound_at=clock.now() - timedelta(hours=49))
    assert (await channel.send(stale)).status == "skipped"
    assert len(uploads(fake)) == 2 and fake.count("message/custom/send") == 2


async def _status(service, campaign: str, status: str) -> bool:
    d = (await deliveries(service)).get(campaign)
    return d is not None and d.status == status


async def _count_sent(service, n: int) -> bool:
    return await count(service, Delivery, Delivery.status == "sent") == n


def _png() -> bytes:
    """A real 1x1 PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


async def test_report_digest_reaches_a_wechat_manager_inside_48_hours_only(aiohttp_client, make_config, clock, fake):
    # WeChat lets the service message the manager for 48 hours after they last wrote: the digest goes out
    # (text, then its chart) the morning after "/digest", and is skipped once the manager has been silent.
    from scrm import digests
    from scrm.store.models import ReportDigest

    client, service = await start(aiohttp_client, make_config, clock, fake, overrides=MANAGER)
    resp = await post(client, plaintext(TOKEN, text_xml("o_manager", "/digest daily 09:00", 871)))
    assert "Digest daily 09:00" in xmltodict.parse(await resp.text())["xml"]["Content"]

    async def due_at():
        async with service.sessions() as s:
            return (await s.scalar(select(ReportDigest))).next_at

    clock.set(await due_at() + timedelta(seconds=30))
    assert await digests.send_due(service) == 1
    [upload] = uploads(fake)
    assert [(m["touser"], m["msgtype"]) for m in fake.custom_messages] == [("o_manager", "text"), ("o_manager", "image")]
    assert fake.custom_messages[1]["image"]["media_id"] == upload.answer["media_id"]

    clock.set(await due_at() + timedelta(days=2, seconds=30))  # the manager last wrote three days ago
    assert await digests.send_due(service) == 0
    assert len(fake.custom_messages) == 2 and len(uploads(fake)) == 1
    async with service.sessions() as s:
        sent = (await s.scalars(select(Touchpoint).where(Touchpoint.kind == "report_digest")
                                .order_by(Touchpoint.id))).all()
    assert [(t.actor, t.payload["status"], t.payload["reason"]) for t in sent] == [
        ("staff:wechat:o_manager", "sent", None), ("staff:wechat:o_manager", "skipped", "outside_48h_window")]
