"""Operators' switches on running campaigns; the state lives in the store so every instance sees it."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.store.dialect import rowcount
from scrm.store.models import Campaign


async def set_paused(session: AsyncSession, name: str, paused: bool, now: datetime) -> bool:
    """Pause or resume; False when the store knows no such campaign (it syncs files at start)."""
    result = await session.execute(update(Campaign).where(Campaign.name == name).values(paused=paused, updated_at=now))
    return bool(rowcount(result))
