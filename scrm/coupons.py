"""Coupon pools, unique codes, grants and redemptions (a redemption is a conversion)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.config import CouponPool
from scrm.store.models import Conversion, Coupon, CouponCode, Delivery, Redemption

_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/L: codes are read aloud at the till


async def pool_row(session: AsyncSession, name: str, pool: CouponPool) -> Coupon:
    row = await session.scalar(select(Coupon).where(Coupon.name == name))
    if row is None:
        row = Coupon(name=name, value=pool.value)
        session.add(row)
        await session.flush()
    elif row.value != pool.value:
        row.value = pool.value
    return row


async def grant(
    session: AsyncSession, name: str, pool: CouponPool, customer_id: int, now: datetime, delivery_id: int | None = None
) -> CouponCode | None:
    """A fresh code for the customer, or None when they reached the pool's per-customer limit.

    Granting twice for the same delivery returns the first code.
    """
    if delivery_id is not None:
        existing = await session.scalar(select(CouponCode).where(CouponCode.delivery_id == delivery_id))
        if existing is not None:
            return existing
    coupon = await pool_row(session, name, pool)
    held = await session.scalar(
        select(func.count()).where(CouponCode.coupon_id == coupon.id, CouponCode.customer_id == customer_id)
    )
    if held >= pool.per_customer:
        return None
    while True:
        code = pool.prefix + "".join(secrets.choice(_ALPHABET) for _ in range(8))
        if await session.scalar(select(CouponCode.id).where(CouponCode.code == code)) is None:
            break
    row = CouponCode(
        coupon_id=coupon.id,
        code=code,
        customer_id=customer_id,
        delivery_id=delivery_id,
        granted_at=now,
        expires_at=now + timedelta(days=pool.valid_days),
    )
    session.add(row)
    await session.flush()
    return row


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
