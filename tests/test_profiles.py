"""Profiles over time: segment SQL against independently computed truth, behaviour tags, the
activity-drop signal, lifecycle transitions both ways, RFM quintiles — on SQLite and PostgreSQL."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from sqlalchemy import event, func, select

from scrm import profiles, rfm, segments
from scrm.clock import ManualClock
from scrm.config import Config
from scrm.messages import InboundEvent
from scrm.service import Service
from scrm.store.models import (
    Conversion,
    Customer,
    CustomerTag,
    Identity,
    Tag,
    Touchpoint,
)
from scrm.tagging import add_tag

NOW = datetime(2026, 11, 27, 12, 0, 0)


@dataclass
class Person:
    id: int = 0
    stage: str = "acquisition"
    opted_out: bool = False
    channel: str = "wechat"
    silent_days: int = 0
    tags: set[str] = field(default_factory=set)
    orders: list[tuple[int, float]] = field(default_factory=list)  # (days ago, amount)
    messages: list[int] = field(default_factory=list)  # days ago
    city: str = "sh"


def generate(n: int, seed: int = 7) -> list[Person]:
    rng = random.Random(seed)
    people = []
    for _ in range(n):
        p = Person(
            stage=rng.choice(["acquisition", "nurture", "retention", "upsell", "winback"]),
            opted_out=rng.random() < 0.2,
            channel=rng.choice(["wechat", "telegram", "wecom"]),
            tags={t for t in ("奶粉", "vip", "coupon-seeker") if rng.random() < 0.4},
            orders=[(rng.randint(0, 200), float(rng.choice([50, 120, 300, 800]))) for _ in range(rng.randint(0, 4))],
            messages=sorted(rng.randint(0, 60) for _ in range(rng.randint(0, 6))),
            city=rng.choice(["sh", "bj"]),
        )
        p.silent_days = min(p.messages) if p.messages else 90
        people.append(p)
    return people


async def load(service: Service, people: list[Person]) -> None:
    async with service.sessions() as s, s.begin():
        for i, p in enumerate(people):
            c = Customer(display_name=f"p{i}", stage=p.stage, opted_out=p.opted_out, first_seen_at=NOW - timedelta(days=90),
                         last_seen_at=NOW - timedelta(days=p.silent_days), attributes={"city": p.city},
                         last_inbound_at=NOW - timedelta(days=p.silent_days) if p.messages else None)
            s.add(c)
            await s.flush()
            p.id = c.id
            s.add(Identity(customer_id=c.id, channel=p.channel, account="a", external_id=f"x{i}", created_at=NOW))
            for tag in p.tags:
                await add_tag(s, c.id, tag, "operator", "test", NOW)
            for days, amount in p.orders:
                s.add(Conversion(customer_id=c.id, kind="order", amount=amount, created_at=NOW - timedelta(days=days)))
            for days in p.messages:
                s.add(Touchpoint(customer_id=c.id, channel=p.channel, account="a", direction="in", kind="text",
                                 payload={}, created_at=NOW - timedelta(days=days, hours=1)))


TRUTH = {
    "tag('奶粉') and not opted_out": lambda p: "奶粉" in p.tags and not p.opted_out,
    "days_silent >= 30 and not opted_out": lambda p: p.silent_days >= 30 and not p.opted_out,
    "channel == 'telegram' or stage in ['upsell', 'winback']": lambda p: p.channel == "telegram" or p.stage in ("upsell", "winback"),
    "channel != 'wechat' and attr.city == 'bj'": lambda p: p.channel != "wechat" and p.city == "bj",
    "msgs(14) >= 2": lambda p: sum(d < 14 for d in p.messages) >= 2,
    "msgs(7, 30) > 0 and not tag('vip')": lambda p: any(7 <= d < 30 for d in p.messages) and "vip" not in p.tags,
    "conversions(90) >= 2 or revenue() > 1000": lambda p: sum(d < 90 for d, _ in p.orders) >= 2 or sum(a for _, a in p.orders) > 1000,
    "segment('fans') and conversions() == 0": lambda p: "奶粉" in p.tags and not p.opted_out and not p.orders,
}


@pytest.fixture
async def generated(make_config):
    config: Config = make_config({"segments": {"fans": "tag('奶粉') and not opted_out"}})
    service = Service(config, ManualClock(NOW))
    await service.start(scheduler=False)
    people = generate(80)
    await load(service, people)
    yield service, people
    await service.stop()


@pytest.mark.parametrize("expression", list(TRUTH))
async def test_segment_sql_matches_truth(generated, expression):
    service, people = generated
    condition = segments.condition(expression, NOW, service.config.segments)
    async with service.sessions() as s:
        ids = set((await s.scalars(select(Customer.id).where(condition))).all())
    expected = {p.id for p in people if TRUTH[expression](p)}
    assert expected, "the generated data should exercise the expression"
    assert ids == expected


@pytest.mark.parametrize(("expression", "problem"), [
    ("tag('x') and", "syntax error"),
    ("__import__('os')", "unknown function"),
    ("stage.__class__ == 1", "unknown name"),
    ("days_silent == 3", "compared with"),
    ("segment('nope')", "unknown segment"),
    ("customer.name == 'x'", "unknown name"),
])
def test_bad_expressions_are_refused(expression, problem):
    assert problem in (segments.check(expression, {}) or "")


async def test_rfm_quintiles(generated):
    service, people = generated
    async with service.sessions() as s, s.begin():
        scored = await rfm.recompute(s)
    buyers = [p for p in people if p.orders]
    assert scored == len(buyers)
    async with service.sessions() as s:
        rows = {r.id: r for r in (await s.execute(select(Customer.id, Customer.rfm_r, Customer.rfm_f, Customer.rfm_m))).all()}
    for p in people:
        if not p.orders:
            assert rows[p.id].rfm_r is None
    # Independently: monetary quintile = ceil(5 * share of buyers spending <= this buyer).
    totals = sorted(sum(a for _, a in p.orders) for p in buyers)
    for p in buyers:
        total = sum(a for _, a in p.orders)
        share = sum(t <= total for t in totals) / len(totals)
        assert rows[p.id].rfm_m == max(1, -(-int(share * 5 * 1000) // 1000)), p
    frequent = max(buyers, key=lambda p: (len(p.orders), p.id))
    assert rows[frequent.id].rfm_f == 5
    condition = segments.condition("rfm.r >= 4", NOW)
    async with service.sessions() as s:
        assert await s.scalar(select(func.count()).select_from(Customer).where(condition)) >= len(buyers) // 5


async def test_behaviour_tags_activity_drop_and_stages_move_both_ways(make_config):
    clock = ManualClock(NOW)
    config = make_config({
        "tagging": {"behaviour": [{"tag": "chatty", "when": "msgs(7) >= 3"}],
                    "activity_drop": {"tag": "activity-drop", "days": 7, "drop_percent": 50}},
        "lifecycle": {"transitions": [
            {"from": ["acquisition"], "to": "nurture", "when": "msgs(30) >= 2"},
            {"from": ["nurture"], "to": "retention", "when": "conversions(90) >= 1"},
            {"from": ["retention"], "to": "winback", "when": "days_silent >= 30"},
            {"from": ["winback"], "to": "retention", "when": "msgs(7) >= 1"},
        ]},
    })
    service = Service(config, clock)
    await service.start(scheduler=False)
    n = 0

    async def say(text: str = "hi") -> int:
        nonlocal n
        n += 1
        reaction = await service.receive(InboundEvent("console", "local", "ivy", "text", text=text, platform_msg_id=f"i{n}"))
        await service.refresh_touched()
        return reaction.customer_id

    async def state(cid: int) -> tuple[str, set[str]]:
        async with service.sessions() as s:
            stage = await s.scalar(select(Customer.stage).where(Customer.id == cid))
            names = set((await s.scalars(select(Tag.name).join(CustomerTag).where(CustomerTag.customer_id == cid))).all())
            return stage, names

    try:
        cid = await say()
        assert (await state(cid))[0] == "acquisition"
        await say()
        assert (await state(cid))[0] == "nurture"           # incremental: moved on the event
        await say()
        _, tags = await state(cid)
        assert "chatty" in tags
        clock.advance(timedelta(days=8))                    # a quiet week: 3 before, 0 now
        await service.refresh_all()
        _, tags = await state(cid)
        assert "chatty" not in tags and "activity-drop" in tags
        await say()                                         # 1 against the previous week's 3: still a drop
        assert "activity-drop" in (await state(cid))[1]
        await say()                                         # 2 against 3 is a fall of a third, under 50%
        assert "activity-drop" not in (await state(cid))[1]
        async with service.sessions() as s, s.begin():
            s.add(Conversion(customer_id=cid, kind="order", amount=99, created_at=clock.now()))
        await service.refresh_all()
        assert (await state(cid))[0] == "retention"
        clock.advance(timedelta(days=31))
        await service.refresh_all()
        assert (await state(cid))[0] == "winback"
        await say()                                         # back from win-back
        assert (await state(cid))[0] == "retention"
        async with service.sessions() as s:
            moves = [t.payload for t in (await s.scalars(select(Touchpoint).where(Touchpoint.kind == "stage_changed")
                                                         .order_by(Touchpoint.id))).all()]
        assert [(m["from"], m["to"]) for m in moves] == [
            ("acquisition", "nurture"), ("nurture", "retention"), ("retention", "winback"), ("winback", "retention")]
    finally:
        await service.stop()


async def test_campaign_messages_and_replies(make_config):
    service = Service(make_config(), ManualClock(NOW))
    await service.start(scheduler=False)
    try:
        async with service.sessions() as s, s.begin():
            ids = []
            for name, campaign_days_ago, inbound_days_ago in (("quiet", 5, 9), ("answered", 5, 2), ("never", None, 1)):
                c = Customer(display_name=name, first_seen_at=NOW - timedelta(days=30), last_seen_at=NOW,
                             last_inbound_at=NOW - timedelta(days=inbound_days_ago), attributes={})
                s.add(c)
                await s.flush()
                ids.append(c.id)
                if campaign_days_ago is not None:
                    for extra in (0, 20):
                        s.add(Touchpoint(customer_id=c.id, channel="console", account="local", direction="out",
                                         kind="campaign_message", payload={},
                                         created_at=NOW - timedelta(days=campaign_days_ago + extra)))
        async with service.sessions() as s:
            def who(expression: str):
                return s.scalars(select(Customer.display_name).where(segments.condition(expression, NOW))
                                 .order_by(Customer.id))
            assert (await who("replied()")).all() == ["answered"]
            assert (await who("campaign_messages(10) == 1")).all() == ["quiet", "answered"]
            assert (await who("campaign_messages() == 2 and not replied()")).all() == ["quiet"]
    finally:
        await service.stop()


async def test_refreshes_cover_every_customer_across_chunks(make_config, monkeypatch):
    # Each chunk of touched customers, and each id range of the full pass, is its own short transaction;
    # the result adds them all up.
    monkeypatch.setattr(profiles, "CHUNK", 2)
    clock = ManualClock(NOW)
    config = make_config({
        "tagging": {"behaviour": [{"tag": "chatty", "when": "msgs(7) >= 2"}]},
        "lifecycle": {"transitions": [{"from": ["acquisition"], "to": "nurture", "when": "msgs(30) >= 2"}]},
    })
    service = Service(config, clock)
    await service.start(scheduler=False)
    try:
        people = [f"p{i}" for i in range(5)]
        for round_ in range(2):
            for person in people:
                await service.receive(InboundEvent("console", "local", person, "text", text="hi",
                                                   platform_msg_id=f"{person}-{round_}"))
        commits: list[object] = []
        event.listen(service.engine.sync_engine, "commit", commits.append)
        result = await service.refresh_touched()
        assert len(commits) == 3  # 2 + 2 + 1 customers
        assert result is not None
        assert result.tags_added == {"chatty": 5} and result.stage_moves == {"acquisition->nurture": 5}
        async with service.sessions() as s:
            assert set((await s.scalars(select(Customer.stage))).all()) == {"nurture"}
        assert await service.refresh_touched() is None  # nothing touched since
        # the full pass goes by id range, a transaction each: 5 customers in ranges of 2
        monkeypatch.setattr(profiles, "RANGE", 2)
        clock.advance(timedelta(days=8))  # a quiet week: the behaviour tag goes again
        assert service.consumer is not None
        await service.consumer.prune()  # the journal's rows are past its retention now: not counted below
        commits.clear()
        result = await service.refresh_all()
        assert len(commits) == 3 and result.tags_removed == {"chatty": 5}
        # A chunk in which nobody changes takes no write transaction: p0 and p1 say one thing each (still
        # not chatty, already nurture), p4 two things (chatty again), so only p4's chunk is written.
        for person, says in (("p0", 1), ("p1", 1), ("p4", 2)):
            for i in range(says):
                await service.receive(InboundEvent("console", "local", person, "text", text="hi",
                                                   platform_msg_id=f"{person}-later-{i}"))
        commits.clear()
        result = await service.refresh_touched()
        assert result is not None and result.tags_added == {"chatty": 1}
        assert len(commits) == 1
    finally:
        await service.stop()
