"""Issue 12's "done when", end to end on SQLite and PostgreSQL: a customer checks in, buys, earns,
climbs a tier and gets the message, redeems points for a coupon, invites a friend who converts
(credited once), answers a survey with a low score and the owner is alerted; staff list and close
tasks; the 360° view shows it all. The scheduler is off: the test runs the jobs it would run."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select

from scrm import orders
from scrm.clock import ManualClock
from scrm.customers import find_customer
from scrm.loyalty import jobs
from scrm.messages import InboundEvent
from scrm.profile import customer_view
from scrm.service import Service
from scrm.store.models import (
    Customer,
    Delivery,
    FollowupTask,
    PointsLedger,
    Referral,
    Survey,
    Touchpoint,
)

START = datetime(2026, 11, 27, 3, 0)  # 11:00 in Asia/Shanghai, a Friday

LOYALTY = {
    "coupons": {"points10": {"prefix": "PTS", "value": 10, "valid_days": 30, "per_customer": 1000}},
    "loyalty": {
        "points_per_amount": 1,
        "checkin_points": 5,
        "tiers": [{"name": "普通"}, {"name": "银卡", "min_points": 100},
                  {"name": "金卡", "min_points": 1000, "min_spend": 5000}],
        "rewards": {"c10": {"title": "10 元券", "points": 50, "pool": "points10"}},
        "referral": {"points": 30, "telegram_bot": "demo_bot"},
        "surveys": {"kind": "csat", "delay_hours": 1, "points": 2},
        "followups": {"digest_at": "09:00", "intent_days": 3,
                      "rules": [{"kind": "vip_quiet", "when": "tier == '金卡' and days_silent >= 30",
                                 "note": "VIP 30 天未互动"}]},
    },
}


@pytest.fixture
async def svc(make_config):
    service = Service(make_config(LOYALTY), ManualClock(START))
    await service.start(scheduler=False)
    yield service
    await service.stop()


class World:
    def __init__(self, service: Service) -> None:
        self.s = service
        self.n = 0

    @property
    def clock(self) -> ManualClock:
        return self.s.clock  # type: ignore[return-value]

    async def say(self, user: str, text: str, kind: str = "text", source: str | None = None) -> str:
        self.n += 1
        reaction = await self.s.receive(InboundEvent("console", "local", user, kind, text=text, display_name=user,
                                                     platform_msg_id=f"m{self.n}", source=source))
        return "\n".join(reaction.replies)

    async def run(self) -> jobs.SweepResult:
        result = await jobs.sweep(self.s)
        await self.s.refresh_touched()
        await self.s.run_campaign_clock()
        while await self.s.outbox.tick():
            pass
        return result

    def inbox(self, user: str) -> list[str]:
        return list(self.s.channel("console", "local")._mailboxes.pop(user, ()))  # type: ignore[union-attr]

    async def cid(self, user: str) -> int:
        async with self.s.sessions() as s:
            customer = await find_customer(s, "console", user)
            assert customer is not None
            return customer.id

    async def buy(self, user: str, order_id: str, amount: float, items: list[dict] | None = None) -> None:
        """The integration API's path: scrm.orders records the order (and keeps its line items)."""
        async with self.s.sessions() as s, s.begin():
            customer = await find_customer(s, "console", user)
            assert customer is not None
            await orders.record_order(s, customer, orders.Order(order_id, amount, "CNY", items=tuple(items or ())),
                                      self.clock.now(), "api", "shop")


@pytest.fixture
def world(svc) -> World:
    return World(svc)


