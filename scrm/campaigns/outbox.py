"""The outbox worker: claims due deliveries, renders and sends them, records every outcome.

At most once: a delivery is marked ``sending`` in its own commit before the platform is called, and
a ``sending`` row found at start-up (the process died mid-send) becomes ``unknown``, never resent.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import coupons
from scrm.campaigns import templates
from scrm.channels import NoticeTemplate, OutboundMessage, SendResult
from scrm.customers import touchpoint
from scrm.store.models import Customer, CustomerTag, Delivery, Tag

if TYPE_CHECKING:
    from scrm.service import Service

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5


@dataclass
class _Prepared:
    delivery_id: int
    message: OutboundMessage | None
    skip_reason: str | None = None


class Outbox:
    def __init__(self, service: Service) -> None:
        self.service = service
        self._lock = asyncio.Lock()

    async def recover(self) -> int:
        """Mark deliveries left mid-send by a crashed process as ``unknown``; returns how many."""
        now = self.service.clock.now()
        async with self.service.sessions() as session, session.begin():
            rows = (await session.scalars(select(Delivery).where(Delivery.status == "sending"))).all()
            for d in rows:
                d.status, d.reason, d.finished_at = "unknown", "crashed_mid_send", now
                touchpoint(session, customer_id=d.customer_id, channel=d.channel, account=d.account,
                           direction="out", kind="delivery_unknown", now=now, campaign=d.campaign,
                           delivery_id=d.id, payload={"reason": "crashed_mid_send"})
        if rows:
            log.warning("%d deliveries were mid-send at the last stop; marked unknown, not resent", len(rows))
        return len(rows)

    async def tick(self) -> int:
        """Send what is due now; returns the number of deliveries finished or deferred."""
        async with self._lock:
            prepared = await self._claim()
            if not prepared:
                return 0
            results = await asyncio.gather(*(self._send(p) for p in prepared))
            await self._record(list(zip(prepared, results)))
            return len(prepared)

    async def pending_for(self, session: AsyncSession, customer_id: int, horizon: timedelta) -> int:
        due_by = self.service.clock.now() + horizon
        rows = await session.scalars(
            select(Delivery.id).where(
                Delivery.customer_id == customer_id,
                Delivery.status.in_(("planned", "sending")),
                Delivery.due_at <= due_by,
            )
        )
        return len(rows.all())

    async def _claim(self) -> list[_Prepared]:
        svc = self.service
        now = svc.clock.now()
        prepared: list[_Prepared] = []
        async with svc.sessions() as session, session.begin():
            query = (
                select(Delivery.id)
                .where(Delivery.status == "planned", Delivery.due_at <= now)
                .order_by(Delivery.due_at, Delivery.id)
                .limit(svc.config.scheduler.outbox_batch)
            )
            if svc.paused:
                query = query.where(Delivery.campaign.not_in(svc.paused))
            for delivery_id in (await session.scalars(query)).all():
                claimed = await session.execute(
                    update(Delivery)
                    .where(Delivery.id == delivery_id, Delivery.status == "planned")
                    .values(status="sending", attempts=Delivery.attempts + 1)
                )
                if claimed.rowcount:
                    prepared.append(await self._prepare(session, delivery_id))
        return prepared

    async def _prepare(self, session: AsyncSession, delivery_id: int) -> _Prepared:
        svc = self.service
        now = svc.clock.now()
        d = await session.get(Delivery, delivery_id)
        assert d is not None
        customer = await session.get(Customer, d.customer_id)
        loaded = svc.campaigns.get(d.campaign)
        if customer is None or customer.opted_out:
            return _Prepared(d.id, None, "opted_out")
        if loaded is None:
            return _Prepared(d.id, None, "campaign_removed")
        if svc.channel(d.channel, d.account) is None:
            return _Prepared(d.id, None, "channel_not_configured")
        definition = loaded.definition
        tags = (await session.scalars(
            select(Tag.name).join(CustomerTag).where(CustomerTag.customer_id == customer.id).order_by(Tag.name)
        )).all()
        context: dict[str, object] = {
            "customer": {"id": customer.id, "name": customer.display_name or "朋友", "stage": customer.stage,
                         "tags": list(tags), "channel": d.channel},
            "campaign": {"name": definition.name, "title": definition.title},
        }
        if definition.coupon is not None:
            pool = svc.config.coupons[definition.coupon.pool]
            code = await coupons.grant(session, definition.coupon.pool, pool, customer.id, now, delivery_id=d.id)
            if code is None:
                return _Prepared(d.id, None, "coupon_limit_reached")
            touchpoint(session, customer_id=customer.id, channel=d.channel, account=d.account, direction="internal",
                       kind="coupon_granted", now=now, campaign=d.campaign, delivery_id=d.id,
                       payload={"code": code.code, "pool": definition.coupon.pool})
            context["coupon"] = {"code": code.code, "value": f"{pool.value:g}",
                                 "expires": code.expires_at.date().isoformat() if code.expires_at else ""}
        d.text = templates.render(definition.message.text, context)
        notice = None
        if (spec := definition.message.template) is not None:
            notice = NoticeTemplate(spec.template_id, {k: templates.render(v, context) for k, v in spec.fields.items()},
                                    spec.url)
        return _Prepared(d.id, OutboundMessage(d.channel, d.account, d.external_id, d.text, d.id, d.campaign,
                                               customer.last_inbound_at, notice))

    async def _send(self, p: _Prepared) -> SendResult:
        if p.message is None:
            return SendResult("skipped", p.skip_reason)
        channel = self.service.channel(p.message.channel, p.message.account)
        assert channel is not None
        try:
            return await channel.send(p.message)
        except Exception as exc:  # a channel bug must not leave the delivery in limbo
            log.exception("channel %s failed to send delivery %s", p.message.channel, p.delivery_id)
            return SendResult("failed", f"error:{type(exc).__name__}")

    async def _record(self, outcomes: list[tuple[_Prepared, SendResult]]) -> None:
        now = self.service.clock.now()
        async with self.service.sessions() as session, session.begin():
            for p, result in outcomes:
                d = await session.get(Delivery, p.delivery_id)
                assert d is not None
                if result.status == "retry" and d.attempts < MAX_ATTEMPTS:
                    d.status, d.reason = "planned", result.reason
                    d.due_at = now + timedelta(seconds=max(result.retry_after, 1.0))
                    continue
                d.status = "failed" if result.status == "retry" else result.status
                d.reason, d.finished_at = result.reason, now
                kind = {"sent": "campaign_message", "skipped": "delivery_skipped"}.get(d.status, "delivery_failed")
                touchpoint(session, customer_id=d.customer_id, channel=d.channel, account=d.account, direction="out",
                           kind=kind, now=now, text=d.text if d.status == "sent" else None, campaign=d.campaign,
                           delivery_id=d.id, platform_msg_id=None,
                           payload={"reason": result.reason} if result.reason else {})
