"""Send-rate limits per channel account, shared by all campaigns (and, on PostgreSQL, all instances).

On SQLite one process sends, so an in-memory limiter (aiolimiter) is enough; on PostgreSQL several
instances send, so the bucket is a row they update under a row lock.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from aiolimiter import AsyncLimiter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scrm.store.dialect import insert_ignore
from scrm.store.models import RateBucket


class SharedBucket:
    """A token bucket in the store: at most ``rate`` sends per second across every instance."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], key: str, rate: float) -> None:
        self.sessions, self.key, self.rate = sessions, key, rate
        self.burst = max(1.0, rate / 10)  # a tenth of a second's worth: no bursts over the platform limit

    async def acquire(self) -> None:
        while True:
            wait = await self._take()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _take(self) -> float:
        stamp = datetime.now(UTC).replace(tzinfo=None)  # wall time: rates are physical, not the test clock
        async with self.sessions() as session, session.begin():
            await insert_ignore(session, RateBucket.__table__, {"key": self.key, "tokens": self.burst,
                                                                "updated_at": stamp})
            row = await session.scalar(select(RateBucket).where(RateBucket.key == self.key).with_for_update())
            assert row is not None
            elapsed = max(0.0, (stamp - row.updated_at).total_seconds())
            tokens = min(self.burst, row.tokens + elapsed * self.rate)
            row.updated_at = stamp
            if tokens >= 1:
                row.tokens = tokens - 1
                return 0.0
            row.tokens = tokens
            return (1 - tokens) / self.rate

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        return None


Limiter = AsyncLimiter | SharedBucket


def limiters(sessions: async_sessionmaker[AsyncSession], dialect: str, rates: dict[str, float]) -> dict[str, Limiter]:
    if dialect == "postgresql":
        return {key: SharedBucket(sessions, key, rate) for key, rate in rates.items()}
    return {key: AsyncLimiter(rate, 1.0) for key, rate in rates.items()}
