"""``/campaigns``: the list with funnel numbers, a campaign's funnel by variant and channel, pause and
resume, a preview as a chosen customer, and starting an event-triggered campaign for one customer.

The funnel is :func:`scrm.reports.funnel` (chat's ``/funnel``, the console's campaign page), pause and
resume :func:`scrm.campaigns.control.switch` (the console's buttons), the preview
:func:`scrm.campaigns.outbox.preview` (``scrm campaigns preview``, the console), audited as a read of
the customer.
"""

from __future__ import annotations

from typing import Any, get_args

from jinja2 import TemplateError
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import reports
from scrm.api import models as m
from scrm.api.framework import ApiError, Call, Endpoint
from scrm.api.refs import resolve
from scrm.audit import audit
from scrm.campaigns import control
from scrm.campaigns.definitions import LoadedCampaign, TriggerEvent
from scrm.campaigns.outbox import preview
from scrm.campaigns.planner import plan_many
from scrm.customers import BadCustomerRef, CustomerRefError, customer_of, parse_ref, touchpoint
from scrm.store.engine import reading, writing
from scrm.store.models import STAFF_REPLY, Campaign, Customer, Delivery


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


def _loaded(call: Call) -> LoadedCampaign:
    name = call.params["name"]
    loaded = call.service.campaigns.get(name)
    if loaded is None:
        raise ApiError(404, "campaign_not_found", f"no campaign {name[:64]!r}")
    return loaded


def _step(row: reports.FunnelRow) -> m.FunnelStep:
    return m.FunnelStep.model_validate(row.as_dict())


async def campaign_funnel(call: Call) -> m.CampaignFunnel:
    svc = call.service
    name = _loaded(call).definition.name
    days = svc.config.reports.attribution_days
    async with reading(svc.sessions) as session:
        found = await reports.funnel(session, name, days)
    if found is None:  # it never planned anything: every step is zero
        found = reports.Funnel(name, reports.FunnelRow(), {}, {}, {}, 0, days)
    return m.CampaignFunnel(campaign=name, total=_step(found.total),
                            by_variant={k: _step(v) for k, v in found.by_variant.items()},
                            by_channel={k: _step(v) for k, v in found.by_channel.items()}, skips=found.skips,
                            unassigned_conversions=found.unassigned_conversions,
                            attribution=reports.attribution_rule(days, "en"))


async def _switch(call: Call, paused: bool) -> m.PausedOut:
    name = _loaded(call).definition.name
    if not await control.switch(call.service, name, paused):
        raise ApiError(404, "campaign_not_found", f"campaign {name!r} is not in the store yet")
    return m.PausedOut(campaign=name, paused=paused)


async def pause_campaign(call: Call) -> m.PausedOut:
    return await _switch(call, True)


async def resume_campaign(call: Call) -> m.PausedOut:
    out = await _switch(call, False)
    call.service.wake_outbox()  # its planned deliveries may go now
    return out


async def preview_campaign(call: Call) -> m.CampaignPreview:
    query: m.CampaignPreviewQuery = call.query
    svc = call.service
    d = _loaded(call).definition
    values = {pool: spec.value for pool, spec in svc.config.coupons.items()}
    try:
        wanted = parse_ref(query.customer, svc.config.channels)
    except BadCustomerRef as exc:
        raise ApiError(422, "validation_error", f"query.customer: {exc}",
                       [{"field": "query.customer", "problem": str(exc)}]) from None
    async with writing(svc.sessions) as session:
        try:
            customer = await customer_of(session, wanted, svc.keyring)
        except CustomerRefError as exc:
            raise ApiError(404, "customer_not_found", f"query.customer: {exc}") from None
        channel = wanted.channel or "console"
        try:
            texts = await preview(session, d, customer, channel, values)
        except TemplateError as exc:
            raise ApiError(409, "template_error", f"a message template did not render for this customer: {exc}") \
                from None
        await audit(session, call.actor, None, customer.id, "view", f"api campaign preview {d.name}",
                    via=call.actor, at=svc.clock.now())
    return m.CampaignPreview(campaign=d.name, customer_id=customer.id, channel=channel, steps=texts)


async def deliveries(session: AsyncSession) -> dict[str, m.DeliveryCounts]:
    """Per campaign, its outbox rows by status (one grouped query; staff replies are no campaign)."""
    out: dict[str, dict[str, int]] = {}
    for campaign, status, n in (await session.execute(
            select(Delivery.campaign, Delivery.status, func.count()).where(Delivery.campaign != STAFF_REPLY)
            .group_by(Delivery.campaign, Delivery.status))):
        if status in m.DeliveryCounts.model_fields:
            out.setdefault(campaign, {})[status] = n
    return {name: m.DeliveryCounts(**values) for name, values in out.items()}


async def list_campaigns(call: Call) -> m.CampaignList:
    svc = call.service
    async with reading(svc.sessions) as session:
        paused = set((await session.scalars(select(Campaign.name).where(Campaign.paused))).all())
        statuses = await deliveries(session)
        numbers = await reports.funnels(session, svc.campaigns, svc.config.reports.attribution_days)
    items = []
    for name, loaded in sorted(svc.campaigns.items()):
        d, t = loaded.definition, loaded.definition.trigger
        items.append(m.CampaignOut(
            name=name, title=d.title, kind=d.kind, paused=name in paused, triggerable=_triggerable(d),
            trigger=m.TriggerInfo(event=t.event, tag=t.tag, stage=t.stage, cron=getattr(t, "cron", None),
                                  delay=t.delay),
            deliveries=statuses.get(name, m.DeliveryCounts()),
            funnel=_step(numbers[name].total if name in numbers else reports.FunnelRow())))
    return m.CampaignList(campaigns=items)


_NAME = {"name": "The campaign's name (its file's name = \"...\")"}

ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", "/campaigns", list_campaigns, "campaigns:read", "Campaigns with their funnel numbers",
             m.CampaignList),
    Endpoint("POST", "/campaigns/{name}/trigger", trigger_campaign, "campaigns:trigger",
             "Start an event-triggered campaign for one customer", m.TriggerOut, body=m.TriggerIn, status=201,
             params=_NAME, errors=(404, 409),
             description="Plans the campaign's first step like its own trigger would; 200 with planned=false "
                         "when the customer already had it (each campaign reaches a customer once)."),
    Endpoint("GET", "/campaigns/{name}/funnel", campaign_funnel, "campaigns:read",
             "A campaign's funnel over its life, by A/B variant and by channel", m.CampaignFunnel, params=_NAME,
             errors=(404,), description="The figures of /funnel in chat and the console's campaign page: audience, "
                                        "sent, delivered, replied, clicked, redeemed, converted, with rates."),
    Endpoint("POST", "/campaigns/{name}/pause", pause_campaign, "campaigns:write",
             "Pause a campaign: its deliveries wait, planned, until resumed", m.PausedOut, params=_NAME,
             errors=(404,)),
    Endpoint("POST", "/campaigns/{name}/resume", resume_campaign, "campaigns:write", "Resume a paused campaign",
             m.PausedOut, params=_NAME, errors=(404,)),
    Endpoint("GET", "/campaigns/{name}/preview", preview_campaign, "campaigns:read",
             "Every step of a campaign as a customer would read it (nothing is sent)", m.CampaignPreview,
             params=_NAME, query=m.CampaignPreviewQuery, errors=(404, 409),
             description="Rendered on the reference's channel (the console for a store id); audited as a read "
                         "of the customer. 409 template_error when a step does not render for them."),
]
