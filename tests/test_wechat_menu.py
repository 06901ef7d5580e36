"""The Official Account's custom menu: the config checked by key path, `scrm wechat menu push|show|delete`
against the fake WeChat API (its limits and errcodes), and taps on it through the real app: a click's
tags, passive answer and campaign, a view recorded."""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import xmltodict
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, select

from scrm.campaigns.definitions import load_campaigns
from scrm.config import ConfigError
from scrm.config_file import load_config, parse_config
from scrm.conversations.replies import load_replies
from scrm.acquisition.menus import check_clicks
from scrm.store.models import CustomerTag, Delivery, Tag, Touchpoint, TrackedLink
from tests.conftest import ROOT, applied
from tests.fakes.wechat import FakeWeChat, event_xml, plaintext
from tests.test_quickstart import SECRETS, uncommented_example
from tests.test_wechat import TOKEN, customer_of, post, start

MENU = """
[[channels.wechat.brand.menu.button]]
name = "逛商城"
type = "view"
url = "https://shop.example.com/"
[[channels.wechat.brand.menu.button]]
name = "服务"
[[channels.wechat.brand.menu.button.sub_button]]
name = "营业时间"
type = "click"
key = "HOURS"
[[channels.wechat.brand.menu.button.sub_button]]
name = "查物流"
type = "view"
url = "https://shop.example.com/orders"
[[channels.wechat.brand.menu.button]]
name = "育儿课堂"
type = "click"
key = "COURSE"
[channels.wechat.brand.menu.clicks.HOURS]
reply = "opening-hours"
tags = ["asked-hours"]
[channels.wechat.brand.menu.clicks.COURSE]
tags = ["育儿课堂", "parent"]
text = "报名成功!第 1 课马上就到。"
campaign = "menu-course"
"""

#: Where the service's tracked links are served (a domain the account allows for its menu).
LINKS = "https://go.example.com"
LINK = re.compile(re.escape(LINKS) + r"/l/[A-Za-z0-9_-]{24}")


def sent(shop: str, orders: str) -> dict[str, Any]:
    """menu/create's body, the view buttons opening these links."""
    return {"button": [
        {"type": "view", "name": "逛商城", "url": shop},
        {"name": "服务", "sub_button": [{"type": "click", "name": "营业时间", "key": "HOURS"},
                                      {"type": "view", "name": "查物流", "url": orders}]},
        {"type": "click", "name": "育儿课堂", "key": "COURSE"},
    ]}


def pushed(shop: str, orders: str) -> dict[str, Any]:
    """The same as menu/get gives it back."""
    return {"button": [
        {"type": "view", "name": "逛商城", "url": shop, "sub_button": []},
        {"name": "服务", "sub_button": [
            {"type": "click", "name": "营业时间", "key": "HOURS", "sub_button": []},
            {"type": "view", "name": "查物流", "url": orders, "sub_button": []}]},
        {"type": "click", "name": "育儿课堂", "key": "COURSE", "sub_button": []},
    ]}


@pytest.fixture
async def fake(aiohttp_server) -> FakeWeChat:
    fake = FakeWeChat()
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("/"))  # type: ignore[attr-defined]
    return fake


def menu_settings(menu: str = MENU) -> dict[str, Any]:
    return tomllib.loads(menu)["channels"]["wechat"]["brand"]["menu"]


def write_config(tmp_path: Path, fake: FakeWeChat, menu: str = MENU) -> Path:
    """The shipped example config (its demo campaigns and replies) with a WeChat account on the fake."""
    for folder in ("campaigns", "replies"):
        if not (tmp_path / folder).exists():
            (tmp_path / folder).symlink_to(ROOT / folder)
    path = tmp_path / "config.toml"
    example = (ROOT / "config.example.toml").read_text("utf-8")
    commented = '# base_url = "https://scrm.example.com"'
    assert commented in example  # the example's [links] table, where this account's links are served
    example = example.replace(commented, f'base_url = "{LINKS}"', 1)
    path.write_text(example + f"""
[channels.wechat.brand]
app_id = "{fake.app_id}"
app_secret = "{fake.app_secret}"
token = "{TOKEN}"
api_base_url = "{fake.base_url}"
request_timeout_seconds = 2
{menu}
""", "utf-8")  # type: ignore[attr-defined]
    return path


