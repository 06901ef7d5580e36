"""The console's pages over the bench data set, served by the real application, on SQLite and PostgreSQL.

    python -m bench.console [--customers 1000000] [--touchpoints 10000000] [--stores sqlite,postgresql]
                            [--repeat 20] [--pages dashboard,customers]

The data set is bench/dataset.py's (cached SQLite file under bench/results/; PostgreSQL gets a fresh
schema, loaded with COPY and dropped afterwards). Its daily report rollups are built first as the
service's job builds them (days already built in the cached file are kept). Then the application
``scrm run`` serves (:func:`scrm.web.create_app`, role ``web``: no planner or outbox at work; its
clock at the data set's "now") listens on a loopback port with the demo config (its segments,
coupon pools and campaigns, plus ``bench_reports``, the data set's finished campaign sent to every
10th customer), and a staff member (an admin, for the audit log) signs in through the sign-in form.

Each page is requested ``--repeat`` times, one request at a time. Server time is the handler's own
time, measured by a middleware around every handler of the application (the console's sign-in and
role checks and the template included; HTTP parsing and the socket not). The first request of each
page is shown apart (no snapshot of its figures yet: it reads them, cold) and counted in p50/p95
(nearest rank); half-way, the service's clock moves on a minute, so the views after it are served
beside the background refresh of the snapshots they show. "stall" is the longest the event loop
(shared by the server and this client) went without turning while the page was requested.
Customer searches are the box's kinds, each on its first page and on a page 1,000 rows from the
result's end (the cursor walks nearly the whole index before it: what OFFSET would cost every time).

Beside the pages, three operations on a whole search result, run twice each: the bulk-tag
confirmation page (a count of the result, ``tag:vip``: 20% of the customers), the bulk tag itself
(``tag:interest-3``, ~7%: one INSERT ... SELECT, through the same core function as the page, in a
transaction rolled back so the cached data set stays as it was) and the CSV export of ``tag:vip``
streamed by the page.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import shutil
import tempfile
import time
import tomllib
from datetime import timedelta
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from sqlalchemy import func, select

from bench.common import ROOT, table, write_results
from bench.dataset import NOW, SEGMENT, TAG_X, sqlite_path
from bench.planning import on_each_store
from scrm import rollups
from scrm.cli.service import _tune_gc
from scrm.clock import ManualClock
from scrm.config_file import parse_config
from scrm.console import accounts
from scrm.customer_search import search
from scrm.service import Service
from scrm.store.engine import make_engine, make_sessionmaker, reading, writing
from scrm.store.migrate import upgrade
from scrm.store.models import Customer
from scrm.tagging import tag_where
from scrm.web import SERVICE, create_app

STAFF, PASSWORD = "bench-admin", "bench console password"
#: Half-way through a page's requests the service's clock moves on this much: past a snapshot's
#: freshness (scrm.snapshots), so the second half is served while its figures are read again.
STALE = timedelta(seconds=61)
#: The data set's finished campaign (bench/dataset.py), as a campaign file that nothing triggers.
BENCH_CAMPAIGN = '''name = "bench_reports"
title = "Bench: a finished campaign, every 10th customer"
kind = "marketing"

[trigger]
event = "tag_added"
tag = "bench-never-added"

[message]
text = "新品上架"
'''
SEARCHES = {
    "all customers": "",
    "name, rare (客户777777)": "客户777777",
    "name, common (客户1)": "客户1",
    "#id": "#500000",
    "channel:id": "wechat:o500000",
    "phone (no one)": "13812345678",
    "tag:vip (20%)": f"tag:{TAG_X}",
    "tag:interest-3 (~7%)": "tag:interest-3",
    "stage:nurture": "stage:nurture",
    "expression": SEGMENT,
}
#: Searches that find one customer or none have no page further down.
ONE_OR_NONE = {"#id", "channel:id", "phone (no one)", "name, rare (客户777777)"}


def pages() -> dict[str, tuple[str, str]]:
    """Label -> (group, path) of every page timed, in the table's order."""
    found: dict[str, tuple[str, str]] = {
        "dashboard 7d": ("dashboard", "/console/?period=7d"),
        "dashboard 30d": ("dashboard", "/console/?period=30d"),
        "trend chart 7d": ("dashboard", "/console/charts/trend.png?period=7d"),
        "trend chart 30d": ("dashboard", "/console/charts/trend.png?period=30d"),
    }
    for label, q in SEARCHES.items():
        found[f"customers: {label}"] = ("customers", "/console/customers?" + urlencode({"q": q}))
    found.update({
        "customer #500000": ("customer", "/console/customers/500000"),
        "customer #500000, thread": ("customer", "/console/customers/500000/thread"),
        "inbox": ("inbox", "/console/inbox"),
        "campaigns": ("campaigns", "/console/campaigns"),
        "campaign bench_reports": ("campaigns", "/console/campaigns/bench_reports"),
        "campaign funnel chart": ("campaigns", "/console/campaigns/bench_reports/funnel.png"),
        "coupons": ("coupons", "/console/coupons"),
        "channel codes 7d": ("codes", "/console/codes?period=7d"),
        "channel codes 30d": ("codes", "/console/codes?period=30d"),
        "segments": ("segments", "/console/segments"),
        "segment preview silent_30d": ("segments", "/console/segments?show=silent_30d"),
        "segment ad-hoc expression": ("segments", "/console/segments?" + urlencode({"expr": SEGMENT})),
        "audit log": ("audit", "/console/audit"),
    })
    return found


