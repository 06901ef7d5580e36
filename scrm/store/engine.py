"""Async engine and sessions for SQLite (WAL) or PostgreSQL, behind one URL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from scrm.store import sqlite_driver  # registers sqlite+scrm_aiosqlite

#: SQLite has one writer at a time: this process's writers queue here, in order.
_writers: WeakKeyDictionary[Engine, asyncio.Lock] = WeakKeyDictionary()


def make_engine(url: str, schema: str | None = None, **kwargs: Any) -> AsyncEngine:
    if url.startswith("sqlite"):
        # the same aiosqlite driver, one trip to its thread per statement (scrm.store.sqlite_driver)
        url = url.replace("sqlite+aiosqlite://", "sqlite+scrm_aiosqlite://", 1)
        engine = create_async_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets readers (reports, CLI) run beside the single writer; NORMAL sync in WAL
            # mode survives a process crash, which is what "acknowledged means committed" needs.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if schema:
        kwargs["connect_args"] = {"server_settings": {"search_path": schema}}
    return create_async_engine(url, pool_pre_ping=True, **kwargs)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def writing(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A short transaction that writes (ingest, the outbox, the incremental profile refresh), committed
    when the block ends.

    On SQLite this process's writers take turns on an asyncio lock, because SQLite's own wait for
    its write lock sleeps 1 to 100 ms between tries, and then hold SQLite's lock from the start with
    their statements on the loop (:func:`scrm.store.sqlite_driver.hold_write_lock`); work whose
    statements may run long sends them back to the driver's thread
    (:func:`scrm.store.sqlite_driver.statements_in_thread`). The block must open no other writing
    transaction inside. PostgreSQL: a plain transaction.
    """
    engine = sessions.kw["bind"]
    if engine.dialect.name != "sqlite":
        async with sessions() as session, session.begin():
            yield session
        return
    async with _writers.setdefault(engine.sync_engine, asyncio.Lock()), sessions() as session, session.begin():
        await sqlite_driver.hold_write_lock(session)
        yield session


@asynccontextmanager
async def reading(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A transaction that only reads (staff reports), beside the writer: it never takes SQLite's write
    lock, and a write in it is an error (SQLite's ``query_only``, PostgreSQL's ``READ ONLY``). Its
    statements all read one snapshot, so a report's figures agree with each other (PostgreSQL:
    REPEATABLE READ; SQLite: an explicit ``BEGIN``, as the driver begins no transaction for reads)."""
    async with sessions() as session, session.begin():
        connection = await session.connection()
        if connection.dialect.name != "sqlite":
            await connection.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield session
            return
        await connection.exec_driver_sql("PRAGMA query_only = ON")
        await connection.exec_driver_sql("BEGIN")
        try:
            yield session
        finally:  # the connection goes back to the pool
            await connection.exec_driver_sql("PRAGMA query_only = OFF")
