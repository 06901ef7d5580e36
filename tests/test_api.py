"""The integration API driven through the real app (pytest-aiohttp), on SQLite and PostgreSQL:
keys and scopes, the error shape, orders with attribution and idempotency, the till, the 360° view,
tags, campaign triggers and funnels, and the OpenAPI document matching the routes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from scrm import personal
from scrm.customers import find_customer
from scrm.importer import Importer
from scrm.store.models import (
    Conversion,
    CouponCode,
    Customer,
    Delivery,
    Redemption,
    Touchpoint,
)
from scrm.web import SERVICE, create_app
from tests.conftest import eventually
from tests.test_foundation_flow import _sent, say, updates

SHOP = "shop-key-0123456789abcdef"
POS = "pos-key-0123456789abcdef"
READER = "reader-key-0123456789abcdef"
KEYS = {"api": {"keys": {
    "shop": {"key": SHOP, "scopes": ["conversions:write", "customers:read", "customers:write", "campaigns:read",
                                     "campaigns:trigger"]},
    "pos": {"key": POS, "scopes": ["coupons:redeem"]},
    "reader": {"key": READER, "scopes": ["customers:read"]},
}}}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def client(aiohttp_client, make_config, clock):
    return await aiohttp_client(create_app(make_config(KEYS), clock))


async def count(client, model, *where) -> int:
    async with client.app[SERVICE].sessions() as s:
        return int(await s.scalar(select(func.count()).select_from(model).where(*where)))


async def welcome_coupon(client, user: str = "alice") -> str:
    """A customer's first message; the welcome campaign sends her a coupon through the outbox."""
    await say(client, user, "你好")
    messages = await eventually(lambda: _messages(client, user))
    await eventually(lambda: _sent(client))
    async with client.app[SERVICE].sessions() as s:
        code = await s.scalar(select(CouponCode.code).join(Customer, Customer.id == CouponCode.customer_id))
    assert code in messages[0]
    return code


async def _messages(client, user: str) -> list[str]:
    return (await updates(client, user, wait=1))["messages"]


async def order(client, key: str = SHOP, **body: Any):
    body.setdefault("customer", {"channel": "console", "external_id": "alice"})
    body.setdefault("amount", 99.5)
    return await client.post("/api/v1/orders", json=body, headers=auth(key))


async def test_keys_scopes_and_error_shape(client):
    resp = await client.get("/api/v1/campaigns")
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "unauthorized"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = await client.get("/api/v1/campaigns", headers=auth(SHOP[:-1] + "X"))
    assert resp.status == 401
    resp = await client.get("/api/v1/campaigns", headers={"X-API-Key": SHOP})
    assert resp.status == 200
    resp = await order(client, POS, order_id="o-1")
    assert resp.status == 403
    body = await resp.json()
    assert body == {"error": {"code": "forbidden", "message": "this key lacks the scope 'conversions:write'"}}
    resp = await client.get("/api/v1/nowhere", headers=auth(SHOP))
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    assert "X-Request-ID" in resp.headers
    resp = await client.get("/api/v1/campaigns", headers={**auth(SHOP), "X-Request-ID": "req-42"})
    assert resp.headers["X-Request-ID"] == "req-42"


async def test_validation_names_the_field(client):
    await say(client, "alice", "你好")
    resp = await order(client, order_id="o-1", amount="lots")
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert error["code"] == "validation_error" and error["fields"][0]["field"] == "body.amount"
    resp = await client.post("/api/v1/orders", json={"order_id": "o-1", "amount": 1}, headers=auth(SHOP))
    assert [f["field"] for f in (await resp.json())["error"]["fields"]] == ["body.customer"]
    resp = await order(client, order_id="o-1", customer={"channel": "console", "external_id": "alice", "phone": "13800138000"})
    assert resp.status == 422 and "exactly one" in (await resp.json())["error"]["message"]
    resp = await order(client, order_id="o-1", currency="yuan")
    assert (await resp.json())["error"]["fields"][0]["field"] == "body.currency"
    resp = await client.post("/api/v1/orders", data=b"{not json", headers=auth(SHOP))
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "invalid_json"
    resp = await order(client, order_id="o-1", customer={"channel": "console", "external_id": "nobody"})
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "customer_not_found"
    assert await count(client, Conversion) == 0


async def test_body_too_large(aiohttp_client, make_config, clock):
    client = await aiohttp_client(create_app(make_config({**KEYS, "service": {"max_body_bytes": 2048}}), clock))
    items = [{"sku": f"sku-{i}", "quantity": 1, "price": 1.0} for i in range(200)]
    resp = await order(client, order_id="big", items=items)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "body_too_large"


