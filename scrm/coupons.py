"""Coupon pools, unique codes, grants and redemptions (a redemption is a conversion)."""

from __future__ import annotations

import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.config import CouponPool
from scrm.store.dialect import dialect_of, insert_ignore, rowcount
from scrm.store.models import Conversion, Coupon, CouponCode, Delivery, Redemption

_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/L: codes are read aloud at the till


async def pool_row(session: AsyncSession, name: str, pool: CouponPool) -> Coupon:
    row = await session.scalar(select(Coupon).where(Coupon.name == name))
    if row is None:
        # INSERT ... ON CONFLICT: two grants from a pool never seen before may race to create it.
        await insert_ignore(session, Coupon.__table__, {"name": name, "value": pool.value})
        row = await session.scalar(select(Coupon).where(Coupon.name == name))
        assert row is not None
    if row.value != pool.value:
        row.value = pool.value
    return row


async def _pool_id(session: AsyncSession, name: str, pool: CouponPool) -> int:
    """The pool's id, read once per session (the outbox grants a group's coupons in one)."""
    known: dict[str, int] = session.info.setdefault("scrm_coupon_pools", {})
    if name not in known:
        known[name] = (await pool_row(session, name, pool)).id
    return known[name]


async def granted_for(session: AsyncSession, delivery_ids: Collection[int]) -> dict[int, CouponCode]:
    """The codes given for these deliveries, by delivery: a delivery claimed again (its instance died
    before sending it) keeps the code it was given."""
    if not delivery_ids:
        return {}
    rows = await session.scalars(select(CouponCode).where(CouponCode.delivery_id.in_(delivery_ids)))
    return {row.delivery_id: row for row in rows if row.delivery_id is not None}


async def grant(
    session: AsyncSession, name: str, pool: CouponPool, customer_id: int, now: datetime, delivery_id: int | None = None
) -> CouponCode | None:
    """A fresh code for the customer (given for ``delivery_id``, one code per delivery: see
    :func:`granted_for`), or None when they reached the pool's per-customer limit.

    Codes are written at once (never left pending in the session), so counting them needs no flush
    of what else the session holds: the outbox's group of deliveries is flushed once, at its commit."""
    coupon_id = await _pool_id(session, name, pool)
    held = await session.scalar(
        select(func.count()).where(CouponCode.coupon_id == coupon_id, CouponCode.customer_id == customer_id),
        execution_options=_NO_FLUSH)
    if (held or 0) >= pool.per_customer:
        return None
    expires = now + timedelta(days=pool.valid_days)
    row = await _claim_imported(session, coupon_id, customer_id, delivery_id, now, expires)
    if row is not None or not pool.generate:
        return row
    while row is None:  # a new random code; another already taken (one in 10^11 or so) means another draw
        code = pool.prefix + "".join(secrets.choice(_ALPHABET) for _ in range(8))
        row = await session.scalar(
            dialect_of(session).insert(CouponCode).on_conflict_do_nothing(index_elements=[CouponCode.code])
            .values(coupon_id=coupon_id, code=code, customer_id=customer_id, delivery_id=delivery_id,
                    granted_at=now, expires_at=expires).returning(CouponCode),
            execution_options=_NO_FLUSH)
    return row


#: For the statements of :func:`grant`, which do not depend on what the session has pending.
_NO_FLUSH = {"autoflush": False}


def _empty_pools(session: AsyncSession) -> set[int]:
    """Pools this transaction found without a free code (codes it returns or imports take them off)."""
    empty: set[int] = session.info.setdefault("scrm_empty_pools", set())
    return empty


