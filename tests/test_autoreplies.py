"""Keyword auto-replies (scrm.conversations): rules answered passively on WeChat in plaintext and safe mode
(text and news card) and on Telegram (buttons), negation, the per-customer cooldown (across batches and
within one), priorities and one answer per message beside a campaign's keyword trigger, the fallback in
and out of working hours in the staff's time zones, coupons, and rule files validated by file, key and
problem and reloaded while the service runs."""

from __future__ import annotations

import asyncio
import logging
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import xmltodict
from sqlalchemy import func, select

from scrm.clock import ManualClock
from scrm.conversations.autoreply import AUTO_REPLY, AutoReplies
from scrm.conversations.replies import ReplyError, check_file, load_replies
from scrm.messages import InboundEvent, Reaction
from scrm.service import Service
from scrm.store.models import Conversation, Delivery, Identity, Touchpoint
from scrm.web import SERVICE, create_app
from tests.conftest import ROOT, eventually
from tests.fakes.telegram import FakeTelegram, Updates, group_chat, user
from tests.fakes.wechat import FakeWeChat, open_reply, plaintext, safe_mode, text_xml
from tests.test_telegram import TOKEN as TELEGRAM_TOKEN
from tests.test_telegram import deliver, telegram_config
from tests.test_wechat import AES_KEY, TOKEN, account, post

RULES = """
[[rules]]
name = "hours"
keywords = ["营业时间", "几点开门"]
text = "{{ customer.name }},营业时间 9:00-21:00"

[[rules]]
name = "shipping"
keywords = ["快递", "发货"]
negations = ["不要", "不用"]
text = "48 小时内发货"
buttons = [{ text = "查物流", url = "https://shop.example.com/orders" }]

[[rules]]
name = "guide"
priority = 5
contains = ["选奶粉"]
regex = ["^which formula"]
text = "选奶粉小贴士"
[rules.article]
title = "选奶粉 {{ customer.name }}"
description = "三分钟看懂"
url = "https://shop.example.com/guide"
picurl = "https://shop.example.com/guide.png"

[[rules]]
name = "gift"
exact = ["领券"]
coupon = "gift"
text = "您的券:{{ coupon.code }}({{ coupon.value }} 元)"
"""

FALLBACK = """
[fallback]
text = "收到,客服稍后回复"
out_of_hours = "下班了,{{ customer.name }},明天回复"
[fallback.hours]
start = "09:00"
end = "18:00"
"""

#: A marketing campaign started by keywords, one of them a rule's too.
KEYWORD_CAMPAIGN = """
name = "double11"
[trigger]
event = "keyword"
keywords = ["活动", "快递"]
[message]
text = "双十一全场 8 折"
"""

GIFT_POOL = {"coupons": {"gift": {"prefix": "GIFT", "value": 5, "per_customer": 1}}}
#: The fallback at any hour of any day: for tests on the real clock.
ALWAYS = FALLBACK.replace('start = "09:00"', 'start = "00:00"').replace('end = "18:00"', 'end = "00:00"') + (
    'days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]\n')
WEDNESDAY = datetime(2026, 12, 2, 2, 0)  # 10:00 in Asia/Shanghai (the staff's zone), a Wednesday


def write_replies(folder: Path, **files: str) -> Path:
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.toml").write_text(text, "utf-8")
    return folder


def with_keyword_campaign(tmp_path: Path) -> dict[str, Any]:
    """The demo campaigns plus ``double11``, in a folder of the test's own."""
    folder = tmp_path / "campaigns"
    shutil.copytree(ROOT / "campaigns", folder)
    (folder / "double11.toml").write_text(KEYWORD_CAMPAIGN, "utf-8")
    return {"campaigns": {"path": str(folder)}}


@pytest.fixture
async def svc(make_config, tmp_path):
    """The service in-process with the scheduler off, rules and fallback in place, on a Wednesday morning."""
    write_replies(tmp_path / "replies", rules=RULES, fallback=FALLBACK)
    service = Service(make_config({**GIFT_POOL, **with_keyword_campaign(tmp_path)}), ManualClock(WEDNESDAY))
    await service.start(scheduler=False)
    yield service
    await service.stop()


