"""Issue 6's crash test: a worker process is SIGKILLed mid-campaign and restarted.

A real ``scrm run --role worker`` sends a one-off campaign to 300 Telegram customers through the fake
Bot API (which answers each send 100 ms after delivering it, so sends are in flight at any moment). When
the fake has received about a third, the process is killed with SIGKILL and started again. Afterwards:
nobody received a message twice, every delivery is final, the deliveries that were ``sending`` at the
kill (and only those) are ``unknown`` — counted, never resent — and everybody else received theirs.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

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

CUSTOMERS = 300
RATE = 25  # sends/second we allow ourselves; the fake allows 30
CONCURRENCY = 8  # [delivery] concurrency: platform calls in flight at once
SEND_DELAY = 0.1  # the fake answers each send this long after delivering it


async def statuses(sessions: Any) -> dict[int, tuple[str, str | None, int]]:
    """delivery id -> (status, claimed_by, customer id), for the campaign."""
    async with sessions() as session:
        rows = (await session.execute(select(Delivery.id, Delivery.status, Delivery.claimed_by, Delivery.customer_id)
                                      .where(Delivery.campaign == CAMPAIGN))).all()
    return {r.id: (r.status, r.claimed_by, r.customer_id) for r in rows}


async def test_sigkill_mid_campaign_sends_nobody_twice_and_everybody_else_once(tmp_path: Path,
                                                                               store: dict[str, Any]) -> None:
    fake, runner = await start_fake(overall_per_second=30, per_chat_per_second=1, send_delay=SEND_DELAY)
    config = write_setup(tmp_path, store, fake.base_url, rate=RATE, at=local_in(2),
                         overrides={"delivery": {"concurrency": CONCURRENCY}})
    await prepare_store(config, CUSTOMERS)
    engine = store_engine(config)
    sessions = make_sessionmaker(engine)
    first, second = Instance(config, "worker-1", "worker"), Instance(config, "worker-2", "worker")
    try:
        chats = await chat_of_customers(engine)
        await first.start()
        await first.wait_ready()
        await wait_for(lambda: len(fake.sent) >= CUSTOMERS // 3, 60, lambda: f"a third sent\n{first.tail()}", 0.005)
        await first.kill()
        await asyncio.sleep(0.3)  # requests already on the wire still reach the fake (it delivers them)
        received_before = Counter(s.chat_id for s in fake.sent)
        at_kill = await statuses(sessions)
        sending_at_kill = {i for i, (status, _, _) in at_kill.items() if status == "sending"}
        sent_at_kill = {i for i, (status, _, _) in at_kill.items() if status == "sent"}
        assert len(at_kill) == CUSTOMERS, "the run planned everyone before the kill"
        assert CUSTOMERS // 3 <= sum(received_before.values()) < CUSTOMERS, "killed midway"
        # Only sends actually handed to the platform are in doubt: at most `concurrency` of them.
        assert 1 <= len(sending_at_kill) <= CONCURRENCY, Counter(status for status, *_ in at_kill.values())

        await second.start()
        await second.wait_ready()

        async def all_final() -> bool:
            now = await statuses(sessions)
            return all(status not in ("planned", "claimed", "sending") for status, *_ in now.values())

        await wait_for(all_final, 60, lambda: f"every delivery final\n{second.tail()}", 0.2)
        await asyncio.sleep(0.5)  # nothing more may arrive
        final = await statuses(sessions)
        async with sessions() as session:
            runs = (await session.scalars(select(CampaignRun).where(CampaignRun.campaign == CAMPAIGN))).all()
            unknown_count = await session.scalar(select(func.count()).select_from(Delivery).where(
                Delivery.campaign == CAMPAIGN, Delivery.status == "unknown", Delivery.reason == "crashed_mid_send"))
    finally:
        await kill_all([first, second])
        await engine.dispose()
        await runner.cleanup()

    received = Counter(s.chat_id for s in fake.sent)
    twice = {chat: n for chat, n in received.items() if n > 1}
    assert not twice, f"received more than once: {twice}"
    assert [(r.status, r.planned) for r in runs] == [("ran", CUSTOMERS)], "one run, planned once"
    by_status = Counter(status for status, *_ in final.values())
    assert set(by_status) <= {"sent", "unknown"}, by_status
    unknown = {i for i, (status, _, _) in final.items() if status == "unknown"}
    sent = {i for i, (status, _, _) in final.items() if status == "sent"}
    # Exactly the sends in flight at the kill are unknown (counted, with their reason), none resent.
    assert unknown == sending_at_kill and unknown_count == len(unknown)
    assert len(sent) + len(unknown) == CUSTOMERS
    chat = {i: chats[cid] for i, (_, _, cid) in final.items()}
    # Everybody else received theirs, exactly once; a sent delivery is a received message.
    assert all(received[chat[i]] == 1 for i in sent)
    assert set(received) <= {chat[i] for i in sent | unknown}
    # Before the kill: what the fake had = what was sent + some of the in-flight ones.
    assert {chat[i] for i in sent_at_kill} <= set(received_before)
    assert set(received_before) - {chat[i] for i in sent_at_kill} <= {chat[i] for i in sending_at_kill}
    # After the restart: nothing in doubt went out again, everything sent after it arrived after it.
    after = set(received) - set(received_before)
    assert not after & {chat[i] for i in unknown}
    assert after == {chat[i] for i in sent - sent_at_kill}
    in_doubt_received = len(set(received) & {chat[i] for i in unknown})
    assert sum(received.values()) == len(sent) + in_doubt_received
    print(f"\n[{'postgresql' if 'schema_name' in store else 'sqlite'}] received before kill "
          f"{sum(received_before.values())}, in flight at kill {len(sending_at_kill)} "
          f"(of which delivered {in_doubt_received}), sent {len(sent)}, unknown {len(unknown)}")
