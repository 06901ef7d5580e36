"""Planning: turn a trigger into planned deliveries in the outbox, at most one per step and customer."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from scrm.campaigns.definitions import LoadedCampaign, TriggerEvent
from scrm.store.dialect import insert_ignore
from scrm.store.models import Delivery


async def plan_event(
    session: AsyncSession,
    campaigns: Sequence[LoadedCampaign],
    paused: set[str],
    event: TriggerEvent,
    *,
    customer_id: int,
    channel: str,
    account: str,
    external_id: str,
    now: datetime,
    tag: str | None = None,
) -> list[str]:
    """Plan every active campaign triggered by ``event``; returns the names newly planned."""
    planned: list[str] = []
    for loaded in campaigns:
        d = loaded.definition
        if d.trigger.event != event or d.name in paused or (event == "tag_added" and d.trigger.tag != tag):
            continue
        inserted = await insert_ignore(
            session,
            Delivery.__table__,
            {
                "campaign": d.name,
                "step": 0,
                "customer_id": customer_id,
                "channel": channel,
                "account": account,
                "external_id": external_id,
                "status": "planned",
                "attempts": 0,
                "due_at": now + d.delay,
                "created_at": now,
            },
        )
        if inserted:
            planned.append(d.name)
    return planned
