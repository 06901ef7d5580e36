"""Nightly churn / CLV scoring over the whole base (issue 12, "Speed").

    python -m bench.scoring [--customers 1000000] [--conversions 10000000] [--method auto|rules]

Data set: N customers and M orders in the project's own schema (Alembic migrations), spread over the
two years before bench.dataset.NOW with a realistic skew: 45% one-time buyers, the rest repeat buyers
with a log-normal spread of purchase counts (a few buy very often), some of whom stopped buying at a
random point (so there is churn to find). Generated in a child process by sqlite3 ``executemany``
in one transaction (journal off, synchronous off; the secondary indexes are dropped during the load
and re-created from their own schema SQL), cached under bench/results/ and reused when the sizes match.

Timed: ``scrm.loyalty.churn.score(session, NOW, method, min_repeat=1, horizon_days=90)``, the call the
nightly job makes, through ``make_engine`` / ``make_sessionmaker`` in one transaction, committed;
loyalty accounts are removed first so every run is a "first night" (accounts inserted, then scored).
Two runs: one plain (its wall time and the process's ru_maxrss are the headline), one under
tracemalloc (Python heap peak; tracemalloc slows it, so its time is only shown).
Targets on SQLite: <= 60 s and <= 1 GB peak.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, max_rss_mib, table, write_results
from bench.dataset import NOW, _migrate

DAYS = 730
ONE_TIME = 0.45
CHUNK = 200_000
SEED = 20261101


def db_path(customers: int, conversions: int) -> Path:
    return RESULTS / f"scoring-{customers}c-{conversions}v.db"


def _counts(rng: Any, n: int, m: int) -> Any:
    """Orders per customer: every customer buys once (or the first ``m`` when m < n); 45% stop there,
    the others share the rest log-normally (at least two orders each)."""
    import numpy as np

    counts = np.zeros(n, dtype=np.int64)
    if m <= n:
        counts[:m] = 1
        return counts
    counts[:] = 1
    repeat = np.flatnonzero(rng.random(n) >= ONE_TIME)
    if len(repeat) == 0:
        repeat = np.arange(n)
    extra = m - n
    base = min(extra // len(repeat), 1)
    counts[repeat] += base
    rest = extra - base * len(repeat)
    weights = rng.lognormal(0.0, 1.2, len(repeat))
    counts[repeat] += rng.multinomial(rest, weights / weights.sum())
    return counts


def generate(customers: int, conversions: int) -> Path:
    """The cached store for these sizes, generated when missing."""
    import numpy as np

    path = db_path(customers, conversions)
    if path.exists():
        return path
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    asyncio.run(_migrate(f"sqlite+aiosqlite:///{partial}"))
    rng = np.random.default_rng(SEED)
    minutes = DAYS * 24 * 60
    # timestamps at minute resolution, in SQLAlchemy's SQLite text format (index = minutes before NOW)
    start = time.perf_counter()
    pool = [(NOW - timedelta(minutes=int(k))).strftime("%Y-%m-%d %H:%M:%S.%f") for k in range(minutes + 1)]
    counts = _counts(rng, customers, conversions)
    first = rng.integers(0, minutes, customers)  # first purchase, minutes ago
    # repeat buyers: half still buying, the others stopped somewhere between their first order and now
    stopped = rng.random(customers) < 0.5
    end = np.where(stopped, (first * rng.random(customers)).astype(np.int64), 0)
    print(f"  plan: {time.perf_counter() - start:.1f}s", flush=True)

    conn = sqlite3.connect(partial)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
                           "AND tbl_name IN ('customers', 'conversions')").fetchall()
    for name, _sql in indexes:
        conn.execute(f"DROP INDEX {name}")
    conn.execute("BEGIN")

    start = time.perf_counter()
    sql = ("INSERT INTO customers (id, display_name, stage, opted_out, acquisition_source, first_seen_at, "
           "last_seen_at, last_inbound_at, attributes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
    for lo in range(0, customers, CHUNK):
        hi = min(lo + CHUNK, customers)
        f = first[lo:hi].tolist()
        e = end[lo:hi].tolist()
        conn.executemany(sql, [(i + 1, f"客户{i + 1}", "nurture", False, "wechat:brand", pool[a], pool[b], pool[b], "{}")
                               for i, a, b in zip(range(lo, hi), f, e)])
    print(f"  customers: {customers} rows in {time.perf_counter() - start:.1f}s", flush=True)

    start = time.perf_counter()
    sql = ("INSERT INTO conversions (id, customer_id, kind, order_id, amount, currency, coupon_code, campaign, "
           "created_at) VALUES (?, ?, 'order', ?, ?, 'CNY', NULL, NULL, ?)")
    # per customer a typical basket (log-normal around 150 CNY), each order varying around it
    basket = rng.lognormal(np.log(150.0), 0.6, customers)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    row = 0
    c_lo = 0
    while c_lo < customers:  # chunks of whole customers
        c_hi = int(np.searchsorted(offsets, offsets[c_lo] + CHUNK, side="right")) - 1
        c_hi = max(c_hi, c_lo + 1)
        c_hi = min(c_hi, customers)
        cnt = counts[c_lo:c_hi]
        total = int(cnt.sum())
        if total:
            owner = np.repeat(np.arange(c_lo, c_hi), cnt)
            f, e = first[owner], end[owner]
            ago = e + (rng.random(total) * (f - e)).astype(np.int64)
            starts = offsets[c_lo:c_hi] - offsets[c_lo]
            ago[starts[cnt > 0]] = first[c_lo:c_hi][cnt > 0]  # the first order at the first purchase time
            amount = np.round(basket[owner] * rng.lognormal(0.0, 0.3, total), 2)
            ids = range(row + 1, row + total + 1)
            conn.executemany(sql, [(i, c + 1, f"o{i:010d}", a, pool[t]) for i, c, a, t in
                                   zip(ids, (owner).tolist(), amount.tolist(), ago.tolist())])
            row += total
        c_lo = c_hi
    print(f"  conversions: {row} rows in {time.perf_counter() - start:.1f}s", flush=True)
    start = time.perf_counter()
    for _name, index_sql in indexes:
        conn.execute(index_sql)
    conn.commit()
    conn.execute("ANALYZE")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    print(f"  indexes + analyze: {time.perf_counter() - start:.1f}s", flush=True)
    partial.rename(path)
    return path


def ensure(customers: int, conversions: int) -> Path:
    path = db_path(customers, conversions)
    if not path.exists():
        print(f"generating {path.name} (cached for later runs)...", flush=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.scoring", "--generate-only", "--customers", str(customers),
                        "--conversions", str(conversions)], check=True, cwd=ROOT)
        print(f"generated in {time.perf_counter() - started:.0f}s", flush=True)
    return path


async def run(url: str, method: str, traced: bool) -> dict[str, Any]:
    from sqlalchemy import delete, func, select

    from scrm.loyalty import churn
    from scrm.store.engine import make_engine, make_sessionmaker
    from scrm.store.models import LoyaltyAccount

    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    try:
        async with sessions() as session, session.begin():
            await session.execute(delete(LoyaltyAccount))
        gc.collect()
        if traced:
            tracemalloc.start()
        start = time.perf_counter()
        async with sessions() as session, session.begin():
            result = await churn.score(session, NOW, method, 1, 90, tier="")
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] / 2**20 if traced else None
        if traced:
            tracemalloc.stop()
        rss = max_rss_mib()
        async with sessions() as session:
            by_method = dict((await session.execute(
                select(LoyaltyAccount.churn_method, func.count()).group_by(LoyaltyAccount.churn_method))).all())
    finally:
        await engine.dispose()
    return {"seconds": round(elapsed, 2), "tracemalloc_peak_mib": None if peak is None else round(peak, 1),
            "max_rss_mib": round(rss, 1), "scored": result.scored, "by_model": result.by_model,
            "method": result.method, "params": result.params, "stored_by_method": by_method}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--conversions", type=int, default=10_000_000)
    parser.add_argument("--method", choices=("auto", "rules"), default="auto")
    parser.add_argument("--no-traced", action="store_true", help="skip the second run under tracemalloc")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate_only:
        print(generate(args.customers, args.conversions))
        return
    path = ensure(args.customers, args.conversions)
    url = f"sqlite+aiosqlite:///{path}"
    from scrm.loyalty import churn

    plain = asyncio.run(run(url, args.method, traced=False))
    traced = None if args.no_traced else asyncio.run(run(url, args.method, traced=True))
    results: dict[str, Any] = {
        "customers": args.customers, "conversions": args.conversions, "requested_method": args.method,
        "lifetimes_installed": churn.HAS_LIFETIMES, "scipy_installed": churn.HAS_SCIPY,
        "plain": plain, "traced": traced,
        "headline": {"seconds": plain["seconds"],
                     "peak_mib": max(plain["max_rss_mib"], (traced or {}).get("tracemalloc_peak_mib") or 0),
                     "target_seconds": 60, "target_mib": 1024},
    }
    head = results["headline"]
    head["met"] = head["seconds"] <= 60 and head["peak_mib"] <= 1024
    write_results("scoring", results)
    rows = [("run", "method", "scored", "by model", "seconds", "tracemalloc MiB", "ru_maxrss MiB")]
    for name, r in (("plain", plain), ("tracemalloc", traced)):
        if r:
            rows.append((name, r["method"], str(r["scored"]), str(r["by_model"]), f"{r['seconds']:.2f}",
                         "-" if r["tracemalloc_peak_mib"] is None else f"{r['tracemalloc_peak_mib']:.1f}",
                         f"{r['max_rss_mib']:.0f}"))
    print(table(rows))
    print(f"{args.customers:,} customers, {args.conversions:,} conversions over {DAYS} days; "
          f"requested method {args.method} (lifetimes installed: {churn.HAS_LIFETIMES}, scipy: {churn.HAS_SCIPY})")
    print(f"nightly scoring: {head['seconds']:.1f} s, {head['peak_mib']:.0f} MB peak (targets <= 60 s, <= 1 GB)"
          f"{'' if head['met'] else '  -- NOT MET'}")


if __name__ == "__main__":
    main()
