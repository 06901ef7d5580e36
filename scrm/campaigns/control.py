"""Operators' switches on running campaigns; the state lives in the store so every instance sees it."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.store.dialect import rowcount
from scrm.store.models import Campaign


async def set_paused(session: AsyncSession, name: str, paused: bool, now: datetime) -> bool:
    """Pause or resume; False when the store knows no such campaign (it syncs files at start)."""
    result = await session.execute(update(Campaign).where(Campaign.name == name).values(paused=paused, updated_at=now))
    return bool(rowcount(result))


async def add_campaign(session: AsyncSession, name: str, paused: bool, now: datetime) -> None:
    """The store's row for a campaign whose file is about to be written, so that it starts ``paused`` or
    not as asked (the service's sync of the files adds a new campaign active, and keeps an existing row)."""
    row = await session.scalar(select(Campaign).where(Campaign.name == name))
    if row is None:
        session.add(Campaign(name=name, paused=paused, definition_hash=None, created_at=now, updated_at=now))
    else:
        row.paused, row.updated_at = paused, now
    await session.flush()
