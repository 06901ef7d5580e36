"""Store guarantees: one touchpoint per platform message, group commit under concurrency,
at-most-once delivery across a crash, opt-out respected, health reporting."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select, update

from scrm import commands
from scrm.messages import InboundEvent
from scrm.store.models import Customer, CustomerTag, Delivery, Identity, Tag, Touchpoint
from scrm.web import SERVICE, create_app
from tests.conftest import eventually


async def count(service, model, *where) -> int:
    async with service.sessions() as s:
        return await s.scalar(select(func.count()).select_from(model).where(*where))


async def test_platform_retries_make_one_touchpoint(aiohttp_client, make_config, clock):
    client = await aiohttp_client(create_app(make_config(), clock))
    service = client.app[SERVICE]
    body = {"user": "dora", "text": "奶粉", "id": "m-1"}
    first, second = await asyncio.gather(
        client.post("/console/local/messages", json=body), client.post("/console/local/messages", json=body))
    results = sorted([(await first.json())["duplicate"], (await second.json())["duplicate"]])
    assert results == [False, True]
    assert await count(service, Touchpoint, Touchpoint.direction == "in") == 1


async def test_concurrent_messages_share_commits_and_all_land(aiohttp_client, make_config, clock):
    client = await aiohttp_client(create_app(make_config(), clock))
    service = client.app[SERVICE]
    users = [f"u{i}" for i in range(40)]

    async def post(user: str, n: int):
        resp = await client.post("/console/local/messages", json={"user": user, "text": f"你好 {n}", "id": f"{user}-{n}"})
        assert resp.status == 200

    await asyncio.gather(*(post(u, n) for u in users for n in range(5)))
    assert await count(service, Touchpoint, Touchpoint.direction == "in") == 200
    assert await count(service, Customer) == 40
    assert await count(service, Identity) == 40


async def test_one_group_commit_keeps_each_events_effects_and_order(aiohttp_client, make_config, clock):
    """Events that share one batch: a retry inside it, a new customer's second message, interest
    accumulating to a threshold across two messages, an opt-out between a customer's messages."""
    client = await aiohttp_client(create_app(make_config(), clock))
    service = client.app[SERVICE]

    def text(user: str, words: str, msg_id: str) -> InboundEvent:
        return InboundEvent("console", "local", user, "text", text=words, platform_msg_id=msg_id)

    events = [text("fay", "我想买奶粉", "f1"), text("fay", "我想买奶粉", "f1"), text("fay", "下单用优惠券", "f2"),
              text("gus", "奶粉", "g1"), text("gus", "退订", "g2"), text("gus", "formula", "g3")]
    # submitted without awaiting in between: the writer takes them as one batch
    reactions = await asyncio.gather(*(service.receive(e) for e in events))

    assert [r.duplicate for r in reactions] == [False, True, False, False, False, False]
    fay, gus = reactions[0].customer_id, reactions[3].customer_id
    assert fay and gus and fay != gus and reactions[2].customer_id == fay and reactions[5].customer_id == gus
    assert reactions[4].replies == (commands.OPT_OUT_REPLY,)
    assert await count(service, Customer) == 2 and await count(service, Identity) == 2
    assert await count(service, Touchpoint, Touchpoint.direction == "in") == 5
    async with service.sessions() as s:
        tags = {(c, t) for c, t in await s.execute(
            select(CustomerTag.customer_id, Tag.name).join(Tag, Tag.id == CustomerTag.tag_id))}
        opted_out = dict((await s.execute(select(Customer.id, Customer.opted_out))).all())
        welcomes = (await s.scalars(select(Delivery.customer_id).where(Delivery.campaign == "welcome"))).all()
        tag_added = (await s.scalars(select(Touchpoint.customer_id).where(Touchpoint.kind == "tag_added"))).all()
    # high-intent needs 3: 买 (1) in the first message, 下单 (2) in the second; the retry adds nothing
    assert tags == {(fay, "奶粉"), (fay, "high-intent"), (fay, "coupon-seeker"), (gus, "奶粉")}
    assert opted_out == {fay: False, gus: True}
    assert sorted(welcomes) == sorted([fay, gus]), "one welcome per new customer, however many messages"
    assert sorted(tag_added) == sorted([fay, fay, fay, gus]), "a tag applied once, however often it is hit"