_ids = iter(range(1, 1_000_000))


async def say(service: Service, who: str, text: str, channel: str = "console") -> Reaction:
    return await service.receive(InboundEvent(channel, "local", who, "text", text=text, display_name=who,
                                              platform_msg_id=f"m{next(_ids)}"))


async def auto_replies(service: Service) -> list[tuple[str | None, str | None, dict[str, Any]]]:
    async with service.sessions() as s:
        rows = await s.execute(select(Touchpoint.reply_to, Touchpoint.text, Touchpoint.payload)
                               .where(Touchpoint.kind == AUTO_REPLY).order_by(Touchpoint.id))
        return [tuple(r) for r in rows]  # type: ignore[misc]


# -- WeChat: passive answers, plaintext and safe mode ------------------------------------------------------


@pytest.fixture
async def wechat(aiohttp_server, aiohttp_client, make_config, clock, tmp_path):
    fake = FakeWeChat()
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("/"))  # type: ignore[attr-defined]
    write_replies(tmp_path / "replies", rules=RULES)
    config = make_config({"channels": {"wechat": {"brand": account(fake)}}, **GIFT_POOL})
    client = await aiohttp_client(create_app(config, clock))
    return fake, client


async def test_rule_answered_passively_in_plaintext_and_safe_mode(wechat):
    fake, client = wechat
    resp = await post(client, plaintext(TOKEN, text_xml("o_amy", "请问营业时间是?", 8001)))
    assert resp.status == 200 and resp.content_type == "application/xml"
    reply = xmltodict.parse(await resp.text())["xml"]
    assert (reply["MsgType"], reply["ToUserName"], reply["Content"]) == ("text", "o_amy", "朋友,营业时间 9:00-21:00")

    resp = await post(client, safe_mode(TOKEN, AES_KEY, fake.app_id, text_xml("o_ben", "快递几天能到", 8002)))
    reply = open_reply(TOKEN, AES_KEY, fake.app_id, await resp.text())
    assert (reply["MsgType"], reply["ToUserName"], reply["Content"]) == ("text", "o_ben", "48 小时内发货")

    # a rule with a news card answers with it (in safe mode too); the higher priority wins over "shipping"
    resp = await post(client, safe_mode(TOKEN, AES_KEY, fake.app_id, text_xml("o_ben", "怎么选奶粉?快递快吗", 8003)))
    card = open_reply(TOKEN, AES_KEY, fake.app_id, await resp.text())
    assert (card["MsgType"], card["ArticleCount"]) == ("news", "1")
    item = card["Articles"]["item"]
    assert (item["Title"], item["Description"], item["Url"], item["PicUrl"]) == (
        "选奶粉 朋友", "三分钟看懂", "https://shop.example.com/guide", "https://shop.example.com/guide.png")

    # WeChat retrying a message whose answer it lost gets the recorded answer again, nothing is run twice
    again = await post(client, plaintext(TOKEN, text_xml("o_amy", "请问营业时间是?", 8001)))
    assert xmltodict.parse(await again.text())["xml"]["Content"] == "朋友,营业时间 9:00-21:00"
    service = client.app[SERVICE]
    assert await auto_replies(service) == [("8001", "朋友,营业时间 9:00-21:00", {"rule": "hours"}),
                                           ("8002", "48 小时内发货", {"rule": "shipping"}),
                                           ("8003", "选奶粉小贴士", {"rule": "guide"})]


async def test_negation_cancels_a_keyword(wechat):
    _, client = wechat
    resp = await post(client, plaintext(TOKEN, text_xml("o_cat", "我不要快递,自己来店里取", 8101)))
    assert await resp.text() == "success"  # no rule, and these rules have no fallback
    resp = await post(client, plaintext(TOKEN, text_xml("o_cat", "那快递要几天", 8102)))
    assert xmltodict.parse(await resp.text())["xml"]["Content"] == "48 小时内发货"


