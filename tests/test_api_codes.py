"""Channel codes through the integration API, against the fake WeChat and WeCom servers, on SQLite and
PostgreSQL: made (201), refused with the field or the platform's reason and nothing kept, listed, shown
with their figures, drawn as PNG and SVG that read back as the code's URL, disabled, and reported."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image
from sqlalchemy import func, select

from scrm.store.models import AcquisitionCode
from scrm.web import SERVICE, create_app
from tests.test_api import auth
from tests.test_codes import (  # noqa: F401  (wechat, wecom: fixtures)
    CORP_ID,
    POOL,
    WECOM_AES,
    WECOM_SECRET,
    WECOM_TOKEN,
    WX_TOKEN,
    decode,
    follow,
    wechat,
    wecom,
)

MAKER = "maker-key-0123456789abcdef"
VIEWER = "viewer-key-0123456789abcdef"
CODE_KEYS = {"api": {"keys": {
    "maker": {"key": MAKER, "scopes": ["codes:read", "codes:write", "reports:read"]},
    "viewer": {"key": VIEWER, "scopes": ["codes:read"]},
}}}


async def kept(service) -> int:
    async with service.sessions() as s:
        return int(await s.scalar(select(func.count()).select_from(AcquisitionCode)))


async def create(client, key: str = MAKER, **body: Any):
    return await client.post("/api/v1/codes", json=body, headers=auth(key))


async def error_of(resp) -> tuple[int, str, list[str]]:
    body = await resp.json()
    assert set(body) == {"error"}, body
    return resp.status, body["error"]["code"], [f["field"] for f in body["error"].get("fields") or []]


async def test_wechat_code_through_the_api(aiohttp_client, make_config, clock, wechat):
    config = make_config({**CODE_KEYS, "coupons": POOL, "channels": {"wechat": {"brand": {
        "app_id": wechat.app_id, "app_secret": wechat.app_secret, "token": WX_TOKEN,
        "api_base_url": wechat.base_url, "request_timeout_seconds": 2}}}})
    client = await aiohttp_client(create_app(config, clock))
    service = client.app[SERVICE]

    resp = await create(client, name="poster_mall", channel="wechat:brand", expires="7d", tags=["商场海报"],
                        coupon="poster", cost=300)
    assert resp.status == 201, await resp.text()
    made = await resp.json()
    [call] = [c for c in wechat.calls if c.endpoint == "qrcode/create"]
    assert call.body["expire_seconds"] == 7 * 86400 and made["url"] == call.answer["url"]
    assert (made["kind"], made["state"], made["created_by"]) == ("qr", "active", "api:maker")
    assert made["tags"] == ["商场海报"]

    # refusals: the field named, nothing kept, the platform not asked for what can be told before
    asked = len(wechat.calls)
    cases = [
        (create(client, name="bad name", channel="wechat:brand"), (422, "validation_error", ["body.name"])),
        (create(client, name="x", channel="wechat:nope"), (400, "invalid_code", ["body.channel"])),
        (create(client, name="x", channel="wechat:brand", staff=["zhangsan"]), (400, "invalid_code", ["body.staff"])),
        (create(client, name="x", channel="wechat:brand", coupon="nope"), (400, "invalid_code", ["body.coupon"])),
        (create(client, name="x", channel="wechat:brand", expires="31d"), (400, "invalid_code", ["body.expires"])),
        (create(client, name="x", channel="wechat:brand", expires="soon"), (400, "invalid_code", ["body.expires"])),
        (create(client, name="x", channel="wechat:brand", welcome="{{ nobody }}"),
         (400, "invalid_code", ["body.welcome"])),
        (create(client, name="poster_mall", channel="wechat:brand"), (409, "code_exists", [])),
        (create(client, VIEWER, name="x", channel="wechat:brand"), (403, "forbidden", [])),
    ]
    for request, expected in cases:
        assert await error_of(await request) == expected, expected
    assert len(wechat.calls) == asked and await kept(service) == 1
    wechat.fail_next("qrcode/create", 45009)  # WeChat's quota: said, and nothing kept
    resp = await create(client, name="today", channel="wechat:brand")
    assert (await error_of(resp))[:2] == (502, "platform_refused")
    assert "45009" in (await resp.json())["error"]["message"]
    assert await kept(service) == 1

    # a new follower through it; the code's page counts them
    await follow(client, "o_new", "subscribe", "qrscene_poster_mall", 1700000001)
    resp = await client.get("/api/v1/codes/poster_mall", headers=auth(VIEWER))
    shown = await resp.json()
    assert resp.status == 200 and shown["url"] == made["url"]
    figures = shown["figures"]
    assert (figures["scans"], figures["new_customers"], figures["cost_per_new"]) == (1, 1, 300)
    listed = await (await client.get("/api/v1/codes", headers=auth(VIEWER))).json()
    assert [c["name"] for c in listed["codes"]] == ["poster_mall"]

    # drawn: PNG and poster PNG read back as the URL, SVG is SVG, with their media types
    png = await client.get("/api/v1/codes/poster_mall/image", headers=auth(VIEWER))
    assert png.status == 200 and png.content_type == "image/png" and decode(await png.read()) == made["url"]
    poster = await client.get("/api/v1/codes/poster_mall/image?format=png&poster=true", headers=auth(VIEWER))
    big = await poster.read()
    assert decode(big) == made["url"] and Image.open(io.BytesIO(big)).size[0] > 4 * Image.open(
        io.BytesIO(await png.read())).size[0]
    svg = await client.get("/api/v1/codes/poster_mall/image?format=svg", headers=auth(VIEWER))
    assert svg.content_type == "image/svg+xml" and b"<svg" in await svg.read()
    bad = await client.get("/api/v1/codes/poster_mall/image?format=gif", headers=auth(VIEWER))
    assert await error_of(bad) == (422, "validation_error", ["query.format"])
    for path in ("/api/v1/codes/nope", "/api/v1/codes/nope/image"):
        assert (await error_of(await client.get(path, headers=auth(VIEWER))))[:2] == (404, "code_not_found")

    # the report as JSON
    resp = await client.get("/api/v1/reports/codes?days=7", headers=auth(MAKER))
    report = await resp.json()
    assert resp.status == 200 and report["days"] == 7
    [figures] = report["codes"]
    assert (figures["name"], figures["new_customers"], figures["days"][0]["new_customers"]) == ("poster_mall", 1, 1)
    assert (await client.get("/api/v1/reports/codes", headers=auth(VIEWER))).status == 403
    assert (await error_of(await client.get("/api/v1/reports/codes?days=0", headers=auth(MAKER))))[2] == ["query.days"]

    # changed: what is given changes, null clears, the rest stays; the printed code is the same
    patch = client.patch
    resp = await patch("/api/v1/codes/poster_mall", headers=auth(MAKER),
                       json={"tags": ["春季"], "cost": None, "welcome": "欢迎 {{ coupon.code }}"})
    changed = await resp.json()
    assert resp.status == 200, changed
    assert (changed["tags"], changed["cost"], changed["welcome"], changed["coupon"], changed["url"]) == \
        (["春季"], None, "欢迎 {{ coupon.code }}", "poster", made["url"])
    for body, expected in (({}, (422, "validation_error", ["body"])),
                           ({"tags": None}, (422, "validation_error", ["body"])),
                           ({"campaign": "nope"}, (400, "invalid_code", ["body.campaign"])),
                           ({"colour": "red"}, (422, "validation_error", ["body.colour"]))):
        assert await error_of(await patch("/api/v1/codes/poster_mall", json=body, headers=auth(MAKER))) == expected
    assert (await error_of(await patch("/api/v1/codes/nope", json={"cost": 1}, headers=auth(MAKER))))[:2] == \
        (404, "code_not_found")
    assert (await patch("/api/v1/codes/poster_mall", json={"cost": 1}, headers=auth(VIEWER))).status == 403

    # disabled: once, then the same answer; reading it shows so
    assert (await client.delete("/api/v1/codes/poster_mall", headers=auth(VIEWER))).status == 403
    resp = await client.delete("/api/v1/codes/poster_mall", headers=auth(MAKER))
    assert resp.status == 200 and (await resp.json())["state"] == "disabled"
    again = await client.delete("/api/v1/codes/poster_mall", headers=auth(MAKER))
    assert (await again.json())["disabled_at"] == (await resp.json())["disabled_at"]
    assert (await error_of(await client.delete("/api/v1/codes/nope", headers=auth(MAKER))))[:2] == \
        (404, "code_not_found")
    assert (await error_of(await patch("/api/v1/codes/poster_mall", json={"cost": 1}, headers=auth(MAKER))))[:2] == \
        (409, "code_disabled")


async def test_wecom_code_is_withdrawn_when_disabled(aiohttp_client, make_config, clock, wecom):
    config = make_config({**CODE_KEYS, "channels": {"wecom": {"acme": {
        "corp_id": CORP_ID, "secret": WECOM_SECRET, "token": WECOM_TOKEN, "encoding_aes_key": WECOM_AES,
        "api_base_url": wecom.url, "sender": "zhangsan"}}}})
    client = await aiohttp_client(create_app(config, clock))
    service = client.app[SERVICE]
    resp = await create(client, name="store_b", channel="wecom:acme", staff=["wangwu"])  # left the corp
    status, code, _ = await error_of(resp)
    assert (status, code) == (502, "platform_refused") and "not in the corp" in (await resp.json())["error"]["message"]
    assert await error_of(await create(client, name="store_b", channel="wecom:acme")) == \
        (400, "invalid_code", ["body.staff"])
    resp = await create(client, name="store_b", channel="wecom:acme", staff=["zhangsan", "lisi"])
    assert resp.status == 201 and (await resp.json())["kind"] == "contact_way"
    assert len(wecom.ways) == 1 and await kept(service) == 1
    resp = await client.delete("/api/v1/codes/store_b", headers=auth(MAKER))
    assert resp.status == 200 and (await resp.json())["state"] == "disabled" and wecom.ways == {}