async def menu_cli(config: Path, *args: str) -> Result:
    """``scrm wechat menu ...``; the CLI runs its own event loop while the fake serves on this one."""
    from scrm.cli import main

    return await asyncio.to_thread(CliRunner().invoke, main, ["-c", str(config), "wechat", "menu", *args])


# -- the commands -------------------------------------------------------------------------------------


async def test_push_show_delete(tmp_path, fake):
    config = write_config(tmp_path, fake)
    before = await menu_cli(config, "show")
    assert before.exit_code == 0, before.output
    assert "(none)" in before.output and "+  └ 营业时间  click HOURS" in before.output
    [shop, orders] = LINK.findall(before.output)  # view buttons open tracked links, the same each time
    assert f"+逛商城  view {shop}" in before.output and f"+  └ 查物流  view {orders}" in before.output

    done = await menu_cli(config, "push")
    assert done.exit_code == 0, done.output
    assert "menu pushed to wechat:brand (4 buttons)" in done.output
    assert fake.menu == pushed(shop, orders)
    [create] = [c for c in fake.calls if c.endpoint == "menu/create"]  # as UTF-8 text: the fake refuses \\u escapes
    assert create.body == sent(shop, orders)
    store = create_engine(f"sqlite:///{tmp_path / 'scrm.db'}")  # the demo config's store, beside it
    with store.connect() as db:
        rows = db.execute(select(TrackedLink.token, TrackedLink.target, TrackedLink.rule, TrackedLink.customer_id)
                          .order_by(TrackedLink.target)).all()
    store.dispose()
    assert [tuple(r) for r in rows] == [
        (shop.rsplit("/", 1)[1], "https://shop.example.com/", "menu:wechat:brand", None),
        (orders.rsplit("/", 1)[1], "https://shop.example.com/orders", "menu:wechat:brand", None)]

    same = await menu_cli(config, "show", "--account", "brand")
    assert same.exit_code == 0, same.output
    assert "育儿课堂  click COURSE" in same.output and "the config's menu is the same" in same.output

    deleted = await menu_cli(config, "delete")
    assert deleted.exit_code == 0 and "menu deleted on wechat:brand" in deleted.output
    assert fake.menu is None and fake.count("menu/delete") == 1
    assert "(none)" in (await menu_cli(config, "show")).output


async def test_wechat_refusals_are_told_with_their_errcode(tmp_path, fake):
    config = write_config(tmp_path, fake)
    fake.fail_next("menu/create", 40018)
    refused = await menu_cli(config, "push")
    assert refused.exit_code == 1
    assert "WeChat refused menu/create: 40018: invalid button name size" in refused.output
    assert "a button's name is too long (16 bytes at the top" in refused.output
    assert fake.menu is None

    fake.menu_domains = {"shop.example.com"}  # the account allows the shop, not where the links are served
    domain = await menu_cli(config, "push")
    assert domain.exit_code == 1 and "40055: invalid button url domain" in domain.output
    assert "a button's URL is on a domain WeChat does not allow" in domain.output and fake.menu is None

    fake.app_secret = "rotated"
    token = await menu_cli(config, "push")
    assert token.exit_code == 1 and "WeChat refused the access token: 40125: invalid appsecret" in token.output