async def test_text_no_rule_matches_is_acknowledged_once_durable_and_its_fallback_follows_as_a_message(
        aiohttp_server, aiohttp_client, make_config, tmp_path):
    # Only text a rule (or a command) may answer waits to be applied; the fallback is sent once it is
    # applied, as a customer-service message inside the window the message opened (scrm.ingest.replying).
    fake = FakeWeChat()
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("/"))  # type: ignore[attr-defined]
    write_replies(tmp_path / "replies", rules=RULES, fallback=ALWAYS)
    config = make_config({"channels": {"wechat": {"brand": account(fake)}}, **GIFT_POOL})
    client = await aiohttp_client(create_app(config, ManualClock(WEDNESDAY)))
    service = client.app[SERVICE]
    assert not service.accept(InboundEvent("wechat", "brand", "o_x", "location_report")).answers
    resp = await post(client, plaintext(TOKEN, text_xml("o_dee", "今天天气不错", 8201)))
    assert await resp.text() == "success"

    async def sent() -> list[str]:  # the fallback's customer-service messages (the demo welcome goes too)
        return [m["text"]["content"] for m in fake.custom_messages
                if m["touser"] == "o_dee" and m["text"]["content"].startswith("收到")]

    assert await eventually(sent) == ["收到,客服稍后回复"]
    assert [(r, t) for r, t, _ in await auto_replies(service)] == [("8201", "收到,客服稍后回复")]
    # a rule's answer is still passive, and the fallback's cooldown holds the next unmatched message
    resp = await post(client, plaintext(TOKEN, text_xml("o_dee", "营业时间?", 8202)))
    assert xmltodict.parse(await resp.text())["xml"]["Content"] == "朋友,营业时间 9:00-21:00"
    resp = await post(client, plaintext(TOKEN, text_xml("o_dee", "好的谢谢", 8203)))
    assert await resp.text() == "success"
    await eventually(lambda: _applied(service, "8203"))
    assert await sent() == ["收到,客服稍后回复"]


async def _applied(service: Service, msg_id: str) -> bool:
    async with service.sessions() as s:
        return await s.scalar(select(Touchpoint.id).where(Touchpoint.platform_msg_id == msg_id)) is not None


async def test_a_passive_reply_arrives_inside_the_timeout_while_the_journal_takes_a_flood(wechat):
    # Hundreds of messages no rule answers, acknowledged once durable, arrive around one a rule answers:
    # that one waits for its application behind the flood's and still gets its passive reply.
    fake, client = wechat
    flood = [post(client, plaintext(TOKEN, text_xml(f"o_f{i}", "随便看看", 9000 + i)), wait=False) for i in range(300)]
    asked = post(client, plaintext(TOKEN, text_xml("o_amy", "几点开门", 8999)), wait=False)
    answers = await asyncio.gather(*flood[:150], asked, *flood[150:])
    assert all(r.status == 200 for r in answers)
    assert {await r.text() for i, r in enumerate(answers) if i != 150} == {"success"}
    assert xmltodict.parse(await answers[150].text())["xml"]["Content"] == "朋友,营业时间 9:00-21:00"
    service = client.app[SERVICE]

    async def inbound() -> int:
        async with service.sessions() as s:
            return await s.scalar(select(func.count()).select_from(Touchpoint).where(Touchpoint.direction == "in"))

    await eventually(lambda: _applied(service, "9299"))
    assert await inbound() == 301  # every one applied, each once


# -- Telegram: buttons under the answer; a group gets no fallback ---------------------------------------------


