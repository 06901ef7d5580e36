"""The console's Customers page over a million customers, on SQLite and PostgreSQL.

    python -m bench.console_customers [--customers 1000000] [--touchpoints 1000000] [--stores sqlite,postgresql]

Times the functions behind the page (scrm/console/customers.py): reading the search box
(:func:`search`) and one page of 50 results (:func:`result_page`: the page by id, then the page's
identities and tags), for each kind of search, on the first page and on a page far down the result
(its cursor just above the result's 1,000th-smallest id, so the page walks nearly the whole index
before it: what OFFSET would cost every time, and what "by id" avoids for the pages in between).
Then the bulk-tag confirmation's count, a bulk tag of a 7% result (one INSERT ... SELECT, rolled back),
and the CSV's first 100,000 rows, read a batch at a time by id as the page streams them. Each figure
is the second of two runs (warm cache), the first beside it.

The data set is bench/dataset.py's: names 客户<n>, 20 tags (vip on 20%), identities wechat:o<n> /
telegram:o<n>, no phone numbers (a phone search is the keyed-hash index's look-up of a number no one has).
"""

from __future__ import annotations

import argparse
import io
import time
from types import SimpleNamespace
from typing import Any

from sqlalchemy import select

from bench.common import table, write_results
from bench.dataset import NOW, SEGMENT
from bench.planning import on_each_store
from scrm import exporter
from scrm.console.customers import CSV_BATCH, _bulk_counts, result_page, search
from scrm.keyring import LOOKUP_ID, Keyring, new_key_entry
from scrm.store.engine import make_engine, make_sessionmaker, reading
from scrm.store.models import Customer
from scrm.tagging import tag_where

PAGE = 50
SEARCHES = {
    "all customers": "",
    "name, rare (客户777777)": "客户777777",
    "name, common (客户1)": "客户1",
    "#id": "#500000",
    "channel:id": "wechat:o500000",
    "phone (no one)": "13812345678",
    "tag:vip (20%)": "tag:vip",
    "tag:interest-3 (~7%)": "tag:interest-3",
    "stage:nurture": "stage:nurture",
    "expression": SEGMENT,
}


def stand_in() -> Any:
    """What search() reads of the service: channels and segments from the config, the keyring."""
    keyring = Keyring.parse(f"{new_key_entry(LOOKUP_ID)}\n{new_key_entry('k1')}")
    config = SimpleNamespace(channels={"wechat": {"brand": {}}, "telegram": {"brand": {}}}, segments={})
    return SimpleNamespace(config=config, keyring=keyring, campaigns={}, paused=set())


async def timed(fn: Any) -> tuple[float, float, Any]:
    """(first run, second run) in ms, and the second's result."""
    out = []
    for _ in range(2):
        start = time.perf_counter()
        result = await fn()
        out.append(((time.perf_counter() - start) * 1000, result))
    return out[0][0], out[1][0], out[1][1]


async def measure(url: str, schema: str | None) -> dict[str, Any]:
    engine = make_engine(url, schema)
    sessions = make_sessionmaker(engine)
    svc = stand_in()
    figures: dict[str, Any] = {"pages": {}}
    try:
        for label, text in SEARCHES.items():
            async def first_page(text: str = text) -> int:
                async with reading(sessions) as session:
                    found = await search(session, svc, text, NOW)
                    rows, _ = await result_page(session, found.where, PAGE, None, None, "Asia/Shanghai")
                    return len(rows)

            async def deep_page(text: str = text) -> int:
                async with reading(sessions) as session:
                    found = await search(session, svc, text, NOW)
                    low = (await session.scalars(select(Customer.id).where(found.where).order_by(Customer.id)
                                                 .offset(999).limit(1))).first()
                start = time.perf_counter()
                async with reading(sessions) as session:
                    found = await search(session, svc, text, NOW)
                    rows, _ = await result_page(session, found.where, PAGE, low, None, "Asia/Shanghai")
                deep_ms.append((time.perf_counter() - start) * 1000)
                return len(rows)

            cold, warm, n = await timed(first_page)
            deep_ms: list[float] = []
            await deep_page()
            await deep_page()
            figures["pages"][label] = {"first_page_ms": round(warm, 1), "first_page_cold_ms": round(cold, 1),
                                       "deep_page_ms": round(deep_ms[1], 1) if deep_ms else None, "rows": n}

        async def count() -> tuple[int, int]:
            async with reading(sessions) as session:
                found = await search(session, svc, "tag:vip", NOW)
                return await _bulk_counts(session, found.where, "interest-3")

        cold, warm, counted = await timed(count)
        figures["bulk_count_tag_vip_ms"] = round(warm, 1)
        figures["bulk_count_result"] = counted

        async def bulk_tag() -> int:
            async with sessions() as session:  # rolled back: the cached data set stays as it was
                await session.begin()
                found = await search(session, svc, "tag:interest-3", NOW)
                changed = await tag_where(svc, session, found.where, "bench-bulk", True, "console:bench", NOW)
                await session.rollback()
                return changed

        cold, warm, changed = await timed(bulk_tag)
        figures["bulk_tag_ms"], figures["bulk_tag_customers"] = round(warm, 1), changed

        async def csv_rows(limit: int = 100_000) -> int:
            buffer = io.StringIO()
            writer = exporter.Writer(buffer, "csv", exporter.customer_columns(with_personal=False))
            query = exporter.customers_query(None).limit(CSV_BATCH)
            last = written = 0
            while written < limit:
                async with reading(sessions) as session:
                    rows = (await session.execute(query.where(Customer.id > last))).all()
                for row in rows:
                    writer.write(exporter.customer_record(row))
                written += len(rows)
                buffer.seek(0)
                buffer.truncate()
                if len(rows) < CSV_BATCH:
                    break
                last = rows[-1].id
            return written

        cold, warm, written = await timed(csv_rows)
        figures["csv_100k_rows_ms"] = round(warm, 1)
        figures["csv_rows"] = written
    finally:
        await engine.dispose()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--touchpoints", type=int, default=1_000_000)
    parser.add_argument("--stores", default="sqlite,postgresql")
    args = parser.parse_args()
    results = on_each_store(args.stores, args.customers, args.touchpoints, measure)
    rows: list[tuple[str, ...]] = [("search", *(f"{s} first / deep (ms)" for s in results))]
    for label in SEARCHES:
        cells = []
        for store in results.values():
            page = store.get("pages", {}).get(label) if "error" not in store else None
            cells.append(f"{page['first_page_ms']} / {page['deep_page_ms']}" if page else store.get("error", "-"))
        rows.append((label, *cells))
    for key in ("bulk_count_tag_vip_ms", "bulk_tag_ms", "csv_100k_rows_ms"):
        rows.append((key, *(str(store.get(key, "-")) for store in results.values())))
    print(table(rows))
    path = write_results("console_customers", {"customers": args.customers, "touchpoints": args.touchpoints,
                                               "page_size": PAGE, "results": results})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
