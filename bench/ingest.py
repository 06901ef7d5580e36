"""Ingest: the WeChat webhook through the real service against a bare aiohttp handler, side by side.

    python -m bench.ingest [--seconds 10] [--rounds 2] [--connections 32] [--generator auto|wrk|aiohttp]
                           [--events text|location] [--postgres] [--before REF]

Starts ``scrm run`` (its event loop: ``--loop``; a config written by ``scrm init``: SQLite, demo campaigns, plus a WeChat account
whose API is the fake WeChat server of tests/fakes/wechat.py in its own process, so the demo welcome
messages are delivered as on a live account) and a bare aiohttp app whose handler reads the body
and answers ``success``. Both get the same signed WeChat text messages (unique MsgIds; every other
one from a returning customer; the texts, drawn from a few, end with the MsgId, so no two are the same) at the same concurrency for the same time, alternating A B A B, from
``wrk`` (bench/wechat.lua) when installed, else an aiohttp load generator. Afterwards every request
the service answered 200 must be a touchpoint in the store. Headline: service req/s / bare req/s.

``--events location`` sends location reports instead, which the service acknowledges once they are
durable in its inbound journal (scrm.ingest) and applies behind: after each service run the benchmark
waits until the journal holds nothing unapplied and reports, beside the acknowledged rate, the applied
rate (events acknowledged in the run / time from the run's start until the last was applied).

``--before REF`` (default: the last commit before the inbound journal) runs the design before as a third
server, from that commit's files (``git archive``) on a store of its own, with the same config and load,
in the same rounds (A B C A B C): it applies each event before acknowledging it, so its acknowledged rate
is its applied rate, and the journal's applied rate is reported as a multiple of it (floor 1.2 x).

After the rounds, two open-loop phases against the service alone (requests sent at a fixed rate
whatever the answers' speed): ``--seconds`` at 80% of the applied rate, for the effect lag's p99
(``applied_at - received_at`` of the phase's journal rows), then 10 seconds at twice the applied rate,
for the 5xx count and the time the backlog takes to drain. At the end, every request answered 200 must
be exactly one inbound touchpoint in the store.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT, free_port, machine, postgres_url, table, write_results

TOKEN = "benchtoken2024"
APP_ID = "wx0123456789abcdef"
REPEAT_POOL = 2000
#: The last commit before the inbound journal: ``--before`` runs it side by side (its own store, the same
#: demo config and load), and the applied rate is compared with what it acknowledged (floor: 1.2 x).
BEFORE_COMMIT = "3f6c1a1"
BURST_SECONDS = 10.0
TEXTS = [
    "你好,请问奶粉多少钱?", "有没有优惠券可以用", "I want to buy milk powder, what is the price", "不要奶粉了,谢谢",
    "今天天气不错,随便看看", "怎么买?我想下单两罐配方奶", "Do you have a coupon or discount?", "宝宝六个月,推荐什么辅食",
]
APP_SECRET = "bench-secret"
WECHAT_ACCOUNT = """
# added by bench/ingest.py: an Official Account whose API is the fake WeChat server on loopback
[channels.wechat.bench]
app_id = "{app_id}"
app_secret = "{app_secret}"
token = "{token}"
api_base_url = "http://127.0.0.1:{port}/"
request_timeout_seconds = 2
"""


@dataclass
class Run:
    target: str  # "service" or "bare"
    requests: int
    ok: int  # answered 200
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def signed_query() -> str:
    timestamp, nonce = str(int(time.time())), "bench12345"
    signature = hashlib.sha1("".join(sorted([TOKEN, timestamp, nonce])).encode()).hexdigest()
    return f"signature={signature}&timestamp={timestamp}&nonce={nonce}"


def body(msg_id: int, events: str = "text") -> bytes:
    """The same message shapes as bench/wechat.lua."""
    openid = f"o_rep_{msg_id % REPEAT_POOL}" if msg_id % 2 == 0 else f"o_new_{msg_id}"
    if events == "location":
        return (f"<xml><ToUserName><![CDATA[gh_0123456789ab]]></ToUserName><FromUserName><![CDATA[{openid}]]>"
                f"</FromUserName><CreateTime>{msg_id}</CreateTime><MsgType><![CDATA[event]]></MsgType>"
                "<Event><![CDATA[LOCATION]]></Event><Latitude>23.137466</Latitude><Longitude>113.352425</Longitude>"
                "<Precision>119.385040</Precision></xml>").encode()
    return (f"<xml><ToUserName><![CDATA[gh_0123456789ab]]></ToUserName><FromUserName><![CDATA[{openid}]]>"
            f"</FromUserName><CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content><![CDATA[{TEXTS[msg_id % len(TEXTS)]} {msg_id}]]></Content><MsgId>{msg_id}</MsgId></xml>").encode()


# -- the servers ---------------------------------------------------------------------------------------


def serve_bare(port: int) -> None:
    """The reference: an aiohttp handler that only reads the body and answers ``success``."""
    from aiohttp import web

    async def callback(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="success")

    app = web.Application()
    app.router.add_post("/wechat/bench", callback)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


def serve_fake_wechat(port: int) -> None:
    """WeChat's API as the tests' fake speaks it (tokens, customer-service messages)."""
    from aiohttp import web

    from tests.fakes.wechat import FakeWeChat

    web.run_app(FakeWeChat(app_id=APP_ID, app_secret=APP_SECRET).app(), host="127.0.0.1", port=port, print=None)


def write_config(folder: Path, wechat_port: int, campaigns: bool = True, env: dict[str, str] | None = None) -> Path:
    """``scrm init`` as a user runs it, plus the WeChat account; validated by the project's loader.
    ``env``: the design before's (``PYTHONPATH`` at its tree).
    Without ``campaigns`` the campaigns folder is emptied (no welcome deliveries for the outbox)."""
    from scrm.config_file import load_config

    config = folder / "config.toml"
    subprocess.run([sys.executable, "-m", "scrm", "-c", str(config), "init"], check=True, cwd=folder,
                   capture_output=True, env=env)
    if not campaigns:
        for path in (folder / "campaigns").glob("*.toml"):
            path.unlink()
    with config.open("a", encoding="utf-8") as fh:
        fh.write(WECHAT_ACCOUNT.format(app_id=APP_ID, app_secret=APP_SECRET, token=TOKEN, port=wechat_port))
    if env is None:  # the design before reads it when it starts
        load_config(config, environ={})
    return config


def before_tree(ref: str, folder: Path) -> Path | None:
    """The project's files at ``ref`` (git archive), or None when this is no git checkout holding it."""
    tree = folder / "tree"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref], capture_output=True)
    if archive.returncode != 0:
        print(f"the design before ({ref}) is not in this checkout: {archive.stderr.decode().strip()}")
        return None
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:  # noqa: BLE001 - not listening yet (or 405 for the bare app's POST-only route: it is up)
            if isinstance(sys.exc_info()[1], urllib.error.HTTPError):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up within {timeout}s") from None
            time.sleep(0.2)