async def test_telegram_answer_carries_its_buttons_and_groups_get_no_fallback(aiohttp_server, aiohttp_client,
                                                                              make_config, clock, tmp_path):
    fake = FakeTelegram(TELEGRAM_TOKEN)
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("/bot"))
    write_replies(tmp_path / "replies", rules=RULES, fallback=ALWAYS)
    client = await aiohttp_client(create_app(telegram_config(make_config, fake.base_url, GIFT_POOL), clock))
    updates = Updates(fake.bot_user)
    dan, eve = user(3001, "Dan"), user(3002, "Eve")
    await deliver(client, updates.text(dan, "发货了吗"))
    group = group_chat(-100777)
    await deliver(client, updates.text(eve, "大家好", chat=group))  # group chatter: no fallback
    await deliver(client, updates.text(eve, "今天天气不错"))  # one-to-one: the fallback

    async def answered() -> bool:
        return any(s.text == "48 小时内发货" for s in fake.sent) and "收到,客服稍后回复" in fake.texts_to(3002)

    await eventually(answered)
    [shipping] = [s for s in fake.sent if s.text == "48 小时内发货"]
    assert shipping.chat_id == 3001
    assert shipping.reply_markup["inline_keyboard"] == [[{"text": "查物流", "url": "https://shop.example.com/orders"}]]
    answers = [(text, payload["rule"]) for _, text, payload in await auto_replies(client.app[SERVICE])]
    assert answers == [("48 小时内发货", "shipping"), ("收到,客服稍后回复", "fallback")]  # none in the group


# -- cooldown, priorities, one answer per message ---------------------------------------------------------------


async def test_cooldown_holds_the_rule_silently_per_customer(svc):
    assert (await say(svc, "fay", "快递几天到")).replies == ("48 小时内发货",)
    held = await say(svc, "fay", "快递怎么还没到")  # within the rule's 10 minutes: no answer, and no fallback
    assert held.replies == ()
    assert (await say(svc, "gus", "发货了吗")).replies == ("48 小时内发货",)  # another customer's own cooldown
    svc.clock.advance(timedelta(minutes=10))  # type: ignore[attr-defined]
    assert (await say(svc, "fay", "快递到哪了")).replies == ("48 小时内发货",)

    # two messages of one customer committed in one batch: the second is held by the first's answer
    both = await asyncio.gather(say(svc, "hal", "营业时间?"), say(svc, "hal", "几点开门?"))
    assert sorted(r.replies for r in both) == [(), ("hal,营业时间 9:00-21:00",)]
    assert [p["rule"] for _, _, p in await auto_replies(svc)] == ["shipping", "shipping", "shipping", "hours"]


async def test_one_answer_beside_commands_and_keyword_campaigns(svc):
    # a command answers alone
    assert (await say(svc, "ivy", "退订")).replies != () and await auto_replies(svc) == []
    # a campaign's keyword trigger takes a message no rule matches: planned, and no fallback
    assert (await say(svc, "jon", "最近有什么活动吗")).replies == ()
    # a rule that matches wins over a campaign with the same keyword: one answer, nothing planned
    assert (await say(svc, "kim", "快递包邮吗")).replies == ("48 小时内发货",)
    async with svc.sessions() as s:
        planned = (await s.execute(select(Delivery.external_id).where(Delivery.campaign == "double11"))).scalars().all()
    assert planned == ["jon"]
    assert (await say(svc, "lou", "在吗")).replies == ("收到,客服稍后回复",)
    assert [(p["rule"]) for _, _, p in await auto_replies(svc)] == ["shipping", "fallback"]
    # only the message nothing but the fallback answered waits for a person
    async with svc.sessions() as s:
        waiting = (await s.scalars(select(Identity.external_id).join(
            Conversation, Conversation.customer_id == Identity.customer_id))).all()
    assert waiting == ["lou"]


async def test_coupon_rule_grants_once_then_quotes_the_same_code(svc):
    first = (await say(svc, "lea", "领券")).replies[0]
    assert first.startswith("您的券:GIFT") and first.endswith("(5 元)")
    svc.clock.advance(timedelta(minutes=10))  # type: ignore[attr-defined]
    assert (await say(svc, "lea", " 领券! ")).replies == (first,)  # exact: spaces and punctuation aside
    async with svc.sessions() as s:
        granted = (await s.scalars(select(Touchpoint.payload).where(Touchpoint.kind == "coupon_granted"))).all()
    assert [g["pool"] for g in granted if g.get("rule") == "gift"] == ["gift"]