def config_for(url: str, schema: str | None, folder: Path, api_keys: dict[str, Any] | None = None) -> Any:
    """The demo config on the bench store, its campaigns and key file in ``folder``; channel accounts
    named as the data set's identities (wechat:brand, telegram:brand), their APIs on a closed port;
    ``api_keys`` as ``[api.keys]`` (bench.api)."""
    data = tomllib.loads((ROOT / "config.example.toml").read_text("utf-8"))
    campaigns = folder / "campaigns"
    campaigns.mkdir(exist_ok=True)
    for demo in (ROOT / "campaigns").glob("*.toml"):
        shutil.copy(demo, campaigns / demo.name)
    (campaigns / "bench_reports.toml").write_text(BENCH_CAMPAIGN, "utf-8")
    data["store"] = {"url": url, **({"schema_name": schema} if schema else {})}
    data["campaigns"] = {**data.get("campaigns", {}), "path": str(campaigns)}
    data["privacy"] = {**data.get("privacy", {}), "key_file": str(folder / "privacy.key")}
    data["logging"] = {**data.get("logging", {}), "level": "WARNING"}
    if api_keys:
        data["api"] = {"keys": api_keys}
    data["channels"] = {**data.get("channels", {}),
                        "wechat": {"brand": {"app_id": "wxbench", "app_secret": "bench", "token": "benchtoken",
                                             "api_base_url": "http://127.0.0.1:9/"}},
                        "telegram": {"brand": {"token": "123456:bench-token-not-a-real-one", "webhook_secret": "bench",
                                               "api_base_url": "http://127.0.0.1:9/bot"}}}
    return parse_config(data, folder, environ={})


def work_folder(url: str) -> Path:
    """Where the service's files live: beside a cached SQLite file (its privacy key must stay with it),
    a temporary folder for a PostgreSQL schema that is dropped afterwards."""
    match = re.match(r"sqlite\+aiosqlite:///(.+)$", url)
    if match:
        folder = Path(match.group(1)).with_suffix(".console")
        folder.mkdir(exist_ok=True)
        return folder
    return Path(tempfile.mkdtemp(prefix="bench-console-"))


