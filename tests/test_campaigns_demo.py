"""The demo campaigns, each driven through time with the injected clock: who got what, when, once.

The jobs called here (run_campaign_clock, outbox.tick, refresh_touched) are the ones APScheduler
runs; the scheduler is off so that the test, not wall time, decides when they run.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from scrm.clock import ManualClock
from scrm.messages import InboundEvent
from scrm.service import Service
from scrm.store.models import (
    CampaignRun,
    ChatGroup,
    Conversion,
    CouponCode,
    Customer,
    Delivery,
    Touchpoint,
)

# 11:00 in Asia/Shanghai on a Friday: outside quiet hours.
START = datetime(2026, 11, 27, 3, 0)


@pytest.fixture
async def svc(make_config):
    service = Service(make_config(), ManualClock(START))
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

    async def say(self, user: str, text: str = "你好", kind: str = "text", **payload: object) -> int:
        self.n += 1
        reaction = await self.s.receive(InboundEvent("console", "local", user, kind, text=text, payload=dict(payload),
                                                     display_name=user,
                                                     platform_msg_id=f"m{self.n}"))
        assert reaction.customer_id is not None
        return reaction.customer_id

    async def run(self) -> None:
        """One round of what the scheduler does: profiles, campaign clock, outbox until quiet."""
        await self.s.refresh_touched()
        await self.s.run_campaign_clock()
        while await self.s.outbox.tick():
            pass

    async def advance(self, delta: timedelta) -> None:
        self.clock.advance(delta)
        await self.run()

    def inbox(self, user: str) -> list[str]:
        channel = self.s.channel("console", "local")
        return list(channel._mailboxes.pop(user, ()))  # type: ignore[union-attr]

    async def deliveries(self, campaign: str) -> list[Delivery]:
        async with self.s.sessions() as s:
            return list((await s.scalars(select(Delivery).where(Delivery.campaign == campaign)
                                         .order_by(Delivery.id))).all())

    async def sql(self, statement) -> None:
        async with self.s.sessions() as s, s.begin():
            await s.execute(statement)


@pytest.fixture
def world(svc) -> World:
    return World(svc)


async def test_welcome_then_nurture_journey_with_condition_variant_and_exit(world):
    ann = await world.say("ann", "我想买奶粉,有优惠券吗")  # tags 奶粉 + coupon-seeker
    ben = await world.say("ben", "奶粉怎么选")               # tags 奶粉 only
    await world.run()
    assert [m.split(",")[0] for m in world.inbox("ann")] == ["ann"]  # the welcome, nothing else yet
    world.inbox("ben")

    await world.advance(timedelta(hours=1))
    assert "选奶粉小贴士" in world.inbox("ann")[0] and "选奶粉小贴士" in world.inbox("ben")[0]

    await world.advance(timedelta(days=3))
    ann_step2 = world.inbox("ann")
    assert len(ann_step2) == 1 and ("满 199 减 30" in ann_step2[0] or "老顾客专享" in ann_step2[0])
    assert world.inbox("ben") == []  # no coupon interest: step 2 skipped, journey goes on
    steps = {(d.customer_id, d.step): d for d in await world.deliveries("nurture-formula")}
    assert steps[(ben, 1)].reason == "condition_not_met" and steps[(ann, 1)].variant in ("A", "B")

    async with world.s.sessions() as s, s.begin():  # ann buys: the journey must stop for her
        s.add(Conversion(customer_id=ann, kind="order", amount=199, created_at=world.clock.now()))
    await world.advance(timedelta(days=4))
    assert world.inbox("ann") == []
    assert "宝宝喝得还好吗" in world.inbox("ben")[0]
    steps = {(d.customer_id, d.step): d for d in await world.deliveries("nurture-formula")}
    assert (steps[(ann, 2)].status, steps[(ann, 2)].reason) == ("skipped", "exited")
    assert steps[(ben, 2)].status == "sent"

    await world.advance(timedelta(days=30))  # nothing is ever sent twice
    sent = [(d.customer_id, d.step) for d in await world.deliveries("nurture-formula") if d.status == "sent"]
    assert sorted(sent) == sorted({(ann, 0), (ann, 1), (ben, 0), (ben, 2)})


async def test_ab_split_is_stable_and_weighted(world):
    from scrm.campaigns.outbox import pick_variant

    step = world.s.campaigns["nurture-formula"].definition.journey[1]
    picks = [pick_variant("nurture-formula", f"c{i}", step) for i in range(2000)]
    assert picks == [pick_variant("nurture-formula", f"c{i}", step) for i in range(2000)]
    assert 900 < picks.count("A") < 1100


async def test_birthday_once_a_year_in_the_customers_time_zone(world):
    cid = await world.say("cat")
    await world.run()
    world.inbox("cat")
    today_local = (START + timedelta(hours=8)).date()  # Asia/Shanghai
    await world.sql(update(Customer).values(birthday_md=today_local.strftime("%m-%d")))
    await world.run()  # 11:00 local, after the 10:00 hour
    [greeting] = world.inbox("cat")
    assert "生日快乐" in greeting and "BDAY" in greeting
    await world.advance(timedelta(hours=5))
    assert world.inbox("cat") == []
    await world.advance(timedelta(days=365))  # a year later: again
    assert "生日快乐" in world.inbox("cat")[0]
    assert [d.occurrence for d in await world.deliveries("birthday")] == ["2026", "2027"]
    # a customer in a time zone where it is not yet 10:00 waits
    await world.sql(update(Customer).where(Customer.id == cid).values(timezone="America/Los_Angeles"))
    await world.advance(timedelta(days=365))
    assert world.inbox("cat") == []


async def test_winback_after_30_days_of_silence_once_per_silence(world):
    await world.say("dan")
    await world.run()
    world.inbox("dan")
    await world.advance(timedelta(days=29))
    assert not [m for m in world.inbox("dan") if "好久不见" in m]
    await world.advance(timedelta(days=1, hours=1))
    [winback] = [m for m in world.inbox("dan") if "好久不见" in m]
    assert "BACK" in winback
    await world.advance(timedelta(days=5))
    assert not [m for m in world.inbox("dan") if "好久不见" in m]
    await world.say("dan", "我回来了")  # a new silence can be won back again
    await world.advance(timedelta(days=31))
    assert [m for m in world.inbox("dan") if "好久不见" in m]
    assert len(await world.deliveries("winback")) == 2


async def test_coupon_expiry_reminder_once_per_unused_code(world):
    await world.say("eve")
    await world.say("fay")
    await world.run()
    codes = {m.split(":")[1][:11]: u for u in ("eve", "fay") for m in world.inbox(u)}
    fay_code = next(c for c, u in codes.items() if u == "fay")
    await world.sql(update(CouponCode).where(CouponCode.code == fay_code).values(redeemed_at=START))
    await world.advance(timedelta(days=26, hours=12))   # welcome codes expire after 30 days
    assert world.inbox("eve") == [] or "将于" not in world.inbox("eve")[0]
    await world.advance(timedelta(days=1))              # now within 3 days of expiry
    [reminder] = [m for m in world.inbox("eve") if "将于" in m]
    assert next(c for c, u in codes.items() if u == "eve") in reminder
    assert not [m for m in world.inbox("fay") if "将于" in m]  # redeemed: no reminder
    await world.advance(timedelta(days=1))
    assert not [m for m in world.inbox("eve") if "将于" in m]
    assert len(await world.deliveries("coupon-expiry")) == 1


async def test_weekly_group_campaign_runs_once_per_week_and_handles_misfires(world):
    for user in ("gus", "hal"):
        await world.say(user, kind="group_joined", group_id="g-moms", group_title="宝妈群")
    await world.say("ivy", kind="group_joined", group_id="g-dads", group_title="奶爸群")
    await world.run()
    for user in ("gus", "hal", "ivy"):
        world.inbox(user)
    async with world.s.sessions() as s:
        assert await s.scalar(select(func.count()).select_from(ChatGroup)) == 2

    # Friday 11:00 -> Monday 10:00 Shanghai is 2 days 23 hours later.
    await world.advance(timedelta(days=2, hours=23))
    assert [m for m in world.inbox("g-moms")] == ["【宝妈群】本周群福利:周三晚 8 点直播答疑,群内下单享 9 折!"]
    assert len(world.inbox("g-dads")) == 1
    await world.advance(timedelta(hours=1))
    assert world.inbox("g-moms") == []

    # The service is down over next Monday 10:00 and comes back at 13:00: within the 6 h grace.
    world.clock.advance(timedelta(days=7, hours=2))
    await world.run()
    assert len(world.inbox("g-moms")) == 1
    # Down over the Monday after, back 8 hours late: beyond grace, skipped and recorded.
    world.clock.advance(timedelta(days=7, hours=5))
    await world.run()
    assert world.inbox("g-moms") == []
    async with world.s.sessions() as s:
        runs = [(r.status, r.planned) for r in (await s.scalars(select(CampaignRun).order_by(CampaignRun.id))).all()]
    assert runs == [("ran", 2), ("ran", 2), ("skipped_misfire", 0)]
    assert len([d for d in await world.deliveries("weekly-groups") if d.status == "sent"]) == 4


async def test_frequency_cap_and_quiet_hours(world):
    # Three marketing messages due at once for one customer: the cap (2 in 7 days) lets two through.
    jay = await world.say("jay")
    await world.run()
    world.inbox("jay")
    async with world.s.sessions() as s, s.begin():
        for name, step in (("winback", 0), ("nurture-formula", 0), ("nurture-formula", 2)):
            s.add(Delivery(campaign=name, step=step, target=f"c{jay}", occurrence="t", customer_id=jay,
                           channel="console", account="local", external_id="jay", status="planned", attempts=0,
                           due_at=world.clock.now(), created_at=world.clock.now()))
    await world.run()
    created = {("winback", 0), ("nurture-formula", 0), ("nurture-formula", 2)}
    outcomes = [(d.status, d.reason) for name in ("winback", "nurture-formula") for d in await world.deliveries(name)
                if d.occurrence == "t" and (d.campaign, d.step) in created]
    assert sorted(outcomes, key=str) == sorted([("sent", None), ("sent", None), ("skipped", "frequency_cap")], key=str)
    assert len(world.inbox("jay")) == 2

    # Quiet hours: a marketing message due at 22:00 local waits until 09:00 local.
    world.clock.set(datetime(2026, 12, 10, 14, 0))  # 22:00 Shanghai
    kim = await world.say("kim", "奶粉")
    await world.advance(timedelta(hours=1))      # nurture step 1 due at 23:00 local
    assert not [m for m in world.inbox("kim") if "小贴士" in m]
    [step] = [d for d in await world.deliveries("nurture-formula") if d.customer_id == kim]
    assert (step.status, step.reason) == ("planned", "deferred:quiet_hours")
    assert step.due_at == datetime(2026, 12, 11, 1, 0)  # 09:00 Shanghai
    await world.advance(timedelta(hours=10))
    assert [m for m in world.inbox("kim") if "小贴士" in m]


async def test_pause_resume_and_reload(world, tmp_path):
    from scrm.campaigns.control import set_paused

    async with world.s.sessions() as s, s.begin():
        assert await set_paused(s, "welcome", True, world.clock.now())
    await world.say("lee")
    await world.run()
    assert world.inbox("lee") == []  # planned, waiting
    [d] = await world.deliveries("welcome")
    assert d.status == "planned"
    async with world.s.sessions() as s, s.begin():
        await set_paused(s, "welcome", False, world.clock.now())
    await world.run()
    assert len(world.inbox("lee")) == 1


async def test_opted_out_customers_get_nothing(world):
    await world.say("max", "奶粉")
    await world.say("max", "退订")
    await world.advance(timedelta(days=40))
    assert [m for m in world.inbox("max") if "退订" not in m and "您已退订" not in m] == []
    async with world.s.sessions() as s:
        sent = await s.scalar(select(func.count()).select_from(Touchpoint).where(Touchpoint.kind == "campaign_message"))
    assert sent == 0


async def test_templates_can_name_recommendations(world):
    from scrm.campaigns.outbox import customer_context, customer_extras
    from scrm.campaigns.templates import render
    from scrm.store.models import LoyaltyAccount

    cid = await world.say("nat")
    async with world.s.sessions() as s, s.begin():
        s.add(LoyaltyAccount(customer_id=cid, updated_at=world.clock.now(),
                             recommendations=[{"sku": "B1", "name": "奶瓶"}, {"sku": "W2", "name": "湿巾"}]))
    async with world.s.sessions() as s:
        extras = await customer_extras(s, [cid])
        context = customer_context(await s.get(Customer, cid), "console", extras[cid])
    assert render("{{ customer.name }}:{{ recommend(customer, 1) }}|{{ recommend(customer) }}", {"customer": context}) \
        == "nat:奶瓶|奶瓶、湿巾"
