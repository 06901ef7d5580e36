"""The store's own statement helpers on both stores: the one-trip SQLite cursor and insert-or-ignore."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, UniqueConstraint, func, insert, select, text
from sqlalchemy.exc import DBAPIError

from scrm.store.dialect import insert_ignore
from scrm.store.engine import make_engine, make_sessionmaker, reading, writing

METADATA = MetaData()
ITEMS = Table("statement_items", METADATA, Column("id", Integer, primary_key=True), Column("code", Integer),
              Column("label", String(16)), UniqueConstraint("code"))


async def test_insert_ignore_counts_the_rows_it_inserted(store: dict[str, Any]):
    engine = make_engine(store["url"], store.get("schema_name"))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(METADATA.create_all)
        async with make_sessionmaker(engine)() as s, s.begin():
            assert await insert_ignore(s, ITEMS, [{"code": i, "label": "a"} for i in range(5)]) == 5
            # 1,500 rows, 2 of them already there: more than one multi-row statement on either store
            assert await insert_ignore(s, ITEMS, [{"code": i, "label": "b"} for i in range(3, 1503)]) == 1498
            assert await insert_ignore(s, ITEMS, {"code": 1, "label": "c"}) == 0
            assert await insert_ignore(s, ITEMS, {"code": 9999, "label": "c"}) == 1
            assert await s.scalar(select(func.count()).select_from(ITEMS)) == 1504
            assert await s.scalar(select(ITEMS.c.label).where(ITEMS.c.code == 4)) == "a"
    finally:
        await engine.dispose()


async def test_sqlite_statements_read_write_and_report_like_the_stock_driver(tmp_path):
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'one-trip.db'}")
    assert engine.dialect.driver == "scrm_aiosqlite" and engine.dialect.name == "sqlite"
    try:
        async with engine.begin() as conn:
            await conn.run_sync(METADATA.create_all)
            single = await conn.execute(insert(ITEMS).values(code=1, label="x"))
            assert single.rowcount == 1 and single.inserted_primary_key == (1,)
            many = await conn.execute(insert(ITEMS), [{"code": i, "label": "y"} for i in range(2, 12)])
            assert many.rowcount == 10
            returned = await conn.execute(insert(ITEMS).returning(ITEMS.c.id, ITEMS.c.code),
                                          [{"code": 100 + i, "label": "z"} for i in range(3)])
            assert sorted(code for _, code in returned) == [100, 101, 102]
            updated = await conn.execute(text("UPDATE statement_items SET label = 'w' WHERE code < 5"))
            assert updated.rowcount == 4
            rows = (await conn.execute(select(ITEMS.c.code, ITEMS.c.label).order_by(ITEMS.c.code).limit(3))).all()
            assert [tuple(r) for r in rows] == [(1, "w"), (2, "w"), (3, "w")]
        async with engine.connect() as conn:  # a failed statement raises the DBAPI's error and leaves the rest
            try:
                await conn.execute(insert(ITEMS).values(code=1, label="dup"))
            except Exception as exc:  # noqa: BLE001
                assert "UNIQUE" in str(exc)
            else:
                raise AssertionError("duplicate code accepted")
            await conn.rollback()
            assert await conn.scalar(select(func.count()).select_from(ITEMS)) == 14
    finally:
        await engine.dispose()


async def test_a_reading_transaction_cannot_write_and_leaves_its_connection_writable(store: dict[str, Any]):
    engine = make_engine(store["url"], store.get("schema_name"), pool_size=1, max_overflow=0)
    elsewhere = make_engine(store["url"], store.get("schema_name"))  # another process, say
    sessions = make_sessionmaker(engine)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(METADATA.create_all)
            await conn.execute(insert(ITEMS).values(code=1, label="x"))
        async with reading(sessions) as s:
            assert await s.scalar(select(ITEMS.c.label).where(ITEMS.c.code == 1)) == "x"
            async with elsewhere.begin() as other:  # a write committed meanwhile...
                await other.execute(insert(ITEMS).values(code=7, label="w"))
            assert await s.scalar(select(func.count()).select_from(ITEMS)) == 1  # ...is not in its snapshot
        with pytest.raises(DBAPIError, match="(?i)read-?only"):
            async with reading(sessions) as s:
                await s.execute(insert(ITEMS).values(code=2, label="y"))
        async with writing(sessions) as s:  # the same pooled connection: writable again
            await s.execute(insert(ITEMS).values(code=3, label="z"))
        async with sessions() as s:
            assert sorted(await s.scalars(select(ITEMS.c.code))) == [1, 3, 7]
    finally:
        await elsewhere.dispose()
        await engine.dispose()
