"""One person on two channels becomes one customer: by a verified phone, or by an operator."""

from __future__ import annotations

from sqlalchemy import func, select

from scrm.identity import merge_customers
from scrm.messages import InboundEvent
from scrm.service import Service
from scrm.store.models import (
    CouponCode,
    Customer,
    CustomerTag,
    Identity,
    Tag,
    Touchpoint,
)


async def counts(service: Service, customer_id: int) -> dict[str, int]:
    async with service.sessions() as s:
        def n(model, *where):
            return s.scalar(select(func.count()).select_from(model).where(model.customer_id == customer_id, *where))
        return {"identities": await n(Identity), "touchpoints": await n(Touchpoint), "tags": await n(CustomerTag),
                "coupons": await n(CouponCode)}


async def test_verified_phone_merges_and_everything_follows(make_config, clock):
    service = Service(make_config(), clock)
    await service.start(scheduler=False)
    try:
        old = (await service.receive(InboundEvent("console", "local", "alice", "text", text="我想买奶粉",
                                                  platform_msg_id="a1", display_name="alice"))).customer_id
        await service.outbox.tick()  # welcome coupon for the console customer
        new = (await service.receive(InboundEvent("telegram", "main", "777", "text", text="有优惠券吗",
                                                  platform_msg_id="t1"))).customer_id
        assert old != new
        first = await service.receive(InboundEvent("console", "local", "alice", "contact_shared",
                                                   payload={"phone": "+86 138 0013 8000"}, platform_msg_id="a2"))
        assert first.customer_id == old  # nobody else has that number yet
        merged = await service.receive(InboundEvent("telegram", "main", "777", "contact_shared",
                                                    payload={"phone": "13800138000"}, platform_msg_id="t2"))
        assert merged.customer_id == old
        after = await counts(service, old)
        assert after["identities"] == 2 and after["coupons"] == 1
        assert await counts(service, new) == {"identities": 0, "touchpoints": 0, "tags": 0, "coupons": 0}
        async with service.sessions() as s:
            tags = set((await s.scalars(select(Tag.name).join(CustomerTag).where(CustomerTag.customer_id == old))).all())
            assert tags == {"奶粉", "coupon-seeker"}
            [tp] = (await s.scalars(select(Touchpoint).where(Touchpoint.kind == "customers_merged"))).all()
            assert (tp.customer_id, tp.payload["merged"]) == (old, new)
            assert (await s.get(Customer, new)).attributes == {"merged_into": old}
        # later messages on either channel land on the one customer
        again = await service.receive(InboundEvent("telegram", "main", "777", "text", text="hi", platform_msg_id="t3"))
        assert again.customer_id == old
    finally:
        await service.stop()


async def test_operator_merge(make_config, clock):
    service = Service(make_config(), clock)
    await service.start(scheduler=False)
    try:
        a = (await service.receive(InboundEvent("console", "local", "bo", "text", text="hi", platform_msg_id="b1"))).customer_id
        b = (await service.receive(InboundEvent("wechat", "brand", "o_bo", "text", text="奶粉", platform_msg_id="w1"))).customer_id
        async with service.sessions() as s, s.begin():
            await merge_customers(s, await s.get(Customer, a), await s.get(Customer, b), "operator:olive", clock.now())
        assert (await counts(service, a))["identities"] == 2
        assert (await counts(service, a))["tags"] == 1
    finally:
        await service.stop()
