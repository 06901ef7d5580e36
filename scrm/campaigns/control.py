"""Operators' switches on running campaigns; the state lives in the store so every instance sees it."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.store.dialect import rowcount
from scrm.store.engine import writing
from scrm.store.models import Campaign

if TYPE_CHECKING:
    from scrm.runtime import Runtime


async def set_paused(session: AsyncSession, name: str, paused: bool, now: datetime) -> bool:
    """Pause or resume; False when the store knows no such campaign (it syncs files at start)."""
    result = await session.execute(update(Campaign).where(Campaign.name == name).values(paused=paused, updated_at=now))
    return bool(rowcount(result))


async def switch(runtime: Runtime, name: str, paused: bool) -> bool:
    """Pause or resume in the store (every instance's outbox reads it) and in this instance at once (the
    console, the API); False when the store knows no such campaign."""
    async with writing(runtime.sessions) as session:
        found = await set_paused(session, name, paused, runtime.clock.now())
    if found:
        (runtime.paused.add if paused else runtime.paused.discard)(name)
    return found


async def add_campaign(session: AsyncSession, name: str, paused: bool, now: datetime) -> None:
    """The store's row for a campaign whose file is about to be written, so that it starts ``paused`` or
    not as asked (the service's sync of the files adds a new campaign active, and keeps an existing row)."""
    row = await session.scalar(select(Campaign).where(Campaign.name == name))
    if row is None:
        session.add(Campaign(name=name, paused=paused, definition_hash=None, created_at=now, updated_at=now))
    else:
        row.paused, row.updated_at = paused, now
    await session.flush()