async def test_delivery_mid_send_at_crash_becomes_unknown_and_is_never_resent(aiohttp_client, make_config, clock):
    config = make_config()
    client = await aiohttp_client(create_app(config, clock))
    service = client.app[SERVICE]
    await client.post("/console/local/messages", json={"user": "erin", "text": "hi", "id": "e-1"})
    await eventually(lambda: count(service, Delivery, Delivery.status == "sent"))
    # Simulate a process that died after claiming a delivery: the row is left "sending".
    async with service.sessions() as s, s.begin():
        await s.execute(update(Delivery).values(status="sending"))
    await client.close()

    restarted = await aiohttp_client(create_app(config, clock))
    service = restarted.app[SERVICE]
    assert await count(service, Delivery, Delivery.status == "unknown", Delivery.reason == "crashed_mid_send") == 1
    await service.outbox.tick()
    assert await count(service, Touchpoint, Touchpoint.kind == "campaign_message") == 1
    assert await count(service, Touchpoint, Touchpoint.kind == "delivery_unknown") == 1


async def test_opted_out_customer_is_not_sent_to(aiohttp_client, make_config, clock):
    client = await aiohttp_client(create_app(make_config(), clock))
    service = client.app[SERVICE]
    # Opt out in the same breath as the first message: the welcome is planned but must be skipped.
    await service.receive(InboundEvent("console", "local", "finn", "text", text="退订", platform_msg_id="f-1"))
    await eventually(lambda: count(service, Delivery, Delivery.status == "skipped"))
    async with service.sessions() as s:
        delivery = await s.scalar(select(Delivery))
    assert (delivery.status, delivery.reason) == ("skipped", "opted_out")
    assert await count(service, Touchpoint, Touchpoint.kind == "campaign_message") == 0
    replies = (await (await client.get("/console/local/updates", params={"user": "finn"})).json())["messages"]
    assert replies == []


async def test_console_rejects_bad_input_and_writes_nothing(aiohttp_client, make_config, clock):
    client = await aiohttp_client(create_app(make_config({"service": {"max_body_bytes": 2048}}), clock))
    service = client.app[SERVICE]
    bad = [
        (client.post("/console/local/messages", data=b"{not json"), 400),
        (client.post("/console/local/messages", json={"user": "a b", "text": "x"}), 400),
        (client.post("/console/local/messages", json={"user": "gia", "text": ""}), 400),
        (client.post("/console/local/messages", json={"user": "gia", "text": "x" * 5000}), 413),
        (client.post("/console/nope/messages", json={"user": "gia", "text": "x"}), 404),
    ]
    for request, status in bad:
        assert (await request).status == status
    assert await count(service, Touchpoint) == 0


async def test_healthz(aiohttp_client, make_config, clock):
    client = await aiohttp_client(create_app(make_config(), clock))
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok", "scheduler": "running", "store": "ok", "role": "all",
                                 "planner": "leader", "ingest_backlog": "0", "ingest_lag_seconds": "0.0"}


async def test_planner_lease_moves_when_the_holder_stops_heartbeating(make_config, clock):
    from scrm.service import Service

    config = make_config()
    first, second = Service(config, clock), Service(config, clock)
    await first.start(scheduler=False)
    await second.start(scheduler=False)
    try:
        assert (first.cluster.is_leader, second.cluster.is_leader) == (True, False)
        # first claims a delivery and dies (stops heartbeating) mid-send
        await first.receive(InboundEvent("console", "local", "nia", "text", text="hi", platform_msg_id="n1"))
        async with first.sessions() as s, s.begin():
            await s.execute(update(Delivery).values(status="sending", claimed_by=first.cluster.instance_id))
        clock.advance(config.cluster.lease_seconds - 1)
        await second.cluster.heartbeat()
        assert not second.cluster.is_leader  # the lease has not run out yet
        assert await count(second, Delivery, Delivery.status == "sending") == 1  # first may still be sending
        clock.advance(2)
        await second.cluster.heartbeat()
        assert second.cluster.is_leader
        assert await count(second, Delivery, Delivery.status == "unknown") == 1
        await first.cluster.heartbeat()  # a late heartbeat from the old holder does not take it back
        assert not first.cluster.is_leader
    finally:
        await first.stop()
        await second.stop()


