"""Pages of the integration API over the bench data set: a 100-row page of customers and of a customer's
touchpoints, served by the real application, on SQLite and PostgreSQL.

    python -m bench.api [--customers 1000000] [--touchpoints 10000000] [--stores sqlite,postgresql]
                        [--repeat 50]

The data set, the config and the server are bench.console's (the cached SQLite file under bench/results/,
the demo config, ``scrm.web.create_app`` as ``scrm run`` serves it), with an API key holding
``customers:read``. Each page is requested ``--repeat`` times, one request at a time, and its server
time taken by bench.console's middleware around the handler (key check, validation, the reads, the
page's audit entry and the JSON included; HTTP parsing and the socket not). Pages of customers are
the first page and a page 1,000 rows from the result's end (the cursor, not OFFSET, takes it there),
unfiltered, by tag (20% of the customers) and by segment expression. The data set gives every customer
about ten touchpoints, so for full pages of touchpoints #500000 is given a long history first
(:data:`HISTORY` more, half of them messages; deleted again afterwards, so the cached data set stays as
it was): its first page and one 1,000 touchpoints down, and its messages; beside them a customer with
the data set's own ten. Target: p95 <= 100 ms.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import aiohttp
from sqlalchemy import delete, func, insert, select

from bench.common import table, write_results
from bench.console import percentile, served
from bench.dataset import NOW, SEGMENT, TAG_X
from bench.planning import on_each_store
from scrm.customer_search import search
from scrm.service import Service
from scrm.store.engine import reading, writing
from scrm.store.models import Customer, Touchpoint

KEY = "bench-api-key-0123456789abcdef"
API_KEYS = {"bench": {"key": KEY, "scopes": ["customers:read"]}}
LISTS = {"all customers": {}, f"tag {TAG_X} (20%)": {"tag": TAG_X}, "segment expression": {"segment": SEGMENT}}
TARGET_MS = 100
#: Touchpoints #500000 is given for the touchpoint pages.
HISTORY = 5_000
LONG = 500_000


@asynccontextmanager
async def long_history(svc: Service) -> AsyncIterator[int]:
    """#500000 with :data:`HISTORY` more touchpoints (a message in, an internal event, alternately) while
    the block runs; the id 1,000 touchpoints below its newest."""
    rows = [{"customer_id": LONG, "channel": "wechat", "account": "brand", "direction": "in" if i % 2 else "internal",
             "kind": "text" if i % 2 else "tag_added", "text": f"第{i}条" if i % 2 else None, "payload": {},
             "created_at": NOW - timedelta(minutes=HISTORY - i)} for i in range(HISTORY)]
    async with writing(svc.sessions) as session:
        first = int(await session.scalar(select(func.max(Touchpoint.id))) or 0)
        await session.execute(insert(Touchpoint), rows)
    try:
        async with reading(svc.sessions) as session:
            ids = (await session.scalars(select(Touchpoint.id).where(Touchpoint.customer_id == LONG)
                                         .order_by(Touchpoint.id.desc()).offset(1000).limit(1))).all()
        yield ids[0]
    finally:
        async with writing(svc.sessions) as session:
            await session.execute(delete(Touchpoint).where(Touchpoint.customer_id == LONG, Touchpoint.id > first))


async def paths(svc: Service, deep_touchpoint: int) -> dict[str, str]:
    """Label -> path of every page timed."""
    found: dict[str, str] = {}
    async with reading(svc.sessions) as session:
        for label, params in LISTS.items():
            found[f"customers: {label}"] = "/api/v1/customers?" + urlencode({**params, "limit": 100})
            text = {"tag": f"tag:{TAG_X}", "segment": SEGMENT}.get(next(iter(params), ""), "")
            where = (await search(session, svc, text, NOW)).where
            low = (await session.scalars(select(Customer.id).where(where).order_by(Customer.id)
                                         .offset(999).limit(1))).first()
            if low is not None:
                found[f"customers: {label}, deep"] = "/api/v1/customers?" + urlencode(
                    {**params, "limit": 100, "cursor": low})
        count = await session.scalar(select(func.count()).select_from(Touchpoint).where(Touchpoint.customer_id == LONG))
    label = f"#{LONG} ({count:,} touchpoints)"
    found[f"touchpoints {label}"] = f"/api/v1/customers/{LONG}/touchpoints?limit=100"
    found[f"touchpoints {label}, deep"] = f"/api/v1/customers/{LONG}/touchpoints?limit=100&cursor={deep_touchpoint}"
    found[f"messages {label}"] = f"/api/v1/customers/{LONG}/messages?limit=100"
    found["touchpoints #1 (the data set's own)"] = "/api/v1/customers/1/touchpoints?limit=100"
    return found


async def measure(url: str, schema: str | None, repeat: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"pages": {}}
    async with served(url, schema, API_KEYS) as (base, svc, timings), aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {KEY}"}) as client, long_history(svc) as deep_touchpoint:
        for label, path in (await paths(svc, deep_touchpoint)).items():
            times: list[float] = []
            status, rows = 0, 0
            for _ in range(repeat):
                timings.last = None
                async with client.get(base + path) as response:
                    status, body = response.status, await response.json()
                assert timings.last is not None
                times.append(timings.last)
            rows = len(body.get("customers", body.get("touchpoints", [])))
            figures["pages"][label] = {"path": path, "status": status, "rows": rows, "first_ms": round(times[0], 1),
                                       "p50_ms": round(percentile(times, 0.5), 1),
                                       "p95_ms": round(percentile(times, 0.95), 1), "max_ms": round(max(times), 1)}
            print(f"  {label}: {figures['pages'][label]}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--touchpoints", type=int, default=10_000_000)
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--repeat", type=int, default=50, help="requests per page")
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    results = on_each_store(args.stores, args.customers, args.touchpoints,
                            lambda url, schema: measure(url, schema, args.repeat))
    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])
    stores = list(results)
    labels = list(dict.fromkeys(label for r in results.values() for label in r.get("pages", {})))
    rows: list[tuple[str, ...]] = [("page (server ms)", *(f"{s} p50 / p95 (first) rows" for s in stores))]
    worst = 0.0
    for label in labels:
        cells = []
        for store in stores:
            page = results[store].get("pages", {}).get(label)
            if page is None:
                cells.append(results[store].get("error", "-"))
                continue
            worst = max(worst, page["p95_ms"])
            cells.append(f"{page['p50_ms']:.0f} / {page['p95_ms']:.0f} ({page['first_ms']:.0f}) {page['rows']}"
                         + ("" if page["status"] == 200 else f" HTTP {page['status']}"))
        rows.append((label, *cells))
    print(table(rows))
    print(f"{args.customers:,} customers, {args.touchpoints:,} touchpoints; {args.repeat} requests a page; "
          f"load average {load_before} before, {load_after} after; slowest p95 {worst:.0f} ms "
          f"(target <= {TARGET_MS} ms)")
    path = write_results("api", {"customers": args.customers, "touchpoints": args.touchpoints, "repeat": args.repeat,
                                  "load_average": [load_before, load_after], "results": results})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
