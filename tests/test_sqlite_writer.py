"""SQLite: the ingest writer takes the write lock up front and runs its statements on the event loop
(scrm.store.sqlite_driver.hold_write_lock). Waiting for another writer must not stall the loop, a
staff command's statements go back to the driver's thread, and a staff report reads before it waits."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, select

from scrm.config_file import parse_config
from scrm.store.models import Touchpoint
from scrm.web import SERVICE, create_app
from tests.conftest import ROOT, deep_merge, eventually, example_config


def sqlite_config(tmp_path: Path):
    data = deep_merge(example_config(), {"store": {"url": f"sqlite+aiosqlite:///{tmp_path / 'scrm.db'}"},
                                         "campaigns": {"path": str(ROOT / "campaigns")}})
    return parse_config(data, tmp_path, environ={})


async def stored_messages(service) -> int:
    async with service.sessions() as s:
        return await s.scalar(select(func.count()).select_from(Touchpoint).where(Touchpoint.direction == "in"))


async def test_ingest_waits_for_another_writer_without_stalling_the_loop(aiohttp_client, tmp_path, clock):
    client = await aiohttp_client(create_app(sqlite_config(tmp_path), clock))
    service = client.app[SERVICE]
    assert (await client.post("/console/local/messages", json={"user": "ann", "text": "你好", "id": "a1"})).status == 200

    # e.g. a CLI import in another process; it waits in a thread itself, as the outbox may be writing
    other = sqlite3.connect(tmp_path / "scrm.db", isolation_level=None, check_same_thread=False, timeout=30)
    await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")
    try:
        pending = asyncio.ensure_future(
            client.post("/console/local/messages", json={"user": "bob", "text": "奶粉多少钱", "id": "b1"}))
        await asyncio.sleep(0.5)
        assert not pending.done()  # its transaction waits for the lock...
        health = await asyncio.wait_for(client.get("/healthz"), 20)  # ...while the loop serves others (< busy 30 s)
        assert health.status == 200
        assert await stored_messages(service) == 1
    finally:
        other.execute("COMMIT")
        other.close()
    assert (await asyncio.wait_for(pending, 60)).status == 200
    assert await stored_messages(service) == 2


async def test_ingest_statements_run_on_the_loop_and_a_staff_report_in_the_drivers_thread(aiohttp_client, tmp_path,
                                                                                           clock):
    data = deep_merge(example_config(), {"store": {"url": f"sqlite+aiosqlite:///{tmp_path / 'scrm.db'}"},
                                         "campaigns": {"path": str(ROOT / "campaigns")},
                                         "staff": {"console:boss": "manager"}})
    app = create_app(parse_config(data, tmp_path, environ={}), clock)
    service = app[SERVICE]
    ran: list[tuple[str, str]] = []  # (thread, SQL) as SQLite runs each statement

    @event.listens_for(service.engine.sync_engine, "connect")
    def trace(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection._connection._conn.set_trace_callback(
            lambda sql: ran.append((threading.current_thread().name, sql)))

    client = await aiohttp_client(app)
    assert (await client.post("/console/local/messages", json={"user": "ann", "text": "奶粉", "id": "a1"})).status == 200
    ingest = [thread for thread, sql in ran if sql.startswith("INSERT INTO touchpoints")]
    assert ingest and set(ingest) == {threading.main_thread().name}

    ran.clear()
    resp = await client.post("/console/local/messages", json={"user": "boss", "text": "/report 7d", "id": "r1"})
    assert resp.status == 200 and (await resp.json())["replies"]
    # the batch's own duplicate check runs before the command; the report's reads come after it
    report = [thread for thread, sql in ran if sql.startswith("SELECT") and "touchpoints" in sql
              and "platform_msg_id IN" not in sql]
    assert report and threading.main_thread().name not in report


async def test_a_staff_report_reads_while_another_writer_holds_the_lock(aiohttp_client, tmp_path, clock):
    """A report reads for as long as the store is big: it reads beside the writer, and only its
    answer waits for the write lock, so webhooks queued behind it never wait for its reading."""
    data = deep_merge(example_config(), {"store": {"url": f"sqlite+aiosqlite:///{tmp_path / 'scrm.db'}"},
                                         "campaigns": {"path": str(ROOT / "campaigns")},
                                         "staff": {"console:boss": "manager"}})
    app = create_app(parse_config(data, tmp_path, environ={}), clock)
    service = app[SERVICE]
    ran: list[str] = []

    @event.listens_for(service.engine.sync_engine, "connect")
    def trace(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection._connection._conn.set_trace_callback(ran.append)

    client = await aiohttp_client(app)
    assert (await client.post("/console/local/messages", json={"user": "ann", "text": "奶粉", "id": "a1"})).status == 200
    other = sqlite3.connect(tmp_path / "scrm.db", isolation_level=None, check_same_thread=False, timeout=30)
    await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")
    try:
        ran.clear()
        pending = asyncio.ensure_future(
            client.post("/console/local/messages", json={"user": "boss", "text": "/report 7d", "id": "r1"}))
        async def read() -> bool:  # its reading did not wait for the lock...
            return any(sql.startswith("SELECT") and "FROM customers" in sql for sql in ran)

        await eventually(read)
        assert not pending.done()  # ...its answer does, to be recorded
        assert not any(sql.startswith("INSERT") for sql in ran)
    finally:
        other.execute("COMMIT")
        other.close()
    answer = await (await asyncio.wait_for(pending, 60)).json()
    assert answer["replies"][0].startswith("报告") and len(answer["images"]) == 1
    assert await stored_messages(service) == 2