async def _claim_imported(session: AsyncSession, coupon_id: int, customer_id: int, delivery_id: int | None,
                          now: datetime, expires: datetime) -> CouponCode | None:
    """Hand out the oldest unassigned imported (or returned) code; the conditional UPDATE makes a code
    go to one customer only, even when two instances grant at once. A pool found empty is not looked
    at again in the same transaction (the outbox grants a group's coupons in one)."""
    empty = _empty_pools(session)
    while coupon_id not in empty:
        candidate = await session.scalar(
            select(CouponCode.id).where(CouponCode.coupon_id == coupon_id, CouponCode.customer_id.is_(None))
            .order_by(CouponCode.id).limit(1), execution_options=_NO_FLUSH)
        if candidate is None:
            empty.add(coupon_id)
            return None
        taken = await session.execute(
            update(CouponCode).where(CouponCode.id == candidate, CouponCode.customer_id.is_(None))
            .values(customer_id=customer_id, delivery_id=delivery_id, granted_at=now,
                    expires_at=func.coalesce(CouponCode.expires_at, expires)))
        if rowcount(taken):
            return await session.get(CouponCode, candidate, populate_existing=True)
    return None


async def revoke_for_delivery(session: AsyncSession, delivery_id: int) -> list[str]:
    """Take back the unredeemed codes a message carried that never reached the customer (the channel
    skipped or refused it); they return to their pool. Returns the codes."""
    rows = (await session.scalars(select(CouponCode).where(
        CouponCode.delivery_id == delivery_id, CouponCode.redeemed_at.is_(None)))).all()
    for row in rows:
        row.customer_id = row.delivery_id = row.granted_at = None
        _empty_pools(session).discard(row.coupon_id)
    return [row.code for row in rows]


async def import_codes(session: AsyncSession, name: str, pool: CouponPool, codes: list[str],
                       expires_at: datetime | None = None) -> int:
    """Add codes to a pool (from a supplier's file); codes already known are ignored."""
    coupon = await pool_row(session, name, pool)
    _empty_pools(session).discard(coupon.id)
    rows = [{"coupon_id": coupon.id, "code": c.strip().upper(), "expires_at": expires_at} for c in codes if c.strip()]
    return await insert_ignore(session, CouponCode.__table__, rows) if rows else 0


RedeemStatus = Literal["redeemed", "unknown", "expired", "used", "not_yours"]

REDEEM_REPLIES: dict[RedeemStatus, str] = {
    "redeemed": "券码 {code} 已核销,感谢您的惠顾!",
    "unknown": "没有找到券码 {code},请核对后再试。",
    "expired": "券码 {code} 已过期,无法使用。",
    "used": "券码 {code} 已经使用过了。",
    "not_yours": "券码 {code} 不属于您的账户,无法使用。",
}


@dataclass(frozen=True)
class RedeemOutcome:
    status: RedeemStatus
    code: str
    customer_id: int | None = None
    value: float = 0.0

    @property
    def reply(self) -> str:
        return REDEEM_REPLIES[self.status].format(code=self.code)


async def redeem(
    session: AsyncSession, code: str, now: datetime, via: str, customer_id: int | None = None
) -> RedeemOutcome:
    """Redeem a code; ``customer_id`` (from chat) must own it, the till (None) may redeem any."""
    code = code.strip().upper()
    row = await session.scalar(select(CouponCode).where(CouponCode.code == code).with_for_update())
    if row is None or row.customer_id is None:
        return RedeemOutcome("unknown", code)
    if customer_id is not None and row.customer_id != customer_id:
        return RedeemOutcome("not_yours", code)
    if row.redeemed_at is not None:
        return RedeemOutcome("used", code, row.customer_id)
    if row.expires_at is not None and row.expires_at < now:
        return RedeemOutcome("expired", code, row.customer_id)
    row.redeemed_at = now
    coupon = await session.get(Coupon, row.coupon_id)
    value = coupon.value if coupon else 0.0
    session.add(Redemption(code_id=row.id, customer_id=row.customer_id, via=via, redeemed_at=now))
    campaign = await _granting_campaign(session, row)
    session.add(
        Conversion(customer_id=row.customer_id, kind="coupon_redemption", amount=0.0, coupon_code=code,
                   campaign=campaign, created_at=now)
    )
    await session.flush()
    return RedeemOutcome("redeemed", code, row.customer_id, value)


async def _granting_campaign(session: AsyncSession, row: CouponCode) -> str | None:
    if row.delivery_id is None:
        return None
    return await session.scalar(select(Delivery.campaign).where(Delivery.id == row.delivery_id))
