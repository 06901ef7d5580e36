"""The shipped migrations build the schema the models declare, on SQLite and PostgreSQL, and the
latest one goes down and up again."""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, String, inspect

from scrm.store.engine import make_engine
from scrm.store.migrate import alembic_config, current_revision, upgrade
from scrm.store.models import Base


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    found = []
    for diff in compare_metadata(context, Base.metadata):
        for change in diff if isinstance(diff, list) else [diff]:
            # SQLite ignores VARCHAR lengths, and 0006 widens customers.acquisition_source on PostgreSQL only.
            if (connection.dialect.name == "sqlite" and change[0] == "modify_type"
                    and isinstance(change[-2], String) and isinstance(change[-1], String)):
                continue
            found.append(change)
    return found


def _downgrade(connection: Connection, revision: str) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.downgrade(cfg, revision)


def _indexes(connection: Connection) -> set[str]:
    inspector = inspect(connection)
    return {ix["name"] for table in ("customers", "customer_tags", "tag_scores") for ix in inspector.get_indexes(table)}


#: Indexes dropped as redundant, by the migration that drops them: a composite index that starts
#: with the same column serves their lookups.
REDUNDANT = {"0009": {"ix_customers_stage"}, "0010": {"ix_customer_tags_customer_id", "ix_tag_scores_customer_id"}}


async def test_migrations_match_the_models_and_the_latest_goes_down_and_up(store: dict[str, Any]):
    engine = make_engine(store["url"], store.get("schema_name"))
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    previous = script.get_revision(head).down_revision
    try:
        await upgrade(engine)
        assert await current_revision(engine) == head
        async with engine.connect() as conn:
            assert await conn.run_sync(_differences) == []
            indexes = await conn.run_sync(_indexes)
        assert "ix_customers_stage_first_seen" in indexes and not indexes & set().union(*REDUNDANT.values())

        async with engine.begin() as conn:
            await conn.run_sync(_downgrade, previous)
        assert await current_revision(engine) == previous
        async with engine.connect() as conn:
            assert REDUNDANT.get(head, set()) <= await conn.run_sync(_indexes)  # restored by the downgrade
        await upgrade(engine)
        assert await current_revision(engine) == head
        async with engine.connect() as conn:
            assert await conn.run_sync(_differences) == []
    finally:
        await engine.dispose()