async def test_handled_by_person_says_nothing(svc):
    # a customer who asked for a person gets no auto-reply while the conversation is theirs
    assert (await say(svc, "kit", "转人工")).replies == (svc.config.conversations.person_reply,)
    assert (await say(svc, "kit", "快递几天到")).replies == ()
    assert (await say(svc, "kit", "在吗")).replies == ()
    assert await auto_replies(svc) == []

    cid = (await say(svc, "max", "你好")).customer_id
    assert cid is not None
    rule = svc.replies.match("快递几天到", ["快递", "几天", "到"], "console")
    async with svc.sessions() as s:
        replies = AutoReplies(svc, s, svc.clock.now(), {cid})
        event = InboundEvent("console", "local", "max", "text", text="快递几天到")
        held = await replies.answer(cid, event, rule, handled_by_person=True)
        assert held is not None and (held.rule, held.text, held.held, held.answered) == ("shipping", None, "person",
                                                                                          False)
        fallback = await replies.answer(cid, event, None, handled_by_person=True)
        assert fallback is not None and fallback.fallback and fallback.held == "person"


# -- the fallback, in and out of hours ------------------------------------------------------------------------


async def test_fallback_in_and_out_of_working_hours(svc):
    assert (await say(svc, "ned", "你好")).replies == ("收到,客服稍后回复",)
    assert (await say(svc, "ned", "在吗")).replies == ()  # its cooldown (1 h by default)
    svc.clock.set(WEDNESDAY + timedelta(hours=9))  # type: ignore[attr-defined]  # 19:00 in Shanghai
    assert (await say(svc, "ned", "还在吗")).replies == ("下班了,ned,明天回复",)
    svc.clock.set(datetime(2026, 12, 5, 3, 0))  # type: ignore[attr-defined]  # Saturday 11:00
    assert (await say(svc, "oz", "你好")).replies == ("下班了,oz,明天回复",)
    hours = [(p["rule"], p["hours"]) for _, _, p in await auto_replies(svc)]
    assert hours == [("fallback", "in"), ("fallback", "out"), ("fallback", "out")]


async def test_working_hours_are_the_staffs_in_their_own_time_zones(make_config, tmp_path):
    """19:00 in Shanghai is 11:00 in London: with an operator working from London, someone is at work."""
    write_replies(tmp_path / "replies", fallback=FALLBACK)
    config = make_config({"loyalty": {"followups": {"timezones": {"console:olive": "Europe/London"}}}})
    service = Service(config, ManualClock(WEDNESDAY + timedelta(hours=9)))
    await service.start(scheduler=False)
    try:
        assert (await say(service, "pia", "你好")).replies == ("收到,客服稍后回复",)
        service.clock.advance(timedelta(hours=8))  # type: ignore[attr-defined]  # 19:00 in London
        assert (await say(service, "quinn", "你好")).replies == ("下班了,quinn,明天回复",)
    finally:
        await service.stop()


# -- rule files: validation and reload ------------------------------------------------------------------------


