"""Short-lived snapshots of slow read-only figures, shown with the time they were read.

A manager's dashboard over a million customers reads seconds of report queries (stages, top tags,
attribution, the period before); a campaign list its funnels; the segments page a count of every
segment. Those figures are computed by the same core functions every surface calls
(:mod:`scrm.reports`, :mod:`scrm.segments`), once, and kept here by what was asked (the key), so the
pages that show them answer at once and say "as of HH:MM".

- A snapshot younger than ``fresh`` is served as it is.
- An older one, up to ``keep``, is served too, and one refresh starts in the background: the next
  view gets the new figures, and no view waits for them.
- With none (or one older than ``keep``) the request waits for the figures; requests that ask for
  the same key meanwhile wait for the same computation instead of starting their own.
- :meth:`Snapshots.keep_warm` (every few minutes) refreshes the snapshots someone asked for within
  ``warm``, so a page looked at now and then finds its figures ready rather than reading them while
  the viewer waits. ``compute`` is therefore called again later: it reads what it needs (the time,
  the period it stands for) when it runs, not when it was handed over.

Each process keeps its own snapshots: two instances behind a balancer may show figures read at
different times, each labelled with its time, neither older than ``keep``. Nothing here runs on
the event loop for long: the computation is the caller's (queries awaited on the store's driver,
charts drawn in a worker thread); a background refresh that fails is logged and the snapshot it
would have replaced is served until ``keep`` runs out.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from scrm.clock import Clock

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Snapshot(Generic[T]):
    value: T
    #: When the figures were read (naive UTC, the service's clock): the computation's start.
    at: datetime


class Snapshots:
    """The snapshots of one process, at most ``size`` of them (the least recently asked go first)."""

    def __init__(self, clock: Clock, fresh: timedelta = timedelta(minutes=1), keep: timedelta = timedelta(minutes=30),
                 warm: timedelta = timedelta(hours=2), size: int = 64) -> None:
        self.clock, self.fresh, self.keep, self.warm, self.size = clock, fresh, keep, warm, size
        self._entries: OrderedDict[Hashable, Snapshot[Any]] = OrderedDict()
        self._running: dict[Hashable, asyncio.Task[Snapshot[Any]]] = {}
        #: When each key was last asked for, and how to compute it (for :meth:`keep_warm`).
        self._asked: dict[Hashable, tuple[datetime, Callable[[], Awaitable[Any]]]] = {}
        self._keeper: asyncio.Task[None] | None = None

    async def get(self, key: Hashable, compute: Callable[[], Awaitable[T]], warm: bool = True) -> Snapshot[T]:
        """The snapshot for ``key``, computing it with ``compute`` (which opens its own transaction: a
        refresh outlives the request that started it) when there is none young enough. ``warm=False``:
        not kept warm (figures someone asked for once, such as an expression typed in a box)."""
        if warm:
            self._asked[key] = (self.clock.now(), compute)
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            age = self.clock.now() - found.at
            if age < self.fresh:
                return found
            if age < self.keep:
                self._start(key, compute)
                return found
        # shielded: a request that stops waiting does not stop the computation others wait for
        snapshot: Snapshot[T] = await asyncio.shield(self._start(key, compute))
        return snapshot

    def _start(self, key: Hashable, compute: Callable[[], Awaitable[T]]) -> asyncio.Task[Snapshot[Any]]:
        task = self._running.get(key)
        if task is None:
            task = asyncio.create_task(self._compute(key, compute), name=f"snapshot {key!r}"[:200])
            self._running[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return task

    async def _compute(self, key: Hashable, compute: Callable[[], Awaitable[T]]) -> Snapshot[Any]:
        at = self.clock.now()  # before reading: the figures are at least this recent
        snapshot = Snapshot(await compute(), at)
        self._entries[key] = snapshot
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            dropped, _ = self._entries.popitem(last=False)
            self._asked.pop(dropped, None)
        return snapshot

    def keep_warm(self) -> int:
        """Start a refresh of every snapshot older than ``fresh`` that was asked for within ``warm``;
        the number started."""
        now, started = self.clock.now(), 0
        for key, (asked, compute) in list(self._asked.items()):
            found = self._entries.get(key)
            if now - asked >= self.warm:
                del self._asked[key]
            elif found is not None and now - found.at >= self.fresh and key not in self._running:
                self._start(key, compute)
                started += 1
        return started

    def _finished(self, key: Hashable, task: asyncio.Task[Snapshot[Any]]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled() and (error := task.exception()) is not None:
            log.warning("figures for %r could not be read: %s: %s", key, type(error).__name__, error)

    def keep_warm_every(self, seconds: float) -> None:
        """Call :meth:`keep_warm` every ``seconds`` until :meth:`close`."""

        async def keeper() -> None:
            while True:
                await asyncio.sleep(seconds)
                self.keep_warm()

        if self._keeper is None:
            self._keeper = asyncio.create_task(keeper(), name="snapshots kept warm")

    async def close(self) -> None:
        """Stop the computations still running (the service is stopping: its store is about to close)."""
        running: list[asyncio.Task[Any]] = list(self._running.values())
        if self._keeper is not None:
            running.append(self._keeper)
            self._keeper = None
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
