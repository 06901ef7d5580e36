"""Referrals (推荐有礼): invite codes, capture of referees, the referrer's points, the report.

A referee is captured from the acquisition source of their very first contact (a Telegram deep
link ``start=ref_<code>`` arrives as ``telegram:start:ref_<code>``; a WeChat QR scene or WeCom
state ``ref_<code>`` likewise), or from a typed ``邀请码 <code>`` shortly after first contact. The
referrer is paid when the referee first converts, never at capture: the ``referral`` ledger row is
unique per referee, so a referee is credited once whatever happens.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.customers import touchpoint
from scrm.loyalty.points import base_tier, credit, ensure_account, loyalty
from scrm.store.dialect import insert_ignore, rowcount
from scrm.store.models import Conversion, Customer, LoyaltyAccount, Referral, Touchpoint

if TYPE_CHECKING:
    from scrm.runtime import Runtime

_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
SOURCE_CODE = re.compile(r"(?:^|[:_=])ref_([A-Za-z0-9]{4,16})$")


async def invite_code(session: AsyncSession, customer_id: int, now: datetime, tier: str = "") -> str:
    """The customer's own referral code, made on first ask (unique; a clash just draws again)."""
    await ensure_account(session, customer_id, now, tier)
    code = await session.scalar(select(LoyaltyAccount.referral_code).where(LoyaltyAccount.customer_id == customer_id))
    while code is None:
        candidate = "".join(secrets.choice(_ALPHABET) for _ in range(8))
        if await session.scalar(select(LoyaltyAccount.customer_id)
                                .where(LoyaltyAccount.referral_code == candidate)) is None:
            await session.execute(update(LoyaltyAccount).where(LoyaltyAccount.customer_id == customer_id,
                                                               LoyaltyAccount.referral_code.is_(None))
                                  .values(referral_code=candidate))
            code = await session.scalar(select(LoyaltyAccount.referral_code)
                                        .where(LoyaltyAccount.customer_id == customer_id))
    return code


def invite_text(service: Runtime, code: str) -> str:
    bot = loyalty(service).referral.telegram_bot
    lines = [f"您的邀请码:{code}", f"好友首次联系我们时发送「邀请码 {code}」即可。"]
    if bot:
        lines.append(f"Telegram 邀请链接:https://t.me/{bot}?start=ref_{code}")
    points = loyalty(service).referral.points
    if points:
        lines.append(f"好友首次下单后,您将获得 {points} 积分。")
    return "\n".join(lines)


async def capture(session: AsyncSession, referee: Customer, code: str, via: str, now: datetime,
                  window_hours: int = 24) -> str:
    """Record ``referee`` as referred by the owner of ``code``: ``captured``, or why not."""
    referrer = await session.scalar(select(LoyaltyAccount.customer_id)
                                    .where(LoyaltyAccount.referral_code == code.upper()))
    if referrer is None:
        return "unknown_code"
    if referrer == referee.id:
        return "self"
    if via == "code":
        window = timedelta(hours=window_hours)
        bought = await session.scalar(select(func.count()).where(Conversion.customer_id == referee.id))
        if bought or referee.first_seen_at < now - window:
            return "known_customer"
    inserted = await insert_ignore(session, Referral.__table__, {
        "referrer_id": referrer, "referee_id": referee.id, "code": code.upper(), "via": via, "captured_at": now,
        "points_paid": 0})
    if not inserted:
        return "already_referred"
    touchpoint(session, customer_id=referee.id, channel="system", account="-", direction="internal",
               kind="referral_captured", now=now, payload={"referrer": referrer, "code": code.upper(), "via": via})
    return "captured"


async def capture_from_sources(session: AsyncSession, now: datetime, since: datetime | None = None) -> int:
    """Capture every customer whose first contact came through a ``ref_<code>`` source (sweep).

    The acquisition source is written only when a customer is created, so a known customer who
    follows a link later is never captured."""
    query = (select(Customer).outerjoin(Referral, Referral.referee_id == Customer.id)
             .where(Referral.id.is_(None), Customer.acquisition_source.like("%ref\\_%", escape="\\")))
    if since is not None:
        query = query.where(Customer.first_seen_at >= since)
    captured = 0
    for customer in (await session.scalars(query)).all():
        match = SOURCE_CODE.search(customer.acquisition_source or "")
        if match and await capture(session, customer, match.group(1), "link", now) == "captured":
            captured += 1
    return captured


async def on_conversion(service: Runtime, session: AsyncSession, referee_id: int, now: datetime) -> int | None:
    """Pay the referrer for a referee's first conversion; once per referee (conditional UPDATE)."""
    config = loyalty(service)
    referral = await session.scalar(select(Referral).where(Referral.referee_id == referee_id))
    if referral is None or referral.converted_at is not None:
        return None
    marked = await session.execute(update(Referral).where(Referral.id == referral.id, Referral.converted_at.is_(None))
                                   .values(converted_at=now))
    if not rowcount(marked):
        return None
    points = config.referral.points
    if points:
        await ensure_account(session, referral.referrer_id, now, base_tier(config))
        if await credit(service, session, referral.referrer_id, points, "referral", str(referee_id), now) is not None:
            await session.execute(update(Referral).where(Referral.id == referral.id).values(points_paid=points))
            return referral.referrer_id
    return None


@dataclass(frozen=True)
class ReferralReport:
    invites: int
    captures: int
    conversions: int
    points_paid: int
    top: list[dict[str, Any]]

    def text(self) -> str:
        lines = [(f"推荐有礼 Referrals: 邀请 invites {self.invites}, 拉新 captures {self.captures}, "
                  f"转化 conversions {self.conversions}, 积分 points paid {self.points_paid}")]
        for i, row in enumerate(self.top, 1):
            lines.append(f"{i}. #{row['customer_id']} {row['name'] or ''} — {row['captures']} 位好友, "
                         f"{row['conversions']} 转化, {row['points']} 积分")
        return "\n".join(lines)


async def report(session: AsyncSession, since: datetime | None = None, top: int = 5) -> ReferralReport:
    """Invites (codes handed out), captures, first conversions, points paid, top referrers."""
    invites = select(func.count()).select_from(Touchpoint).where(Touchpoint.kind == "referral_invite")
    refs = select(func.count(Referral.id), func.count(Referral.converted_at), func.coalesce(func.sum(Referral.points_paid), 0))
    tops = (select(Referral.referrer_id, Customer.display_name, func.count(Referral.id).label("n"),
                   func.count(Referral.converted_at), func.coalesce(func.sum(Referral.points_paid), 0))
            .join(Customer, Customer.id == Referral.referrer_id)
            .group_by(Referral.referrer_id, Customer.display_name))
    if since is not None:
        invites = invites.where(Touchpoint.created_at >= since)
        refs = refs.where(Referral.captured_at >= since)
        tops = tops.where(Referral.captured_at >= since)
    captures, conversions, paid = (await session.execute(refs)).one()
    rows = (await session.execute(tops.order_by(func.count(Referral.converted_at).desc(),
                                                func.count(Referral.id).desc(), Referral.referrer_id).limit(top))).all()
    return ReferralReport(int(await session.scalar(invites) or 0), int(captures), int(conversions), int(paid),
                          [{"customer_id": r[0], "name": r[1], "captures": r[2], "conversions": r[3], "points": int(r[4])}
                           for r in rows])