def test_bad_rule_files_are_named_by_file_key_and_problem(make_config, tmp_path):
    folder = write_replies(tmp_path / "replies", a=RULES, b="""
[[rules]]
name = "broken"
regex = ["(unclosed"]
text = "{{ customer.phone }}"

[[rules]]
name = "nothing"
text = "matches nothing"

[[rules]]
name = "pool"
exact = ["券"]
coupon = "nope"
channels = ["wechat", "fax"]
text = "{{ coupon.code }}"
colour = "red"
""", c=FALLBACK, d=FALLBACK + "\n", e="[[rules]\nname = ", f='[[rules]]\nname = "hours"\nexact = ["几点"]\ntext = "x"\n')
    with pytest.raises(ReplyError) as caught:
        load_replies(make_config(GIFT_POOL))
    problems = caught.value.problems
    assert "f.toml: rules.0.name: 'hours' is already used by a.toml" in problems
    assert any(p.startswith("b.toml: rules.0.regex: bad regular expression '(unclosed'") for p in problems)
    assert "b.toml: rules.1: give keywords, exact, contains or regex" in problems
    assert "b.toml: rules.2.colour: unknown key" in problems
    assert "d.toml: fallback: the fallback is already given in c.toml" in problems
    assert any(p.startswith("e.toml: invalid TOML") for p in problems)
    # a file the models take is checked against the config: `scrm replies validate FILE` says the same
    fixed = '[[rules]]\nname = "pool"\nexact = ["券"]\ncoupon = "nope"\nchannels = ["wechat", "fax"]\n' \
            'text = "{{ coupon.code }}"\n[[rules]]\nname = "phone"\nexact = ["电话"]\ntext = "{{ customer.phone }}"\n'
    found = [str(p) for p in check_file(make_config(GIFT_POOL), folder / "b.toml", fixed.encode())]
    assert "b.toml: rules.0.coupon: unknown pool 'nope' (known: birthday, gift, points10, welcome, winback)" in found
    assert any(p.startswith("b.toml: rules.0.channels.1: unknown channel 'fax'") for p in found)
    assert not any("rules.0.text" in p for p in found)  # coupon is there for a rule with a pool, known or not
    assert any(p.startswith("b.toml: rules.1.text: template error") and "phone" in p for p in found)


async def test_rule_files_reload_while_running_and_a_broken_edit_keeps_the_rules(svc, tmp_path, caplog):
    folder = tmp_path / "replies"
    assert await svc.reload_replies() is False  # nothing changed
    (folder / "more.toml").write_text('[[rules]]\nname = "returns"\nkeywords = ["退货"]\ntext = "7 天无理由退货"\n'
                                      '[[rules]]\nname = "bad"\nregex = ["("]\ntext = "x"\n', "utf-8")
    with caplog.at_level(logging.ERROR, logger="scrm.service"):
        assert await svc.reload_replies() is False
        assert await svc.reload_replies() is False
    assert [r.message.splitlines()[0] for r in caplog.records] == ["reply rules not reloaded:"]  # logged once
    assert "more.toml: rules.1.regex" in caplog.text
    assert (await say(svc, "rex", "营业时间")).replies == ("rex,营业时间 9:00-21:00",)  # the rules running before
    (folder / "more.toml").write_text('[[rules]]\nname = "returns"\nkeywords = ["退货"]\ntext = "7 天无理由退货"\n',
                                      "utf-8")
    assert await svc.reload_replies() is True
    assert (await say(svc, "rex", "可以退货吗")).replies == ("7 天无理由退货",)


def test_demo_replies_load():
    """The files `scrm init` writes (replies/) load with the demo config."""
    from scrm.config_file import load_config

    book = load_replies(load_config(ROOT / "config.example.toml", environ={}))
    assert [r.rule.name for r in book.rules] == ["formula-advice", "opening-hours", "shipping"]
    assert book.fallback is not None


def test_replies_validate_command(tmp_path, store):
    """`scrm replies validate` after `scrm init`: the demo files pass; a broken one is named, exit 2."""
    from tests.test_quickstart import scrm

    assert scrm(tmp_path, store, "init").returncode == 0
    ok = scrm(tmp_path, store, "replies", "validate")
    assert (ok.returncode, ok.stdout.strip()) == (0, "3 rule(s) valid, a fallback")
    (tmp_path / "replies" / "new.toml").write_text('[[rules]]\nname = "shipping"\nexact = ["x"]\ntext = "y"\n'
                                                   '[fallback]\ntext = "{{ nobody }}"\n', "utf-8")
    bad = scrm(tmp_path, store, "replies", "validate")
    assert bad.returncode == 2
    assert "reply rules have 3 problem(s):" in bad.stderr
    assert "new.toml: rules.0.name: 'shipping' is already used by faq.toml" in bad.stderr
    assert "new.toml: fallback: the fallback is already given in fallback.toml" in bad.stderr
    assert "new.toml: fallback.text: unknown variable(s): nobody (available: customer)" in bad.stderr