async def test_a_claim_takes_one_batch_and_instances_take_different_ones(make_config, clock):
    """``scheduler.outbox_batch`` bounds a claim on both stores, so the instances share the outbox."""
    from scrm.service import Service

    config = make_config({"scheduler": {"outbox_batch": 4}})
    first, second = Service(config, clock), Service(config, clock)
    await first.start(scheduler=False)
    await second.start(scheduler=False)
    try:
        for n in range(10):  # ten first messages: ten welcome deliveries due now
            await first.receive(InboundEvent("console", "local", f"c{n}", "text", text="hi", platform_msg_id=f"c{n}"))
        assert await count(first, Delivery, Delivery.status == "planned") == 10
        mine, theirs = await first.outbox._claim(), await second.outbox._claim()
        assert len(mine) == len(theirs) == 4 and not set(mine) & set(theirs)
        assert await count(first, Delivery, Delivery.status == "claimed",
                           Delivery.claimed_by == first.cluster.instance_id) == 4
        assert await count(first, Delivery, Delivery.status == "planned") == 2
    finally:
        await first.stop()
        await second.stop()


async def test_the_event_loop_runs_between_the_deliveries_a_prepare_transaction_prepares(make_config, clock):
    """On SQLite a prepare transaction's statements run on the loop's thread; between deliveries the loop
    gets a turn (a probe task that yields in a loop counts them), so sends paced to a platform's rate are
    not woken a whole group late."""
    from sqlalchemy import event

    from scrm.campaigns.outbox import PREPARE_GROUP
    from scrm.service import Service

    service = Service(make_config(), clock)
    await service.start(scheduler=False)
    turns = 0
    seen: list[tuple[str, int]] = []

    async def probe() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    def statement(conn, cursor, text, params, context, many) -> None:
        seen.append((text, turns))

    try:
        for n in range(PREPARE_GROUP):
            await service.receive(InboundEvent("console", "local", f"p{n}", "text", text="hi", platform_msg_id=f"p{n}"))
        event.listen(service.engine.sync_engine, "before_cursor_execute", statement)
        event.listen(service.engine.sync_engine, "commit", lambda conn: seen.append(("COMMIT", turns)))
        task = asyncio.create_task(probe())
        assert await service.outbox.tick() == PREPARE_GROUP
        task.cancel()
        start = next(i for i, (text, _) in enumerate(seen)
                     if text.lstrip().startswith("SELECT deliveries.") and "deliveries.id IN" in text)
        end = next(i for i in range(start, len(seen)) if seen[i][0] == "COMMIT")
        if service.engine.dialect.name == "sqlite":
            assert len({t for _, t in seen[start:end]}) > PREPARE_GROUP  # a turn per delivery at least
        assert await count(service, Delivery, Delivery.status == "sent") == PREPARE_GROUP
    finally:
        await service.stop()


async def test_the_sends_in_flight_share_their_commits(make_config, clock):
    """A send's ``sending`` mark and its outcome are committed before and after its platform call, and
    the marks and outcomes of the sends in flight together share one commit (group commit), instead
    of two commits a delivery; every delivery still ends sent, with one touchpoint each."""
    from sqlalchemy import event

    from scrm.service import Service

    service = Service(make_config(), clock)
    await service.start(scheduler=False)
    commits = 0

    def counted(_conn) -> None:
        nonlocal commits
        commits += 1

    try:
        n = 40
        for i in range(n):  # forty first messages: forty welcome deliveries due now
            await service.receive(InboundEvent("console", "local", f"g{i}", "text", text="hi", platform_msg_id=f"g{i}"))
        event.listen(service.engine.sync_engine, "commit", counted)
        assert await service.outbox.tick() == n
        assert await count(service, Delivery, Delivery.status == "sent") == n
        assert await count(service, Touchpoint, Touchpoint.kind == "campaign_message") == n
        assert commits < n  # two a delivery (mark, outcome) without group commit, plus claims and prepares
    finally:
        event.remove(service.engine.sync_engine, "commit", counted)
        await service.stop()
