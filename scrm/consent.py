"""Marketing consent per customer and channel, with its source and time; and the marketing gate.

Consent is a history (one row per change) rather than a flag, because "who agreed, how and when" is
what a brand must be able to show under PIPL. Service replies never need consent; marketing does
when ``privacy.require_consent_for_marketing`` is on, and a withdrawal always wins.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.store.models import Consent, Customer
from scrm.webhooks import events

if TYPE_CHECKING:
    from scrm.config import Config

MARKETING = "marketing"
#: Consent to keep the phone number the person shared (not consent to marketing).
PHONE = "phone"
SOURCES = frozenset({"subscribed", "message", "import", "opt_out", "unsubscribed", "contact_shared", "operator"})

OPT_IN_WORDS = frozenset({"订阅", "同意接收", "/subscribe", "subscribe"})
OPT_IN_REPLY = "已为您开启活动和优惠消息。回复 TD 或 退订 可随时退订。"


def is_opt_in(text: str) -> bool:
    return text.strip().casefold() in OPT_IN_WORDS


def record(session: AsyncSession, customer_id: int, channel: str, granted: bool, source: str, now: datetime,
           purpose: str = MARKETING, detail: str | None = None) -> Consent:
    """Append a consent change; the caller's transaction commits it."""
    if source not in SOURCES:
        raise ValueError(f"unknown consent source {source!r} (known: {', '.join(sorted(SOURCES))})")
    row = Consent(customer_id=customer_id, channel=channel, purpose=purpose, granted=granted, source=source,
                  detail=detail, created_at=now)
    session.add(row)
    events.emit(session, "consent.changed", customer_id, {"channel": channel, "purpose": purpose, "granted": granted,
                                                          "source": source, "detail": detail}, now)
    return row


async def latest(session: AsyncSession, customer_id: int, channel: str, purpose: str = MARKETING) -> Consent | None:
    """The customer's current answer on a channel (None: never asked)."""
    return (await session.scalars(
        select(Consent).where(Consent.customer_id == customer_id, Consent.channel == channel,
                              Consent.purpose == purpose)
        .order_by(Consent.id.desc()).limit(1))).first()


async def may_market(session: AsyncSession, customer: Customer, channel: str, config: Config) -> str | None:
    """Why a marketing message must not go to this customer on this channel, or None if it may.

    Reasons: ``opted_out`` (the customer's global opt-out), ``consent_withdrawn`` (the latest consent on
    the channel is a withdrawal), ``no_consent`` (consent is required by config and was never given).
    """
    if customer.opted_out:
        return "opted_out"
    answer = await latest(session, customer.id, channel)
    if answer is not None and not answer.granted:
        return "consent_withdrawn"
    if config.privacy.require_consent_for_marketing and answer is None:
        return "no_consent"
    return None


async def history(session: AsyncSession, customer_id: int) -> list[Consent]:
    return list((await session.scalars(
        select(Consent).where(Consent.customer_id == customer_id).order_by(Consent.id))).all())
