"""The consumer: applies the journal's committed events (scrm.ingest.journal) in id order, in large batches.

Runs in instances with role ``worker`` or ``all``. Each batch is one writing transaction that reads the
oldest unapplied events, runs the pipeline on them (scrm.pipeline.handle_batch: set-based, a few
statements per batch) and marks them applied, with the reaction recorded, in that same transaction: an
event's effects and its ``applied_at`` commit together or not at all, so nothing is applied twice and
nothing acknowledged is lost when the process dies (SIGKILL) between the append and the application.

One consumer applies at a time. On PostgreSQL each batch transaction first takes a transaction-level
advisory lock (``pg_try_advisory_xact_lock``) and is skipped when another instance holds it; on SQLite
the store's single writer does the same. This keeps each customer's events in order: batches are
applied one after the other, in id order. An event acknowledged before another arrives has the lower
id and was committed first (a sequence grows as rows are inserted), so a consumer that sees the later
one sees the earlier one too; two consumers applying side by side could commit a customer's second
event before the first.

A batch that fails is rolled back whole and its events applied one at a time, in order, up to the one
that fails; that one is tried again on the next poll, and after ``ingest.max_attempts`` failed tries
it is set aside (marked applied with reaction ``failed``, logged and counted) so that the events
behind it are not held up for ever. The consumer is woken by an append committed in this process and
polls every ``ingest.poll_seconds`` for events appended by ``--role web`` instances. Under load (its
last round applied :data:`BUSY` events or more) it waits ``ingest.apply_linger_ms`` after a wake before
applying, so that batches fill: a batch's statements are set-based, and the cost per event falls as
batches grow; a lone event is applied at once. Applied rows are
deleted after ``ingest.retention_days``.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import metrics, pipeline
from scrm.group_commit import StoreUnavailable
from scrm.ingest.journal import Journal, decode, encode_reaction, scrubbed
from scrm.messages import Reaction
from scrm.store.dialect import dialect_name
from scrm.store.engine import writing
from scrm.store.models import InboundJournal

if TYPE_CHECKING:
    from scrm.runtime import Runtime

log = logging.getLogger(__name__)

#: The advisory lock (PostgreSQL) that lets one consumer apply at a time: this number ("SCIN") with the
#: store's schema hashed, as advisory locks are shared by every schema of the database.
APPLY_LOCK = 0x5343494E
#: How often applied rows past the retention are deleted, and how many in one transaction.
PRUNE_EVERY = 600.0
#: A round that applied this many events means load: the next one lingers first (ingest.apply_linger_ms).
BUSY = 32
PRUNE_CHUNK = 5000

_T = InboundJournal.__table__
_NEXT = (select(_T.c.id, _T.c.channel, _T.c.account, _T.c.external_id, _T.c.event, _T.c.received_at)
         .where(_T.c.applied_at.is_(None)).order_by(_T.c.id).limit(bindparam("limit")))
_ANY = select(_T.c.id).where(_T.c.applied_at.is_(None)).limit(1)
_MARK = update(_T).where(_T.c.id == bindparam("row_id")).values(applied_at=bindparam("now"),
                                                               reaction=bindparam("reaction"))
_SCRUB = update(_T).where(_T.c.id == bindparam("row_id")).values(event=bindparam("stored"))


class Consumer:
    def __init__(self, service: Runtime, journal: Journal) -> None:
        self.service = service
        self.journal = journal
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._next_prune = 0.0
        #: The first event of the last batch read: the one a lone failure is charged to.
        self._first: int | None = None
        journal.on_append = self.wake

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="scrm-ingest-consumer")

    async def stop(self) -> None:
        """Apply what is durable by now (the journal has stopped taking events), then stop."""
        if self._task is None:
            return
        self._stopping = True
        self.wake()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._next_prune = loop.time() + self.service.config.ingest.poll_seconds
        busy = False
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.service.config.ingest.poll_seconds)
            except TimeoutError:
                pass
            self._wake.clear()
            if busy and not self._stopping:  # under load: let the batch fill (cheaper per event)
                await asyncio.sleep(self.service.config.ingest.apply_linger_ms / 1000)
            busy = await self.drain() >= BUSY
            if self._stopping:
                return
            if loop.time() >= self._next_prune:
                self._next_prune = loop.time() + PRUNE_EVERY
                await self.prune()

    async def drain(self) -> int:
        """Apply batches until none is left (or another consumer holds the lock); returns events applied."""
        total = 0
        while True:
            try:
                applied = await self._apply_next()
            except Exception as exc:  # noqa: BLE001 - the store is unreachable: the next poll tries again
                metrics.store_error("ingest_apply")
                log.warning("could not apply inbound events (tried again in %ss): %r",
                            self.service.config.ingest.poll_seconds, exc)
                return total
            total += applied
            if applied == 0:
                return total

    async def _apply_next(self) -> int:
        limit = self.service.config.ingest.batch
        try:
            return await self._apply(limit)
        except Exception:  # noqa: BLE001 - rolled back whole: one at a time finds the event that fails
            if self._first is None:  # no event read: the store itself failed
                raise
            log.warning("a batch of inbound events failed; applying them one at a time", exc_info=True)
        applied = 0
        while applied < limit:
            try:
                one = await self._apply(1)
            except Exception as exc:  # noqa: BLE001 - counted against the event; tried again next poll
                if not await self._failed(exc):
                    return applied
                one = 1
            if one == 0:
                break
            applied += one
        return applied

    async def _apply(self, limit: int) -> int:
        """One batch: the oldest ``limit`` unapplied events, their effects and their marks, one transaction."""
        service = self.service
        self._first = None
        async with service.sessions() as session:  # a read first: a poll that finds nothing takes no write lock
            if await session.scalar(_ANY) is None:
                return 0
        async with writing(service.sessions) as session:
            if not await _exclusive(session):
                return 0
            rows = (await session.execute(_NEXT, {"limit": limit})).all()
            if not rows:
                return 0
            self._first = rows[0].id
            now = service.clock.now()
            keyring = service.keyring
            events = [decode(r.channel, r.account, r.external_id, r.event, keyring) for r in rows]
            items = [(event, self.journal.answer_for(r.id)) for event, r in zip(events, rows, strict=True)]
            outcome = await pipeline.handle_batch(service, session, items, now)
            await session.execute(_MARK, [{"row_id": r.id, "now": now, "reaction": encode_reaction(reaction)}
                                          for r, reaction in zip(rows, outcome.reactions, strict=True)])
            kept = [{"row_id": r.id, "stored": s} for r in rows if (s := scrubbed(r.event)) is not None]
            if kept:
                await session.execute(_SCRUB, kept)
        for event, reaction in zip(events, outcome.reactions, strict=True):
            metrics.received(event, reaction)
        if outcome.planned:
            service.wake_outbox()
        service.touch(outcome.customers)
        self.journal.applied([(r.id, r.received_at, reaction) for r, reaction in zip(rows, outcome.reactions,
                                                                                      strict=True)])
        return len(rows)

    async def _failed(self, error: Exception) -> bool:
        """Count a failed try against the event that failed alone; set it aside once it has had its tries.
        Returns whether it was set aside (the events behind it can go on)."""
        journal_id = self._first
        if journal_id is None:  # failed before reading it: the store itself
            raise error
        async with writing(self.service.sessions) as session:
            if not await _exclusive(session):
                return False
            row = await session.get(InboundJournal, journal_id)
            if row is None or row.applied_at is not None:
                return True
            row.attempts += 1
            if row.attempts < self.service.config.ingest.max_attempts:
                log.warning("inbound event #%d could not be applied (try %d): %r", journal_id, row.attempts, error)
                return False
            row.applied_at = self.service.clock.now()
            row.reaction = {**encode_reaction(Reaction()), "failed": type(error).__name__}
        metrics.store_error("ingest_set_aside")
        log.error("inbound event #%d set aside after %d failed tries: %r", journal_id, row.attempts, error)
        self.journal.set_aside(journal_id, StoreUnavailable(f"inbound event #{journal_id} could not be applied"))
        return True

    async def prune(self) -> int:
        """Delete applied events older than ``ingest.retention_days``, a chunk per transaction."""
        before = self.service.clock.now() - timedelta(days=self.service.config.ingest.retention_days)
        total = 0
        try:
            old = select(_T.c.id).where(_T.c.applied_at < before).order_by(_T.c.id).limit(PRUNE_CHUNK)
            while True:
                # Read beside the writer (applied rows never change again): nothing to delete, no write lock.
                async with self.service.sessions() as session:
                    ids = list(await session.scalars(old))
                if not ids:
                    return total
                async with writing(self.service.sessions) as session:
                    await session.execute(delete(_T).where(_T.c.id.in_(ids)))
                total += len(ids)
                if len(ids) < PRUNE_CHUNK:
                    return total
        except Exception:  # noqa: BLE001 - the next prune tries again
            metrics.store_error("ingest_prune")
            log.exception("could not prune the inbound journal")
            return total


async def _exclusive(session: AsyncSession) -> bool:
    """Whether this transaction may apply: on PostgreSQL, the advisory lock (released at its end);
    SQLite's writing transaction already excludes every other writer."""
    if dialect_name(session) != "postgresql":
        return True
    return bool(await session.scalar(select(func.pg_try_advisory_xact_lock(
        APPLY_LOCK, func.hashtext(func.current_schema())))))
