"""Orders from other systems become conversions, credited to the campaign that earned them.

Attribution, in order: the campaign whose delivery granted the coupon used on the order; else the
last campaign message sent to the customer within :data:`ATTRIBUTION_WINDOW`; else none. An order id
is recorded once: posting it again returns the first result (kept in the order's touchpoint) and
writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import coupons
from scrm.customers import touchpoint
from scrm.store.models import STAFF_REPLY, Conversion, CouponCode, Customer, Delivery, Touchpoint

ATTRIBUTION_WINDOW = timedelta(days=7)
ORDER_KIND = "order"


@dataclass(frozen=True)
class Order:
    order_id: str
    amount: float
    currency: str
    coupon_code: str | None = None
    items: tuple[dict[str, Any], ...] = ()


async def existing_result(session: AsyncSession, order_id: str) -> dict[str, Any] | None:
    """The stored result of an order id recorded before, or None."""
    conversion = await session.scalar(select(Conversion).where(Conversion.order_id == order_id))
    if conversion is None:
        return None
    stored = await session.scalar(
        select(Touchpoint.payload).where(Touchpoint.customer_id == conversion.customer_id,
                                         Touchpoint.kind == ORDER_KIND, Touchpoint.platform_msg_id == order_id)
        .order_by(Touchpoint.id).limit(1))
    if stored and isinstance(stored.get("result"), dict):
        return {**stored["result"], "duplicate": True}
    # An order id recorded by some other path: rebuild what can be rebuilt from the conversion.
    return {"order_id": order_id, "conversion_id": conversion.id, "customer_id": conversion.customer_id,
            "amount": conversion.amount, "currency": conversion.currency, "campaign": conversion.campaign,
            "attribution": "coupon" if conversion.coupon_code and conversion.campaign else
            "last_delivery" if conversion.campaign else "none",
            "coupon": {"code": conversion.coupon_code, "status": "used"} if conversion.coupon_code else None,
            "duplicate": True}


async def last_campaign(session: AsyncSession, customer_id: int, now: datetime) -> str | None:
    """The campaign of the last message sent to the customer within the attribution window."""
    return await session.scalar(
        select(Delivery.campaign).where(
            Delivery.customer_id == customer_id, Delivery.status == "sent", Delivery.campaign != STAFF_REPLY,
            Delivery.finished_at >= now - ATTRIBUTION_WINDOW, Delivery.finished_at <= now,
        ).order_by(Delivery.finished_at.desc(), Delivery.id.desc()).limit(1))


async def _coupon_campaign(session: AsyncSession, code: str, customer_id: int) -> str | None:
    return await session.scalar(
        select(Delivery.campaign).join(CouponCode, CouponCode.delivery_id == Delivery.id)
        .where(CouponCode.code == code, CouponCode.customer_id == customer_id))


async def record_order(session: AsyncSession, customer: Customer, order: Order, now: datetime,
                       channel: str, account: str) -> dict[str, Any]:
    """Record one order as a conversion (the caller has checked the id is new, and commits).

    A coupon on the order is redeemed with it when valid and the customer's own; the redemption's
    conversion then *is* the order's, so one order never counts as two conversions.
    """
    conversion: Conversion | None = None
    coupon_use: dict[str, str] | None = None
    campaign: str | None = None
    attribution = "none"
    if order.coupon_code:
        code = order.coupon_code.strip().upper()
        outcome = await coupons.redeem(session, code, now, via="api", customer_id=customer.id)
        coupon_use = {"code": code, "status": outcome.status}
        if outcome.status == "redeemed":
            # coupons.redeem wrote the redemption's conversion: the order takes it over.
            conversion = await session.scalar(
                select(Conversion).where(Conversion.coupon_code == code, Conversion.kind == "coupon_redemption",
                                         Conversion.order_id.is_(None)).order_by(Conversion.id.desc()).limit(1))
            touchpoint(session, customer_id=customer.id, channel=channel, account=account, direction="internal",
                       kind="coupon_redeemed", now=now, payload={"code": code, "order_id": order.order_id})
        if outcome.status in ("redeemed", "used"):
            campaign = await _coupon_campaign(session, code, customer.id)
            attribution = "coupon" if campaign else "none"
    if campaign is None:
        campaign = await last_campaign(session, customer.id, now)
        attribution = "last_delivery" if campaign else "none"
    honoured = coupon_use is not None and coupon_use["status"] in ("redeemed", "used")
    if conversion is None:
        conversion = Conversion(customer_id=customer.id, kind=ORDER_KIND, created_at=now)
        session.add(conversion)
    conversion.kind, conversion.order_id, conversion.campaign = ORDER_KIND, order.order_id, campaign
    conversion.amount, conversion.currency = order.amount, order.currency
    conversion.coupon_code = coupon_use["code"] if honoured and coupon_use else None
    await session.flush()
    result = {"order_id": order.order_id, "conversion_id": conversion.id, "customer_id": customer.id,
              "amount": order.amount, "currency": order.currency, "campaign": campaign,
              "attribution": attribution, "coupon": coupon_use, "duplicate": False}
    touchpoint(session, customer_id=customer.id, channel=channel, account=account, direction="internal",
               kind=ORDER_KIND, now=now, platform_msg_id=order.order_id, campaign=campaign,
               payload={"items": list(order.items), "result": result})
    return result
