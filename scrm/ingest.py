"""Group commit: many inbound events share one transaction, each acknowledged after the commit.

A commit per request caps ingest at a few percent of a bare handler; here one writer task takes
whatever has queued while the previous commit was in flight and commits it together. After a
commit of several events it first waits ``store.commit_linger_ms``: the clients it just answered
send their next events at once, and those then share the commit (a lone event never waits).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from scrm import metrics, pipeline
from scrm.messages import InboundEvent, Reaction
from scrm.store.engine import writing

if TYPE_CHECKING:
    from scrm.runtime import Runtime
    from scrm.staff import StaffReply

log = logging.getLogger(__name__)

#: The event, its future, and a staff report's answer read before the transaction (scrm.staff).
_Item = tuple[InboundEvent, asyncio.Future[Reaction], "StaffReply | None"]


class StoreUnavailable(Exception):
    """The event could not be committed; the channel should ask the platform to retry (503)."""


class Ingestor:
    def __init__(self, service: Runtime, max_batch: int = 500) -> None:
        self.service = service
        self.max_batch = max_batch
        self.linger = service.config.store.commit_linger_ms / 1000
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scrm-ingest")

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

    def submit(self, event: InboundEvent, answer: StaffReply | None = None) -> asyncio.Future[Reaction]:
        """A future resolved once the event and its effects are committed (a future, not a
        coroutine: a caller may stop waiting for it without cancelling the commit). ``answer``: a
        staff report's, already read; the transaction records it instead of running the command."""
        if self._task is None:
            raise StoreUnavailable("ingest is not running")
        future: asyncio.Future[Reaction] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((event, future, answer))
        return future

    async def _run(self) -> None:
        last = 0
        while True:
            batch = [await self._queue.get()]
            if last > 1 and self.linger:
                # Under load the events answered by the last commit come straight back: waiting a
                # moment lets them share this commit instead of splitting the traffic in two halves.
                await asyncio.sleep(self.linger)
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            last = len(batch)
            try:
                await self._commit(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit(self, batch: list[_Item]) -> None:
        try:
            outcome = await self._process(batch)
        except Exception:
            if len(batch) == 1:
                metrics.store_error("ingest")
                log.exception("could not commit inbound event")
                _resolve(batch[0][1], exc=StoreUnavailable("store error"))
                return
            # One bad event (or a unique-key race with another instance) must not fail its batch mates.
            for item in batch:
                await self._commit([item])
            return
        for (event, future, _), reaction in zip(batch, outcome.reactions):
            _resolve(future, metrics.received(event, reaction))
        if outcome.planned:
            self.service.wake_outbox()
        self.service.touch(outcome.customers)

    async def _process(self, batch: list[_Item]) -> pipeline.BatchOutcome:
        svc = self.service
        async with writing(svc.sessions) as session:
            return await pipeline.handle_batch(svc, session, [(event, answer) for event, _, answer in batch],
                                               svc.clock.now())


def _resolve(future: asyncio.Future[Reaction], reaction: Reaction | None = None, exc: Exception | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        assert reaction is not None
        future.set_result(reaction)
