"""What keeps the console's pages fast over a large store (``python -m bench.console`` times them over a
million customers), checked for what it must not change: the answers.

- A phone number is looked up in its keyed hash's index, also once the store's statistics say most
  customers have no phone (SQLite then walked every customer in id order).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert, text

from scrm.customers import phone_ref, resolve_refs
from scrm.keyring import LOOKUP_ID, Keyring, new_key_entry
from scrm.personal import phone_hash
from scrm.store.engine import make_engine, make_sessionmaker
from scrm.store.migrate import upgrade
from scrm.store.models import Customer

NOW = datetime(2026, 11, 27, 12, 0, 0)


async def test_a_phone_number_is_looked_up_in_its_index(tmp_path: Path) -> None:
    keyring = Keyring.parse(f"{new_key_entry(LOOKUP_ID)}\n{new_key_entry('k1')}")
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'scrm.db'}")
    await upgrade(engine)
    sessions = make_sessionmaker(engine)
    number = "+86 138 0013 8000"
    digest = phone_hash(number, keyring)
    async with sessions() as session, session.begin():  # most customers have no phone; two share one
        await session.execute(insert(Customer), [
            {"id": i, "display_name": f"c{i}", "first_seen_at": NOW, "last_seen_at": NOW,
             "phone_hash": digest if i in (900, 40) else None} for i in range(1, 3001)])
        await session.execute(text("ANALYZE"))
    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if "phone_hash" in statement:
            statements.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    try:
        async with sessions() as session:
            ref = phone_ref(number)
            assert (await resolve_refs(session, [ref], keyring))[ref] == 40  # the first customer with it
            [(statement, parameters)] = statements
            connection = await session.connection()
            plan = " / ".join(str(row[-1]) for row in (await connection.exec_driver_sql(
                f"EXPLAIN QUERY PLAN {statement}", parameters)).all())
        assert "ix_customers_phone_hash" in plan and "SCAN customers" not in plan, plan
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", seen)
        await engine.dispose()