async def test_fake_checks_wechats_limits(fake):
    """The fake refuses what WeChat refuses, each with its own errcode (so the client is tested against them)."""
    base = fake.base_url  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "cgi-bin/token", params={
                "grant_type": "client_credential", "appid": fake.app_id, "secret": fake.app_secret}) as resp:
            token = (await resp.json())["access_token"]

        async def create(menu: Any, *, ascii_only: bool = False) -> int:
            async with http.post(base + "cgi-bin/menu/create", params={"access_token": token},
                                 data=json.dumps(menu, ensure_ascii=ascii_only).encode()) as resp:
                return int((await resp.json())["errcode"])

        click = {"type": "click", "name": "一二三四五", "key": "K"}  # 15 bytes
        assert await create({"button": [click]}) == 0
        assert await create({"button": [{**click, "name": "一二三四五六"}]}) == 40018  # 18 bytes
        assert await create({"button": [click] * 4}) == 40016
        assert await create({"button": [{**click, "key": "k" * 129}]}) == 40019
        assert await create({"button": [{"name": "服务", "sub_button": [{**click, "name": "字" * 21}]}]}) == 40025
        assert await create({"button": [{"name": "服务", "sub_button": [{**click, "name": "字" * 20}]}]}) == 0
        assert await create({"button": [{"name": "服务", "sub_button": [click] * 6}]}) == 40023
        assert await create({"button": [click]}, ascii_only=True) == 40033
        assert await create({"button": [{"type": "view", "name": "a", "url": "ftp://x"}]}) == 40020


# -- the config -----------------------------------------------------------------------------------------


async def test_a_bad_menu_is_refused_by_key_path(tmp_path, fake):
    bad = MENU.replace('name = "营业时间"', 'name = "' + "营业时间" * 6 + '"').replace('key = "COURSE"', "")
    bad = bad.replace('name = "逛商城"\ntype = "view"\nurl = "https://shop.example.com/"', 'name = "逛商城"')
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, fake, bad), environ={})
    problems = info.value.problems
    assert "channels.wechat.brand.menu.button.1.sub_button.0.name: the name is 72 bytes; WeChat takes at most 60 " \
           "(a Chinese character is 3)" in problems
    assert "channels.wechat.brand.menu.button.2: a click button needs key" in problems
    assert "channels.wechat.brand.menu.button.0: give sub_button, or type: click (with key), view (with url) or " \
           "miniprogram" in problems
    assert len(problems) == 3

    four = MENU + '[[channels.wechat.brand.menu.button]]\nname = "多余"\ntype = "click"\nkey = "MORE"\n'
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, fake, four), environ={})
    assert info.value.problems == ["channels.wechat.brand.menu.button: List should have at most 3 items after "
                                   "validation, not 4"]

    unknown = MENU + '[channels.wechat.brand.menu.clicks.NOPE]\ntext = "?"\n'
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, fake, unknown), environ={})
    assert info.value.problems == ["channels.wechat.brand.menu: clicks.NOPE: no click button has this key "
                                   "(keys: HOURS, COURSE)"]

    refused = await menu_cli(write_config(tmp_path, fake, bad), "push")
    assert refused.exit_code == 2 and "channels.wechat.brand.menu.button.2: a click button needs key" in refused.output
    assert fake.count("menu/create") == 0


async def test_clicks_must_name_rules_and_menu_campaigns_that_exist(tmp_path, fake):
    wrong = MENU.replace('reply = "opening-hours"', 'reply = "opening-times"').replace(
        'campaign = "menu-course"', 'campaign = "welcome"')
    refused = await menu_cli(write_config(tmp_path, fake, wrong), "push")
    assert refused.exit_code == 2
    assert "channels.wechat.brand.menu.clicks.HOURS.reply: no reply rule 'opening-times' (known: " in refused.output
    assert ("channels.wechat.brand.menu.clicks.COURSE.campaign: campaign 'welcome' is not started by menu clicks: "
            'give it [trigger] event = "menu_click"') in refused.output
    assert fake.count("menu/create") == 0 and fake.count("token") == 0

    unset = await menu_cli(write_config(tmp_path, fake, ""), "push")
    assert unset.exit_code == 2 and "channels.wechat.brand.menu is not set" in unset.output