async def test_done_when_scenario(world):
    w = world
    # Check-in: once a day.
    assert "+5" in await w.say("ann", "签到")
    assert "已经签到" in await w.say("ann", "签到")
    ann = await w.cid("ann")
    await w.run()
    w.inbox("ann")
    # The manager makes olive ann's owner.
    assert "console:olive" in await w.say("bob", f"/assign #{ann} console:olive")

    # Buys: points per amount, a tier-up message through the outbox.
    await w.buy("ann", "A-1", 120, [{"sku": "A", "name": "奶粉", "quantity": 1, "price": 60},
                                    {"sku": "B", "name": "奶瓶", "quantity": 1, "price": 60}])
    result = await w.run()
    assert result.points == 120 and result.tier_changes == 1
    assert any("恭喜您升级为银卡会员" in m for m in w.inbox("ann"))
    assert (await w.run()).points == 0  # the sweep is idempotent
    shown = await w.say("ann", "积分")
    assert "125" in shown and "银卡" in shown and "+120" in shown

    # Redeem points for a coupon; the coupon command still redeems coupons.
    assert "10 元券 — 50 积分" in await w.say("ann", "积分兑换")
    answer = await w.say("ann", "积分兑换 1")
    code = re.search(r"券码 (PTS\w+)", answer).group(1)
    assert "剩余积分 75" in answer
    assert "已核销" in await w.say("ann", f"/redeem {code}")
    assert "没有这个兑换项" in await w.say("ann", "/rewards 7")
    assert "没有这个兑换项" in await w.say("ann", "积分兑换 ¹")  # a digit to str.isdigit, not to int()

    # Invite: a code and a Telegram deep link; a friend captured through it, credited once.
    invite = await w.say("ann", "/invite")
    ref = re.search(r"邀请码:(\w+)", invite).group(1)
    assert f"https://t.me/demo_bot?start=ref_{ref}" in invite
    assert "自己的邀请码" in await w.say("ann", f"邀请码 {ref}")
    await w.say("ben", "/start", kind="subscribe", source=f"telegram:start:ref_{ref}")
    assert (await w.run()).referrals_captured == 1
    async with w.s.sessions() as s:
        before = await s.scalar(select(func.sum(PointsLedger.delta)).where(PointsLedger.customer_id == ann))
    await w.buy("ben", "B-1", 80, [{"sku": "A", "name": "奶粉"}, {"sku": "C", "name": "辅食"}])
    assert (await w.run()).referrals_paid == 1
    await w.buy("ben", "B-2", 80)
    assert (await w.run()).referrals_paid == 0
    async with w.s.sessions() as s:
        after = await s.scalar(select(func.sum(PointsLedger.delta)).where(PointsLedger.customer_id == ann))
        referral = await s.scalar(select(Referral))
    assert after - before == 30 and referral.referrer_id == ann and referral.points_paid == 30

    # Survey an hour after the purchase; a low score tags, alerts the owner with the 360° card.
    w.clock.advance(timedelta(hours=1))
    await w.run()
    question = [m for m in w.inbox("ann") if "满意" in m]
    assert len(question) == 1 and "1-5" in question[0]
    assert "1-5 之间" in await w.say("ann", "9")
    assert "非常抱歉" in await w.say("ann", "1 发货太慢")
    assert "已经评价过了" in await w.say("ann", "5")
    await w.run()
    alert = "\n".join(w.inbox("olive"))
    assert "跟进提醒" in alert and f"#{ann}" in alert and "发货太慢" in alert and "银卡" in alert
    async with w.s.sessions() as s:
        survey = await s.scalar(select(Survey).where(Survey.customer_id == ann, Survey.status == "answered"))
        assert (survey.score, survey.reason) == (1, "发货太慢")
        tags = await s.scalar(select(func.count()).select_from(Touchpoint).where(
            Touchpoint.customer_id == ann, Touchpoint.kind == "tag_added"))
        assert tags and (await w.run()).alerts == 0  # alerted once

    # Staff list and close tasks.
    tasks = await w.say("olive", "/tasks")
    task_id = int(re.search(r"\[(\d+)\].*detractor", tasks).group(1))
    assert "发货太慢" in tasks
    assert "已完成" in await w.say("olive", f"/done {task_id}")
    assert "不存在或已完成" in await w.say("olive", f"/done {task_id}")
    assert "没有待办" in await w.say("olive", "/tasks")
    assert "已创建跟进" in await w.say("olive", f"/followup #{ann} 2d 回访新品")
    assert "回访新品" in await w.say("olive", "/tasks")

    # Nightly: recommendations and churn risk; the 360° view shows everything.
    await w.say("cat", "你好")
    await w.buy("cat", "C-1", 50, [{"sku": "A"}, {"sku": "C"}])
    await w.run()
    nightly = await jobs.nightly(w.s)
    assert nightly.pairs >= 2 and nightly.churn is not None and nightly.churn.scored == 3
    async with w.s.sessions() as s:
        view = await customer_view(s, await s.get(Customer, ann))
    loyalty = view["loyalty"]
    assert loyalty["tier"] == "银卡" and loyalty["owner"] == "console:olive"
    assert loyalty["points"] == 75 + 30 + 2  # check-in + order - reward + referral + survey
    assert [r["sku"] for r in loyalty["recommendations"]] == ["C"]
    assert loyalty["surveys"][0]["score"] == 1
    assert {t["kind"] for t in loyalty["tasks"]} == {"detractor", "manual"}
    assert loyalty["churn"]["risk"] is not None and loyalty["churn"]["method"] in ("rules", "bgnbd", "bgnbd-scipy")
    assert view["loyalty"]["referrals"] == {"captured": 1, "converted": 1}
    report = await w.say("bob", "/referrals")
    assert "captures 1" in report and "conversions 1" in report and "points paid 30" in report


