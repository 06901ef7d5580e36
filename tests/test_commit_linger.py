"""Group commit under load: after a commit of several events the writer lingers, so events arriving
just after it share the next commit instead of each taking their own. The journal's appends are
counted: the consumer, which applies them in commits of its own, waits until they are counted."""

from __future__ import annotations

import asyncio

from sqlalchemy import event

from scrm.ingest import Consumer
from scrm.messages import InboundEvent
from scrm.service import Service


def message(user: str, msg_id: str) -> InboundEvent:
    return InboundEvent("console", "local", user, "text", text="你好", platform_msg_id=msg_id)


async def test_events_arriving_during_the_linger_share_one_commit(make_config, clock, monkeypatch):
    gate = asyncio.Event()
    apply = Consumer._apply

    async def held(self: Consumer, limit: int) -> int:
        await gate.wait()
        return await apply(self, limit)

    monkeypatch.setattr(Consumer, "_apply", held)
    service = Service(make_config({"store": {"commit_linger_ms": 100}}), clock)
    await service.start(scheduler=False)
    commits = 0

    def count(_connection) -> None:
        nonlocal commits
        commits += 1

    event.listen(service.engine.sync_engine, "commit", count)
    try:
        # a burst: two events in one commit (the writer takes both at once)
        await asyncio.gather(service.accept(message("ann", "a1")).durable, service.accept(message("bob", "b1")).durable)
        before = commits
        first = service.accept(message("ann", "a2"))
        await asyncio.sleep(0.02)  # without the linger the first would be committed, alone, by now
        second = service.accept(message("bob", "b2"))
        await asyncio.gather(first.durable, second.durable)
        assert commits - before == 1
        gate.set()
        assert [r.duplicate for r in await asyncio.gather(first.applied, second.applied)] == [False, False]
    finally:
        gate.set()
        event.remove(service.engine.sync_engine, "commit", count)
        await service.stop()