async def test_order_with_welcome_coupon_is_attributed_and_idempotent(client, clock):
    code = await welcome_coupon(client)
    clock.advance(timedelta(hours=2))
    resp = await order(client, order_id="shop-1001", amount=128.0, coupon_code=code.lower(),
                       items=[{"sku": "formula-800g", "quantity": 2, "price": 64.0}])
    assert resp.status == 201, await resp.text()
    first = await resp.json()
    assert (first["campaign"], first["attribution"], first["coupon"]) == ("welcome", "coupon",
                                                                          {"code": code, "status": "redeemed"})
    assert first["duplicate"] is False
    async with client.app[SERVICE].sessions() as s:
        conversion = await s.scalar(select(Conversion))
        assert (conversion.kind, conversion.order_id, conversion.amount, conversion.campaign, conversion.coupon_code) \
            == ("order", "shop-1001", 128.0, "welcome", code)
        assert (await s.scalar(select(CouponCode.redeemed_at).where(CouponCode.code == code))) is not None
    # (the background profile refresh may still write a stage change: count what the API writes)
    written = ((Conversion,), (Redemption,), (Touchpoint, Touchpoint.channel == "api"))
    before = [await count(client, *w) for w in written]

    again = await order(client, order_id="shop-1001", amount=1.0)  # a retry, even a garbled one
    assert again.status == 200
    assert await again.json() == {**first, "duplicate": True}
    assert [await count(client, *w) for w in written] == before == [1, 1, 2]  # order + coupon_redeemed

    # the till redeeming the same code now: already used
    resp = await client.post("/api/v1/coupons/redeem", json={"code": code}, headers=auth(POS))
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "coupon_used"

    # the funnel counts the send, the coupon and the attributed order
    welcome = {c["name"]: c for c in (await (await client.get("/api/v1/campaigns", headers=auth(SHOP))).json())
               ["campaigns"]}["welcome"]
    assert welcome["deliveries"]["sent"] == 1
    funnel = welcome["funnel"]
    assert {k: funnel[k] for k in ("delivered", "redeemed", "converted", "conversions", "revenue")} == \
        {"delivered": 1, "redeemed": 1, "converted": 1, "conversions": 1, "revenue": 128.0}
    # the same figures as the manager's /funnel (scrm.reports) and the campaign's own funnel endpoint
    from scrm import reports

    async with client.app[SERVICE].sessions() as s:
        report = await reports.funnel(s, "welcome")
    assert (report.total.conversions, report.total.revenue) == (1, 128.0)
    own = await (await client.get("/api/v1/campaigns/welcome/funnel", headers=auth(SHOP))).json()
    assert own["total"] == funnel


async def test_attribution_without_coupon(client, clock):
    await welcome_coupon(client)
    clock.advance(timedelta(days=3))
    resp = await order(client, order_id="o-in-window", amount=10)
    assert ((await resp.json())["campaign"], (await resp.json())["attribution"]) == ("welcome", "last_delivery")
    clock.advance(timedelta(days=5))  # 8 days after the welcome message
    resp = await order(client, order_id="o-late", amount=10)
    assert ((await resp.json())["campaign"], (await resp.json())["attribution"]) == (None, "none")
    resp = await order(client, order_id="o-bad-coupon", amount=10, coupon_code="WELNOPE")
    body = await resp.json()
    assert resp.status == 201 and body["coupon"] == {"code": "WELNOPE", "status": "unknown"}
    assert body["campaign"] is None
    assert await count(client, Conversion) == 3


async def test_order_by_phone_and_lookup(client):
    await say(client, "bob2", "你好")
    service = client.app[SERVICE]
    async with service.sessions() as s, s.begin():
        customer = await s.scalar(select(Customer))
        await personal.set_phone(s, customer, "+86 138 0013 8000", service.keyring)
    resp = await order(client, order_id="p-1", customer={"phone": "13800138000"})
    assert resp.status == 201 and (await resp.json())["customer_id"] == customer.id
    resp = await client.post("/api/v1/customers/lookup", json={"phone": "138-0013-8000"}, headers=auth(READER))
    assert resp.status == 200 and (await resp.json())["id"] == customer.id
    resp = await client.post("/api/v1/customers/lookup", json={"phone": "+1 555 0100 999"}, headers=auth(READER))
    assert resp.status == 404
    resp = await client.post("/api/v1/customers/lookup", json={"phone": "call me"}, headers=auth(READER))
    assert resp.status == 422 and (await resp.json())["error"]["fields"][0]["field"] == "body.customer.phone"


