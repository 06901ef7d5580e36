"""What a channel code does when someone comes through it (a follow, a scan, an add, a ``/start``).

Runs inside the ingest transaction of the arrival, so its effects commit with it: the scan is recorded
(new customer: first touch; someone already known: a re-engagement), the code's tags are added, its
coupon is granted on the customer's first arrival through that code only, its campaign is planned,
and its welcome text is returned for the channel to answer with (WeChat's passive reply to the
subscribe or scan event, WeCom's welcome code, the reply to Telegram's ``/start``); a ``track()`` link
in it is counted for the rule ``code:<name>``. A disabled or expired code is still counted, and does
nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError
from sqlalchemy import exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import coupons
from scrm.acquisition import links
from scrm.campaigns import templates
from scrm.campaigns.outbox import customer_context, customer_extras
from scrm.campaigns.planner import plan_many
from scrm.messages import InboundEvent
from scrm.store.models import AcquisitionCode, CodeScan, Customer
from scrm.tagging import add_tag

if TYPE_CHECKING:
    from scrm.runtime import Runtime

#: Event kinds that are an arrival when they carry a code's scene.
ARRIVALS = frozenset({"subscribe", "scan"})
#: The acquisition source of a customer a code brought (first touch).
SOURCE_PREFIX = "code:"


@dataclass
class Arrival:
    """What the code did, for the pipeline to record and answer with."""

    code: str
    new_customer: bool
    honoured: bool
    welcome: str | None = None
    tags: list[str] = field(default_factory=list)
    granted: dict[str, Any] | None = None
    planned: int = 0

    @property
    def payload(self) -> dict[str, Any]:
        return {"code": self.code, "new": self.new_customer, **({} if self.honoured else {"ignored": True})}


async def arrive(service: Runtime, session: AsyncSession, event: InboundEvent, customer_id: int, created: bool,
                 now: datetime) -> Arrival | None:
    """The code behind ``event.scene`` on this account, applied; None when no code has that scene
    (states and scenes made outside the service stay plain acquisition sources)."""
    if event.scene is None or event.kind not in ARRIVALS:
        return None
    code = await session.scalar(select(AcquisitionCode).where(
        AcquisitionCode.channel == event.channel, AcquisitionCode.account == event.account,
        AcquisitionCode.scene == event.scene))
    if code is None:
        return None
    first_time = not await session.scalar(select(exists().where(
        CodeScan.code_id == code.id, CodeScan.customer_id == customer_id)))
    session.add(CodeScan(code_id=code.id, customer_id=customer_id, new_customer=created, scanned_at=now))
    honoured = code.disabled_at is None and (code.expires_at is None or code.expires_at > now)
    arrival = Arrival(code.name, created, honoured)
    if created:
        await session.execute(update(Customer).where(Customer.id == customer_id)
                              .values(acquisition_source=f"{SOURCE_PREFIX}{code.name}"[:64]))
    if not honoured:
        await session.flush()
        return arrival
    for tag in code.tags:
        if await add_tag(session, customer_id, tag, "code", code.name, now):
            arrival.tags.append(tag)
    coupon: dict[str, str] | None = None
    pool = service.config.coupons.get(code.coupon_pool) if code.coupon_pool else None
    if pool is not None and code.coupon_pool is not None and first_time:
        given = await coupons.grant(session, code.coupon_pool, pool, customer_id, now)
        if given is not None:
            coupon = coupons.template_data(given, pool)
            arrival.granted = {"pool": code.coupon_pool, "code": given.code, "via": f"{SOURCE_PREFIX}{code.name}"}
    if code.campaign is not None and (loaded := service.campaigns.get(code.campaign)) is not None \
            and code.campaign not in service.paused:
        arrival.planned = await plan_many(session, code.campaign, 0, Customer.id == customer_id,
                                          now + loaded.definition.delay, now, channels=[event.channel])
    if code.welcome:
        customer = await session.get(Customer, customer_id)
        assert customer is not None
        extras = (await customer_extras(session, [customer_id]))[customer_id]
        tracked = links.for_reply(service.config, f"{SOURCE_PREFIX}{code.name}"[:64], customer_id, now)
        context: dict[str, Any] = {"customer": customer_context(customer, event.channel, extras),
                                   links.CONTEXT_KEY: tracked}
        if coupon is not None:
            context["coupon"] = coupon
        try:
            arrival.welcome = templates.render(code.welcome, context).strip() or None
        except TemplateError:  # e.g. {{ coupon.code }} with the pool empty: no welcome, the rest stands
            arrival.welcome = None
        if arrival.welcome is not None:
            await tracked.save(session)
    await session.flush()
    return arrival
