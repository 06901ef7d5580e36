"""Group commit on both stores: writes queued together share one commit, each caller gets its own
result once committed, and one failing write fails alone (its batch mates are committed)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Column, Integer, MetaData, String, Table, event, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.group_commit import GroupCommit, Outcome, StoreUnavailable
from scrm.store.engine import make_engine, make_sessionmaker

METADATA = MetaData()
NOTES = Table("group_commit_notes", METADATA, Column("id", Integer, primary_key=True),
              Column("label", String(16), unique=True))


async def test_writes_share_commits_and_a_bad_one_fails_alone(store: dict[str, Any]):
    engine = make_engine(store["url"], store.get("schema_name"))
    commits = 0
    committed_batches: list[list[str]] = []

    def counted(_conn: Any) -> None:
        nonlocal commits
        commits += 1

    async def write(session: AsyncSession, labels: list[str]) -> Outcome[int]:
        ids = [(await session.execute(insert(NOTES).values(label=label).returning(NOTES.c.id))).scalar_one()
               for label in labels]
        return ids, lambda: committed_batches.append(labels)

    def errors() -> float:
        return REGISTRY.get_sample_value("scrm_store_errors_total", {"where": "notes"}) or 0.0

    before = errors()
    writer: GroupCommit[str, int] = GroupCommit("notes", make_sessionmaker(engine), write)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(METADATA.create_all)
        with pytest.raises(StoreUnavailable):
            writer.submit("early")  # not started: nothing is queued that could be lost
        await writer.start()
        event.listen(engine.sync_engine, "commit", counted)
        futures = [writer.submit(f"n{i}") for i in range(20)]
        ids = await asyncio.gather(*futures)
        assert len(set(ids)) == 20 and commits == 1 and committed_batches == [[f"n{i}" for i in range(20)]]

        # "n3" is taken: its batch is retried one write at a time, and only it fails
        futures = [writer.submit(label) for label in ("m1", "n3", "m2")]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert isinstance(results[1], StoreUnavailable)
        assert all(isinstance(r, int) for r in (results[0], results[2]))
        assert committed_batches[1:] == [["m1"], ["m2"]]  # the failed batch's after-commit action never ran
        assert errors() == before + 1

        queued = [writer.submit(f"late{i}") for i in range(3)]
        await writer.stop()  # commits what is queued before it stops
        assert all(f.done() and not f.exception() for f in queued)
        with pytest.raises(StoreUnavailable):
            writer.submit("after")
        async with engine.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(NOTES)) == 25
    finally:
        await writer.stop()
        await engine.dispose()


async def test_callers_get_their_results_when_what_follows_the_commit_fails(store: dict[str, Any], caplog):
    engine = make_engine(store["url"], store.get("schema_name"))

    def broken() -> None:
        raise RuntimeError("a bug after the commit")

    async def write(session: AsyncSession, labels: list[str]) -> Outcome[str]:
        await session.execute(insert(NOTES), [{"label": label} for label in labels])
        return labels, broken

    writer: GroupCommit[str, str] = GroupCommit("notes", make_sessionmaker(engine), write)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(METADATA.create_all)
        await writer.start()
        assert await asyncio.wait_for(asyncio.gather(writer.submit("a"), writer.submit("b")), 10) == ["a", "b"]
        assert any("what follows a commit failed" in r.getMessage() for r in caplog.records)
        async with engine.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(NOTES)) == 2
    finally:
        await writer.stop()
        await engine.dispose()
