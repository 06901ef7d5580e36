"""SQLite through aiosqlite, one trip to its thread per statement, or none while a writer holds the lock.

SQLAlchemy's aiosqlite adapter goes to aiosqlite's thread three or four times per statement (open
a cursor, execute, fetch, close), and every trip is a wake-up of the event loop; at ingest's rates
those trips cost more than the SQL (measured: ~9x a single trip for ``SELECT 1``). This cursor does
the four in one trip. It is SQLAlchemy's aiosqlite dialect otherwise, registered as
``sqlite+scrm_aiosqlite``; :func:`scrm.store.engine.make_engine` uses it for ``sqlite+aiosqlite``.
"""

from __future__ import annotations

import collections
import sqlite3
from typing import Any

from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
    SQLiteDialect_aiosqlite,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.util.concurrency import await_

_Result = tuple[Any, int, int | None, list[Any]]


def _run(conn: sqlite3.Connection, operation: str, parameters: Any, many: bool) -> _Result:
    """In aiosqlite's thread: the whole statement, rows included."""
    cursor = conn.cursor()
    try:
        if many:
            cursor.executemany(operation, parameters)
        else:
            cursor.execute(operation, parameters if parameters is not None else ())
        return cursor.description, cursor.rowcount, cursor.lastrowid, cursor.fetchall() if cursor.description else []
    finally:
        cursor.close()


class OneTripCursor(AsyncAdapt_aiosqlite_cursor):
    __slots__ = ("_description", "_lastrowid", "_rowcount")
    _adapt_connection: OneTripConnection

    def __init__(self, adapt_connection: OneTripConnection) -> None:
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._rows: collections.deque[Any] = collections.deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    # SQLAlchemy annotates lastrowid as int; sqlite3's is None after executemany.
    @property
    def lastrowid(self) -> int | None:  # type: ignore[override]
        return self._lastrowid

    def close(self) -> None:
        self._rows.clear()

    async def _async_soft_close(self) -> None:
        """Nothing stays open in aiosqlite's thread after a statement."""

    def execute(self, operation: Any, parameters: Any = None) -> None:
        self._trip(operation, parameters, many=False)

    def executemany(self, operation: Any, seq_of_parameters: Any) -> None:
        self._trip(operation, seq_of_parameters, many=True)

    def _trip(self, operation: Any, parameters: Any, many: bool) -> None:
        try:
            if self._adapt_connection.inline:
                result = _run(self._connection._conn, operation, parameters, many)
            else:
                result = await_(self._in_thread(operation, parameters, many))
        except Exception as error:  # noqa: BLE001 - the adapter translates any driver error (and re-raises)
            self._adapt_connection._handle_exception(error)
        self._description, self._rowcount, self._lastrowid, rows = result
        self._rows = collections.deque(rows)

    async def _in_thread(self, operation: Any, parameters: Any, many: bool) -> _Result:
        async with self._adapt_connection._execute_mutex:
            return await self._connection._execute(_run, self._connection._conn, operation, parameters, many)


class OneTripConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ("inline",)
    # The base class types its cursor class as taking any DBAPI connection adapter; this one is only
    # ever made by this connection, with itself.
    _cursor_cls = OneTripCursor  # type: ignore[assignment]

    def __init__(self, dbapi: Any, connection: Any) -> None:
        super().__init__(dbapi, connection)
        #: Set by :func:`hold_write_lock` for the rest of the transaction.
        self.inline = False

    def commit(self) -> None:
        self.inline = False
        super().commit()

    def rollback(self) -> None:
        self.inline = False
        super().rollback()


class OneTripDBAPI(AsyncAdapt_aiosqlite_dbapi):
    def connect(self, *arg: Any, **kw: Any) -> OneTripConnection:
        adapted = super().connect(*arg, **kw)
        return OneTripConnection(self, adapted._connection)


class OneTripDialect(SQLiteDialect_aiosqlite):
    driver = "scrm_aiosqlite"
    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls) -> OneTripDBAPI:
        return OneTripDBAPI(__import__("aiosqlite"), __import__("sqlite3"))


registry.register("sqlite.scrm_aiosqlite", __name__, "OneTripDialect")


async def hold_write_lock(session: AsyncSession) -> None:
    """Start the session's transaction holding SQLite's write lock, then run its statements here.

    ``BEGIN IMMEDIATE`` waits (in aiosqlite's thread) for any other writer; from then on no statement
    of the transaction can wait for another connection, and each takes microseconds, less than a trip
    to the thread costs, so they run on the calling thread. COMMIT and ROLLBACK still go to the thread
    (a commit may checkpoint the WAL, which writes and syncs the database file). No-op on PostgreSQL.
    """
    connection = await session.connection()
    if connection.dialect.name != "sqlite":
        return
    await connection.exec_driver_sql("BEGIN IMMEDIATE")
    (await connection.get_raw_connection()).dbapi_connection.inline = True  # type: ignore[union-attr]


async def statements_in_thread(session: AsyncSession) -> None:
    """Back to one trip to the thread per statement, for the rest of the transaction: for work whose
    statements may run long (a staff command's report) while the write lock is held."""
    connection = await session.connection()
    if connection.dialect.name == "sqlite":
        (await connection.get_raw_connection()).dbapi_connection.inline = False  # type: ignore[union-attr]
