"""Tracked links through the real app, store and scheduler, against the fake Telegram Bot API — on SQLite
and PostgreSQL: a campaign's ``track()`` link goes out, a visit is counted once per person in the funnel,
tags the clicker and redirects to the recorded target only; previews count nobody; forged and expired
tokens answer 404 and write nothing."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from scrm import reports, segments
from scrm.acquisition import links
from scrm.campaigns import templates
from scrm.store.models import Customer, CustomerTag, Delivery, Identity, Tag, Touchpoint, TrackedLink
from scrm.web import SERVICE, create_app
from tests.conftest import eventually
from tests.fakes.telegram import FakeTelegram, Updates, user

TOKEN = "7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0"
SECRET = "wh_s3cret-Token_123"
ALICE = user(1001, "Alice", "Wang", "alice_w")
BASE = "https://go.example.com"
TARGET = "https://shop.example.com/winter?from=chat"
LINK = re.compile(re.escape(BASE) + r"/l/([A-Za-z0-9_-]+)")
BROWSER = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
           "Mobile/15E148 MicroMessenger/8.0.40(0x1800282a) NetType/WIFI Language/zh_CN")
PREVIEWS = ["TelegramBot (like TwitterBot)", "WhatsApp/2.23.18.78 i", "facebookexternalhit/1.1", "Twitterbot/1.0",
            "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", "MicroMessenger Client", "LinkPreview/2.0",
            ""]
pytestmark = pytest.mark.filterwarnings("ignore:.*`retry_after`.*:DeprecationWarning")

PROMO = f'''name = "promo"
title = "Winter promo"
kind = "lifecycle"

[trigger]
event = "first_message"
delay = "0s"

[message]
text = """{{{{ customer.name }}}}, winter sale: {{{{ track('{TARGET}') }}}} (again: {{{{ track('{TARGET}') }}}})
and the guide {{{{ track('https://shop.example.com/guide') }}}}"""
'''
REPLIES = '''[[rules]]
name = "shop-link"
exact = ["链接"]
text = "{{ track('https://shop.example.com/') }}"
'''


@pytest.fixture
async def fake(aiohttp_server) -> FakeTelegram:
    fake = FakeTelegram(TOKEN)
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("/bot"))
    return fake


@pytest.fixture
async def client(aiohttp_client, make_config, clock, fake, tmp_path: Path):
    campaigns, replies = tmp_path / "campaigns", tmp_path / "replies"
    campaigns.mkdir()
    replies.mkdir()
    (campaigns / "promo.toml").write_text(PROMO, "utf-8")
    (replies / "links.toml").write_text(REPLIES, "utf-8")
    account = {"token": TOKEN, "webhook_secret": SECRET, "api_base_url": fake.base_url}
    config = make_config({"channels": {"telegram": {"main": account}}, "campaigns": {"path": str(campaigns)},
                          "replies": {"path": str(replies)}, "links": {"base_url": BASE + "/"}})
    return await aiohttp_client(create_app(config, clock))


async def say(client, updates: Updates, text: str) -> None:
    resp = await client.post("/telegram/main", data=json.dumps(updates.text(ALICE, text)).encode(),
                             headers={"X-Telegram-Bot-Api-Secret-Token": SECRET, "Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()


async def visit(client, token: str, agent: str = BROWSER, method: str = "GET", query: str = "") -> Any:
    return await client.request(method, f"/l/{token}{query}", headers={"User-Agent": agent}, allow_redirects=False)


async def count(client, model: Any, *where: Any) -> int:
    async with client.app[SERVICE].sessions() as s:
        return int(await s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def tags_of(client, customer_id: int) -> set[str]:
    async with client.app[SERVICE].sessions() as s:
        return set((await s.scalars(select(Tag.name).join(CustomerTag)
                                    .where(CustomerTag.customer_id == customer_id))).all())


async def clicked_in_funnel(client) -> int:
    async with client.app[SERVICE].sessions() as s:
        funnel = await reports.funnel(s, "promo")
    assert funnel is not None
    return funnel.total.clicked


async def promo(client) -> Delivery | None:
    async with client.app[SERVICE].sessions() as s:
        return await s.scalar(select(Delivery).where(Delivery.campaign == "promo"))


async def sent_promo(client, fake: FakeTelegram, updates: Updates, first: bool = True) -> tuple[Delivery, list[str]]:
    """Alice's first message (unless ``first`` is False: said already), and the promo it starts, as it
    arrived at Telegram (and recorded as sent)."""
    if first:
        await say(client, updates, "你好")

    async def sent() -> Delivery | None:
        d = await promo(client)
        return d if d is not None and d.status == "sent" and fake.texts_to(1001) else None

    delivery = await eventually(sent)
    [text] = fake.texts_to(1001)
    return delivery, LINK.findall(text)


@pytest.fixture
def updates(fake: FakeTelegram) -> Updates:
    return Updates(fake.bot_user)


async def test_click_redirects_records_tags_and_counts_once_in_the_funnel(client, fake, updates, clock):
    delivery, tokens = await sent_promo(client, fake, updates)
    assert len(tokens) == 3 and tokens[0] == tokens[1] != tokens[2]  # one link per target in a message
    assert all(len(t) >= 22 for t in tokens)  # 18 random-looking bytes
    assert await count(client, TrackedLink) == 2
    service = client.app[SERVICE]
    # Rendering the delivery again (a retry) writes the same link, not a second one.
    again = links.for_delivery(service.config, service.keyring, delivery, clock.now())
    assert again.track(TARGET) == f"{BASE}/l/{tokens[0]}"
    customer_id = delivery.customer_id
    assert customer_id is not None and await clicked_in_funnel(client) == 0

    resp = await visit(client, tokens[0], query="?url=https://evil.example.net/&next=//evil.example.net")
    assert resp.status == 302
    assert resp.headers["Location"] == TARGET  # the recorded target, never one from the request
    assert resp.headers["Cache-Control"] == "no-store" and resp.headers["Referrer-Policy"] == "no-referrer"
    async with service.sessions() as s:
        [click] = (await s.scalars(select(Touchpoint).where(Touchpoint.kind == "click"))).all()
    assert (click.customer_id, click.direction, click.campaign, click.delivery_id) == (customer_id, "in", "promo",
                                                                                        delivery.id)
    assert click.payload == {"target": TARGET, "token": tokens[0], "step": 0, "delivery": delivery.id}
    assert "clicked:promo" in await tags_of(client, customer_id)
    assert await clicked_in_funnel(client) == 1

    assert (await visit(client, tokens[2])).headers["Location"] == "https://shop.example.com/guide"
    assert (await visit(client, tokens[0])).status == 302
    assert await count(client, Touchpoint, Touchpoint.kind == "click") == 3
    assert await count(client, Touchpoint, Touchpoint.kind == "tag_added") == 1  # tagged once
    assert await clicked_in_funnel(client) == 1  # one customer, however often they click
    async with service.sessions() as s:
        text = reports.format_funnel(await reports.funnel(s, "promo"), "en")  # type: ignore[arg-type]
    assert re.search(r"Clicked\s+1\s+100%", text) and "Delivered>Replied>Clicked>Redeemed" in text

    async def holds(expression: str) -> bool:
        async with service.sessions() as s:
            found = await s.scalar(select(Customer.id).where(
                Customer.id == customer_id, segments.condition(expression, clock.now())))
        return found is not None

    assert await holds("clicked('promo')") and await holds("clicked('promo', 30)")
    assert not await holds("clicked('welcome')")
    clock.advance(timedelta(days=31))
    assert await holds("clicked('promo')") and not await holds("clicked('promo', 30)")


async def test_a_send_tried_again_carries_the_links_of_its_first_rendering(client, fake, updates, clock):
    fake.inject_flood(retry_after=1)
    await say(client, updates, "你好")

    async def throttled() -> bool:
        d = await promo(client)
        return bool(fake.throttled) and d is not None and d.status == "planned" and d.reason is not None

    await eventually(throttled)
    async with client.app[SERVICE].sessions() as s:
        first = {row.token: row.created_at for row in (await s.scalars(select(TrackedLink))).all()}
    assert len(first) == 2
    clock.advance(timedelta(seconds=5))  # past the platform's retry_after: rendered and sent again
    delivery, tokens = await sent_promo(client, fake, updates, first=False)
    assert delivery.attempts == 2 and set(tokens) == set(first)
    async with client.app[SERVICE].sessions() as s:
        assert {row.token: row.created_at for row in (await s.scalars(select(TrackedLink))).all()} == first


async def test_link_previews_are_redirected_and_counted_apart(client, fake, updates):
    delivery, tokens = await sent_promo(client, fake, updates)
    for agent in PREVIEWS:
        resp = await visit(client, tokens[0], agent)
        assert (resp.status, resp.headers["Location"]) == (302, TARGET), agent
    resp = await visit(client, tokens[0], method="HEAD")  # a browser's visit is a GET
    assert (resp.status, resp.headers["Location"]) == (302, TARGET)
    assert await count(client, Touchpoint, Touchpoint.kind == "link_preview") == len(PREVIEWS) + 1
    assert await count(client, Touchpoint, Touchpoint.kind == "click") == 0
    assert delivery.customer_id is not None and "clicked:promo" not in await tags_of(client, delivery.customer_id)
    assert await clicked_in_funnel(client) == 0
    # WeChat's own browser is a person
    assert (await visit(client, tokens[0], BROWSER)).status == 302
    assert await count(client, Touchpoint, Touchpoint.kind == "click") == 1


async def test_forged_unknown_and_expired_tokens_get_404_and_write_nothing(client, fake, updates, clock):
    delivery, tokens = await sent_promo(client, fake, updates)
    assert delivery.customer_id is not None
    visits = (Touchpoint.kind.in_(["click", "link_preview", "tag_added"]),)
    touchpoints = await count(client, Touchpoint, *visits)
    forged = "A" * 24
    for token in (forged, tokens[0][:-1] + ("A" if tokens[0][-1] != "A" else "B"), "short", "x" * 200,
                  tokens[0] + "A", "..%2F..%2Fetc"):
        resp = await visit(client, token)
        assert resp.status == 404, token
        assert "Location" not in resp.headers
    clock.advance(timedelta(days=89))
    assert (await visit(client, tokens[2], "TelegramBot (like TwitterBot)")).status == 302  # still live
    touchpoints += 1
    clock.advance(timedelta(days=1))  # 90 days after it was sent: links.expiry_days
    for agent in (BROWSER, "TelegramBot (like TwitterBot)"):
        assert (await visit(client, tokens[0], agent)).status == 404
    assert await count(client, Touchpoint, *visits) == touchpoints
    assert "clicked:promo" not in await tags_of(client, delivery.customer_id)
    assert await clicked_in_funnel(client) == 0


async def test_a_reply_rule_link_is_counted_for_its_rule(client, fake, updates):
    await say(client, updates, "链接")

    async def answered() -> list[str]:
        return [t for t in fake.texts_to(1001) if t.startswith(BASE)]

    [answer] = await eventually(answered)
    [token] = LINK.findall(answer)
    resp = await visit(client, token)
    assert (resp.status, resp.headers["Location"]) == (302, "https://shop.example.com/")
    async with client.app[SERVICE].sessions() as s:
        [click] = (await s.scalars(select(Touchpoint).where(Touchpoint.kind == "click"))).all()
        customer_id = await s.scalar(select(Identity.customer_id).where(Identity.external_id == "1001"))
    assert (click.customer_id, click.campaign) == (customer_id, None)
    assert click.payload == {"target": "https://shop.example.com/", "token": token, "rule": "shop-link"}
    assert not {t for t in await tags_of(client, customer_id) if t.startswith("clicked:")}


def test_templates_accept_only_http_links():
    assert templates.check("{{ track('https://shop.example.com/a?b=1') }}", set()) is None
    assert templates.check("{{ track('http://shop.example.com') }}", set()) is None
    for bad in ("javascript:alert(1)", "ftp://shop.example.com/", "//shop.example.com/", "https:///path",
                "data:text/html,hi", "/relative", "http://[::1/", "https://shop.example.com/a b"):
        problem = templates.check(f"{{% if false %}}{{{{ track('{bad}') }}}}{{% endif %}}", set())
        assert problem is not None and "not an http(s) URL" in problem, bad
    assert templates.check("{{ track() }}", set()) == "template error: track() takes one URL"
    assert templates.check("{{ track('https://a.example', 2) }}", set()) == "template error: track() takes one URL"
    # outside a message (a campaign preview) the link is the target itself
    assert templates.render("{{ track('https://shop.example.com/') }}", {}) == "https://shop.example.com/"


def test_preview_agents_are_told_from_people():
    for agent in PREVIEWS + ["Discordbot/2.0", "LinkedInBot/1.0", "Mozilla/5.0 (compatible; Googlebot/2.1)"]:
        assert links.is_preview(agent), agent
    for agent in (BROWSER, "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 "
                           "Safari/537.36", "Mozilla/5.0 (Android 14; Mobile; rv:121.0) Gecko/121.0 Firefox/121.0"):
        assert not links.is_preview(agent), agent


async def test_a_menu_link_is_the_same_for_every_push_and_outlives_link_expiry(client, clock):
    service = client.app[SERVICE]
    first = links.for_menu(service.config, service.keyring, "wechat", "brand", clock.now())
    url = first.track(TARGET)
    assert url == first.track(TARGET) and url != first.track("https://shop.example.com/orders")
    async with service.sessions() as s, s.begin():
        await first.save(s)
    clock.advance(timedelta(days=30))
    again = links.for_menu(service.config, service.keyring, "wechat", "brand", clock.now())
    assert again.track(TARGET) == url  # a push again keeps the links followers have
    assert links.for_menu(service.config, service.keyring, "wechat", "other", clock.now()).track(TARGET) != url
    async with service.sessions() as s, s.begin():
        await again.save(s)
    [token] = LINK.findall(url)
    clock.advance(timedelta(days=400))  # a menu stays until the next push: its links outlive links.expiry_days
    resp = await visit(client, token)
    assert (resp.status, resp.headers["Location"]) == (302, TARGET)
    assert (await visit(client, token, "MicroMessenger Client")).status == 302
    async with service.sessions() as s:
        visits = (await s.scalars(select(Touchpoint).where(Touchpoint.kind.in_(["click", "link_preview"]))
                                  .order_by(Touchpoint.id))).all()
    assert [(v.kind, v.customer_id, v.payload["rule"]) for v in visits] == [
        ("click", None, "menu:wechat:brand"), ("link_preview", None, "menu:wechat:brand")]
    assert await count(client, TrackedLink) == 2
