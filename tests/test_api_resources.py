"""Tags, segments, campaigns (funnel, pause, resume, preview), coupon pools (counts, import, grant) and the
reports as JSON through the integration API, on SQLite and PostgreSQL: each through the same core as chat,
the CLI and the console, so the figures are checked against those functions; bad input refused, writing
nothing."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from scrm import reports, segments
from scrm.conversations.figures import conversation_figures
from scrm.loyalty.report import care_figures
from scrm.store.models import AuditEntry, Campaign, CouponCode, Delivery, Touchpoint
from scrm.web import SERVICE, create_app
from tests.conftest import eventually
from tests.test_api import auth
from tests.test_foundation_flow import _sent, say

BOSS = "boss-key-0123456789abcdef"
SHOP = "shop-key-0123456789abcdef"
SCOPES = ["tags:read", "segments:read", "campaigns:read", "campaigns:write", "coupons:read", "coupons:write",
          "reports:read", "customers:read"]
KEYS = {"api": {"keys": {"boss": {"key": BOSS, "scopes": SCOPES},
                         "shop": {"key": SHOP, "scopes": ["customers:write"]}}}}


@pytest.fixture
async def client(aiohttp_client, make_config, clock):
    return await aiohttp_client(create_app(make_config(KEYS), clock))


async def get(client, path: str, key: str = BOSS, **params: Any) -> tuple[int, Any]:
    resp = await client.get(path, params={k: str(v) for k, v in params.items()}, headers=auth(key))
    return resp.status, await resp.json()


async def post(client, path: str, body: Any = None, key: str = BOSS) -> tuple[int, Any]:
    resp = await client.post(path, json=body, headers=auth(key))
    return resp.status, await resp.json()


async def test_tags_and_segments(client):
    service = client.app[SERVICE]
    for user, text in (("amy", "我想买奶粉"), ("cara", "奶粉有货吗"), ("dan", "你好")):
        await say(client, user, text)
    status, body = await get(client, "/api/v1/tags")
    assert status == 200
    counts = {t["name"]: t["customers"] for t in body["tags"]}
    assert counts["奶粉"] == 2 and body["tags"][0]["name"] == "奶粉"
    async with service.sessions() as s:
        assert [(t["name"], t["customers"], t["added_7d"]) for t in body["tags"]] == \
            list(await reports.top_tags(s, service.clock.now(), 100))
    assert (await get(client, "/api/v1/tags", limit=0))[0] == 422
    assert (await get(client, "/api/v1/tags", SHOP))[0] == 403

    status, body = await get(client, "/api/v1/segments")
    listed = {s["name"]: s for s in body["segments"]}
    assert status == 200 and set(listed) == set(service.config.segments)
    assert listed["formula_fans"]["count"] == 2
    status, body = await get(client, "/api/v1/segments/formula_fans", limit=1)
    assert (status, body["count"], len(body["members"])) == (200, 2, 1)
    assert set(body["members"][0]) == {"id", "display_name", "stage", "last_seen_at"}  # nothing personal beyond
    assert (await get(client, "/api/v1/segments/nope"))[0] == 404
    status, body = await post(client, "/api/v1/segments/preview", {"expression": "not tag('奶粉')"})
    assert (status, body["name"], body["count"]) == (200, None, 1)
    async with service.sessions() as s:
        total, _ = await segments.preview(s, segments.condition("not tag('奶粉')", service.clock.now()), 1)
    assert total == 1
    status, body = await post(client, "/api/v1/segments/preview", {"expression": "tag('奶粉' and"})
    assert status == 422 and body["error"]["fields"][0]["field"] == "body.expression"
    async with service.sessions() as s:
        audited = (await s.scalars(select(AuditEntry.detail).where(AuditEntry.actor == "api:boss"))).all()
    assert any(d.startswith("api segment preview 'formula_fans'") for d in audited)


async def test_campaign_funnel_pause_resume_preview(client):
    service = client.app[SERVICE]
    await say(client, "amy", "你好")
    await eventually(lambda: _sent(client))
    status, body = await get(client, "/api/v1/campaigns/welcome/funnel")
    assert status == 200 and body["total"]["sent"] == 1 and body["campaign"] == "welcome"
    async with service.sessions() as s:
        expected = await reports.funnel(s, "welcome", service.config.reports.attribution_days)
    assert expected is not None and body["total"] == {**expected.total.as_dict()}
    status, body = await get(client, "/api/v1/campaigns/winback/funnel")  # never planned: zeros
    assert status == 200 and body["total"]["audience"] == 0 and body["by_variant"] == {}
    assert (await get(client, "/api/v1/campaigns/nope/funnel"))[0] == 404

    status, body = await post(client, "/api/v1/campaigns/welcome/pause")
    assert (status, body) == (200, {"campaign": "welcome", "paused": True})
    assert "welcome" in service.paused
    async with service.sessions() as s:
        assert await s.scalar(select(Campaign.paused).where(Campaign.name == "welcome")) is True
    status, body = await post(client, "/api/v1/campaigns/welcome/resume")
    assert (status, body["paused"]) == (200, False) and "welcome" not in service.paused
    assert (await post(client, "/api/v1/campaigns/nope/pause"))[0] == 404

    status, body = await get(client, "/api/v1/campaigns/welcome/preview", customer="console:amy")
    assert status == 200 and body["channel"] == "console" and len(body["steps"]) >= 1
    assert (await get(client, "/api/v1/campaigns/welcome/preview", customer="console:nobody"))[0] == 404
    status, body = await get(client, "/api/v1/campaigns/welcome/preview")
    assert status == 422 and body["error"]["fields"][0]["field"] == "query.customer"
    async with service.sessions() as s:
        assert await s.scalar(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.detail == "api campaign preview welcome")) == 1


async def welcomed(client, n: int) -> None:
    """The welcome campaign's sends (with their coupons) are done: what follows reads still figures."""
    async def done() -> bool:
        async with client.app[SERVICE].sessions() as s:
            return await s.scalar(select(func.count()).select_from(Delivery).where(
                Delivery.status == "sent", Delivery.campaign == "welcome")) == n

    await eventually(done)


