"""The few statements that differ between SQLite and PostgreSQL."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Column,
    CursorResult,
    Integer,
    Result,
    Select,
    String,
    Table,
    bindparam,
    column,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession


def dialect_name(session: AsyncSession) -> str:
    """The session's store: ``"postgresql"`` or ``"sqlite"``."""
    return session.get_bind().dialect.name


def dialect_of(session: AsyncSession) -> Any:
    """SQLAlchemy's dialect module for the session's store, for its ``insert`` with ON CONFLICT."""
    return postgresql if dialect_name(session) == "postgresql" else sqlite


def rowcount(result: Result[*tuple[Any, ...]]) -> int:
    """The rows matched by the INSERT, UPDATE or DELETE whose execution gave ``result``.

    Executing such a statement gives a CursorResult, which has ``rowcount``; AsyncSession.execute is
    annotated with the base Result, which does not."""
    return cast("CursorResult[*tuple[Any, ...]]", result).rowcount


async def insert_ignore(session: AsyncSession, table: Table, values: dict[str, Any] | list[dict[str, Any]]) -> int:
    """INSERT ... ON CONFLICT DO NOTHING; returns the number of rows actually inserted."""
    statement = dialect_of(session).insert(table).on_conflict_do_nothing()
    if isinstance(values, dict):
        return rowcount(await session.execute(statement.values(values))) or 0
    # Many rows: executemany, compiled once (a multi-row VALUES is a new statement for each row
    # count); RETURNING counts the inserted rows, which executemany's rowcount does not on asyncpg.
    return len((await session.execute(statement.returning(literal_column("1")), values)).all())


async def insert_select_ignore(session: AsyncSession, table: Table, columns: list[str], query: Select[*tuple[Any, ...]]) -> int:
    """INSERT INTO table (columns) SELECT ... ON CONFLICT DO NOTHING; returns rows inserted."""
    result = await session.execute(dialect_of(session).insert(table).from_select(columns, query).on_conflict_do_nothing())
    return rowcount(result) or 0


async def upsert(session: AsyncSession, table: Table, keys: tuple[str, ...], columns: tuple[str, ...],
                 rows: list[dict[str, Any]]) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE SET columns, one executemany for all rows (the
    statement is built once per store, dialect and column set)."""
    await session.execute(_upsert_statement(dialect_name(session), table, keys, columns), rows)


@functools.cache
def _upsert_statement(dialect: str, table: Table, keys: tuple[str, ...], columns: tuple[str, ...]) -> Any:
    statement = (postgresql if dialect == "postgresql" else sqlite).insert(table)
    return statement.on_conflict_do_update(index_elements=list(keys),
                                           set_={c: statement.excluded[c] for c in columns})


def json_rows(session: AsyncSession, columns: Sequence[Column[Any]], name: str = "rows") -> Select[Any]:
    """SELECT the rows of a JSON array of arrays, bound as one string parameter ``name``: one row per
    array, its items in the order of ``columns`` and typed as they are (SQLite ``json_each`` and
    ``json_extract``, PostgreSQL ``jsonb_array_elements`` and casts).

    For INSERT ... SELECT of thousands of rows at once: the store parses them in C, where an
    executemany has SQLAlchemy and the driver bind every row in Python (~10 µs a row), and arrays
    of values dump several times faster than objects. Values are JSON as the column stores them:
    numbers, strings, null, and datetimes as text in SQLite's storage format (:func:`sqlite_datetime`)."""
    return _json_rows(dialect_name(session), tuple(columns), name)


@functools.cache
def _json_rows(dialect: str, columns: tuple[Column[Any], ...], name: str) -> Select[Any]:
    if dialect == "postgresql":
        rows = func.jsonb_array_elements(sql_cast(bindparam(name, type_=String), postgresql.JSONB)) \
            .table_valued(column("value", postgresql.JSONB)).alias("r")
        return select(*(sql_cast(rows.c.value.op("->>")(literal_column(str(i))), c.type).label(c.name)
                        for i, c in enumerate(columns)))
    rows = func.json_each(bindparam(name, type_=String)).table_valued("value").alias("r")
    return select(*(func.json_extract(rows.c.value, literal_column(f"'$[{i}]'")).label(c.name)
                    for i, c in enumerate(columns)))


def json_values(session: AsyncSession, name: str, integers: bool = False) -> Select[Any]:
    """SELECT the items of a JSON array of strings (or integers) bound as one string parameter ``name``:
    ``column.in_(json_values(...))`` checks thousands of values in one statement of one parameter,
    which neither store limits and which is compiled once (an IN list is a new statement for each
    length and binds every value in Python)."""
    return _json_values(dialect_name(session), name, integers)


@functools.cache
def _json_values(dialect: str, name: str, integers: bool) -> Select[Any]:
    type_ = Integer() if integers else String()
    if dialect == "postgresql":
        return select(sql_cast(func.jsonb_array_elements_text(sql_cast(bindparam(name, type_=String),
                                                                        postgresql.JSONB)), type_))
    return select(literal_column("value", type_)).select_from(func.json_each(bindparam(name, type_=String)))


def sqlite_datetime(value: datetime) -> str:
    """A naive datetime as SQLAlchemy stores it in SQLite (text that sorts and compares as its rows do);
    PostgreSQL reads the same text as a timestamp."""
    return value.isoformat(" ", "microseconds")


#: SQLite page cache of a connection that writes in bulk (KiB): a big transaction's dirty pages stay in
#: memory until its commit instead of spilling to the WAL, and its reads of index pages hit memory.
BULK_CACHE_KIB = 262_144


async def bulk_writes(session: AsyncSession) -> None:
    """Set the session's connection up for large write transactions (imports): on SQLite a page cache
    of :data:`BULK_CACHE_KIB`, kept by the connection until it closes. No-op on PostgreSQL."""
    if dialect_name(session) == "sqlite":
        await session.execute(text(f"PRAGMA cache_size = -{BULK_CACHE_KIB}"))
