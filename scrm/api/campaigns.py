"""``/campaigns``: the list with funnel numbers, and starting an event-triggered campaign for one customer."""

from __future__ import annotations

from typing import Any, get_args

from sqlalchemy import distinct, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.acquisition import links
from scrm.api import models as m
from scrm.api.framework import ApiError, Call, Endpoint
from scrm.api.refs import resolve
from scrm.campaigns.definitions import TriggerEvent
from scrm.campaigns.planner import plan_many
from scrm.customers import touchpoint
from scrm.store.models import (
    STAFF_REPLY,
    Campaign,
    Conversion,
    CouponCode,
    Customer,
    Delivery,
    Touchpoint,
)


def _triggerable(definition: Any) -> bool:
    """Campaigns started by one customer's event (not cron/date runs, not group campaigns)."""
    trigger = definition.trigger
    audience = getattr(definition, "audience", None)
    return trigger.event in get_args(TriggerEvent) and not getattr(audience, "groups", False)


async def trigger_campaign(call: Call) -> tuple[int, m.TriggerOut]:
    body: m.TriggerIn = call.body
    svc = call.service
    name = call.params["name"]
    loaded = svc.campaigns.get(name)
    if loaded is None:
        raise ApiError(404, "campaign_not_found", f"no campaign {name[:64]!r}")
    d = loaded.definition
    if not _triggerable(d):
        raise ApiError(409, "campaign_not_triggerable", f"campaign {name!r} is not started by a customer event")
    async with svc.sessions() as session, session.begin():
        if await session.scalar(select(Campaign.paused).where(Campaign.name == name)):
            raise ApiError(409, "campaign_paused", f"campaign {name!r} is paused")
        customer = await resolve(call, session, body.customer)
        now = svc.clock.now()
        where = Customer.id == customer.id
        segment = getattr(getattr(d, "audience", None), "segment", None)
        if segment:
            from scrm.segments import condition

            where = where & condition(svc.config.segments[segment], now, svc.config.segments)
        planned = await plan_many(session, name, 0, where, now + d.delay, now,
                                  channels=getattr(d, "channels", None) or None)
        due = await session.scalar(select(Delivery.due_at).where(
            Delivery.campaign == name, Delivery.step == 0, Delivery.target == f"c{customer.id}"))
        if due is None:
            reason = f"not in the campaign's segment {segment!r}" if segment else "has no identity to reach"
            raise ApiError(409, "customer_not_reachable", f"customer #{customer.id} {reason}")
        if planned:
            touchpoint(session, customer_id=customer.id, actor=call.actor, channel="api", account=call.key_name,
                       direction="internal", kind="campaign_triggered", now=now, campaign=name)
    if planned:
        svc.wake_outbox()
    return (201 if planned else 200), m.TriggerOut(campaign=name, customer_id=customer.id, planned=bool(planned),
                                                   due_at=due.isoformat(timespec="seconds"))


async def funnels(session: AsyncSession) -> dict[str, m.Funnel]:
    """Per campaign: deliveries by status, customers who clicked its links, coupons granted/redeemed through
    them, attributed conversions.

    Plain aggregate SQL over the outbox, the clicks (their own index) and conversions (four grouped queries,
    whatever the base size).
    """
    out: dict[str, dict[str, Any]] = {}
    for campaign, status, n in (await session.execute(
            select(Delivery.campaign, Delivery.status, func.count()).where(Delivery.campaign != STAFF_REPLY)
            .group_by(Delivery.campaign, Delivery.status))):
        if status in m.Funnel.model_fields:
            out.setdefault(campaign, {})[status] = n
    for campaign, granted, redeemed in (await session.execute(
            select(Delivery.campaign, func.count(CouponCode.id), func.count(CouponCode.redeemed_at))
            .join(CouponCode, CouponCode.delivery_id == Delivery.id).group_by(Delivery.campaign))):
        out.setdefault(campaign, {}).update(coupons_granted=granted, coupons_redeemed=redeemed)
    for clicked, people in (await session.execute(
            select(Touchpoint.campaign, func.count(distinct(Touchpoint.customer_id)))
            # The kind written out, not bound: the partial index on clicks applies only to the literal.
            .where(Touchpoint.kind == literal_column(f"'{links.CLICK}'"), Touchpoint.campaign.is_not(None))
            .group_by(Touchpoint.campaign))):
        assert clicked is not None  # the query excludes clicks without a campaign
        out.setdefault(clicked, {})["clicked_customers"] = people
    for credited, n, people, revenue in (await session.execute(
            select(Conversion.campaign, func.count(), func.count(distinct(Conversion.customer_id)),
                   func.coalesce(func.sum(Conversion.amount), 0))
            .where(Conversion.campaign.is_not(None)).group_by(Conversion.campaign))):
        assert credited is not None  # the query excludes conversions without a campaign
        out.setdefault(credited, {}).update(conversions=n, converted_customers=people, revenue=float(revenue))
    return {name: m.Funnel(**values) for name, values in out.items()}


async def list_campaigns(call: Call) -> m.CampaignList:
    svc = call.service
    async with svc.sessions() as session:
        paused = set((await session.scalars(select(Campaign.name).where(Campaign.paused))).all())
        numbers = await funnels(session)
    items = []
    for name, loaded in sorted(svc.campaigns.items()):
        d, t = loaded.definition, loaded.definition.trigger
        items.append(m.CampaignOut(
            name=name, title=d.title, kind=d.kind, paused=name in paused, triggerable=_triggerable(d),
            trigger=m.TriggerInfo(event=t.event, tag=t.tag, stage=t.stage, cron=getattr(t, "cron", None),
                                  delay=t.delay),
            funnel=numbers.get(name, m.Funnel())))
    return m.CampaignList(campaigns=items)


ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", "/campaigns", list_campaigns, "campaigns:read", "Campaigns with their funnel numbers",
             m.CampaignList),
    Endpoint("POST", "/campaigns/{name}/trigger", trigger_campaign, "campaigns:trigger",
             "Start an event-triggered campaign for one customer", m.TriggerOut, body=m.TriggerIn, status=201,
             params={"name": "The campaign's name (its file's name = \"...\")"}, errors=(404, 409),
             description="Plans the campaign's first step like its own trigger would; 200 with planned=false "
                         "when the customer already had it (each campaign reaches a customer once)."),
]
