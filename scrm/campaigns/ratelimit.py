"""Send-rate limits per channel and account, shared by all campaigns (and, on PostgreSQL, all instances).

On SQLite one process sends, so an in-memory limiter (aiolimiter) is enough; on PostgreSQL several
instances send, so the schedule lives in a row they all update. :class:`Pace` spaces one process's
calls to a platform evenly at the platform's own limit (Telegram's ~30 messages a second).
"""

from __future__ import annotations

import asyncio
import math

from aiolimiter import AsyncLimiter
from sqlalchemy import func, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scrm.store.dialect import insert_ignore
from scrm.store.models import RateBucket

#: Reserve the next free send slot: the row's ``updated_at`` is when the next slot is free (naive UTC,
#: the database's clock, so instances on several hosts agree); returns how long to wait for ours.
_RESERVE = text("""
WITH clock AS (SELECT timezone('utc', clock_timestamp()) AS now)
UPDATE rate_buckets
SET updated_at = GREATEST(rate_buckets.updated_at, clock.now) + make_interval(secs => CAST(:interval AS float8))
FROM clock WHERE rate_buckets.key = :key
RETURNING CAST(EXTRACT(EPOCH FROM (rate_buckets.updated_at - clock.now)) AS float8) - CAST(:interval AS float8)
""")

#: Reservations a stalled sender may make before it sends anyway (it cannot wait forever).
MAX_RESERVATIONS = 5


class SharedBucket:
    """At most ``rate`` sends per second across every instance, evenly spaced.

    Each send reserves the next free slot (``1 / rate`` after the previous one) with one
    UPDATE ... RETURNING on the key's row, then sleeps until its slot: no polling, so waiting
    instances do not compete for the row lock, and no bursts (a sliding second holds at most
    ``rate`` + 1 sends)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], key: str, rate: float) -> None:
        self.sessions, self.key, self.rate = sessions, key, rate

    async def acquire(self) -> None:
        """Sleep until our slot. A sender that wakes more than a slot late (its process was stalled)
        takes a new slot instead: going now would land next to the senders whose slots come next."""
        loop = asyncio.get_running_loop()
        for _ in range(MAX_RESERVATIONS):
            wait = await self._reserve()
            due = loop.time() + max(wait, 0.0)
            if wait > 0:
                await asyncio.sleep(wait)
            if loop.time() - due <= 1.0 / self.rate:
                return

    async def _reserve(self) -> float:
        params = {"key": self.key, "interval": 1.0 / self.rate}
        async with self.sessions() as session, session.begin():
            wait = await session.scalar(_RESERVE, params)
            if wait is None:  # the key's first send ever
                await insert_ignore(session, RateBucket.__table__, {
                    "key": self.key, "tokens": 0.0, "updated_at": func.timezone("utc", func.clock_timestamp())})
                wait = await session.scalar(_RESERVE, params)
        assert wait is not None
        return float(wait)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        return None


class Pace:
    """Evenly spaced acquisitions, a little over ``1 / rate`` apart; waiters go in arrival order.

    Each acquisition takes the next slot of a schedule. A waiter that wakes late (a busy event loop) keeps
    the schedule unless it is more than a quarter slot late, so the next slot comes that much sooner and
    the rate holds; a leaky bucket of capacity one (PTB's AIORateLimiter set up to space requests) loses
    every late wake-up instead, and Telegram sends reached about 27 of 30 a second. The margin is for the
    platform, which counts arrivals: any ``rate + 1`` acquisitions span more than a second by enough
    (about 10 ms at 30/s) to absorb the jitter between here and there."""

    def __init__(self, rate: float, margin: float = 0.02) -> None:
        self.interval = (1 + margin) / rate
        self.tolerance = self.interval / 4
        self._next = -math.inf  # the next free slot, in event loop time
        self._turn = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._turn:
            loop = asyncio.get_running_loop()
            slot = max(self._next, loop.time())
            while (wait := slot - loop.time()) > 0:
                await asyncio.sleep(wait)
            self._next = max(slot, loop.time() - self.tolerance) + self.interval


Limiter = AsyncLimiter | SharedBucket


def limiters(sessions: async_sessionmaker[AsyncSession], dialect: str, rates: dict[str, float]) -> dict[str, Limiter]:
    if dialect == "postgresql":
        return {key: SharedBucket(sessions, key, rate) for key, rate in rates.items()}
    return {key: AsyncLimiter(rate, 1.0) for key, rate in rates.items()}