class Timings:
    """Server time of each request, taken by a middleware around the application's handlers; and the
    longest the event loop went without turning (server and client share it: a handler or a snapshot
    refresh that held it would hold up every other request)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.stall = 0.0

    async def watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.005)
            self.stall = max(self.stall, (loop.time() - start - 0.005) * 1000)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        try:
            return await handler(request)
        finally:
            self.last = (time.perf_counter() - start) * 1000


@asynccontextmanager
async def served(url: str, schema: str | None,
                 api_keys: dict[str, Any] | None = None) -> AsyncIterator[tuple[str, Service, Timings]]:
    folder = work_folder(url)
    app = create_app(config_for(url, schema, folder, api_keys), ManualClock(NOW), role="web")
    timings = Timings()
    app.middlewares.insert(0, timings.middleware)
    app.on_startup.append(_tune_gc)  # the garbage-collector settings scrm run serves with
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", app[SERVICE], timings
    finally:
        await runner.cleanup()
        if not url.startswith("sqlite"):
            shutil.rmtree(folder, ignore_errors=True)


async def sign_in(client: aiohttp.ClientSession, base: str, svc: Service) -> None:
    async with writing(svc.sessions) as session:
        try:
            await accounts.add_account(session, STAFF, "admin", PASSWORD, svc.clock.now())
        except accounts.AccountError:  # a cached data set keeps the account of an earlier run
            await accounts.set_password(session, STAFF, PASSWORD, svc.clock.now())
    async with client.get(f"{base}/console/login") as response:
        form = await response.text()
    match = re.search(r'name="pre" value="([^"]+)"', form)
    assert match, "no sign-in form token"
    async with client.post(f"{base}/console/login", data={"name": STAFF, "password": PASSWORD, "pre": match.group(1)},
                           allow_redirects=False) as response:
        assert response.status == 303, f"sign-in answered {response.status}"


async def deep_pages(svc: Service) -> dict[str, str]:
    """For each search with more than a page: its page 1,000 rows from the result's end, by cursor."""
    found: dict[str, str] = {}
    async with reading(svc.sessions) as session:
        for label, q in SEARCHES.items():
            if label in ONE_OR_NONE:
                continue
            where = (await search(session, svc, q, NOW)).where
            low = (await session.scalars(select(Customer.id).where(where).order_by(Customer.id)
                                         .offset(999).limit(1))).first()
            if low is not None:
                found[f"customers: {label}, deep"] = "/console/customers?" + urlencode({"q": q, "before": low})
    return found


