"""The planning / reports data set: N customers and M touchpoints in the project's own schema.

    python -m bench.dataset --store sqlite --customers 1000000 --touchpoints 10000000

The schema comes from the Alembic migrations (``scrm.store.migrate.upgrade``); rows go in by bulk
insert (sqlite3 ``executemany`` with the journal off during the load, asyncpg COPY on PostgreSQL).
Deterministic (fixed seed). Besides customers (5% opted out, 40% silent for 30+ days), identities
and touchpoints (inbound messages and campaign messages), it holds 20 tags (``vip`` on 20% of the
customers), 2% of customers with a conversion, and a finished campaign ``bench_reports`` sent to
every 10th customer within the last 20 days (for the funnel). SQLite files are cached under
bench/results/ and reused when the sizes match.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from bench.common import RESULTS, postgres_url

TAGS = ["vip", "奶粉", "coupon-seeker", "price-sensitive", "high-intent", *(f"interest-{i}" for i in range(15))]
TAG_X = "vip"
CHUNK = 50_000
#: Fixed "now" for the data set, so cached files stay meaningful: the benchmarks use the same.
NOW = datetime(2026, 11, 1, 12, 0, 0)
SEGMENT = f"days_silent >= 30 and tag('{TAG_X}') and not opted_out"


def sqlite_path(customers: int, touchpoints: int) -> Path:
    return RESULTS / f"dataset-{customers}c-{touchpoints}t.db"


def _ts(dt: datetime, text: bool) -> Any:
    return dt.strftime("%Y-%m-%d %H:%M:%S.%f") if text else dt


class Generator:
    """Row tuples for each table, in insert order, streamed in chunks."""

    def __init__(self, customers: int, touchpoints: int, text_times: bool) -> None:
        self.n, self.t, self.text = customers, touchpoints, text_times
        rng = random.Random(20241127)
        # per customer: first seen (days ago), last inbound (days ago), opted out, has tag X
        self.first = [rng.uniform(30, 400) for _ in range(customers)]
        self.last = [rng.uniform(31, f) if rng.random() < 0.4 else rng.uniform(0, min(29.9, f))
                     for f in self.first]
        self.opted = [rng.random() < 0.05 for _ in range(customers)]
        self.rng = rng
        # a pool of timestamps (minute resolution over 400 days) so rows do not format each one
        self.pool = [_ts(NOW - timedelta(minutes=m), text_times) for m in range(0, 400 * 24 * 60, 7)]

    def at(self, days_ago: float) -> Any:
        return self.pool[min(len(self.pool) - 1, int(days_ago * 24 * 60 / 7))]

    def customers(self) -> Iterator[tuple[Any, ...]]:
        for i in range(self.n):
            yield (i + 1, f"客户{i + 1}", "nurture", self.opted[i], "wechat:brand", self.at(self.first[i]),
                   self.at(self.last[i]), self.at(self.last[i]), "{}")

    def identities(self) -> Iterator[tuple[Any, ...]]:
        for i in range(self.n):
            channel = "wechat" if i % 3 else "telegram"
            yield (i + 1, i + 1, channel, "brand", f"o{i + 1}", self.at(self.first[i]))

    def tags(self) -> Iterator[tuple[Any, ...]]:
        for i, name in enumerate(TAGS):
            yield (i + 1, name)

    def customer_tags(self) -> Iterator[tuple[Any, ...]]:
        rng, row = random.Random(7), 0
        for i in range(self.n):
            chosen = {1} if rng.random() < 0.2 else set()
            chosen |= {rng.randint(2, len(TAGS)) for _ in range(rng.randint(0, 2))}
            for tag in sorted(chosen):
                row += 1
                yield (row, i + 1, tag, "keyword", None, 1.0, self.at(self.first[i]), None)

    def touchpoints(self) -> Iterator[tuple[Any, ...]]:
        """``t`` rows spread over the customers: inbound text between first seen and last inbound,
        with every customer's last one at their last inbound time; one in ten is a campaign message."""
        rng, row = random.Random(11), 0
        per, extra = divmod(self.t, self.n)
        for i in range(self.n):
            count = per + (1 if i < extra else 0)
            first, last = self.first[i], self.last[i]
            channel = "wechat" if i % 3 else "telegram"
            for k in range(count):
                row += 1
                ago = last if k == count - 1 else rng.uniform(last, first)
                if k % 10 == 9:
                    yield (row, i + 1, channel, "brand", "out", "campaign_message", None, "新品上架", "{}",
                           "weekly", self.at(ago))
                else:
                    yield (row, i + 1, channel, "brand", "in", "text", f"m{row}", "请问奶粉多少钱", "{}", None,
                           self.at(ago))

    def conversions(self) -> Iterator[tuple[Any, ...]]:
        rng, row = random.Random(13), 0
        for i in range(self.n):
            if rng.random() < 0.02:
                row += 1
                yield (row, i + 1, "order", f"o-{row}", round(rng.uniform(20, 500), 2), "CNY", None, None,
                       self.at(rng.uniform(0, 25)))

    def deliveries(self) -> Iterator[tuple[Any, ...]]:
        """The finished ``bench_reports`` campaign: every 10th customer, 90% sent."""
        rng = random.Random(17)
        for row, i in enumerate(range(0, self.n, 10), start=1):
            sent = rng.random() < 0.9
            ago = rng.uniform(1, 20)
            yield (row, "bench_reports", 0, f"c{i + 1}", "", i + 1, "wechat" if i % 3 else "telegram", "brand",
                   f"o{i + 1}", "A" if i % 20 else "B", "sent" if sent else "skipped",
                   None if sent else "frequency_cap", 1, self.at(ago), self.at(ago + 0.01), self.at(ago))


