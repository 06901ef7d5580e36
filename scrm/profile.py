"""The 360° view of one customer: identities, tags with their sources, stage history, coupons, orders,
deliveries, loyalty, recent touchpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.loyalty.view import loyalty_section
from scrm.messages import MESSAGE_KINDS
from scrm.store.models import (
    Conversion,
    Coupon,
    CouponCode,
    Customer,
    CustomerTag,
    Delivery,
    Identity,
    Tag,
    Touchpoint,
)


async def touchpoint_page(session: AsyncSession, customer_id: int, size: int, before: int | None,
                          messages_only: bool = False) -> tuple[list[Touchpoint], int | None]:
    """The customer's touchpoints below id ``before``, newest first, and the cursor of the next page (None
    on the last): by id, never OFFSET, so the thousandth page costs what the first does. ``messages_only``:
    what was said (a message kind, or any touchpoint with text: sends, staff replies)."""
    query = select(Touchpoint).where(Touchpoint.customer_id == customer_id)
    if before is not None:
        query = query.where(Touchpoint.id < before)
    if messages_only:
        query = query.where(or_(Touchpoint.kind.in_(sorted(MESSAGE_KINDS)), Touchpoint.text.is_not(None)))
    rows = list((await session.scalars(query.order_by(Touchpoint.id.desc()).limit(size + 1))).all())
    return rows[:size], rows[size - 1].id if len(rows) > size else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


async def customer_view(session: AsyncSession, customer: Customer, touchpoints: int = 20) -> dict[str, Any]:
    cid = customer.id
    identities = (await session.scalars(select(Identity).where(Identity.customer_id == cid).order_by(Identity.id))).all()
    tags = (await session.execute(
        select(Tag.name, CustomerTag).join(CustomerTag, CustomerTag.tag_id == Tag.id)
        .where(CustomerTag.customer_id == cid).order_by(CustomerTag.added_at, Tag.name)
    )).all()
    codes = (await session.execute(
        select(CouponCode, Coupon.name).join(Coupon).where(CouponCode.customer_id == cid).order_by(CouponCode.id)
    )).all()
    recent = (await session.scalars(
        select(Touchpoint).where(Touchpoint.customer_id == cid).order_by(Touchpoint.id.desc()).limit(touchpoints)
    )).all()
    deliveries = (await session.scalars(select(Delivery).where(Delivery.customer_id == cid).order_by(Delivery.id))).all()
    moves = (await session.execute(
        select(Touchpoint.created_at, Touchpoint.payload)
        .where(Touchpoint.customer_id == cid, Touchpoint.kind == "stage_changed").order_by(Touchpoint.id)
    )).all()
    orders = (await session.scalars(
        select(Conversion).where(Conversion.customer_id == cid).order_by(Conversion.id))).all()
    return {
        "id": cid,
        "display_name": customer.display_name,
        "stage": customer.stage,
        "opted_out": customer.opted_out,
        "acquisition_source": customer.acquisition_source,
        "first_seen_at": _iso(customer.first_seen_at),
        "last_seen_at": _iso(customer.last_seen_at),
        "last_inbound_at": _iso(customer.last_inbound_at),
        "identities": [{"channel": i.channel, "account": i.account, "external_id": i.external_id} for i in identities],
        "tags": [
            {"name": name, "source": ct.source, "detail": ct.source_detail, "score": ct.score,
             "added_at": _iso(ct.added_at), "expires_at": _iso(ct.expires_at)}
            for name, ct in tags
        ],
        "stage_history": [{"at": _iso(at), "from": payload.get("from"), "to": payload.get("to")}
                          for at, payload in moves],
        "coupons": [
            {"code": c.code, "pool": pool, "granted_at": _iso(c.granted_at), "expires_at": _iso(c.expires_at),
             "redeemed_at": _iso(c.redeemed_at)}
            for c, pool in codes
        ],
        "deliveries": [
            {"campaign": d.campaign, "step": d.step, "status": d.status, "reason": d.reason, "due_at": _iso(d.due_at),
             "finished_at": _iso(d.finished_at)}
            for d in deliveries
        ],
        "orders": [
            {"order_id": o.order_id, "kind": o.kind, "amount": o.amount, "currency": o.currency,
             "coupon_code": o.coupon_code, "campaign": o.campaign, "at": _iso(o.created_at)}
            for o in orders
        ],
        "loyalty": await loyalty_section(session, cid),
        "touchpoints": [
            {"at": _iso(t.created_at), "direction": t.direction, "kind": t.kind, "channel": t.channel,
             "text": t.text, "campaign": t.campaign, "payload": t.payload}
            for t in reversed(recent)
        ],
    }