def percentile(values: list[float], share: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


async def fetch(client: aiohttp.ClientSession, base: str, path: str, timings: Timings) -> tuple[int, int, float]:
    """Status, body bytes and server time (ms) of one GET."""
    timings.last = None
    async with client.get(base + path, allow_redirects=False) as response:
        body = await response.read()
    assert timings.last is not None
    return response.status, len(body), timings.last


async def measure(url: str, schema: str | None, repeat: int, groups: set[str] | None) -> dict[str, Any]:
    engine = make_engine(url, schema)
    try:  # the service's rollup job, as of the data set's "now" (a cached file keeps the days it built)
        await upgrade(engine)
        start = time.perf_counter()
        days = await rollups.build(make_sessionmaker(engine), "Asia/Shanghai", NOW)
        figures: dict[str, Any] = {"rollups": {"days_built": days, "seconds": round(time.perf_counter() - start, 1)}}
    finally:
        await engine.dispose()
    figures["pages"] = {}
    async with served(url, schema) as (base, svc, timings), aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        await sign_in(client, base, svc)
        todo = {label: path for label, (group, path) in pages().items() if groups is None or group in groups}
        if groups is None or "customers" in groups:
            todo.update(await deep_pages(svc))
        watcher = asyncio.create_task(timings.watch())
        clock = svc.clock
        assert isinstance(clock, ManualClock)
        for label, path in todo.items():
            times, status, size = [], 0, 0
            timings.stall = 0.0
            for i in range(repeat):
                if i == repeat // 2:  # the snapshots go stale: the views after are served beside their refresh
                    clock.advance(STALE)
                status, size, ms = await fetch(client, base, path, timings)
                times.append(ms)
            figures["pages"][label] = {"path": path, "status": status, "bytes": size, "first_ms": round(times[0], 1),
                                       "p50_ms": round(percentile(times, 0.5), 1),
                                       "p95_ms": round(percentile(times, 0.95), 1), "max_ms": round(max(times), 1),
                                       "loop_stall_ms": round(timings.stall, 1)}
            print(f"  {label}: {figures['pages'][label]}", flush=True)
        watcher.cancel()
        if groups is None or "operations" in groups:
            figures["operations"] = await operations(client, base, svc, timings)
    return figures


async def operations(client: aiohttp.ClientSession, base: str, svc: Service, timings: Timings) -> dict[str, Any]:
    """The bulk-tag count (its confirmation page), the bulk tag (rolled back) and the CSV of a result."""
    out: dict[str, Any] = {}
    confirm = "/console/customers/tag?" + urlencode({"q": f"tag:{TAG_X}", "tag": "interest-3", "op": "add"})
    csv = "/console/customers/export?" + urlencode({"q": f"tag:{TAG_X}"})
    for key, path in (("bulk_tag_confirmation", confirm), ("csv_tag_vip", csv)):
        runs = [await fetch(client, base, path, timings) for _ in range(2)]
        out[key] = {"status": runs[-1][0], "bytes": runs[-1][1], "first_ms": round(runs[0][2], 1),
                    "ms": round(runs[1][2], 1)}
    async with reading(svc.sessions) as session:
        where = (await search(session, svc, f"tag:{TAG_X}", NOW)).where
        out["csv_tag_vip"]["rows"] = await session.scalar(select(func.count()).select_from(Customer).where(where))
    tag_runs: list[float] = []
    for _ in range(2):
        start = time.perf_counter()
        async with svc.sessions() as session:  # rolled back: the cached data set stays as it was
            await session.begin()
            found = await search(session, svc, "tag:interest-3", NOW)
            changed = await tag_where(svc, session, found.where, "bench-bulk", True, "console:bench", NOW)
            await session.rollback()
        tag_runs.append((time.perf_counter() - start) * 1000)
    out["bulk_tag_interest_3"] = {"customers": changed, "first_ms": round(tag_runs[0], 1), "ms": round(tag_runs[1], 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--touchpoints", type=int, default=10_000_000)
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--repeat", type=int, default=20, help="requests per page")
    parser.add_argument("--pages", help="only these groups: dashboard, customers, customer, inbox, campaigns, "
                                        "coupons, codes, segments, audit, operations")
    args = parser.parse_args()
    groups = set(args.pages.split(",")) if args.pages else None
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    results = on_each_store(args.stores, args.customers, args.touchpoints,
                            lambda url, schema: measure(url, schema, args.repeat, groups))
    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])
    stores = list(results)
    labels = list(dict.fromkeys(label for r in results.values() for label in r.get("pages", {})))
    rows: list[tuple[str, ...]] = [("page (server ms)", *(f"{s} p50 / p95 (first) stall" for s in stores))]
    worst: dict[str, tuple[float, str]] = {}
    for label in labels:
        cells = []
        for store in stores:
            page = results[store].get("pages", {}).get(label)
            if page is None:
                cells.append(results[store].get("error", "-"))
                continue
            cells.append(f"{page['p50_ms']:.0f} / {page['p95_ms']:.0f} ({page['first_ms']:.0f}) "
                         f"{page['loop_stall_ms']:.0f}" + ("" if page["status"] == 200 else f" HTTP {page['status']}"))
            if page["p95_ms"] > worst.get(store, (-1.0, ""))[0]:
                worst[store] = (page["p95_ms"], label)
        rows.append((label, *cells))
    for key, label in (("bulk_tag_confirmation", "bulk-tag count, tag:vip (2nd run)"),
                       ("bulk_tag_interest_3", "bulk tag, tag:interest-3, rolled back (2nd run)"),
                       ("csv_tag_vip", "CSV of tag:vip (2nd run)")):
        cells = [f"{r['operations'][key]['ms']:.0f}" if "operations" in r else "-" for r in results.values()]
        rows.append((label, *cells))
    print(table(rows))
    print(f"{args.customers:,} customers, {args.touchpoints:,} touchpoints; {args.repeat} requests a page; "
          f"load average {load_before} before, {load_after} after")
    failed = [f"{store} {label} (HTTP {page['status']})" for store, r in results.items()
              for label, page in r.get("pages", {}).items() if page["status"] != 200]
    if failed:
        print("NOT ANSWERED 200: " + ", ".join(failed))
    print("slowest page at p95: " + ", ".join(f"{s} {ms:.0f} ms ({label})" for s, (ms, label) in worst.items())
          + " (target <= 300 ms)")
    path = write_results("console", {"customers": args.customers, "touchpoints": args.touchpoints,
                                      "repeat": args.repeat, "load_average": [load_before, load_after],
                                      "results": results})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
