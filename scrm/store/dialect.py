"""The few statements that differ between SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession


def _dialect(session: AsyncSession) -> Any:
    return postgresql if session.bind.dialect.name == "postgresql" else sqlite


async def insert_ignore(session: AsyncSession, table: Table, values: dict[str, Any] | list[dict[str, Any]]) -> int:
    """INSERT ... ON CONFLICT DO NOTHING; returns the number of rows actually inserted."""
    result = await session.execute(_dialect(session).insert(table).values(values).on_conflict_do_nothing())
    return result.rowcount or 0


async def insert_select_ignore(session: AsyncSession, table: Table, columns: list[str], query: Select[Any]) -> int:
    """INSERT INTO table (columns) SELECT ... ON CONFLICT DO NOTHING; returns rows inserted."""
    result = await session.execute(_dialect(session).insert(table).from_select(columns, query).on_conflict_do_nothing())
    return result.rowcount or 0
