"""Webhook delivery: events posted per second to a local receiver, through the real service.

    python -m bench.webhooks [--customers 5000] [--tags 2] [--postgres] [--verify]

Customers are inserted directly (they emit nothing); then ``--tags`` bulk tag changes (the console's
"tag the whole result") each write one ``tag.added`` event per customer in one INSERT ... SELECT, in the
service's own transaction. The service (in-process, config from config.example.toml with one
``[webhooks.bench]`` subscription) posts them to a receiver in a process of its own, which answers 204
(``--verify``: after checking each signature with the standardwebhooks verifier). Reported: events
delivered per second from the commit of the first tag change to the last delivery, with the
customer's order kept (a customer's second event waits for the first's answer), and whether every
event arrived exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import sys
import tempfile
import time
import tomllib
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web
from sqlalchemy import func, insert, select

from bench.common import ROOT, free_port, postgres_url, table, write_results

sys.path.insert(0, str(ROOT))
from scrm.config_file import parse_config
from scrm.service import Service
from scrm.store.models import Customer, WebhookDelivery
from scrm.tagging import tag_where
from scrm.webhooks.subscriptions import new_secret


def receive(port: int, secret: str, verify: bool, ready: Connection) -> None:
    """The receiver process: counts each webhook-id; GET /count answers the counts."""
    from standardwebhooks import Webhook

    seen: Counter[str] = Counter()
    signer = Webhook(secret)

    async def hook(request: web.Request) -> web.Response:
        data = await request.read()
        if verify:
            signer.verify(data, dict(request.headers))
        seen[request.headers["webhook-id"]] += 1
        return web.Response(status=204)

    async def count(_request: web.Request) -> web.Response:
        return web.json_response({"events": len(seen), "posts": sum(seen.values())})

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/count", count)
    ready.send(True)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    port, secret = free_port(), new_secret()
    parent, child = multiprocessing.Pipe()
    receiver = multiprocessing.Process(target=receive, args=(port, secret, args.verify, child), daemon=True)
    receiver.start()
    parent.recv()
    data = tomllib.loads((ROOT / "config.example.toml").read_text("utf-8"))
    store: dict[str, Any] = {"url": f"sqlite+aiosqlite:///{folder / 'bench.db'}"}
    schema = None
    if args.postgres:
        schema = f"bench_webhooks_{int(time.time())}"
        store = {"url": postgres_url(), "schema_name": schema}
        await _schema(store["url"], f"CREATE SCHEMA {schema}")
    data |= {"store": store, "campaigns": {"path": str(folder / "campaigns")}, "logging": {"level": "WARNING"},
             "webhooks": {"bench": {"url": f"http://127.0.0.1:{port}/hook", "secret": secret}},
             "webhook_delivery": {"concurrency": args.concurrency}}
    (folder / "campaigns").mkdir()
    service = Service(parse_config(data, folder, environ={}))
    try:
        await service.start()
        now = service.clock.now()
        async with service.sessions() as session, session.begin():
            await session.execute(insert(Customer), [
                {"display_name": f"c{i}", "first_seen_at": now, "last_seen_at": now, "attributes": {}, "stage": "acquisition",
                 "opted_out": False} for i in range(args.customers)])
        started = time.perf_counter()
        for n in range(args.tags):
            async with service.sessions() as session, session.begin():
                await tag_where(service, session, Customer.id > 0, f"bench-{n}", True, "bench", now)
        written = time.perf_counter() - started
        expected = args.customers * args.tags
        async with ClientSession() as http:
            while True:
                async with http.get(f"http://127.0.0.1:{port}/count") as resp:
                    counts = await resp.json()
                if counts["events"] >= expected:
                    break
                await asyncio.sleep(0.02)
            elapsed = time.perf_counter() - started
            await asyncio.sleep(0.5)  # anything posted twice would arrive by now
            async with http.get(f"http://127.0.0.1:{port}/count") as resp:
                counts = await resp.json()
        async with service.sessions() as session:
            delivered = await session.scalar(select(func.count()).select_from(WebhookDelivery).where(
                WebhookDelivery.status == "delivered"))
    finally:
        await service.stop()
        receiver.terminate()
        if schema is not None:
            await _schema(postgres_url(), f"DROP SCHEMA {schema} CASCADE")
    return {"store": "postgresql" if args.postgres else "sqlite", "customers": args.customers, "tags": args.tags,
            "events": expected, "verify": args.verify, "concurrency": args.concurrency,
            "written_seconds": round(written, 3), "seconds": round(elapsed, 3),
            "events_per_second": round(expected / elapsed, 1), "posts": counts["posts"],
            "received_events": counts["events"], "marked_delivered": delivered}


async def _schema(url: str, statement: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text(statement))
    await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--tags", type=int, default=2, help="bulk tag changes: events per customer")
    parser.add_argument("--concurrency", type=int, default=32, help="[webhook_delivery] concurrency")
    parser.add_argument("--postgres", action="store_true", help=f"on PostgreSQL ({postgres_url()})")
    parser.add_argument("--verify", action="store_true", help="the receiver checks every signature")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        figures = asyncio.run(run(args, Path(tmp)))
    write_results("webhooks" + ("_postgresql" if args.postgres else ""), figures)
    print(table([
        ("store", "events", "written (s)", "delivered in (s)", "posts", "received", "events/s"),
        (figures["store"], str(figures["events"]), f"{figures['written_seconds']:.2f}", f"{figures['seconds']:.2f}",
         str(figures["posts"]), str(figures["received_events"]), f"{figures['events_per_second']:,.0f}"),
    ]))
    twice = figures["posts"] - figures["received_events"]
    print(f"\nwebhook delivery: {figures['events_per_second']:,.0f} events/s "
          f"({'every event once' if twice == 0 else f'{twice} posted twice'}; target >= 500)")


if __name__ == "__main__":
    main()