async def test_pos_redeem(client):
    code = await welcome_coupon(client)
    resp = await client.post("/api/v1/coupons/redeem", json={"code": "WELNOTACODE"}, headers=auth(POS))
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "coupon_not_found"
    await say(client, "carol", "你好")
    resp = await client.post("/api/v1/coupons/redeem", headers=auth(POS),
                             json={"code": code, "customer": {"channel": "console", "external_id": "carol"}})
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "coupon_not_yours"
    resp = await client.post("/api/v1/coupons/redeem", json={"code": code}, headers=auth(POS))
    assert resp.status == 200
    assert (await resp.json())["campaign"] == "welcome"
    async with client.app[SERVICE].sessions() as s:
        conversion = await s.scalar(select(Conversion))
        assert (conversion.kind, conversion.campaign) == ("coupon_redemption", "welcome")


async def test_view_and_tags(client):
    await say(client, "alice", "我想买奶粉")
    resp = await client.get("/api/v1/customers/console:alice", headers=auth(READER))
    view = await resp.json()
    assert resp.status == 200 and view["identities"] == [{"channel": "console", "account": "local",
                                                            "external_id": "alice"}]
    assert "奶粉" in {t["name"] for t in view["tags"]}
    resp = await client.get(f"/api/v1/customers/{view['id']}", headers=auth(READER))
    assert (await resp.json())["id"] == view["id"]
    assert (await client.get("/api/v1/customers/console:nobody", headers=auth(READER))).status == 404
    for ref in ("%C2%B9", "%23%E2%91%A1"):  # "¹" and "#②": digits to str.isdigit, not ids
        assert (await client.get(f"/api/v1/customers/{ref}", headers=auth(READER))).status == 404
    resp = await client.post("/api/v1/customers/console:alice/tags", json={"add": ["vip"]}, headers=auth(READER))
    assert resp.status == 403
    resp = await client.post("/api/v1/customers/console:alice/tags", json={"add": ["vip"], "remove": ["奶粉"]},
                             headers=auth(SHOP))
    assert await resp.json() == {"customer_id": view["id"], "changed": ["+vip", "-奶粉"], "tags": ["vip"]}
    resp = await client.post("/api/v1/customers/console:alice/tags", json={"add": ["vip"]}, headers=auth(SHOP))
    assert (await resp.json())["changed"] == []
    resp = await client.post("/api/v1/customers/console:alice/tags", json={"add": ["has space"]}, headers=auth(SHOP))
    assert resp.status == 422 and (await resp.json())["error"]["fields"][0]["field"] == "body.add.0"
    async with client.app[SERVICE].sessions() as s:
        actors = (await s.scalars(select(Touchpoint.actor).where(Touchpoint.kind == "tag_added"))).all()
        assert "api:shop" in actors


async def test_trigger_campaign(client, tmp_path):
    service = client.app[SERVICE]
    # a customer the welcome never reached: imported, she has not written yet
    (tmp_path / "dora.csv").write_text("identity\nconsole:local:dora\n", "utf-8")
    imported = await Importer(service.sessions, service.config, service.keyring, service.clock.now()).run(
        tmp_path / "dora.csv")
    assert imported.created == 1
    async with service.sessions() as s:
        customer = await find_customer(s, "console", "dora", "local")
    body = {"customer": {"channel": "console", "external_id": "dora"}}
    resp = await client.post("/api/v1/campaigns/nope/trigger", json=body, headers=auth(SHOP))
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "campaign_not_found"
    resp = await client.post("/api/v1/campaigns/welcome/trigger", json=body, headers=auth(SHOP))
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["planned"] is True
    messages = await eventually(lambda: _messages(client, "dora"))
    assert messages[0].startswith("dora") or "欢迎" in messages[0]
    resp = await client.post("/api/v1/campaigns/welcome/trigger", json=body, headers=auth(SHOP))
    assert resp.status == 200 and (await resp.json())["planned"] is False
    async with service.sessions() as s:
        assert await s.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.customer_id == customer.id)) == 1


async def test_openapi_matches_routes(client):
    resp = await client.get("/api/v1/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    served = set()
    for resource in client.app.router.resources():
        info = resource.get_info()
        if "app" in info:  # the API sub-app (the console is another)
            for route in info["app"].router.routes():
                path = route.resource.canonical
                if path.startswith("/api/v1/") and path != "/api/v1/openapi.json":
                    served.add((route.method.lower(), path))
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert served == documented
    order_schema = doc["paths"]["/api/v1/orders"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = order_schema["$ref"].rsplit("/", 1)[1]
    assert set(doc["components"]["schemas"][name]["required"]) == {"order_id", "customer", "amount"}
    assert {"401", "403", "422", "413", "201"} <= set(doc["paths"]["/api/v1/orders"]["post"]["responses"])
