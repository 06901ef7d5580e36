"""A redemption storm: 200 concurrent redemptions by one customer, each in its own transaction, on
SQLite and PostgreSQL. The balance must end exact and never negative, and no code be handed twice."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest
from sqlalchemy import func, select

from scrm.clock import ManualClock
from scrm.loyalty import points
from scrm.messages import InboundEvent
from scrm.service import Service
from scrm.store.models import CouponCode, LoyaltyAccount, PointsLedger
from tests.test_loyalty import LOYALTY

START = datetime(2026, 11, 27, 3, 0)


@pytest.fixture
async def svc(make_config):
    service = Service(make_config(LOYALTY), ManualClock(START))
    await service.start(scheduler=False)
    yield service
    await service.stop()


async def test_two_hundred_concurrent_redemptions(svc):
    reaction = await svc.receive(InboundEvent("console", "local", "ann", "text", text="你好", platform_msg_id="x1"))
    cid = reaction.customer_id
    assert cid is not None
    async with svc.sessions() as s, s.begin():
        assert await points.credit(svc, s, cid, 5020, "adjust", "grant", START) == 5020
    price = LOYALTY["loyalty"]["rewards"]["c10"]["points"]

    async def one(i: int) -> points.RewardOutcome:
        async with svc.sessions() as s, s.begin():
            return await points.redeem_reward(svc, s, cid, "c10", START, "console", "local")

    outcomes = await asyncio.gather(*(one(i) for i in range(200)))
    redeemed = [o for o in outcomes if o.status == "redeemed"]
    assert len(redeemed) == 5020 // price == 100
    assert {o.status for o in outcomes} == {"redeemed", "insufficient"}
    assert all(o.balance >= 0 for o in outcomes)
    assert len({o.code for o in redeemed}) == 100
    async with svc.sessions() as s:
        account = await s.get(LoyaltyAccount, cid)
        assert account.balance == 20
        ledger = await s.scalar(select(func.sum(PointsLedger.delta)).where(PointsLedger.customer_id == cid))
        assert ledger == 20
        assert await s.scalar(select(func.min(PointsLedger.balance_after))
                              .where(PointsLedger.customer_id == cid)) >= 0
        codes = (await s.scalars(select(CouponCode.code).where(CouponCode.customer_id == cid))).all()
        assert len(codes) == len(set(codes)) == 100

    # The same storm through chat (one group-committed batch): still exact.
    async with svc.sessions() as s, s.begin():
        await points.credit(svc, s, cid, 480, "adjust", "grant-2", START)
    replies = await asyncio.gather(*(svc.receive(InboundEvent("console", "local", "ann", "text", text="积分兑换 1",
                                                              platform_msg_id=f"r{i}")) for i in range(20)))
    assert sum("兑换成功" in r.replies[0] for r in replies) == 10
    async with svc.sessions() as s:
        assert (await s.get(LoyaltyAccount, cid, populate_existing=True)).balance == 0
