"""Per-channel message shapes from one campaign: Telegram link buttons, a WeChat news card, and the
plain text elsewhere — each through the real outbox and channel against the fake platform."""

from __future__ import annotations

from pathlib import Path

import pytest

from scrm.web import SERVICE, create_app
from tests.conftest import ROOT, eventually
from tests.fakes.telegram import FakeTelegram, Updates
from tests.fakes.wechat import FakeWeChat, plaintext, text_xml
from tests.test_telegram import TOKEN as TELEGRAM_TOKEN
from tests.test_telegram import deliver, telegram_config
from tests.test_wechat import TOKEN as WECHAT_TOKEN
from tests.test_wechat import post, start

RICH = """name = "formula-offer"
kind = "lifecycle"
[trigger]
event = "tag_added"
tag = "奶粉"
[message]
text = "{{ customer.name }},新品奶粉到货!"
buttons = [ { text = "去看看", url = "https://shop.example.com/formula" } ]
[message.article]
title = "{{ customer.name }} 的奶粉推荐"
description = "新品到货,老顾客专享价"
url = "https://shop.example.com/formula"
picurl = "https://shop.example.com/formula.png"
"""


@pytest.fixture
async def fake_telegram(aiohttp_server) -> FakeTelegram:
    fake = FakeTelegram(TELEGRAM_TOKEN)
    fake.base_url = str((await aiohttp_server(fake.app())).make_url("/bot"))
    return fake


@pytest.fixture
async def fake_wechat(aiohttp_server) -> FakeWeChat:
    fake = FakeWeChat()
    fake.base_url = str((await aiohttp_server(fake.app())).make_url("/"))  # type: ignore[attr-defined]
    return fake


def campaigns(tmp_path: Path) -> str:
    folder = tmp_path / "rich-campaigns"
    folder.mkdir()
    (folder / "welcome.toml").write_text((ROOT / "campaigns" / "welcome.toml").read_text("utf-8"), "utf-8")
    (folder / "rich.toml").write_text(RICH, "utf-8")
    return str(folder)


async def test_telegram_gets_link_buttons(aiohttp_client, make_config, clock, fake_telegram, tmp_path):
    updates = Updates(fake_telegram.bot_user)
    config = telegram_config(make_config, fake_telegram.base_url, {"campaigns": {"path": campaigns(tmp_path)}})
    client = await aiohttp_client(create_app(config, clock))
    await deliver(client, updates.text({"id": 4242, "is_bot": False, "first_name": "Ada"}, "有奶粉吗"))

    async def offer():
        return [m for m in fake_telegram.sent if m.text and "新品奶粉" in m.text]

    [sent] = await eventually(offer)
    assert sent.reply_markup == {"inline_keyboard": [[{"text": "去看看", "url": "https://shop.example.com/formula"}]]}


async def test_wechat_gets_a_news_card(aiohttp_client, make_config, clock, fake_wechat, tmp_path):
    client, service = await start(aiohttp_client, make_config, clock, fake_wechat,
                                  overrides={"campaigns": {"path": campaigns(tmp_path)}})
    await post(client, plaintext(WECHAT_TOKEN, text_xml("o_ada", "有奶粉吗", 77)))

    async def card():
        return [m for m in fake_wechat.custom_messages if m["msgtype"] == "news"]

    [sent] = await eventually(card)
    [article] = sent["news"]["articles"]
    assert article == {"title": "朋友 的奶粉推荐", "description": "新品到货,老顾客专享价",
                       "url": "https://shop.example.com/formula", "picurl": "https://shop.example.com/formula.png"}
    assert client.app[SERVICE] is service


async def test_telegram_quick_replies_come_back_as_answers(aiohttp_client, make_config, clock, fake_telegram):
    from sqlalchemy import select

    from scrm.messages import OutboundMessage
    from scrm.store.models import Touchpoint

    client = await aiohttp_client(create_app(telegram_config(make_config, fake_telegram.base_url), clock))
    channel = client.app[SERVICE].channel("telegram", "main")
    result = await channel.send(OutboundMessage("telegram", "main", "5150", "满意吗?1-5 分",
                                                quick_replies=tuple("12345")))
    assert result.status == "sent"
    [question] = fake_telegram.sent
    assert question.reply_markup == {"inline_keyboard": [[{"text": n, "callback_data": f"qr:{n}"} for n in "12345"]]}

    customer, updates = {"id": 5150, "is_bot": False, "first_name": "Bea"}, Updates(fake_telegram.bot_user)
    await deliver(client, updates.tap(customer, "qr:4"))
    await deliver(client, updates.tap(customer, "not-ours"))  # other buttons' data is ignored
    async with client.app[SERVICE].sessions() as s:
        answers = (await s.scalars(select(Touchpoint.text).where(Touchpoint.direction == "in"))).all()
    assert answers == ["4"]

    async def answered():
        return len(fake_telegram.method_calls("answerCallbackQuery")) == 1

    await eventually(answered)
