"""Customers and their channel identities, and the touchpoints that record every interaction."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.messages import OutboundMessage, SendResult
from scrm.store.models import Customer, Identity, Touchpoint


async def find_customer(session: AsyncSession, channel: str, external_id: str, account: str | None = None) -> Customer | None:
    query = select(Customer).join(Identity).where(Identity.channel == channel, Identity.external_id == external_id)
    if account is not None:
        query = query.where(Identity.account == account)
    return (await session.scalars(query.order_by(Identity.id).limit(1))).first()


async def find_by_ref(session: AsyncSession, ref: str) -> Customer | None:
    """A customer named the way operators do: ``#12`` / ``12`` (store id) or ``channel:external_id``."""
    ref = ref.strip()
    digits = ref.lstrip("#")
    if digits.isascii() and digits.isdigit():  # not "¹" or "②": digits to str.isdigit, not to int()
        return await session.get(Customer, int(digits))
    channel, sep, external_id = ref.partition(":")
    return await find_customer(session, channel, external_id) if sep and external_id else None


def touchpoint(
    session: AsyncSession,
    *,
    customer_id: int | None,
    channel: str,
    account: str,
    direction: str,
    kind: str,
    now: datetime,
    text: str | None = None,
    payload: dict[str, Any] | None = None,
    platform_msg_id: str | None = None,
    campaign: str | None = None,
    delivery_id: int | None = None,
    actor: str | None = None,
) -> Touchpoint:
    """Append one touchpoint to the session; the caller's transaction commits it."""
    row = Touchpoint(
        customer_id=customer_id,
        actor=actor,
        channel=channel,
        account=account,
        direction=direction,
        kind=kind,
        text=text,
        payload=payload or {},
        platform_msg_id=platform_msg_id,
        campaign=campaign,
        delivery_id=delivery_id,
        created_at=now,
    )
    session.add(row)
    return row


def staff_message_touchpoint(session: AsyncSession, message: OutboundMessage, result: SendResult, kind: str,
                             now: datetime, **payload: Any) -> Touchpoint:
    """Record a message the service sent to a staff member (digest, alert) and how the send went."""
    return touchpoint(session, customer_id=None, actor=staff_actor(message.channel, message.external_id),
                      channel=message.channel, account=message.account, direction="out", kind=kind, now=now,
                      text=message.text, payload={"status": result.status, "reason": result.reason,
                                                  "platform_msg_id": result.platform_msg_id, **payload})


def staff_actor(channel: str, external_id: str) -> str:
    """How staff touchpoints name who acted: ``staff:<channel>:<id on that channel>``."""
    return f"staff:{channel}:{external_id}"


async def staff_last_inbound(session: AsyncSession, channel: str, account: str, external_id: str) -> datetime | None:
    """When this staff member last wrote to the account: WeChat lets the service message them for 48
    hours after, as it does customers (whose time is ``Customer.last_inbound_at``)."""
    return await session.scalar(select(func.max(Touchpoint.created_at)).where(
        Touchpoint.actor == staff_actor(channel, external_id), Touchpoint.account == account,
        Touchpoint.direction == "in"))
