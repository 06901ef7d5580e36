"""Pages of customers and of a customer's touchpoints through the integration API, on SQLite and
PostgreSQL: every customer once across the pages, newest first; each filter alone and together; a
malformed filter 422 naming it; pages audited; scope and unknown customers refused."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from scrm import customer_search
from scrm.messages import InboundEvent
from scrm.store.models import AuditEntry, Customer, Touchpoint
from scrm.web import SERVICE, create_app
from tests.test_api import KEYS, READER, SHOP, auth

POS_ONLY = "pos-key-0123456789abcdef"
NAMES = ["amy", "cara", "dan", "eve", "finn", "gus", "hana"]


@pytest.fixture
async def client(aiohttp_client, make_config, clock):
    return await aiohttp_client(create_app(make_config(KEYS), clock))


async def say(service, user: str, text: str, n: list[int] = [0]) -> None:  # noqa: B006
    n[0] += 1
    await service.receive(InboundEvent("console", "local", user, "text", text=text, platform_msg_id=f"m-{n[0]}",
                                       display_name=user.title()))


async def ids_of(service) -> dict[str, int]:
    async with service.sessions() as s:
        return {name.lower(): cid for cid, name in await s.execute(select(Customer.id, Customer.display_name))}


async def page(client, path: str, key: str = READER, **params: Any) -> tuple[int, dict[str, Any]]:
    resp = await client.get(path, params={k: str(v) for k, v in params.items()}, headers=auth(key))
    return resp.status, await resp.json()


async def walk(client, path: str, **params: Any) -> list[list[int]]:
    """Every page, following next_cursor; the ids of each."""
    pages, cursor = [], None
    while True:
        status, body = await page(client, path, **params, **({"cursor": cursor} if cursor else {}))
        assert status == 200, body
        items = body.get("customers", body.get("touchpoints"))
        pages.append([item["id"] for item in items])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


async def test_customer_pages_and_filters(client, clock):
    service = client.app[SERVICE]
    for name in NAMES:
        await say(service, name, "你好")
        clock.advance(timedelta(minutes=1))
    ids = await ids_of(service)
    for name in ("cara", "eve", "hana"):
        resp = await client.post(f"/api/v1/customers/console:{name}/tags", json={"add": ["vip"]}, headers=auth(SHOP))
        assert resp.status == 200
    async with service.sessions() as s, s.begin():
        await s.execute(update(Customer).where(Customer.id == ids["eve"]).values(stage="loyal"))

    pages = await walk(client, "/api/v1/customers", limit=3)
    assert [len(p) for p in pages] == [3, 3, 1]
    assert sum(pages, []) == sorted(ids.values(), reverse=True)
    status, first = await page(client, "/api/v1/customers", limit=2)
    assert first["customers"][0] == {"id": ids["hana"], "display_name": "Hana", "stage": first["customers"][0]["stage"],
                                     "opted_out": False, "last_seen_at": first["customers"][0]["last_seen_at"],
                                     "identities": ["console:hana"], "tags": ["vip"]}

    async def found(**params: Any) -> list[int]:
        return sum(await walk(client, "/api/v1/customers", **params), [])

    assert await found(tag="vip", limit=2) == [ids["hana"], ids["eve"], ids["cara"]]
    assert await found(stage="loyal") == [ids["eve"]]
    assert await found(tag="vip", stage="loyal") == [ids["eve"]]
    assert await found(channel="console", limit=100) == sorted(ids.values(), reverse=True)
    assert await found(channel="wechat") == []
    assert await found(segment="tag('vip') and stage != 'loyal'") == [ids["hana"], ids["cara"]]
    assert await found(q=f"#{ids['dan']}") == [ids["dan"]]
    assert await found(q="console:nobody") == []
    assert await found(q="name:fin") == [ids["finn"]]
    since = (clock.now() - timedelta(minutes=2, seconds=30)).isoformat()
    assert await found(updated_since=since) == [ids["hana"], ids["gus"]]
    assert await found(updated_since=since + "-08:00") == []  # 8 hours later in UTC: no one since

    for params, field in (({"segment": "tag('vip' and"}, "query.segment"), ({"q": "tag('vip') and"}, "query.q"),
                          ({"cursor": "abc"}, "query.cursor"), ({"limit": "101"}, "query.limit"),
                          ({"tag": "has space"}, "query.tag"), ({"updated_since": "yesterday"}, "query.updated_since"),
                          ({"colour": "red"}, "query.colour")):
        status, body = await page(client, "/api/v1/customers", **params)
        assert status == 422 and body["error"]["fields"][0]["field"] == field, (params, body)
    assert (await page(client, "/api/v1/customers", POS_ONLY))[0] == 403

    async with service.sessions() as s:
        entries = (await s.scalars(select(AuditEntry.detail).where(
            AuditEntry.actor == "api:reader", AuditEntry.detail.like("api customers page%")))).all()
    assert f"api customers page: 3 customers, #{ids['hana']}..#{ids['finn']}" in entries


async def test_touchpoint_and_message_pages(client, clock):
    service = client.app[SERVICE]
    for i in range(5):
        await say(service, "amy", f"第{i}条")
        clock.advance(timedelta(minutes=1))
    await client.post("/api/v1/customers/console:amy/tags", json={"add": ["vip"]}, headers=auth(SHOP))
    amy = (await ids_of(service))["amy"]
    async with service.sessions() as s:
        every = (await s.scalars(select(Touchpoint.id).where(Touchpoint.customer_id == amy)
                                 .order_by(Touchpoint.id.desc()))).all()
        said = (await s.scalars(select(Touchpoint.id).where(Touchpoint.customer_id == amy, Touchpoint.kind == "text",
                                                             Touchpoint.direction == "in")
                                .order_by(Touchpoint.id.desc()))).all()
    pages = await walk(client, f"/api/v1/customers/{amy}/touchpoints", limit=2)
    assert sum(pages, []) == list(every) and all(len(p) == 2 for p in pages[:-1])
    messages = sum(await walk(client, "/api/v1/customers/console:amy/messages", limit=3), [])
    assert set(said) <= set(messages) and set(messages) < set(every)  # the tag change is not a message
    status, body = await page(client, "/api/v1/customers/console:amy/messages", limit=1)
    assert body["touchpoints"][0]["kind"] in ("text",) or body["touchpoints"][0]["text"]
    assert (await page(client, "/api/v1/customers/console:nobody/touchpoints"))[0] == 404
    assert (await page(client, f"/api/v1/customers/{amy}/touchpoints", POS_ONLY))[0] == 403
    status, body = await page(client, f"/api/v1/customers/{amy}/touchpoints", cursor="0")
    assert status == 422 and body["error"]["fields"][0]["field"] == "query.cursor"
    async with service.sessions() as s:
        assert await s.scalar(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.customer_id == amy, AuditEntry.actor == "api:reader",
            AuditEntry.detail.like("api touchpoints%"))) == len(pages)


async def test_a_search_out_of_time_answers_a_partial_page_and_goes_on(client, clock, monkeypatch):
    """A filter few customers match reads a window of ids at a time; past its time budget the page stops
    (partial) and next_cursor goes on from there: following the cursors finds each match once."""
    service = client.app[SERVICE]
    for name in NAMES:
        await say(service, name, "你好")
    ids = await ids_of(service)
    monkeypatch.setattr(customer_search, "SCAN_WINDOW", 2)
    monkeypatch.setattr(customer_search, "SCAN_BUDGET", 0.0)
    partial, found, cursor = [], [], None
    while True:
        status, body = await page(client, "/api/v1/customers", q="name:a", **({"cursor": cursor} if cursor else {}))
        assert status == 200, body
        partial.append(body["partial"])
        found += [c["id"] for c in body["customers"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert found == sorted((ids[n] for n in ("amy", "cara", "dan", "hana")), reverse=True)
    assert any(partial)
