"""The inbound journal (scrm.ingest): acknowledged once durable, applied once, in order, behind it.

Both stores. The consumer is held where a test needs an event durable but not applied: the pipeline's
batch function is wrapped to wait for an asyncio event (never for a sleep), so what is checked in
between is the state the store holds, whatever the machine's load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import xmltodict
from aiohttp import ClientError, ClientSession, ClientTimeout
from sqlalchemy import func, select

from scrm import pipeline
from scrm.commands import OPT_OUT_REPLY
from scrm.ingest import Consumer
from scrm.messages import InboundEvent
from scrm.service import Service
from scrm.store.engine import make_sessionmaker
from scrm.store.models import InboundJournal, Touchpoint
from tests.conftest import eventually
from tests.e2e import Instance, kill_all, local_in, prepare_store, start_fake, store_engine, wait_for, write_setup
from tests.fakes.wechat import event_xml, plaintext, text_xml
from tests.test_wechat import TOKEN as WECHAT_TOKEN
from tests.test_wechat import fake  # noqa: F401 - the fake WeChat API, a fixture
from tests.test_wechat import post as wechat_post
from tests.test_wechat import start as wechat_start

BatchFn = Callable[..., Awaitable[pipeline.BatchOutcome]]


def text(who: str, msg_id: str, words: str = "你好") -> InboundEvent:
    return InboundEvent("console", "local", who, "text", text=words, display_name=who, platform_msg_id=msg_id)


async def journal(service: Service) -> list[InboundJournal]:
    async with service.sessions() as s:
        return list((await s.scalars(select(InboundJournal).order_by(InboundJournal.id))).all())


async def inbound(service: Service, msg_id: str | None = None) -> list[Touchpoint]:
    async with service.sessions() as s:
        where = [Touchpoint.direction == "in"]
        if msg_id is not None:
            where.append(Touchpoint.platform_msg_id == msg_id)
        return list((await s.scalars(select(Touchpoint).where(*where).order_by(Touchpoint.id))).all())


@pytest.fixture
async def service(make_config, clock):
    service = Service(make_config(), clock)
    await service.start(scheduler=False)
    yield service
    await service.stop()


def hold(monkeypatch: pytest.MonkeyPatch, gate: asyncio.Event, entered: asyncio.Event | None = None) -> None:
    """The consumer waits for ``gate`` before each batch, outside its transaction (on SQLite a batch holds
    the one writer, which appends need too)."""
    original = Consumer._apply

    async def held(self: Consumer, limit: int) -> int:
        if entered is not None:
            entered.set()
        await gate.wait()
        return await original(self, limit)

    monkeypatch.setattr(Consumer, "_apply", held)


async def test_a_retry_of_an_event_durable_but_not_applied_is_applied_once_and_answered_with_its_replies(
        service, monkeypatch):
    gate, entered = asyncio.Event(), asyncio.Event()
    hold(monkeypatch, gate, entered)
    first = service.accept(text("ann", "m-1", "退订"))
    await first.durable
    await entered.wait()  # the consumer is held before applying it
    retry = service.accept(text("ann", "m-1", "退订"))
    await retry.durable
    rows = await journal(service)
    assert [(r.dedup_key, r.applied_at) for r in rows] == [("m-1", None)]  # durable once, not applied
    assert not first.applied.done() and not retry.applied.done()

    gate.set()
    original, again = await first.applied, await retry.applied
    assert original.replies == (OPT_OUT_REPLY,) and not original.duplicate
    assert again.duplicate and again.original is not None and again.original.replies == (OPT_OUT_REPLY,)
    assert len(await inbound(service, "m-1")) == 1
    row, = await journal(service)
    assert row.applied_at is not None and row.reaction is not None and row.reaction["replies"] == [OPT_OUT_REPLY]

    # a retry once it is applied: answered from the journal at append, nothing run again
    late = await service.receive(text("ann", "m-1", "退订"))
    assert late.duplicate and late.original is not None and late.original.replies == (OPT_OUT_REPLY,)
    assert len(await inbound(service, "m-1")) == 1 and len(await journal(service)) == 1


async def test_a_batch_failing_midway_leaves_nothing_half_applied_and_is_applied_on_the_next_try(
        service, monkeypatch):
    original: BatchFn = pipeline.handle_batch
    calls: list[int] = []
    retrying, resume = asyncio.Event(), asyncio.Event()

    async def flaky(svc: Any, session: Any, items: list[Any], now: Any) -> pipeline.BatchOutcome:
        calls.append(len(items))
        if len(calls) == 1:
            await original(svc, session, items, now)  # every effect written in the transaction...
            raise RuntimeError("the store went away mid-batch")  # ...and then the batch fails
        if len(calls) == 2:
            retrying.set()
            await resume.wait()
        return await original(svc, session, items, now)

    monkeypatch.setattr(pipeline, "handle_batch", flaky)
    accepted = [service.accept(text(f"c{i}", f"f-{i}", "奶粉")) for i in range(5)]
    await asyncio.gather(*(a.durable for a in accepted))
    await retrying.wait()
    # The failed batch is rolled back whole: no effect of it and no mark of it.
    assert await inbound(service) == []
    assert all(r.applied_at is None for r in await journal(service))
    assert not any(a.applied.done() for a in accepted)

    resume.set()
    reactions = await asyncio.gather(*(a.applied for a in accepted))
    assert all(not r.duplicate and r.customer_id is not None for r in reactions)
    seen = await inbound(service)
    assert sorted(t.platform_msg_id for t in seen) == [f"f-{i}" for i in range(5)]  # each exactly once
    rows = await journal(service)
    assert all(r.applied_at is not None and r.attempts == 0 for r in rows) and len(rows) == 5


async def test_an_event_failing_alone_is_tried_again_then_set_aside_so_the_rest_go_on(make_config, clock,
                                                                                        monkeypatch):
    service = Service(make_config({"ingest": {"max_attempts": 2}}), clock)
    await service.start(scheduler=False)
    try:
        original: BatchFn = pipeline.handle_batch

        async def poisoned(svc: Any, session: Any, items: list[Any], now: Any) -> pipeline.BatchOutcome:
            if any(event.text == "poison" for event, _ in items):
                raise ValueError("cannot apply this one")
            return await original(svc, session, items, now)

        monkeypatch.setattr(pipeline, "handle_batch", poisoned)
        bad = service.accept(text("dan", "p-1", "poison"))
        good = service.accept(text("dan", "p-2", "你好"))
        assert not (await good.applied).duplicate
        with pytest.raises(Exception, match="could not be applied"):
            await bad.applied
        rows = {r.dedup_key: r for r in await journal(service)}
        assert rows["p-1"].attempts == 2 and rows["p-1"].reaction is not None and rows["p-1"].reaction["failed"]
        assert [t.platform_msg_id for t in await inbound(service)] == ["p-2"]
    finally:
        await service.stop()


async def test_applied_events_are_pruned_after_the_retention(service, clock):
    from datetime import timedelta

    assert service.consumer is not None
    await service.receive(text("eve", "r-1"))
    await service.consumer.prune()
    assert len(await journal(service)) == 1
    clock.advance(timedelta(days=service.config.ingest.retention_days, seconds=1))
    assert await service.consumer.prune() == 1
    assert await journal(service) == []


async def test_a_shared_phone_is_never_kept_in_clear(service, monkeypatch):
    gate, entered = asyncio.Event(), asyncio.Event()
    hold(monkeypatch, gate, entered)
    accepted = service.accept(InboundEvent("console", "local", "fay", "contact_shared", platform_msg_id="ph-1",
                                           payload={"phone": "+86 138 0013 8000"}))
    await accepted.durable
    await entered.wait()
    row, = await journal(service)
    assert "13800138000" not in str(row.event).replace(" ", "") and "phone" not in row.event["payload"]
    gate.set()
    await accepted.applied
    row, = await journal(service)
    assert "sealed_phone" not in row.event  # dropped once applied
    async with service.sessions() as s:
        from scrm.store.models import Customer
        assert (await s.scalar(select(Customer.phone_last4).where(Customer.id == (await accepted.applied).customer_id))
                ) == "8000"


async def test_two_workers_on_postgresql_never_apply_one_customers_events_out_of_order(make_config, store):
    if "schema_name" not in store:
        pytest.skip("two consumers side by side: PostgreSQL (SQLite has one writer and one instance)")
    config = make_config({"ingest": {"batch": 7, "poll_seconds": 0.02}})
    web = Service(config, role="web")
    await web.start(scheduler=False)
    customers, per_customer = 6, 40
    try:
        accepted = [web.accept(text(f"p{c}", f"o-{c}-{n}", f"第{n}条")) for n in range(per_customer)
                    for c in range(customers)]
        await asyncio.gather(*(a.durable for a in accepted))
    finally:
        await web.stop()
    workers = [Service(config, role="worker") for _ in range(2)]
    for worker in workers:
        await worker.start(scheduler=False)
    try:
        async def backlog() -> bool:
            async with workers[0].sessions() as s:
                return not await s.scalar(select(func.count()).select_from(InboundJournal)
                                          .where(InboundJournal.applied_at.is_(None)))

        await asyncio.gather(*(w.consumer.drain() for w in workers if w.consumer is not None))
        await eventually(backlog)
        seen = await inbound(workers[0])
        assert len(seen) == customers * per_customer  # each exactly once
        for c in range(customers):
            order = [int(t.platform_msg_id.rsplit("-", 1)[1]) for t in seen if t.platform_msg_id.startswith(f"o-{c}-")]
            assert order == list(range(per_customer)), f"customer {c}'s events applied out of order"
    finally:
        for worker in workers:
            await worker.stop()


async def test_metrics_and_healthz_show_the_backlog_and_the_lag(service, monkeypatch, clock):
    from datetime import timedelta

    from scrm import metrics

    gate, entered = asyncio.Event(), asyncio.Event()
    hold(monkeypatch, gate, entered)
    accepted = service.accept(text("gus", "h-1"))
    await accepted.durable
    await entered.wait()
    clock.advance(timedelta(seconds=30))
    health = await service.health()
    assert health["ingest_backlog"] == "1" and float(health["ingest_lag_seconds"]) >= 30
    assert metrics.INGEST_BACKLOG._value.get() == 1  # type: ignore[attr-defined]
    gate.set()
    await accepted.applied
    assert (await service.health())["ingest_backlog"] == "0"



# -- WeChat: acknowledged once durable where no passive reply can follow -----------------------------------


async def test_wechat_acknowledges_a_location_report_before_applying_it_and_still_answers_text(
        aiohttp_client, make_config, clock, fake, monkeypatch):
    gate, entered = asyncio.Event(), asyncio.Event()
    hold(monkeypatch, gate, entered)
    client, service = await wechat_start(aiohttp_client, make_config, clock, fake)
    resp = await wechat_post(client, plaintext(WECHAT_TOKEN, location_report("o_lu", 1_700_000_100)), wait=False)
    assert (resp.status, await resp.text()) == (200, "success")
    row, = await journal(service)  # the answer came with the event durable and not applied
    assert row.applied_at is None and row.event["kind"] == "location_report" and await inbound(service) == []

    gate.set()
    resp = await wechat_post(client, plaintext(WECHAT_TOKEN, text_xml("o_lu", "退订", 6_200_000_000_000_000_777),
                                               openid="o_lu"))
    assert xmltodict.parse(await resp.text())["xml"]["Content"] == OPT_OUT_REPLY  # its passive reply, as before
    assert [t.kind for t in await inbound(service)] == ["location_report", "text"]  # in order, each once


def location_report(openid: str, at: int) -> str:
    return event_xml(openid, "LOCATION", create_time=at,
                     extra={"Latitude": 23.137466, "Longitude": 113.352425, "Precision": 119.385040})


# -- SIGKILL between durable and applied -------------------------------------------------------------------


async def test_sigkill_between_durable_and_applied_loses_no_acknowledged_event_and_applies_each_once(
        tmp_path, store):
    """A ``--role web`` instance makes events durable and applies none: killed, its acknowledged events
    wait in the journal. Then an ``all`` instance is killed while taking and applying a stream of them.
    After a restart every acknowledged event has been applied exactly once."""
    fake, runner = await start_fake()
    wechat = {"brand": {"app_id": "wx0123456789abcdef", "app_secret": "s", "token": WECHAT_TOKEN,
                        "api_base_url": fake.base_url}}
    config = write_setup(tmp_path, store, fake.base_url, rate=10, at=local_in(3600),
                         overrides={"channels": {"wechat": wechat}, "ingest": {"poll_seconds": 0.05}})
    await prepare_store(config, 0)
    engine = store_engine(config)
    sessions = make_sessionmaker(engine)
    web, first, second = Instance(config, "web", "web"), Instance(config, "all-1"), Instance(config, "all-2")
    acknowledged: set[str] = set()

    async def send(instance: Instance, http: ClientSession, n: int) -> None:
        openid, at = f"o_{n % 7}", 1_700_000_000 + n
        cb = plaintext(WECHAT_TOKEN, location_report(openid, at))
        try:
            async with http.post(f"http://127.0.0.1:{instance.port}/wechat/brand", params=cb.query, data=cb.body,
                                 headers={"Content-Type": "text/xml"}) as resp:
                if resp.status == 200 and await resp.text() == "success":
                    acknowledged.add(f"{openid}:{at}")
        except (OSError, ClientError, TimeoutError):
            pass  # not acknowledged: the platform would try again

    async def stream(instance: Instance, numbers: range) -> None:
        async with ClientSession(timeout=ClientTimeout(total=10)) as http:
            pending = iter(numbers)

            async def lane() -> None:
                for n in pending:
                    if not instance.alive:
                        return
                    await send(instance, http, n)

            await asyncio.gather(*(lane() for _ in range(8)))

    async def unapplied() -> int:
        async with sessions() as s:
            return int(await s.scalar(select(func.count()).select_from(InboundJournal)
                                      .where(InboundJournal.applied_at.is_(None))) or 0)

    async def drained() -> bool:
        return await unapplied() == 0

    try:
        await web.start()
        await web.wait_ready()
        await stream(web, range(0, 60))
        await web.kill()
        assert len(acknowledged) == 60 and await unapplied() == 60  # durable, none applied

        await first.start()
        await first.wait_ready()
        sending = asyncio.ensure_future(stream(first, range(60, 600)))
        await wait_for(lambda: len(acknowledged) >= 200, 60, lambda: f"events acknowledged\n{first.tail()}")
        await first.kill()
        await sending

        await second.start()
        await second.wait_ready()
        await wait_for(drained, 60, lambda: f"journal applied\n{second.tail()}")
        async with sessions() as s:
            applied = (await s.execute(select(Touchpoint.platform_msg_id, func.count())
                                       .where(Touchpoint.kind == "location_report")
                                       .group_by(Touchpoint.platform_msg_id))).all()
            journaled = set(await s.scalars(select(InboundJournal.dedup_key)))
        counts = dict(applied)
        assert acknowledged <= journaled  # nothing acknowledged was lost
        assert acknowledged <= set(counts), sorted(acknowledged - set(counts))[:5]
        assert set(counts.values()) == {1}  # and nothing applied twice
    finally:
        await kill_all([web, first, second])
        await engine.dispose()
        await runner.cleanup()


def test_an_instance_looks_up_the_events_it_waits_for_in_bounded_id_ranges():
    """A web instance polls for the events another instance applied: ranges of at most WATCH_CHUNK ids, a
    new range after a gap wider than WATCH_SPAN (an old event still waiting must not drag in every row
    since it)."""
    from scrm.ingest.journal import WATCH_CHUNK, WATCH_SPAN, _ranges

    assert _ranges([7]) == [(7, 7)]
    assert _ranges([1, 2, 3, 3 + WATCH_SPAN + 1, 3 + WATCH_SPAN + 2]) == [(1, 3), (4 + WATCH_SPAN, 5 + WATCH_SPAN)]
    many = list(range(1, 2 * WATCH_CHUNK + 2))
    assert _ranges(many) == [(1, WATCH_CHUNK), (WATCH_CHUNK + 1, 2 * WATCH_CHUNK), (2 * WATCH_CHUNK + 1,) * 2]
