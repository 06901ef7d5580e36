"""Issue 8's multi-instance test: three ``scrm run`` processes on one PostgreSQL schema.

A one-off campaign goes to 5,000 Telegram customers through the fake Bot API (220 messages/s allowed,
one per second per chat) with ``[delivery] rate_limits = {"telegram:main" = 200}`` shared by the
instances. When about a third has arrived, the instance holding the planner lease (``/healthz`` ->
``"planner": "leader"``) is SIGKILLed. Checked: every customer got exactly one message (only a send
the killed instance had in flight may be in doubt: ``unknown``, never resent), the rate limit held
across the instances in every sliding second, another instance took the lease within
``lease_seconds`` + a heartbeat, and the campaign ran once.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from scrm.store.engine import make_sessionmaker
from scrm.store.models import CampaignRun, Delivery
from tests.e2e import (
    CAMPAIGN,
    Instance,
    chat_of_customers,
    kill_all,
    local_in,
    prepare_store,
    start_fake,
    store_engine,
    wait_for,
    write_setup,
)

CUSTOMERS = 5000
RATE = 200  # [delivery] rate_limits, shared by every instance
PLATFORM_RATE = 220  # what the fake accepts per (sliding) second
CONCURRENCY = 8
HEARTBEAT, LEASE = 0.5, 3.0


async def leaders(instances: list[Instance]) -> list[Instance]:
    """The live instances whose /healthz says they hold the planner lease."""
    alive = [i for i in instances if i.alive]
    answers = await asyncio.gather(*(i.health() for i in alive))
    return [i for i, status in zip(alive, answers) if status and status.get("planner") == "leader"]


def busiest_window(times: list[float], width: float) -> int:
    """The most arrivals in any window [t, t + width) starting at an arrival."""
    times = sorted(times)
    return max((bisect.bisect_left(times, t + width) - i for i, t in enumerate(times)), default=0)


@pytest.mark.parametrize("store", ["postgresql"], indirect=True)
async def test_three_instances_share_the_campaign_and_survive_losing_the_planner(tmp_path: Path,
                                                                                 store: dict[str, Any]) -> None:
    fake, runner = await start_fake(overall_per_second=PLATFORM_RATE, per_chat_per_second=1)
    config = write_setup(tmp_path, store, fake.base_url, rate=RATE, at=local_in(3), overrides={
        "cluster": {"heartbeat_seconds": HEARTBEAT, "lease_seconds": LEASE},
        "delivery": {"concurrency": CONCURRENCY},
        "scheduler": {"outbox_batch": 100},
    })
    await prepare_store(config, CUSTOMERS)
    engine = store_engine(config)
    sessions = make_sessionmaker(engine)
    instances = [Instance(config, f"scrm-{n}") for n in range(1, 4)]
    loop = asyncio.get_running_loop()
    try:
        chats = await chat_of_customers(engine)
        for instance in instances:
            await instance.start()
        for instance in instances:
            await instance.wait_ready(60)
        started = loop.time()
        await wait_for(lambda: len(fake.sent) >= CUSTOMERS // 3, 60,
                       lambda: f"a third sent ({len(fake.sent)})\n" + "\n".join(i.tail(1500) for i in instances), 0.01)
        holding = await leaders(instances)
        assert len(holding) == 1, f"one planner: {[i.name for i in holding]}"
        leader = holding[0]
        await leader.kill()
        killed_at = loop.time()
        received_at_kill = len(fake.sent)
        successor = await wait_for(lambda: leaders(instances), LEASE + HEARTBEAT + 5, "another instance leads", 0.05)
        takeover = loop.time() - killed_at
        assert len(successor) == 1 and successor[0] is not leader

        async def all_final() -> bool:
            async with sessions() as session:
                open_ = await session.scalar(select(Delivery.id).where(
                    Delivery.campaign == CAMPAIGN, Delivery.status.in_(("planned", "claimed", "sending"))).limit(1))
                return open_ is None

        await wait_for(all_final, 120, lambda: f"every delivery final ({len(fake.sent)} sent)\n"
                       + "\n".join(i.tail(1500) for i in instances), 0.25)
        finished = loop.time()
        await asyncio.sleep(0.5)  # nothing more may arrive
        async with sessions() as session:
            rows = (await session.execute(select(Delivery.id, Delivery.status, Delivery.claimed_by,
                                                 Delivery.customer_id).where(Delivery.campaign == CAMPAIGN))).all()
            runs = (await session.scalars(select(CampaignRun).where(CampaignRun.campaign == CAMPAIGN))).all()
        survivors = [i for i in instances if i.alive]
        assert len(survivors) == 2, "only the leader was killed"
    finally:
        await kill_all(instances)
        await engine.dispose()
        await runner.cleanup()

    # The campaign ran once: one campaign_runs row, everybody planned once.
    assert [(r.status, r.planned) for r in runs] == [("ran", CUSTOMERS)]
    assert len(rows) == CUSTOMERS and len({r.customer_id for r in rows}) == CUSTOMERS
    # Every customer got exactly one message; only the killed instance's in-flight sends may be in doubt.
    received = Counter(s.chat_id for s in fake.sent)
    twice = {chat: n for chat, n in received.items() if n > 1}
    assert not twice, f"received more than once: {twice}"
    by_status = Counter(r.status for r in rows)
    assert set(by_status) <= {"sent", "unknown"}, by_status
    unknown = [r for r in rows if r.status == "unknown"]
    killed_pid = f"-{leader.pid}-"  # instance ids are <host>-<pid>-<random>
    assert len(unknown) <= CONCURRENCY and all(killed_pid in (r.claimed_by or "") for r in unknown), unknown
    assert all(received[chats[r.customer_id]] == 1 for r in rows if r.status == "sent")
    missing = [r for r in rows if received[chats[r.customer_id]] == 0]
    assert {r.id for r in missing} <= {r.id for r in unknown}, "a customer without a message is one in doubt"
    assert sum(received.values()) == CUSTOMERS - len(missing)
    # The rate limit held across the instances: the fake never had to refuse, and no sliding second
    # holds more than the rate (+ one, and the fake's jitter slack: sends are spaced 1/rate apart).
    assert not fake.throttled, fake.throttled[:5]
    times = [s.at for s in fake.sent]
    busiest = busiest_window(times, 1.0)
    assert busiest <= RATE * (1 + fake.slack) + 1, busiest
    # The lease moved within lease_seconds + one heartbeat (+ the watcher's polling and process jitter).
    assert takeover <= LEASE + HEARTBEAT + 0.5, takeover
    # All three instances sent (the outbox is shared).
    senders = {next(i.name for i in instances if f"-{i.pid}-" in (r.claimed_by or "")) for r in rows
               if r.status == "sent"}
    assert len(senders) == 3, senders
    span = max(times) - min(times)
    print(f"\n5,000 customers: sent {by_status['sent']}, unknown {len(unknown)} (delivered "
          f"{len(unknown) - len(missing)}), busiest second {busiest} (limit {RATE}), achieved "
          f"{len(times) / span:.0f}/s over {span:.1f}s, leader killed at {received_at_kill} received, takeover "
          f"{takeover:.2f}s, all final {finished - started:.1f}s after the instances were up")