async def test_intent_task_digest_and_tier_downgrade(world):
    w = world
    await w.say("cat", "这个多少钱")
    cat = await w.cid("cat")
    async with w.s.sessions() as s, s.begin():
        from scrm.loyalty.followups import assign
        await assign(w.s, s, cat, "console:olive", w.clock.now())
    w.clock.advance(timedelta(days=2))
    assert (await w.run()).tasks == 0
    w.clock.advance(timedelta(days=1, minutes=1))
    result = await w.run()
    assert result.tasks == 1 and result.alerts == 1
    assert "询价" in "\n".join(w.inbox("olive"))
    # The daily digest: at 09:00 in olive's zone (01:00 UTC), once a day.
    w.clock.set(datetime(2026, 12, 1, 0, 30))
    assert (await w.run()).digests == 0
    w.clock.set(datetime(2026, 12, 1, 1, 5))
    assert (await w.run()).digests == 1
    assert "今日跟进" in "\n".join(w.inbox("olive"))
    assert (await w.run()).digests == 0

    # Tier by spend, then a downgrade a year later by the nightly pass; tier is a segment field.
    await w.buy("cat", "C-9", 6000)
    await w.run()
    async with w.s.sessions() as s:
        from scrm import segments
        gold = segments.condition("tier == '金卡' and points >= 6000", w.clock.now())
        assert await s.scalar(select(Customer.id).where(gold)) == cat
    w.clock.advance(timedelta(days=366))
    night = await jobs.nightly(w.s)
    assert night.tier_changes == 1 and night.expired == 0  # points last to the end of the 12th month
    w.clock.set(datetime(2028, 1, 1, 0, 0))  # 08:00 on 1 January 2028 in Shanghai: December 2027 is over
    assert (await jobs.nightly(w.s)).expired == 6000
    assert (await jobs.nightly(w.s)).expired == 0
    async with w.s.sessions() as s:
        from scrm.store.models import LoyaltyAccount
        account = await s.get(LoyaltyAccount, cat)
        assert account.tier == "普通" and account.balance == 0
        rows = (await s.scalars(select(Delivery.campaign).where(Delivery.customer_id == cat))).all()
        assert "tier-up-gold" in rows
        # VIP gone quiet rule only for gold customers: none now.
        assert await s.scalar(select(func.count()).select_from(FollowupTask)
                              .where(FollowupTask.kind == "vip_quiet")) == 0


async def test_known_customer_cannot_be_referred_by_code(world):
    w = world
    await w.say("ann", "你好")
    code = re.search(r"邀请码:(\w+)", await w.say("ann", "/invite")).group(1)
    await w.say("dan", "你好")
    assert "已记录您的邀请人" in await w.say("dan", f"邀请码 {code}")
    assert "已经填写过" in await w.say("dan", f"邀请码 {code}")
    await w.say("eve", "你好")
    w.clock.advance(timedelta(days=2))
    assert "仅限新朋友" in await w.say("eve", f"邀请码 {code}")
    assert "没有找到这个邀请码" in await w.say("fay", "邀请码 ZZZZZZZZ")