# -- load generators -----------------------------------------------------------------------------------


def run_wrk(url: str, seconds: float, connections: int, first_id: int, target: str, events: str = "text") -> Run:
    threads = min(2, connections)
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(Path(__file__).with_name("wechat.lua")), url.split("?")[0].rsplit("/wechat", 1)[0] + "/",
           "--", "/wechat/bench?" + url.split("?", 1)[1], str(first_id), str(REPEAT_POOL), events]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("BENCH_JSON "))
    data = json.loads(line.removeprefix("BENCH_JSON "))
    errors = sum(data[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")) + data["status_errors"]
    return Run(target, data["requests"], data["requests"] - data["status_errors"], errors,
               data["duration_us"] / 1e6, data["p50_us"] / 1000, data["p99_us"] / 1000, {"wrk": data})


async def _aiohttp_load(url: str, seconds: float, connections: int, first_id: int, target: str,
                        events: str = "text") -> Run:
    import aiohttp

    latencies: list[float] = []
    counts = {"requests": 0, "ok": 0, "errors": 0}
    next_id = iter(range(first_id, first_id + 10**9))
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as http:
        start = time.perf_counter()
        deadline = start + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                payload = body(next(next_id), events)
                sent = time.perf_counter()
                try:
                    async with http.post(url, data=payload, headers={"Content-Type": "text/xml"}) as resp:
                        await resp.read()
                        status = resp.status
                except aiohttp.ClientError:
                    counts["errors"] += 1
                    continue
                latencies.append(time.perf_counter() - sent)
                counts["requests"] += 1
                if status == 200:
                    counts["ok"] += 1
                else:
                    counts["errors"] += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0

    return Run(target, counts["requests"], counts["ok"], counts["errors"], elapsed, pct(0.5), pct(0.99))


def run_aiohttp(url: str, seconds: float, connections: int, first_id: int, target: str, events: str = "text") -> Run:
    return asyncio.run(_aiohttp_load(url, seconds, connections, first_id, target, events))


async def _open_loop(url: str, rate: float, seconds: float, first_id: int, events: str) -> Run:
    """Requests sent at a fixed ``rate`` whatever the answers' speed (open loop, unlike wrk's connections,
    which wait for each answer): what a platform delivering a given load does."""
    import aiohttp

    latencies: list[float] = []
    counts = {"requests": 0, "ok": 0, "errors": 0, "5xx": 0}
    total = int(rate * seconds)
    connector = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:
        start = time.perf_counter()

        async def one(i: int) -> None:
            sent = time.perf_counter()
            try:
                async with http.post(url, data=body(first_id + i, events), headers={"Content-Type": "text/xml"}) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError):
                counts["errors"] += 1
                return
            latencies.append(time.perf_counter() - sent)
            counts["requests"] += 1
            counts["ok" if status == 200 else "errors"] += 1
            counts["5xx"] += status >= 500

        tasks = []
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0

    return Run("service", counts["requests"], counts["ok"], counts["errors"], elapsed, pct(0.5), pct(0.99),
               {"rate": rate, "5xx": counts["5xx"], "sent": total})


# -- the benchmark -------------------------------------------------------------------------------------


class Store:
    """The service's store as the benchmark reads it: the SQLite file, or a PostgreSQL schema."""

    def __init__(self, db: Path | None = None, url: str | None = None, schema: str | None = None) -> None:
        self.db, self.url, self.schema = db, url, schema

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        if self.db is not None:
            with sqlite3.connect(self.db) as conn:
                return conn.execute(sql, params).fetchall()
        return asyncio.run(self._pg(sql.replace("?", "{}").format(*(f"${i + 1}" for i in range(len(params)))),
                                    params))

    async def _pg(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(self.url or "", connect_args={"server_settings": {"search_path": self.schema or "public"}})
        try:
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                return [tuple(r) for r in await raw.driver_connection.fetch(sql, *params)]  # type: ignore[union-attr]
        finally:
            await engine.dispose()

    def scalar(self, sql: str, *params: Any) -> Any:
        return self.rows(sql, *params)[0][0]


def wait_applied(store: Store, timeout: float = 300.0) -> float:
    """Wait until the service's inbound journal holds nothing unapplied; returns when (perf_counter)."""
    deadline = time.perf_counter() + timeout
    while True:
        left = store.scalar("SELECT count(*) FROM inbound_events WHERE applied_at IS NULL")
        if not left or time.perf_counter() > deadline:
            return time.perf_counter()
        time.sleep(0.02)


def journal_mark(store: Store) -> int:
    """The journal's last id: the rows after it are a later phase's."""
    return int(store.scalar("SELECT coalesce(max(id), 0) FROM inbound_events"))


def lag_p99(store: Store, after: int) -> tuple[float, int]:
    """Effect lag (applied_at - received_at) p99 in seconds of the journal rows after ``after``, and their count."""
    from datetime import datetime

    def at(value: Any) -> datetime:
        return value if isinstance(value, datetime) else datetime.fromisoformat(value)

    rows = store.rows("SELECT received_at, applied_at FROM inbound_events WHERE id > ? AND applied_at IS NOT NULL",
                      after)
    lags = sorted((at(a) - at(r)).total_seconds() for r, a in rows)
    return (lags[min(len(lags) - 1, int(0.99 * len(lags)))] if lags else 0.0), len(lags)


def exactly_once(store: Store) -> tuple[int, int, int]:
    """Journal rows (each event once: deduplicated at append), inbound WeChat touchpoints, and distinct
    message ids among them: equal when every acknowledged event was applied exactly once. (wrk does not
    count the requests in flight when a run ends, so the service holds a few more than it counts.)"""
    journal = store.scalar("SELECT count(*) FROM inbound_events WHERE channel='wechat'")
    tps, distinct = store.rows("SELECT count(*), count(DISTINCT platform_msg_id) FROM touchpoints "
                               "WHERE channel='wechat' AND direction='in'")[0]
    return int(journal), int(tps), int(distinct)


def count_store(store: Store) -> tuple[int, int, dict[str, int]]:
    """Inbound WeChat touchpoints, customers and campaign deliveries by status in the service's store."""
    tps = store.scalar("SELECT count(*) FROM touchpoints WHERE channel='wechat' AND direction='in'")
    customers = store.scalar("SELECT count(*) FROM identities WHERE channel='wechat'")
    deliveries = {str(k): int(v) for k, v in store.rows("SELECT status, count(*) FROM deliveries GROUP BY status")}
    return int(tps), int(customers), deliveries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each run")
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--generator", choices=("auto", "wrk", "aiohttp"), default="auto")
    parser.add_argument("--no-campaigns", action="store_true",
                        help="no demo campaigns: isolates ingest from the outbox's work on welcome messages")
    parser.add_argument("--events", choices=("text", "location"), default="text",
                        help="text messages (answered once applied) or location reports (answered once durable)")
    parser.add_argument("--postgres", action="store_true",
                        help=f"on PostgreSQL ({postgres_url()}): one --role web instance answers, one --role worker applies")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                        help="the service's event loop (scrm run --loop): uvloop when installed, by default")
    parser.add_argument("--before", default=BEFORE_COMMIT, metavar="REF",
                        help="the design to compare with, run side by side from this commit (default: the last "
                             "before the inbound journal); '' to leave it out")
    parser.add_argument("--keep", action="store_true", help="keep the service's folder (config, store, log)")
    parser.add_argument("--profile", metavar="FILE", help="record the service with py-spy (collapsed stacks, for flamegraph tools) into this file")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-wechat", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return
    if args.serve_wechat:
        serve_fake_wechat(args.serve_wechat)
        return

    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "aiohttp"
    load = run_wrk if generator == "wrk" else run_aiohttp

    folder = Path(tempfile.mkdtemp(prefix="scrm-bench-ingest-"))
    service_port, worker_port, bare_port, wechat_port = free_port(), free_port(), free_port(), free_port()
    before_port = free_port()
    config = write_config(folder, wechat_port, campaigns=not args.no_campaigns)
    schema = None
    if args.postgres:  # one web instance (journal only) and one worker (applies), in a schema of their own
        schema = f"bench_ingest_{int(time.time())}"
        store = Store(url=postgres_url(), schema=schema)
        store.rows(f"CREATE SCHEMA {schema}")
        text = config.read_text("utf-8").replace('url = "sqlite+aiosqlite:///scrm.db"',
                                                 f'url = "{postgres_url()}"\nschema_name = "{schema}"', 1)
        config.write_text(text, "utf-8")
    else:
        store = Store(db=folder / "scrm.db")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = (folder / "service.log").open("w")

    def scrm_run(port: int, role: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "scrm", "-c", str(config), "run", "--port", str(port),
                                 "--loop", args.loop, "--role", role],
                                cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env)

    service = scrm_run(service_port, "web" if args.postgres else "all")
    instances = [service]
    # The design before, from its own commit, on a store of its own: its events are applied before they
    # are acknowledged, so what it acknowledges is what it applies.
    before_schema = None
    tree = before_tree(args.before, folder / "before") if args.before else None
    if tree is not None:
        before_env = {**os.environ, "PYTHONPATH": str(tree)}
        before_config = write_config(folder / "before", wechat_port, campaigns=not args.no_campaigns, env=before_env)
        if args.postgres:
            before_schema = f"{schema}_before"
            store.rows(f"CREATE SCHEMA {before_schema}")
            before_config.write_text(before_config.read_text("utf-8").replace(
                'url = "sqlite+aiosqlite:///scrm.db"', f'url = "{postgres_url()}"\nschema_name = "{before_schema}"',
                1), "utf-8")
        instances.append(subprocess.Popen(
            [sys.executable, "-m", "scrm", "-c", str(before_config), "run", "--port", str(before_port)],
            cwd=folder / "before", stdout=log, stderr=subprocess.STDOUT, env=before_env))
    if args.postgres:
        wait_ready(f"http://127.0.0.1:{service_port}/healthz")  # it made the tables: no race at migration
        instances.append(scrm_run(worker_port, "worker"))
        wait_ready(f"http://127.0.0.1:{worker_port}/healthz")
    bare = subprocess.Popen([sys.executable, "-m", "bench.ingest", "--serve-bare", str(bare_port)], cwd=ROOT, env=env)
    wechat = subprocess.Popen([sys.executable, "-m", "bench.ingest", "--serve-wechat", str(wechat_port)], cwd=ROOT,
                              env=env)
    profiler = None
    runs: list[Run] = []
    try:
        wait_ready(f"http://127.0.0.1:{service_port}/healthz")
        wait_ready(f"http://127.0.0.1:{bare_port}/wechat/bench")
        if tree is not None:
            wait_ready(f"http://127.0.0.1:{before_port}/healthz")
        if args.profile:
            profiler = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(service.pid), "-o", args.profile, "-f", "raw", "-r", "200",
                                         "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        query = signed_query()
        urls = {"service": f"http://127.0.0.1:{service_port}/wechat/bench?{query}",
                "bare": f"http://127.0.0.1:{bare_port}/wechat/bench?{query}",
                "before": f"http://127.0.0.1:{before_port}/wechat/bench?{query}"}
        targets = ("service", "bare", "before") if tree is not None else ("service", "bare")
        # warm-up: jieba, connection pools, first customers (not counted in the ratio, counted in the store)
        warm = load(urls["service"], 1.0, args.connections, 9 * 10**12, "service", args.events)
        wait_applied(store)
        load(urls["bare"], 1.0, args.connections, 9 * 10**12, "bare", args.events)
        if tree is not None:
            load(urls["before"], 1.0, args.connections, 9 * 10**12, "before", args.events)
        for i in range(args.rounds):
            for j, target in enumerate(targets):
                started = time.perf_counter()
                run = load(urls[target], args.seconds, args.connections, (1 + 3 * i + j) * 10**10, target, args.events)
                if target == "service":  # the backlog drained before the next run: each has the machine alone
                    run.extra["applied_per_s"] = run.ok / (wait_applied(store) - started)
                runs.append(run)
                applied = f"  applied {run.extra['applied_per_s']:8.0f}/s" if "applied_per_s" in run.extra else ""
                print(f"  round {i + 1} {target:7} {run.rps:8.0f} req/s  p50 {run.p50_ms:6.1f} ms  "
                      f"p99 {run.p99_ms:6.1f} ms  non-200/errors {run.errors}{applied}", flush=True)
        # Lag at 80% of the applied rate, then a burst at twice it, both open loop (scrm.ingest's floors).
        applied_rps = sum(r.ok for r in runs if r.target == "service") / sum(
            r.ok / r.extra["applied_per_s"] for r in runs if r.target == "service")
        mark = journal_mark(store)
        steady = asyncio.run(_open_loop(urls["service"], 0.8 * applied_rps, args.seconds, 7 * 10**12, args.events))
        wait_applied(store)
        lag, lag_rows = lag_p99(store, mark)
        print(f"  steady {steady.extra['rate']:8.0f} req/s sent  p99 {steady.p99_ms:6.1f} ms  errors {steady.errors}"
              f"  effect lag p99 {lag:.3f} s over {lag_rows} events", flush=True)
        burst = asyncio.run(_open_loop(urls["service"], 2 * applied_rps, BURST_SECONDS, 8 * 10**12, args.events))
        burst_end = time.perf_counter()
        drained = wait_applied(store) - burst_end
        print(f"  burst  {burst.extra['rate']:8.0f} req/s sent for {BURST_SECONDS:g}s  p99 {burst.p99_ms:6.1f} ms  "
              f"5xx {burst.extra['5xx']}  errors {burst.errors}  drained {drained:.1f} s after", flush=True)
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=60)
        for proc in (*instances, bare, wechat):
            proc.send_signal(signal.SIGINT)
        for proc in (*instances, bare, wechat):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()

    answered = warm.ok + sum(r.ok for r in runs if r.target == "service") + steady.ok + burst.ok
    stored, customers, deliveries = count_store(store)
    journaled, applied_tps, distinct = exactly_once(store)
    once = journaled == applied_tps == distinct and stored >= answered
    service_runs = [r for r in runs if r.target == "service"]
    bare_runs = [r for r in runs if r.target == "bare"]
    service_rps = sum(r.ok for r in service_runs) / sum(r.seconds for r in service_runs)
    bare_rps = sum(r.ok for r in bare_runs) / sum(r.seconds for r in bare_runs)
    ratio = service_rps / bare_rps
    before_runs = [r for r in runs if r.target == "before"]
    before_rps = sum(r.ok for r in before_runs) / sum(r.seconds for r in before_runs) if before_runs else None
    p50 = sorted(r.p50_ms for r in service_runs)[len(service_runs) // 2]
    p99 = max(r.p99_ms for r in service_runs)
    figures = {
        "store": "postgresql" if args.postgres else "sqlite", "loop": args.loop,
        "campaigns": not args.no_campaigns, "events": args.events, "applied_rps": round(applied_rps, 1),
        "applied_vs_bare": round(applied_rps / bare_rps, 4), "generator": generator, "connections": args.connections, "seconds_per_run": args.seconds,
        "rounds": args.rounds, "service_rps": round(service_rps, 1), "bare_rps": round(bare_rps, 1),
        "service_p50_ms": round(p50, 2), "service_p99_ms": round(p99, 2),
        "bare_p50_ms": round(sorted(r.p50_ms for r in bare_runs)[len(bare_runs) // 2], 2),
        "answered_200": answered, "touchpoints_stored": stored, "wechat_customers": customers,
        "all_answered_stored": stored >= answered, "exactly_once": once, "journal_rows": journaled,
        "distinct_applied": distinct,
        "before": args.before if before_rps else None,
        "before_rps": None if before_rps is None else round(before_rps, 1),
        "before_vs_bare": None if before_rps is None else round(before_rps / bare_rps, 4),
        "applied_vs_before": None if before_rps is None else round(applied_rps / before_rps, 3),
        "steady": steady.__dict__ | {"lag_p99_s": round(lag, 3), "lag_events": lag_rows},
        "burst": burst.__dict__ | {"drained_s": round(drained, 1)}, "deliveries": deliveries, "service_errors": sum(r.errors for r in service_runs),
        "ratio": round(ratio, 4), "target_ratio": 0.30, "runs": [r.__dict__ | {"rps": r.rps} for r in runs],
    }
    for dropped in (schema, before_schema):
        if dropped is not None:
            store.rows(f"DROP SCHEMA {dropped} CASCADE")
    write_results("ingest" + ("_postgresql" if args.postgres else ""), figures)
    print()
    print(table([
        ("", "req/s", "p50 ms", "p99 ms"),
        (f"service (scrm run, {'PostgreSQL, web + worker' if args.postgres else 'SQLite'})", f"{service_rps:.0f}", f"{p50:.1f}", f"{p99:.1f}"),
        ("  applied behind it", f"{applied_rps:.0f}", "", ""),
        *([] if before_rps is None else [(f"the design before ({args.before}), applied", f"{before_rps:.0f}",
                                          f"{sorted(r.p50_ms for r in before_runs)[len(before_runs) // 2]:.1f}",
                                          f"{max(r.p99_ms for r in before_runs):.1f}")]),
        ("bare aiohttp", f"{bare_rps:.0f}", f"{figures['bare_p50_ms']:.1f}",
         f"{max(r.p99_ms for r in bare_runs):.1f}"),
    ]))
    print(f"generator {generator}, {args.connections} connections, {args.rounds} x {args.seconds:g}s each, "
          f"{machine()['cpus']} CPUs")
    print(f"answered 200: {answered} (wrk's last in-flight requests uncounted); journal rows {journaled}, "
          f"inbound touchpoints {applied_tps}, distinct message ids {distinct}: "
          f"{'each acknowledged event applied exactly once' if once else 'NOT EXACTLY ONCE'}")
    if deliveries:
        print("campaign deliveries: " + ", ".join(f"{n} {status}" for status, n in sorted(deliveries.items())))
    if args.keep:
        print(f"service folder kept: {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{args.events} events; acknowledged/bare: {ratio:.3f} (floor 0.30 with --no-campaigns)")
    if before_rps is None:
        print(f"applied {applied_rps:.0f}/s = {applied_rps / bare_rps:.3f} of bare (the design before not run)")
    else:
        print(f"applied {applied_rps:.0f}/s = {applied_rps / bare_rps:.3f} of bare = {applied_rps / before_rps:.2f} x "
              f"the design before ({args.before}: {before_rps:.0f} req/s, {before_rps / bare_rps:.3f} of bare; "
              "floor 1.2 x)")
    print(f"effect lag p99 at 80% of the applied rate: {lag:.3f} s (floor 1 s); burst at 2x for {BURST_SECONDS:g}s: "
          f"{burst.extra['5xx']} 5xx, {burst.errors} errors, drained {drained:.1f} s after")


if __name__ == "__main__":
    main()
