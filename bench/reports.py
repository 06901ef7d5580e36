"""Reports: ``/funnel`` and ``/report 30d`` over the planning data set, on SQLite and PostgreSQL.

    python -m bench.reports [--customers 1000000] [--touchpoints 10000000] [--stores sqlite,postgresql]

Times the functions behind the staff commands in scrm/reports.py: ``funnel`` for the data set's
finished campaign ``bench_reports`` (sent to every 10th customer), and for ``/report 30d`` the
summary (this period and the one before) plus the daily trend the chart draws. Each is run twice;
the second (warm cache) run is reported, the first beside it. Targets: <= 2 s on PostgreSQL,
<= 5 s on SQLite.

Before that, the store is migrated and the daily report rollups are built from scratch the way the
service's job builds them (``scrm.rollups.build`` as of the data set's "now"); that time is its own
figure: a running service pays it once, then about a day's worth per day.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.common import table, write_results
from bench.dataset import NOW
from bench.planning import on_each_store
from scrm import reports, rollups
from scrm.store.engine import make_engine, make_sessionmaker
from scrm.store.migrate import upgrade

TIMEZONE = "Asia/Shanghai"


async def measure(url: str, schema: str | None) -> dict[str, Any]:
    engine = make_engine(url, schema)
    sessions = make_sessionmaker(engine)
    out: dict[str, Any] = {}
    try:
        await upgrade(engine)
        async with sessions() as session, session.begin():
            await rollups.forget_all(session)  # a cached data set keeps the days an earlier run built
        start = time.perf_counter()
        days = await rollups.build(sessions, TIMEZONE, NOW)
        out["rollups"] = {"days": days, "seconds": round(time.perf_counter() - start, 1)}
        for name in ("funnel", "report_30d"):
            times = []
            for _ in range(2):
                start = time.perf_counter()
                async with sessions() as session:
                    if name == "funnel":
                        f = await reports.funnel(session, "bench_reports", 7)
                        assert f is not None
                        detail = {"audience": f.total.audience, "delivered": f.total.delivered,
                                  "replied": f.total.replied, "conversions": f.total.conversions}
                    else:
                        period = reports.parse_period("30d", NOW, TIMEZONE)
                        assert period is not None
                        s = await reports.summary(session, period, attribution_days=7)
                        await reports.daily_trend(session, period, TIMEZONE)
                        detail = {"messages_in": s.current.messages_in, "active": s.current.active_customers,
                                  "conversions": s.current.conversions}
                times.append(time.perf_counter() - start)
            out[name] = {"cold_seconds": round(times[0], 2), "seconds": round(times[1], 2), **detail}
    finally:
        await engine.dispose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--touchpoints", type=int, default=10_000_000)
    parser.add_argument("--stores", default="sqlite,postgresql")
    args = parser.parse_args()
    results: dict[str, Any] = {"customers": args.customers, "touchpoints": args.touchpoints}
    results.update(on_each_store(args.stores, args.customers, args.touchpoints, measure))
    write_results("reports", results)
    rows = [("store", "command", "first run s", "second run s", "target s")]
    for store, target in (("postgresql", 2.0), ("sqlite", 5.0)):
        r = results.get(store)
        if r and "error" in r:
            rows.append((store, r["error"], "", "", ""))
        elif r:
            built = r["rollups"]
            rows.append((store, f"build rollups ({built['days']} days)", f"{built['seconds']:.1f}", "", ""))
            for name, label in (("funnel", "/funnel bench_reports"), ("report_30d", "/report 30d")):
                rows.append((store, label, f"{r[name]['cold_seconds']:.2f}", f"{r[name]['seconds']:.2f}", f"{target:g}"))
    print(table(rows))
    print(f"{args.customers:,} customers, {args.touchpoints:,} touchpoints")
    worst = {s: max(results[s]["funnel"]["seconds"], results[s]["report_30d"]["seconds"])
             for s in ("sqlite", "postgresql") if s in results and "error" not in results[s]}
    print("slowest command: " + ", ".join(f"{s} {t:.2f} s (target <= {2 if s == 'postgresql' else 5})"
                                          for s, t in worst.items()))


if __name__ == "__main__":
    main()
