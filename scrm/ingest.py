"""Ingest: inbound events committed in groups (scrm.group_commit), each acknowledged after the commit.

A commit per request caps ingest at a few percent of a bare handler; group commit shares one
transaction among the events that arrive while the previous one commits. After a commit of several
events the writer waits ``store.commit_linger_ms``: the clients it just answered send their next
events at once, and those then share the commit (a lone event never waits).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import metrics, pipeline
from scrm.group_commit import GroupCommit
from scrm.messages import InboundEvent, Reaction

if TYPE_CHECKING:
    from scrm.runtime import Runtime
    from scrm.staff import StaffReply

#: An event, with a staff report's answer read before the transaction (scrm.staff) or None.
_Item = tuple[InboundEvent, "StaffReply | None"]


class Ingestor:
    def __init__(self, service: Runtime) -> None:
        self.service = service
        self._commits: GroupCommit[_Item, Reaction] = GroupCommit(
            "ingest", service.sessions, self._process, linger=service.config.store.commit_linger_ms / 1000,
            retry=_raced)

    async def start(self) -> None:
        await self._commits.start()

    async def stop(self) -> None:
        """Commit everything already queued, then stop."""
        await self._commits.stop()

    def submit(self, event: InboundEvent, answer: StaffReply | None = None) -> asyncio.Future[Reaction]:
        """A future resolved once the event and its effects are committed. ``answer``: a staff
        report's, already read; the transaction records it instead of running the command."""
        return self._commits.submit((event, answer))

    async def _process(self, session: AsyncSession,
                       items: list[_Item]) -> tuple[list[Reaction], Callable[[], None]]:
        svc = self.service
        outcome = await pipeline.handle_batch(svc, session, items, svc.clock.now())

        def committed() -> None:
            for (event, _), reaction in zip(items, outcome.reactions, strict=True):
                metrics.received(event, reaction)
            if outcome.planned:
                svc.wake_outbox()
            svc.touch(outcome.customers)

        return outcome.reactions, committed


def _raced(exc: Exception) -> bool:
    """Another instance committed one of the event's unique keys while this one was writing it (PostgreSQL:
    the platform retried the message on another instance, or two instances met a new identity at once).
    Tried again, the event reads what the other committed: a retry is then a duplicate, answered with
    its original's replies, instead of a store error the platform would have to retry once more."""
    return isinstance(exc, IntegrityError)
