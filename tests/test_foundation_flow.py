"""The foundation's four-step flow through the real app: capture + tags, welcome coupon via the
scheduler, redemption as a conversion, and the manager's /report — on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select

from scrm.store.models import Conversion, CouponCode, Customer, CustomerTag, Delivery, Redemption, Tag, Touchpoint
from scrm.web import SERVICE
from tests.conftest import eventually


async def say(client, user: str, text: str, msg_id: str | None = None) -> dict:
    resp = await client.post("/console/local/messages", json={"user": user, "text": text, "id": msg_id or uuid.uuid4().hex})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def updates(client, user: str, wait: float = 0) -> dict:
    resp = await client.get("/console/local/updates", params={"user": user, "wait": str(wait)})
    assert resp.status == 200
    return await resp.json()


async def test_four_step_flow(aiohttp_client, make_config, clock):
    app_client = await aiohttp_client(__import__("scrm.web", fromlist=["create_app"]).create_app(make_config(), clock))
    service = app_client.app[SERVICE]

    # 1. capture + keyword tags
    first = await say(app_client, "alice", "你好,我想买奶粉,有优惠券吗")
    assert first["duplicate"] is False
    async with service.sessions() as s:
        customer = await s.scalar(select(Customer))
        assert customer.display_name == "alice"
        tags = set((await s.scalars(select(Tag.name).join(CustomerTag).where(CustomerTag.customer_id == customer.id))).all())
        assert tags == {"奶粉", "coupon-seeker"}
        inbound = (await s.scalars(select(Touchpoint).where(Touchpoint.direction == "in"))).all()
        assert [t.text for t in inbound] == ["你好,我想买奶粉,有优惠券吗"]

    # 2. the welcome campaign sends a personalized coupon through the scheduler's outbox job
    async def welcome():
        return (await updates(app_client, "alice", wait=1))["messages"]

    messages = await eventually(welcome)
    assert len(messages) == 1 and messages[0].startswith("alice,欢迎")
    await eventually(lambda: _sent(app_client))  # recorded just after the channel took it
    async with service.sessions() as s:
        code = await s.scalar(select(CouponCode).where(CouponCode.customer_id == customer.id))
        assert code is not None and code.code in messages[0]
        delivery = await s.scalar(select(Delivery).where(Delivery.campaign == "welcome"))
        assert (delivery.campaign, delivery.status) == ("welcome", "sent")
        sent = await s.scalar(select(func.count()).select_from(Touchpoint).where(Touchpoint.kind == "campaign_message"))
        assert sent == 1

    # 3. redemption in chat becomes a conversion; a second try is refused
    reply = await say(app_client, "alice", f"我要用券 {code.code}")
    assert reply["replies"] == [f"券码 {code.code} 已核销,感谢您的惠顾!"]
    again = await say(app_client, "alice", f"我要用券 {code.code}")
    assert "已经使用过" in again["replies"][0]
    async with service.sessions() as s:
        assert await s.scalar(select(func.count()).select_from(Redemption)) == 1
        conversion = await s.scalar(select(Conversion))
        assert (conversion.kind, conversion.campaign, conversion.customer_id) == ("coupon_redemption", "welcome", customer.id)

    # 4. a manager asks for the report in chat; a customer asking is refused
    refused = await say(app_client, "alice", "/report")
    assert "仅限员工" in refused["replies"][0]
    report = (await say(app_client, "bob", "/report"))["replies"][0]
    expected = {"新客户": "1", "收到消息": "4", "发出消息": "4", "活动发送": "1", "发券": "1",
                "核销": "1", "转化": "1", "转化率": "100.0%"}
    # rows are "<中文> <English...>  <value>  <change against the previous period>"
    lines = {line.split()[0]: line.split()[-2] for line in report.splitlines() if line.split()[:1] in ([k] for k in expected)}
    assert lines == expected
    async with service.sessions() as s:
        # the manager is staff, not a customer
        assert await s.scalar(select(func.count()).select_from(Customer)) == 1


async def test_welcome_is_sent_once_per_customer(aiohttp_client, make_config, clock):
    from scrm.web import create_app

    client = await aiohttp_client(create_app(make_config(), clock))
    for text in ("你好", "在吗", "奶粉多少钱"):
        await say(client, "carol", text)
    await eventually(lambda: _sent(client))
    await client.app[SERVICE].outbox.tick()
    async with client.app[SERVICE].sessions() as s:
        assert await s.scalar(select(func.count()).select_from(Delivery).where(Delivery.campaign == "welcome")) == 1
        assert await s.scalar(select(func.count()).select_from(CouponCode)) == 1


async def _sent(client) -> bool:
    async with client.app[SERVICE].sessions() as s:
        return (await s.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.status == "sent", Delivery.campaign == "welcome"))) == 1