TABLES: dict[str, tuple[str, ...]] = {
    "customers": ("id", "display_name", "stage", "opted_out", "acquisition_source", "first_seen_at", "last_seen_at",
                  "last_inbound_at", "attributes"),
    "identities": ("id", "customer_id", "channel", "account", "external_id", "created_at"),
    "tags": ("id", "name"),
    "customer_tags": ("id", "customer_id", "tag_id", "source", "source_detail", "score", "added_at", "expires_at"),
    "touchpoints": ("id", "customer_id", "channel", "account", "direction", "kind", "platform_msg_id", "text",
                    "payload", "campaign", "created_at"),
    "conversions": ("id", "customer_id", "kind", "order_id", "amount", "currency", "coupon_code", "campaign",
                    "created_at"),
    "deliveries": ("id", "campaign", "step", "target", "occurrence", "customer_id", "channel", "account",
                   "external_id", "variant", "status", "reason", "attempts", "due_at", "created_at", "finished_at"),
}


def _chunks(rows: Iterator[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def _migrate(url: str, schema: str | None = None) -> None:
    from scrm.store.engine import make_engine
    from scrm.store.migrate import upgrade

    engine = make_engine(url, schema)
    await upgrade(engine)
    await engine.dispose()


def build_sqlite(customers: int, touchpoints: int) -> Path:
    """The cached SQLite file for these sizes, generated when missing."""
    path = sqlite_path(customers, touchpoints)
    if path.exists():
        return path
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    asyncio.run(_migrate(f"sqlite+aiosqlite:///{partial}"))
    gen = Generator(customers, touchpoints, text_times=True)
    conn = sqlite3.connect(partial)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    for table, columns in TABLES.items():
        start = time.perf_counter()
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        n = 0
        for chunk in _chunks(getattr(gen, table)()):
            conn.executemany(sql, chunk)
            n += len(chunk)
        conn.commit()
        print(f"  sqlite {table}: {n} rows in {time.perf_counter() - start:.1f}s", flush=True)
    conn.execute("ANALYZE")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    partial.rename(path)
    return path


async def build_postgres(url: str, schema: str, customers: int, touchpoints: int) -> None:
    """A fresh schema on PostgreSQL (the caller drops it), loaded with COPY."""
    import asyncpg
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    admin = create_async_engine(url)
    async with admin.begin() as conn:
        await conn.execute(text(f"CREATE SCHEMA {schema}"))
    await admin.dispose()
    await _migrate(url, schema)
    gen = Generator(customers, touchpoints, text_times=False)
    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    try:
        for table, columns in TABLES.items():
            start = time.perf_counter()
            n = 0
            for chunk in _chunks(getattr(gen, table)()):
                await conn.copy_records_to_table(table, records=chunk, columns=columns, schema_name=schema)
                n += len(chunk)
            print(f"  postgresql {table}: {n} rows in {time.perf_counter() - start:.1f}s", flush=True)
        for table in TABLES:  # ids were given explicitly: move the sequences past them
            await conn.execute(f"SELECT setval(pg_get_serial_sequence('{schema}.{table}', 'id'), "
                               f"(SELECT coalesce(max(id), 0) + 1 FROM {schema}.{table}), false)")
        await conn.execute(f"ANALYZE {', '.join(f'{schema}.{t}' for t in TABLES)}")
    finally:
        await conn.close()


async def drop_postgres(url: str, schema: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    admin = create_async_engine(url)
    async with admin.begin() as conn:
        await conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    await admin.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--touchpoints", type=int, default=10_000_000)
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--schema", help="PostgreSQL schema to create and fill")
    args = parser.parse_args()
    if args.store == "sqlite":
        print(build_sqlite(args.customers, args.touchpoints))
    else:
        asyncio.run(build_postgres(postgres_url(), args.schema, args.customers, args.touchpoints))
