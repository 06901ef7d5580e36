"""The few statements that differ between SQLite and PostgreSQL."""

from __future__ import annotations

import functools
from typing import Any, cast

from sqlalchemy import CursorResult, Result, Select, Table, literal_column
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
