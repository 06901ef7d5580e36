"""Fan-out: one campaign to N Telegram customers through the real service, against the fake Bot API.

    python -m bench.fanout [--customers 3000] [--batch 300] [--concurrency 32]

The fake (tests/fakes/telegram.py) enforces 30 messages/s overall and one per second per chat and
answers 429 with retry_after beyond that. The service runs in-process with a config built from
config.example.toml by the project's own loader, as a user would set it: a Telegram bot whose
``api_base_url`` is the fake, ``[delivery] rate_limits = {"telegram:bench" = 30}``, the outbox batch
and tick. Customers arrive as ordinary messages through ingest; a one-off marketing campaign
(``at`` = the next minute) then plans them all with the planner and the outbox sends. Reported:
achieved rate / allowed rate over the send window (first to last delivery), duplicates, losses.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import tempfile
import time
import tomllib
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web
from sqlalchemy import func, select

from bench.common import ROOT, table, write_results

sys.path.insert(0, str(ROOT))
from scrm.config_file import parse_config
from scrm.messages import InboundEvent
from scrm.service import Service
from scrm.store.models import Delivery
from tests.fakes.telegram import FakeTelegram

TOKEN = "123456789:AAbenchmarkTokenForTheFakeBotApi00000"
ALLOWED_RATE = 30.0
FIRST_CHAT = 500_000_000


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def campaign_file(folder: Path, at: datetime) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_broadcast.toml").write_text(f'''name = "bench_broadcast"
title = "Fan-out benchmark"
kind = "marketing"

[trigger]
at = "{at:%Y-%m-%d %H:%M}"
misfire = "run_late"

[audience]
segment = "bench_everyone"

[message]
text = "{{{{ customer.name }}}}, 新品上架 / new arrivals this week"
''', "utf-8")


async def run(customers: int, batch: int, concurrency: int, tick: float) -> dict[str, Any]:
    fake = FakeTelegram(TOKEN, overall_per_second=int(ALLOWED_RATE), per_chat_per_second=1)
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.base_url = f"http://127.0.0.1:{port}/bot"

    with tempfile.TemporaryDirectory(prefix="scrm-bench-fanout-") as tmp:
        folder = Path(tmp)
        zone = "Asia/Shanghai"
        local_now = datetime.now(ZoneInfo(zone))
        # the next whole minute at least 20 s away: customers arrive first, then the run fires
        at = (local_now + timedelta(seconds=80)).replace(second=0, microsecond=0)
        campaign_file(folder / "campaigns", at)
        data = deep_merge(tomllib.loads((ROOT / "config.example.toml").read_text("utf-8")), {
            "store": {"url": f"sqlite+aiosqlite:///{folder / 'scrm.db'}"},
            "campaigns": {"path": str(folder / "campaigns")},
            "scheduler": {"outbox_tick_seconds": tick, "outbox_batch": batch, "campaign_check_seconds": 1},
            "delivery": {"concurrency": concurrency, "rate_limits": {"telegram:bench": ALLOWED_RATE},
                         "quiet_hours_start": "00:00", "quiet_hours_end": "00:00"},
            "segments": {"bench_everyone": "not opted_out"},
            "privacy": {"key_file": str(folder / "privacy.key")},
            "channels": {"telegram": {"bench": {"token": TOKEN, "webhook_secret": "bench-secret",
                                                "api_base_url": fake.base_url, "overall_per_second": ALLOWED_RATE,
                                                "per_chat_per_second": 1}}},
        })
        data.pop("staff", None)
        config = parse_config(data, folder, environ={})
        service = Service(config)
        await service.start()
        try:
            chats = [FIRST_CHAT + i for i in range(customers)]
            start = time.perf_counter()
            for i in range(0, customers, 500):
                await asyncio.gather(*(service.receive(InboundEvent(
                    "telegram", "bench", str(chat), "text", text="你好", platform_msg_id=f"u{chat}",
                    display_name=f"客户{chat - FIRST_CHAT}")) for chat in chats[i:i + 500]))
            ingest_seconds = time.perf_counter() - start
            print(f"  {customers} customers ingested in {ingest_seconds:.1f}s; campaign fires at {at:%H:%M} local",
                  flush=True)
            deadline = time.monotonic() + (at - datetime.now(ZoneInfo(zone))).total_seconds() \
                + customers / ALLOWED_RATE * 3 + 120
            last_report = 0.0
            while len({s.chat_id for s in fake.sent}) < customers and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                if time.monotonic() - last_report > 15 and fake.sent:
                    last_report = time.monotonic()
                    print(f"  sent {len(fake.sent)}, 429s {len(fake.throttled)}", flush=True)
            await asyncio.sleep(2)  # anything still in flight (a duplicate would show up here)
            settle = time.monotonic() + 120
            while True:  # the outbox records a claimed batch once all of it is sent
                async with service.sessions() as session:
                    statuses = dict((await session.execute(
                        select(Delivery.status, func.count()).where(Delivery.campaign == "bench_broadcast")
                        .group_by(Delivery.status))).all())
                if not {"planned", "sending"} & statuses.keys() or time.monotonic() > settle:
                    break
                await asyncio.sleep(0.5)
        finally:
            await service.stop()
            await runner.cleanup()

    sent = sorted(fake.sent, key=lambda s: s.at)
    per_chat = Counter(s.chat_id for s in sent)
    duplicates = sum(n - 1 for n in per_chat.values() if n > 1)
    losses = sum(1 for chat in chats if chat not in per_chat)
    span = sent[-1].at - sent[0].at if len(sent) > 1 else math.nan
    achieved = (len(sent) - 1) / span if len(sent) > 1 else 0.0
    return {
        "customers": customers, "outbox_batch": batch, "outbox_tick_seconds": tick, "concurrency": concurrency,
        "allowed_rate": ALLOWED_RATE, "sent": len(sent), "send_window_seconds": round(span, 2),
        "achieved_rate": round(achieved, 3), "throttled_429": len(fake.throttled),
        "throttled_by_limit": dict(Counter(t.limit for t in fake.throttled)), "duplicates": duplicates,
        "losses": losses, "delivery_statuses": statuses, "ingest_seconds": round(ingest_seconds, 2),
        "ratio": round(achieved / ALLOWED_RATE, 4), "target_ratio": 0.95,
        "fired_at_utc": at.astimezone(UTC).isoformat(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=300, help="scheduler.outbox_batch")
    parser.add_argument("--tick", type=float, default=0.2, help="scheduler.outbox_tick_seconds")
    parser.add_argument("--concurrency", type=int, default=32, help="delivery.concurrency")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # "skipped: already running" while a tick sends
    figures = asyncio.run(run(args.customers, args.batch, args.concurrency, args.tick))
    write_results("fanout", figures)
    print(table([
        ("customers", "sent", "window s", "msg/s", "allowed", "429s", "duplicates", "losses"),
        (str(figures["customers"]), str(figures["sent"]), f"{figures['send_window_seconds']:.1f}",
         f"{figures['achieved_rate']:.2f}", f"{ALLOWED_RATE:g}", str(figures["throttled_429"]),
         str(figures["duplicates"]), str(figures["losses"])),
    ]))
    print(f"deliveries by status: {figures['delivery_statuses']}")
    print(f"achieved / allowed rate: {figures['ratio']:.3f} (target >= 0.95); duplicates {figures['duplicates']}, "
          f"losses {figures['losses']}")


if __name__ == "__main__":
    main()
