"""Issue 8's multi-instance test: three ``scrm run`` processes on one PostgreSQL schema.

A one-off campaign goes to 400 Telegram customers through the fake Bot API (40 messages/s allowed,
one per second per chat) with ``[delivery] rate_limits = {"telegram:main" = 20}`` shared by the
instances. The limit is far below what the three manage together (about 65 sends/s on two cores), so
it is what paces them: instances each keeping their own limit would send three times as fast.
When about a third has arrived, the instance holding the planner lease (``/healthz`` ->
``"planner": "leader"``) is SIGKILLed. Checked: every customer got exactly one message (only a send
the killed instance had in flight may be in doubt: ``unknown``, never resent), the rate limit held
across the instances (every sliding ten seconds within 6% of it; no second, with room for a loaded
machine's jitter, over 1.6 times it; nothing the fake refused), another instance took the lease within
``lease_seconds`` + a heartbeat, all three instances were sending side by side, and the campaign ran once.

No fixed deadline for the sending itself: the waits fail when the sends stop progressing, so a
loaded machine makes the test slower, not red.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from scrm.store.engine import make_sessionmaker
from scrm.store.models import CampaignRun, Delivery, Lease
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

CUSTOMERS = 400
RATE = 20  # [delivery] rate_limits, shared by every instance: well below what the three can send
#: What the fake accepts per (sliding) second: room for sends bunched by a loaded machine, none for
#: instances that each keep the limit for themselves (three times the rate).
PLATFORM_RATE = 2 * RATE
#: How much later than its slot a send may reach the fake on a loaded machine (a busy event loop, a
#: slow commit before the call, this process descheduled while it stamps arrivals).
JITTER = 0.5
CONCURRENCY = 8
OUTBOX_BATCH = 25  # claims per instance: small, so the work is dealt out in many pieces
HEARTBEAT, LEASE = 0.5, 3.0
#: How long the sends (or deliveries becoming final) may stand still before the test gives up.
STALL = 45.0


async def leaders(instances: list[Instance]) -> list[Instance]:
    """The live instances whose /healthz says they hold the planner lease."""
    alive = [i for i in instances if i.alive]
    answers = await asyncio.gather(*(i.health() for i in alive))
    return [i for i, status in zip(alive, answers) if status and status.get("planner") == "leader"]


async def progressing(progress: Callable[[], Awaitable[int] | int], done: Callable[[int], Awaitable[bool] | bool],
                      what: Callable[[], str], interval: float = 0.05) -> None:
    """Wait until ``done``; fail only when ``progress`` (a count that grows as the work goes on) has not
    grown for ``STALL`` seconds, whatever the total time."""
    loop = asyncio.get_running_loop()
    last, since = -1, loop.time()
    while True:
        count = progress()
        if not isinstance(count, int):
            count = await count
        finished = done(count)
        if not isinstance(finished, bool):
            finished = await finished
        if finished:
            return
        if count != last:
            last, since = count, loop.time()
        elif loop.time() - since > STALL:
            raise AssertionError(f"{what()}: no progress for {STALL}s (at {count})")
        await asyncio.sleep(interval)


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
        "scheduler": {"outbox_batch": OUTBOX_BATCH},
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

        def logs() -> str:
            return f"{len(fake.sent)} sent\n" + "\n".join(i.tail(1500) for i in instances)

        await progressing(lambda: len(fake.sent), lambda n: n >= CUSTOMERS // 3, lambda: "a third sent: " + logs(),
                          0.01)
        holding = await leaders(instances)
        assert len(holding) == 1, f"one planner: {[i.name for i in holding]}"
        leader = holding[0]
        async with sessions() as session:
            held_by = await session.scalar(select(Lease.holder).where(Lease.name == "planner"))
        assert held_by is not None and f"-{leader.pid}-" in held_by, held_by
        await leader.kill()
        killed_at = datetime.now(UTC).replace(tzinfo=None)  # the instances' clock: naive UTC, this host
        received_at_kill = len(fake.sent)

        async def lease_moved() -> datetime | None:
            """When the new holder took the lease, at the latest (its last renewal, a heartbeat apart)."""
            async with sessions() as session:
                lease = (await session.execute(select(Lease.holder, Lease.expires_at)
                                               .where(Lease.name == "planner"))).one()
            return lease.expires_at - timedelta(seconds=LEASE) if lease.holder not in (None, held_by) else None

        taken_at = await wait_for(lease_moved, LEASE + HEARTBEAT + 30, "another instance takes the lease", 0.02)
        takeover = (taken_at - killed_at).total_seconds()
        successor = await wait_for(lambda: leaders(instances), 30, "another instance says it leads", 0.05)
        assert len(successor) == 1 and successor[0] is not leader

        async def final_count() -> int:
            async with sessions() as session:
                return int(await session.scalar(select(func.count()).select_from(Delivery).where(
                    Delivery.campaign == CAMPAIGN, Delivery.status.not_in(("planned", "claimed", "sending")))) or 0)

        await progressing(final_count, lambda n: n == CUSTOMERS, lambda: "every delivery final: " + logs(), 0.25)
        finished = loop.time()
        await asyncio.sleep(0.5)  # nothing more may arrive
        async with sessions() as session:
            rows = (await session.execute(select(Delivery.id, Delivery.status, Delivery.claimed_by,
                                                 Delivery.customer_id, Delivery.finished_at)
                                          .where(Delivery.campaign == CAMPAIGN))).all()
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
    # The rate limit held across the instances: the fake never had to refuse, and no sliding window holds
    # more than the rate allows (sends are spaced 1/rate apart: + 1 for the window's alignment with them,
    # + 1 for a send the limiter lets go up to a slot late, + JITTER's worth) - over ten seconds, the
    # sustained rate, which is within 6% of the limit; and in any one second.
    assert not fake.throttled, fake.throttled[:5]
    times = [s.at for s in fake.sent]
    busiest, sustained = busiest_window(times, 1.0), busiest_window(times, 10.0)
    assert sustained <= RATE * (10 + JITTER) + 2, sustained
    assert busiest <= RATE * (1 + JITTER) + 2, busiest
    # The lease moved within lease_seconds + one heartbeat (+ process jitter), by the new holder's own stamp
    # in the lease row (at the latest), not by when this test noticed.
    assert takeover <= LEASE + HEARTBEAT + 0.5, takeover
    # The outbox is shared: all three instances were sending side by side before the kill, each a fair part
    # (one claim is at most OUTBOX_BATCH deliveries, so no instance can take everything that is due).
    before_kill = Counter(next(i.name for i in instances if f"-{i.pid}-" in (r.claimed_by or "")) for r in rows
                          if r.status == "sent" and r.finished_at <= killed_at)
    assert len(before_kill) == 3 and min(before_kill.values()) >= received_at_kill / 10, before_kill
    span = max(times) - min(times)
    print(f"\n{CUSTOMERS} customers: sent {by_status['sent']}, unknown {len(unknown)} (delivered "
          f"{len(unknown) - len(missing)}), busiest second {busiest} and ten seconds {sustained} (limit {RATE}/s), "
          f"achieved {len(times) / span:.0f}/s over {span:.1f}s, leader killed at {received_at_kill} received, "
          f"takeover {takeover:.2f}s, sent before the kill by instance {sorted(before_kill.values())}, all final "
          f"{finished - started:.1f}s after the instances were up")
