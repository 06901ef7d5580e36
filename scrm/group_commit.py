"""Group commit: many callers' writes share one transaction, each answered after the commit.

A transaction per write costs more than most writes (on SQLite a trip to the driver's thread to take
the write lock and another to commit; the ORM's session and transaction set-up in between), and caps
a writer at a fraction of what its statements cost. Here one writer task takes whatever has queued
while the previous commit was in flight and commits it together. After a commit of several items it
may first wait ``linger`` seconds: callers it just answered may come straight back (the webhook
clients of ingest do), and then share the commit instead of splitting into alternating halves.

Ingest (scrm.ingest) commits inbound events this way; the outbox its ``sending`` marks and outcomes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scrm import metrics
from scrm.store.engine import writing

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
#: What a batch's work returns: a result per item, in order, and what to do once they are committed.
Outcome = tuple[Sequence[R], Callable[[], None] | None]


class StoreUnavailable(Exception):
    """The write could not be committed (for an inbound event: the channel asks the platform to retry, 503)."""


class GroupCommit(Generic[T, R]):
    def __init__(self, name: str, sessions: async_sessionmaker[AsyncSession],
                 work: Callable[[AsyncSession, list[T]], Awaitable[Outcome[R]]], *, linger: float = 0.0,
                 max_batch: int = 500, retry: Callable[[Exception], bool] | None = None) -> None:
        self.name = name
        self.sessions = sessions
        self.work = work
        self.linger = linger
        self.max_batch = max_batch
        #: A lone item that fails with an error this accepts is run once more, in a new transaction
        #: (ingest: another instance committed the same unique key first; the next try reads it).
        self.retry = retry
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"scrm-{self.name}-commits")

    async def stop(self) -> None:
        """Commit everything already queued, then stop."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    def submit(self, item: T) -> asyncio.Future[R]:
        """A future resolved with the item's result once it is committed (a future, not a coroutine:
        a caller may stop waiting for it without cancelling the commit)."""
        if self._task is None:
            raise StoreUnavailable(f"{self.name} is not running")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return future

    async def _run(self) -> None:
        last = 0
        while True:
            batch = [await self._queue.get()]
            if last > 1 and self.linger:
                await asyncio.sleep(self.linger)
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            last = len(batch)
            try:
                await self._commit(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit(self, batch: list[tuple[T, asyncio.Future[R]]], *, again: bool = False) -> None:
        try:
            async with writing(self.sessions) as session:
                results, after = await self.work(session, [item for item, _ in batch])
        except Exception as exc:
            if len(batch) == 1 and not again and self.retry is not None and self.retry(exc):
                await self._commit(batch, again=True)
                return
            if len(batch) == 1:
                metrics.store_error(self.name)
                log.exception("could not commit %s", self.name)
                if not batch[0][1].done():
                    batch[0][1].set_exception(StoreUnavailable("store error"))
                return
            # One bad item (or a unique-key race with another instance) must not fail its batch mates.
            for one in batch:
                await self._commit([one])
            return
        if after is not None:
            try:
                after()
            except Exception:  # committed all the same: every caller still gets its result
                log.exception("%s: what follows a commit failed", self.name)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # a caller may have cancelled its future; the commit stands
                future.set_result(result)
