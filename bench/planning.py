"""Planning a campaign: select a segment over the whole base and write its planned deliveries.

    python -m bench.planning [--customers 1000000] [--touchpoints 10000000] [--stores sqlite,postgresql]

The data set is bench/dataset.py's (cached SQLite file under bench/results/; PostgreSQL gets a fresh
schema, loaded with COPY and dropped afterwards; SCRM_BENCH_POSTGRES_URL or the local test server).
Timed: the segment ``days_silent >= 30 and tag('vip') and not opted_out`` compiled by scrm.segments,
counted, then planned with the project's planner (``plan_many``: one INSERT ... SELECT) and committed.
Memory: tracemalloc peak and the process's ru_maxrss (the data set is generated in a child process).
Targets on SQLite: <= 30 s and <= 500 MB peak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import delete, func, select

from bench.common import ROOT, max_rss_mib, postgres_url, table, write_results
from bench.dataset import NOW, SEGMENT, drop_postgres, sqlite_path
from scrm import segments
from scrm.campaigns.planner import plan_many
from scrm.store.engine import make_engine, make_sessionmaker
from scrm.store.models import Customer, Delivery

CAMPAIGN = "bench_plan"


def ensure_sqlite(customers: int, touchpoints: int) -> str:
    path = sqlite_path(customers, touchpoints)
    if not path.exists():
        print(f"generating {path.name} (cached for later runs)...", flush=True)
        subprocess.run([sys.executable, "-m", "bench.dataset", "--customers", str(customers),
                        "--touchpoints", str(touchpoints)], check=True, cwd=ROOT)
    return f"sqlite+aiosqlite:///{path}"


def fill_postgres(schema: str, customers: int, touchpoints: int) -> None:
    print(f"loading PostgreSQL schema {schema}...", flush=True)
    subprocess.run([sys.executable, "-m", "bench.dataset", "--store", "postgresql", "--schema", schema,
                    "--customers", str(customers), "--touchpoints", str(touchpoints)], check=True, cwd=ROOT,
                   env=os.environ)


def on_each_store(stores: str, customers: int, touchpoints: int,
                  measure: Callable[[str, str | None], Awaitable[dict[str, Any]]],
                  sqlite_url: Callable[[], str] | None = None, fill: Callable[[str], None] | None = None
                  ) -> dict[str, Any]:
    """Run ``measure(url, schema)`` on the cached SQLite data set and on a fresh PostgreSQL schema
    (dropped afterwards); a store that cannot be reached is reported, not fatal. A benchmark with data
    of its own gives the SQLite store's URL (``sqlite_url``) and fills the new schema (``fill``)."""
    results: dict[str, Any] = {}
    for store in stores.split(","):
        if store == "sqlite":
            url = sqlite_url() if sqlite_url else ensure_sqlite(customers, touchpoints)
            results["sqlite"] = asyncio.run(measure(url, None))
        elif store == "postgresql":
            url, schema = postgres_url(), f"bench_{uuid.uuid4().hex[:10]}"
            try:
                if fill:
                    fill(schema)
                else:
                    fill_postgres(schema, customers, touchpoints)
                results["postgresql"] = asyncio.run(measure(url, schema))
            except Exception as exc:  # noqa: BLE001 - no server here: report it, keep the SQLite figures
                results["postgresql"] = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                with contextlib.suppress(Exception):  # the figures stand; a leftover schema is only clutter
                    asyncio.run(drop_postgres(url, schema))
    return results


async def plan(url: str, schema: str | None) -> dict[str, Any]:
    """Time one segment selection + planning run (after removing an earlier run's deliveries)."""
    engine = make_engine(url, schema)
    sessions = make_sessionmaker(engine)
    try:
        async with sessions() as session, session.begin():
            await session.execute(delete(Delivery).where(Delivery.campaign == CAMPAIGN))
        tracemalloc.start()
        start = time.perf_counter()
        async with sessions() as session, session.begin():
            where = segments.condition(SEGMENT, NOW)
            audience = int(await session.scalar(select(func.count()).select_from(Customer).where(where)) or 0)
            selected = time.perf_counter() - start
            planned = await plan_many(session, CAMPAIGN, 0, where, NOW, NOW)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        async with sessions() as session:
            stored = int(await session.scalar(select(func.count()).select_from(Delivery)
                                              .where(Delivery.campaign == CAMPAIGN)) or 0)
    finally:
        await engine.dispose()
    return {"audience": audience, "planned": planned, "stored": stored, "select_seconds": round(selected, 2),
            "total_seconds": round(elapsed, 2), "tracemalloc_peak_mib": round(peak, 1),
            "max_rss_mib": round(max_rss_mib(), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--touchpoints", type=int, default=10_000_000)
    parser.add_argument("--stores", default="sqlite,postgresql")
    args = parser.parse_args()
    results: dict[str, Any] = {"customers": args.customers, "touchpoints": args.touchpoints, "segment": SEGMENT}
    results.update(on_each_store(args.stores, args.customers, args.touchpoints, plan))
    write_results("planning", results)
    rows = [("store", "audience", "planned", "select s", "total s", "tracemalloc MiB", "ru_maxrss MiB")]
    for store in ("postgresql", "sqlite"):
        r = results.get(store)
        if r and "error" not in r:
            rows.append((store, str(r["audience"]), str(r["planned"]), f"{r['select_seconds']:.2f}",
                         f"{r['total_seconds']:.2f}", f"{r['tracemalloc_peak_mib']:.1f}", f"{r['max_rss_mib']:.0f}"))
        elif r:
            rows.append((store, r["error"], "", "", "", "", ""))
    print(table(rows))
    print(f"{args.customers:,} customers, {args.touchpoints:,} touchpoints; segment: {SEGMENT}")
    if "sqlite" in results:
        s = results["sqlite"]
        print(f"SQLite: {s['total_seconds']:.1f} s (target <= 30), peak {max(s['tracemalloc_peak_mib'], s['max_rss_mib']):.0f} "
              f"MiB (target <= 500)")


if __name__ == "__main__":
    main()