async def test_coupon_pools_import_and_grant(client):
    service = client.app[SERVICE]
    await say(client, "amy", "你好")
    await welcomed(client, 1)
    status, body = await post(client, "/api/v1/coupons/winback/codes",
                              {"codes": ["SUP-0001", "sup-0002", "SUP-0001"], "expires": "2099-12-31"})
    assert (status, body) == (201, {"pool": "winback", "imported": 2, "duplicates": 1})
    before = await _codes(service)
    for path, payload, expected in (
            ("/api/v1/coupons/winback/codes", {"codes": ["not a code!"]}, (422, "body.codes")),
            ("/api/v1/coupons/winback/codes", {"codes": []}, (422, "body.codes")),
            ("/api/v1/coupons/winback/codes", {"codes": ["X-1"], "expires": "2001-01-01"}, (422, "body.expires")),
            ("/api/v1/coupons/nope/codes", {"codes": ["X-1"]}, (404, None)),
            ("/api/v1/coupons/nope/grant", {"customer": {"channel": "console", "external_id": "amy"}}, (404, None)),
            ("/api/v1/coupons/winback/grant", {"customer": {"channel": "console", "external_id": "zed"}},
             (404, None))):
        status, body = await post(client, path, payload)
        assert status == expected[0], (path, body)
        if expected[1]:
            assert body["error"]["fields"][0]["field"] == expected[1]
    assert await _codes(service) == before

    status, pools = await get(client, "/api/v1/coupons")
    winback = {p["name"]: p for p in pools["pools"]}["winback"]
    assert (winback["free"], winback["issued"]) == (2, 0)
    customer = {"customer": {"channel": "console", "external_id": "amy"}}
    granted = []
    for _ in range(3):  # winback: per_customer = 3; imported codes go first, oldest first
        status, body = await post(client, "/api/v1/coupons/winback/grant", customer)
        assert status == 201, body
        granted.append(body["code"])
    assert granted[:2] == ["SUP-0001", "SUP-0002"] and granted[2].startswith("BACK")
    status, body = await post(client, "/api/v1/coupons/winback/grant", customer)
    assert (status, body["error"]["code"]) == (409, "coupon_limit")
    async with service.sessions() as s:
        actors = (await s.scalars(select(Touchpoint.actor).where(Touchpoint.kind == "coupon_granted",
                                                                  Touchpoint.channel == "api"))).all()
    assert actors == ["api:boss"] * 3
    status, pools = await get(client, "/api/v1/coupons")
    assert {p["name"]: p for p in pools["pools"]}["winback"]["issued"] == 3
    assert (await get(client, "/api/v1/coupons", SHOP))[0] == 403


async def _codes(service) -> int:
    async with service.sessions() as s:
        return int(await s.scalar(select(func.count()).select_from(CouponCode)))


async def test_reports_as_json(client):
    service = client.app[SERVICE]
    for user in ("amy", "cara"):
        await say(client, user, "你好")
    await welcomed(client, 2)
    status, body = await get(client, "/api/v1/reports/summary")
    assert status == 200 and body["period"] == "7d" and body["new_customers"] == 2
    async with service.sessions() as s:
        summary = await reports.summary(s, service.clock.now(), 7,
                                        attribution_days=service.config.reports.attribution_days)
        care = await care_figures(s, summary.period)
        conversations = await conversation_figures(s, summary.since, summary.until, service.clock.now())
    assert body == {**summary.as_dict(), "care": care, "conversations": conversations.as_dict()}
    assert body["campaign_sends"] == 2 and body["conversations"]["by_staff"] == []
    status, body = await get(client, "/api/v1/reports/summary", period="2026-11-01..2026-11-07")
    assert status == 200 and body["period"] == "2026-11-01..2026-11-07"
    status, body = await get(client, "/api/v1/reports/summary", period="lately")
    assert status == 422 and body["error"]["fields"][0]["field"] == "query.period"
    status, body = await get(client, "/api/v1/reports/cohort", weeks=4)
    assert status == 200 and len(body["weeks"]) == 4 and body["sizes"][-1] == 2
    assert (await get(client, "/api/v1/reports/cohort", weeks=40))[0] == 422
    assert (await get(client, "/api/v1/reports/cohort", SHOP))[0] == 403
