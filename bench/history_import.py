"""Order history import: ``scrm conversions import`` of a million orders with their line items.

    python -m bench.history_import [--customers 100000] [--orders 1000000] [--stores sqlite,postgresql]

The orders file (JSON Lines, deterministic: orders in date order over three years, customers drawn
with a skew, 1-4 line items each from 500 SKUs, the customer named as ``#id``, ``console:local:uN``
or ``console:uN`` in turn) is generated once and cached under bench/results/. Each store gets fresh
customers (and their console identities) through the migrations' schema: a new SQLite file, or a
fresh PostgreSQL schema (SCRM_BENCH_POSTGRES_URL or the local test server) dropped afterwards
(bench.planning's ``on_each_store``). Timed: the real command, ``python -m scrm conversions import
FILE`` in a child process (stderr no terminal: no progress bar), then again on the same file (every
order already there). Peak RSS and CPU time are the child's own (``wait4``), beside the load average
when it ended (the machine may be shared). The stored conversions, loyalty marks and items are
counted afterwards. Target: >= 20,000 orders/s on SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, text

from bench.common import RESULTS, ROOT, postgres_url, table, write_results
from bench.planning import on_each_store
from scrm.store.engine import make_engine, make_sessionmaker
from scrm.store.migrate import upgrade
from scrm.store.models import Conversion, ConversionItem, Customer, Identity, LoyaltySeenConversion

NOW = datetime(2026, 11, 1, 12, 0, 0)
SKUS = [(f"SKU-{i:04d}", f"商品{i}", round(9.9 + (i * 37) % 300, 1)) for i in range(500)]


def orders_path(customers: int, orders: int) -> Path:
    return RESULTS / f"history-{customers}c-{orders}o.jsonl"


def write_orders(path: Path, customers: int, orders: int) -> None:
    """The orders file, written to a temporary name first so an interrupted run leaves no half file."""
    rng = random.Random(20261205)
    start = NOW - timedelta(days=3 * 365)
    step = (NOW - start) / orders
    partial = path.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as fh:
        for n in range(orders):
            c = int(customers * rng.random() ** 2) + 1  # a few customers buy much more often
            ref = (f"#{c}", f"console:local:u{c}", f"console:u{c}")[n % 3]
            items = []
            for sku, name, price in rng.sample(SKUS, rng.randint(1, 4)):
                items.append({"sku": sku, "name": name, "quantity": rng.randint(1, 3), "price": price})
            amount = round(sum(i["quantity"] * i["price"] for i in items), 2)
            when = start + step * n + timedelta(seconds=rng.randint(0, 59))
            fh.write(json.dumps({"order_id": f"S{n % 7}-{n:09d}", "customer": ref, "date": when.isoformat(),
                                 "amount": amount, "currency": "CNY", "items": items}, ensure_ascii=False) + "\n")
    partial.rename(path)


def ensure_orders(customers: int, orders: int) -> Path:
    path = orders_path(customers, orders)
    if not path.exists():
        print(f"generating {path.name} (cached for later runs)...", flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_orders(path, customers, orders)
    return path


async def create_customers(url: str, schema: str | None, customers: int) -> None:
    """The schema (a new PostgreSQL one first), then customers 1..N with console identities u1..uN, in
    chunks of executemany."""
    if schema:
        admin = make_engine(url)
        async with admin.begin() as conn:
            await conn.execute(text(f"CREATE SCHEMA {schema}"))
        await admin.dispose()
    engine = make_engine(url, schema)
    try:
        await upgrade(engine)
        sessions = make_sessionmaker(engine)
        for first in range(1, customers + 1, 20_000):
            ids = range(first, min(first + 20_000, customers + 1))
            async with sessions() as session, session.begin():
                await session.execute(insert(Customer.__table__), [
                    {"id": i, "display_name": f"u{i}", "stage": "retention", "opted_out": False,
                     "first_seen_at": NOW - timedelta(days=1200), "last_seen_at": NOW, "attributes": {}}
                    for i in ids])
                await session.execute(insert(Identity.__table__), [
                    {"customer_id": i, "channel": "console", "account": "local", "external_id": f"u{i}",
                     "created_at": NOW - timedelta(days=1200)} for i in ids])
        if schema:
            # As autovacuum would within a minute of the load: unanalyzed, PostgreSQL takes the new
            # identities for one row and looks a chunk's references up in a nested loop (~6 s a chunk).
            async with engine.begin() as conn:
                await conn.execute(text("ANALYZE customers, identities"))
    finally:
        await engine.dispose()


async def stored(url: str, schema: str | None) -> dict[str, int]:
    engine = make_engine(url, schema)
    try:
        async with make_sessionmaker(engine)() as session:
            return {name: int(await session.scalar(select(func.count()).select_from(model)) or 0)
                    for name, model in (("conversions", Conversion), ("seen", LoyaltySeenConversion),
                                        ("items", ConversionItem))}
    finally:
        await engine.dispose()


def run_import(folder: Path, orders: Path, batch: int | None) -> dict[str, Any]:
    """``scrm conversions import`` in a child process: wall time, the child's peak RSS, its summary line,
    and the load average over the last minute when it ended (the machine is shared)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "scrm", "-c", str(folder / "config.toml"), "conversions", "import", str(orders),
            *(["--batch", str(batch)] if batch else [])]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        child = subprocess.Popen(args, cwd=folder, env=env, stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        elapsed = time.perf_counter() - start
        out.seek(0)
        summary = out.read().decode("utf-8", "replace").strip()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"scrm conversions import exited {os.waitstatus_to_exitcode(status)}: {summary}")
    return {"seconds": round(elapsed, 1), "max_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "summary": summary,
            "load_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--orders", type=int, default=1_000_000)
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--batch", type=int, help="orders per transaction (the command's --batch; default: its own)")
    args = parser.parse_args()
    path = ensure_orders(args.customers, args.orders)
    results: dict[str, Any] = {"customers": args.customers, "orders": args.orders, "batch": args.batch,
                               "file_mib": round(path.stat().st_size / 2**20, 1),
                               "load_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(dir=RESULTS) as tmp:
        folder = Path(tmp)

        def sqlite_url() -> str:
            url = f"sqlite+aiosqlite:///{folder / 'history.db'}"
            asyncio.run(create_customers(url, None, args.customers))
            return url

        def fill(schema: str) -> None:
            asyncio.run(create_customers(postgres_url(), schema, args.customers))

        async def measure(url: str, schema: str | None) -> dict[str, Any]:
            """Import the file, then again (every order already there), and count what is stored."""
            store = "postgresql" if schema else "sqlite"
            (folder / "config.toml").write_text(
                f'[store]\nurl = "{url}"\n' + (f'schema_name = "{schema}"\n' if schema else "")
                + "[channels.console.local]\n", "utf-8")
            print(f"{store}: importing {args.orders:,} orders...", flush=True)
            first = await asyncio.to_thread(run_import, folder, path, args.batch)
            print(f"{store}: {first['summary']} in {first['seconds']} s; importing them again...", flush=True)
            again = await asyncio.to_thread(run_import, folder, path, args.batch)
            counts = await stored(url, schema)
            if counts["conversions"] != args.orders or counts["seen"] != args.orders:
                raise RuntimeError(f"{store}: {counts} stored for {args.orders} orders")
            return {"first": first, "again": again, "stored": counts,
                    "orders_per_second": round(args.orders / first["seconds"])}

        results.update(on_each_store(args.stores, args.customers, 0, measure, sqlite_url, fill))
    if "error" in results.get("sqlite", {}):
        raise SystemExit(results["sqlite"]["error"])
    write_results("history_import", results)
    rows = [("store", "run", "orders/s", "seconds", "CPU s", "peak RSS MiB", "load after", "conversions", "items")]
    for store in ("postgresql", "sqlite"):
        r = results.get(store)
        if r and "error" not in r:
            for run, key in (("import", "first"), ("again", "again")):
                rows.append((store, run, f"{args.orders / r[key]['seconds']:,.0f}", f"{r[key]['seconds']:.1f}",
                             f"{r[key]['cpu_seconds']:.1f}", f"{r[key]['max_rss_mib']:.0f}",
                             f"{r[key]['load_after']:.2f}", f"{r['stored']['conversions']:,}",
                             f"{r['stored']['items']:,}"))
        elif r:
            rows.append((store, r["error"][:80], "", "", "", "", "", "", ""))
    print(table(rows))
    print(f"{args.orders:,} orders ({results['file_mib']} MiB of JSON Lines) for {args.customers:,} customers, "
          f"{args.batch or 'the default number of'} orders a transaction; {os.cpu_count()} CPUs, load average "
          f"{results['load_before']} before")
    if "sqlite" in results:
        s = results["sqlite"]
        print(f"SQLite: {s['orders_per_second']:,} orders/s (target >= 20,000), peak RSS "
              f"{s['first']['max_rss_mib']:.0f} MiB, load average {s['first']['load_after']:.2f}")


if __name__ == "__main__":
    main()
