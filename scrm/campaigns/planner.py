"""Planning: turn a trigger into planned deliveries in the outbox, at most one per step and customer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, String, cast, func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.campaigns.definitions import LoadedCampaign, TriggerEvent
from scrm.store.dialect import insert_ignore, insert_select_ignore
from scrm.store.models import Customer, Delivery, Identity
from scrm.tagging import normalize

if TYPE_CHECKING:
    from scrm.runtime import Runtime


def triggered(campaigns: Sequence[LoadedCampaign], paused: set[str], event: TriggerEvent, *, tag: str | None = None,
              stage: str | None = None, words: set[str] | None = None,
              campaign: str | None = None) -> list[LoadedCampaign]:
    """The active campaigns an event starts (a tag or stage event names which tag or stage; a
    keyword event carries the message's normalized tokens; a menu click names its campaign)."""
    return [
        c for c in campaigns
        if c.definition.trigger.event == event and c.definition.name not in paused
        and (event != "tag_added" or c.definition.trigger.tag == tag)
        and (event != "stage_changed" or c.definition.trigger.stage == stage)
        and (event != "keyword" or bool(words and {normalize(k) for k in c.definition.trigger.keywords} & words))
        and (event != "menu_click" or c.definition.name == campaign)
    ]


@dataclass(frozen=True)
class Trigger:
    """One event that may start campaigns for one customer (reached on the identity it came from)."""

    event: TriggerEvent
    customer_id: int
    channel: str
    account: str
    external_id: str
    tag: str | None = None
    words: frozenset[str] | None = None
    campaign: str | None = None


async def plan_events(session: AsyncSession, campaigns: Sequence[LoadedCampaign], paused: set[str],
                      triggers: Sequence[Trigger], now: datetime) -> int:
    """Plan every active campaign the triggers start, in one insert; returns the deliveries newly planned."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for t in triggers:
        for loaded in triggered(campaigns, paused, t.event, tag=t.tag, words=set(t.words or ()), campaign=t.campaign):
            d = loaded.definition
            if d.channels and t.channel not in d.channels:
                continue
            rows.setdefault((d.name, f"c{t.customer_id}"), {
                "campaign": d.name, "step": 0, "target": f"c{t.customer_id}", "occurrence": "",
                "customer_id": t.customer_id, "channel": t.channel, "account": t.account,
                "external_id": t.external_id, "status": "planned", "attempts": 0, "due_at": now + d.delay,
                "created_at": now,
            })
    return await insert_ignore(session, Delivery.__table__, list(rows.values())) if rows else 0


def _value(value: Any) -> Any:
    """Plain values become bound literals; SQL expressions (per-customer due times, variants) pass."""
    return value if isinstance(value, ColumnElement) else literal(value)


async def plan_many(
    session: AsyncSession, campaign: str, step: int, where: ColumnElement[bool], due_at: Any, now: datetime,
    channels: Sequence[str] | None = None, occurrence: Any = "", variant: Any = None,
) -> int:
    """Plan one step for every customer matching ``where``, in one INSERT ... SELECT.

    Each customer is reached on their first identity (on one of ``channels`` when given); customers
    already planned for this step are left alone (the outbox's unique key), so re-planning is harmless.
    """
    identity_query = select(func.min(Identity.id)).where(Identity.customer_id == Customer.id)
    if channels:
        identity_query = identity_query.where(Identity.channel.in_(channels))
    query = (
        select(
            literal(campaign), literal(step), literal("c") + cast(Customer.id, String), _value(occurrence),
            Customer.id, Identity.channel, Identity.account, Identity.external_id, _value(variant),
            literal("planned"), literal(0), _value(due_at), literal(now),
        )
        .join(Identity, Identity.id == identity_query.correlate(Customer).scalar_subquery())
        .where(where)
    )
    columns = ["campaign", "step", "target", "occurrence", "customer_id", "channel", "account", "external_id",
               "variant", "status", "attempts", "due_at", "created_at"]
    return await insert_select_ignore(session, Delivery.__table__, columns, query)


async def plan_triggered(service: Runtime, session: AsyncSession, event: TriggerEvent, ids: Sequence[int],
                         now: datetime, tag: str | None = None, stage: str | None = None) -> int:
    """Plan the campaigns an event starts for many customers at once (behaviour tags, stage moves)."""
    return await plan_where(service, session, event, Customer.id.in_(ids), now, tag=tag, stage=stage)


async def plan_where(service: Runtime, session: AsyncSession, event: TriggerEvent, where: ColumnElement[bool],
                     now: datetime, tag: str | None = None, stage: str | None = None) -> int:
    """:func:`plan_triggered` for the customers matching a condition (a tag given to a whole search
    result), one INSERT ... SELECT per campaign the event starts."""
    planned = 0
    for loaded in triggered(list(service.campaigns.values()), service.paused, event, tag=tag, stage=stage):
        d = loaded.definition
        planned += await plan_many(session, d.name, 0, where, now + d.delay, now)
    return planned