def test_demo_menu_names_what_the_demo_has(tmp_path):
    """config.example.toml's commented WeChat account carries a menu whose clicks name a demo reply rule
    and the demo menu campaign."""
    data = tomllib.loads(uncommented_example())
    for (kind, name, key), value in SECRETS.items():
        data["channels"][kind][name][key] = value
    data["replies"] = {"path": str(ROOT / "replies")}
    data["campaigns"] = {"path": str(ROOT / "campaigns")}
    config = parse_config(data, tmp_path, environ={})
    menu = config.channels["wechat"]["brand"]["menu"]
    from handlers.wechat import WeChatSettings

    settings = WeChatSettings.model_validate(config.channels["wechat"]["brand"])
    assert settings.menu is not None and menu["clicks"]
    campaigns = {c.definition.name: c for c in load_campaigns(config)}
    assert check_clicks(settings.menu.clicks, load_replies(config), campaigns) == []


# -- taps ---------------------------------------------------------------------------------------------------


async def test_click_tags_answers_and_starts_its_campaign(aiohttp_client, make_config, clock, fake):
    demo_replies = {"replies": {"path": str(ROOT / "replies")}}
    client, service = await start(aiohttp_client, make_config, clock, fake, demo_replies, menu=menu_settings())
    resp = await post(client, plaintext(TOKEN, event_xml("o_ann", "CLICK", "HOURS"), openid="o_ann"))
    reply = xmltodict.parse(await resp.text())["xml"]
    assert (resp.status, reply["MsgType"], reply["ToUserName"]) == (200, "text", "o_ann")
    assert reply["Content"].startswith("门店营业时间:每天 9:00-21:00")
    ann = await customer_of(service, "o_ann")

    resp = await post(client, plaintext(TOKEN, event_xml("o_ann", "CLICK", "COURSE", create_time=1_800_000_001),
                                        openid="o_ann"))
    assert xmltodict.parse(await resp.text())["xml"]["Content"] == "报名成功!第 1 课马上就到。"
    async with service.sessions() as s:
        tags = {(name, source, detail) for name, source, detail in await s.execute(
            select(Tag.name, CustomerTag.source, CustomerTag.source_detail).join(CustomerTag)
            .where(CustomerTag.customer_id == ann.id))}
        added = [tp.payload for tp in await s.scalars(select(Touchpoint).where(
            Touchpoint.customer_id == ann.id, Touchpoint.kind == "tag_added").order_by(Touchpoint.id))]
        course = (await s.scalars(select(Delivery).where(Delivery.campaign == "menu-course"))).all()
        replies = [tp.payload for tp in await s.scalars(select(Touchpoint).where(Touchpoint.kind == "auto_reply"))]
    assert tags == {("asked-hours", "menu", "HOURS"), ("育儿课堂", "menu", "COURSE"), ("parent", "menu", "COURSE")}
    assert added == [{"tag": "asked-hours", "menu": "HOURS"}, {"tag": "育儿课堂", "menu": "COURSE"},
                     {"tag": "parent", "menu": "COURSE"}]
    assert [(d.customer_id, d.step, d.channel, d.external_id) for d in course] == [(ann.id, 0, "wechat", "o_ann")]
    assert replies == [{"rule": "opening-hours"}]  # the rule's answer, recorded as its answers to messages are

    # a key the config says nothing about, and a view: recorded, answered with success
    resp = await post(client, plaintext(TOKEN, event_xml("o_ann", "CLICK", "OLD_KEY", create_time=1_800_000_002)))
    assert await resp.text() == "success"
    resp = await post(client, plaintext(TOKEN, event_xml("o_ann", "VIEW", "https://shop.example.com/orders",
                                                         create_time=1_800_000_003)))
    assert await resp.text() == "success"
    await applied(service)  # a view is acknowledged once durable: its touchpoint follows
    async with service.sessions() as s:
        taps = [(tp.kind, tp.payload) for tp in await s.scalars(select(Touchpoint).where(
            Touchpoint.customer_id == ann.id, Touchpoint.direction == "in").order_by(Touchpoint.id))]
    assert taps == [("menu_click", {"key": "HOURS"}), ("menu_click", {"key": "COURSE"}),
                    ("menu_click", {"key": "OLD_KEY"}), ("menu_view", {"url": "https://shop.example.com/orders"})]

