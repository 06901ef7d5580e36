"""The points ledger: every change is a ledger row and a touchpoint; the balance lives in one row.

Credits are idempotent: (customer, reason, ref) is unique, so an order, a day's check-in or a
referee earns once however often the sweep runs. Debits decrement the balance with a conditional
UPDATE (``balance >= price``), so concurrent redemptions never take it below zero: on PostgreSQL
the row lock makes the second UPDATE re-check the balance, on SQLite writers are serialized.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, and_, case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import coupons
from scrm.config import LoyaltyConfig
from scrm.customers import touchpoint
from scrm.store.dialect import insert_ignore, rowcount
from scrm.store.models import LoyaltyAccount, PointsLedger

if TYPE_CHECKING:
    from scrm.runtime import Runtime

#: Reasons that take points away; everything else adds.
DEBITS = ("redeem", "expire")
#: Earned points that count towards points-based tiers.
EARNS = ("order", "checkin", "survey", "referral", "adjust")


def loyalty(service: Runtime) -> LoyaltyConfig:
    config = service.config.loyalty
    if config is None:
        raise RuntimeError("loyalty is not configured ([loyalty] in the config)")
    return config


def base_tier(config: LoyaltyConfig) -> str:
    return config.tiers[0].name if config.tiers else ""


async def ensure_account(session: AsyncSession, customer_id: int, now: datetime, tier: str = "") -> None:
    """Create the customer's account row if missing (ON CONFLICT: two events may race to create it)."""
    await insert_ignore(session, LoyaltyAccount.__table__, {
        "customer_id": customer_id, "balance": 0, "tier": tier, "updated_at": now})


async def balance(session: AsyncSession, customer_id: int) -> int:
    return int(await session.scalar(
        select(LoyaltyAccount.balance).where(LoyaltyAccount.customer_id == customer_id)) or 0)


def expiry(config: LoyaltyConfig, earned_at: datetime, zone: str) -> datetime | None:
    """End of the Nth month after the earning month, local midnight in the service zone (naive UTC)."""
    if config.expiry_months is None:
        return None
    local = earned_at.replace(tzinfo=UTC).astimezone(ZoneInfo(zone))
    month = local.year * 12 + (local.month - 1) + config.expiry_months + 1
    end = datetime(month // 12, month % 12 + 1, 1, tzinfo=ZoneInfo(zone))
    return end.astimezone(UTC).replace(tzinfo=None)


async def credit(service: Runtime, session: AsyncSession, customer_id: int, points: int, reason: str, ref: str,
                 now: datetime, channel: str = "system", account: str = "-") -> int | None:
    """Add points once per (reason, ref); returns the new balance, or None when already credited."""
    if points <= 0:
        return None
    config = loyalty(service)
    await ensure_account(session, customer_id, now, base_tier(config))
    new = await _move(session, customer_id, points)
    inserted = await insert_ignore(session, PointsLedger.__table__, {
        "customer_id": customer_id, "delta": points, "reason": reason, "ref": ref, "balance_after": new,
        "expires_at": expiry(config, now, service.config.service.timezone), "created_at": now})
    if not inserted:  # credited before: undo the move inside this same transaction
        await _move(session, customer_id, -points)
        return None
    touchpoint(session, customer_id=customer_id, channel=channel, account=account, direction="internal",
               kind="points_earned", now=now, payload={"points": points, "reason": reason, "ref": ref,
                                                       "balance": new})
    return new


async def take(session: AsyncSession, customer_id: int, points: int, now: datetime) -> int | None:
    """The conditional UPDATE: take points only if the balance covers them; the new balance or None."""
    taken = await session.execute(
        update(LoyaltyAccount).where(LoyaltyAccount.customer_id == customer_id, LoyaltyAccount.balance >= points)
        .values(balance=LoyaltyAccount.balance - points, updated_at=now))
    return await balance(session, customer_id) if rowcount(taken) else None


def record_debit(session: AsyncSession, customer_id: int, points: int, reason: str, ref: str, left: int,
                 now: datetime, channel: str = "system", account: str = "-") -> None:
    session.add(PointsLedger(customer_id=customer_id, delta=-points, reason=reason, ref=ref, balance_after=left,
                             created_at=now))
    touchpoint(session, customer_id=customer_id, channel=channel, account=account, direction="internal",
               kind="points_spent", now=now, payload={"points": points, "reason": reason, "ref": ref,
                                                      "balance": left})


async def debit(session: AsyncSession, customer_id: int, points: int, reason: str, ref: str, now: datetime,
                channel: str = "system", account: str = "-") -> int | None:
    """Take points if the balance covers them, with their ledger row; the new balance or None."""
    left = await take(session, customer_id, points, now)
    if left is not None:
        record_debit(session, customer_id, points, reason, ref, left, now, channel, account)
        await session.flush()
    return left


async def _move(session: AsyncSession, customer_id: int, delta: int) -> int:
    await session.execute(update(LoyaltyAccount).where(LoyaltyAccount.customer_id == customer_id)
                          .values(balance=LoyaltyAccount.balance + delta))
    return await balance(session, customer_id)


@dataclass(frozen=True)
class RewardOutcome:
    #: redeemed | unknown | insufficient | unavailable
    status: str
    reward: str
    code: str | None = None
    balance: int = 0
    price: int = 0


async def redeem_reward(service: Runtime, session: AsyncSession, customer_id: int, name: str, now: datetime,
                        channel: str = "system", account: str = "-") -> RewardOutcome:
    """Swap points for a coupon code atomically: the points go first (conditional UPDATE, so two
    concurrent redemptions cannot both spend the same points), then the code is granted in the same
    transaction (codes are unique and claimed with a conditional UPDATE too); a pool that cannot
    give a code gives the points back before anything is recorded."""
    config = loyalty(service)
    reward = config.rewards.get(name)
    if reward is None:
        return RewardOutcome("unknown", name)
    pool = service.config.coupons.get(reward.pool)
    if pool is None:
        return RewardOutcome("unavailable", name, price=reward.points)
    await ensure_account(session, customer_id, now, base_tier(config))
    left = await take(session, customer_id, reward.points, now)
    if left is None:
        return RewardOutcome("insufficient", name, balance=await balance(session, customer_id), price=reward.points)
    granted = await coupons.grant(session, reward.pool, pool, customer_id, now)
    if granted is None:
        await _move(session, customer_id, reward.points)
        return RewardOutcome("unavailable", name, balance=left + reward.points, price=reward.points)
    # The ledger row names the code it bought (unique per customer, reason and ref).
    record_debit(session, customer_id, reward.points, "redeem", f"{name}:{granted.code}", left, now, channel, account)
    touchpoint(session, customer_id=customer_id, channel=channel, account=account, direction="internal",
               kind="coupon_granted", now=now, payload={"code": granted.code, "pool": reward.pool, "reward": name,
                                                        "points": reward.points})
    await session.flush()
    return RewardOutcome("redeemed", name, granted.code, left, reward.points)


def _earned_until(cutoff: datetime) -> ColumnElement[int]:
    return func.coalesce(func.sum(case((and_(PointsLedger.delta > 0, PointsLedger.expires_at <= cutoff),
                                        PointsLedger.delta), else_=0)), 0)


def _debited() -> ColumnElement[int]:
    return func.coalesce(func.sum(case((PointsLedger.delta < 0, -PointsLedger.delta), else_=0)), 0)


async def expiring(session: AsyncSession, customer_id: int, until: datetime) -> int:
    """Points that will have expired by ``until``: spending uses the oldest points first, so what
    expires is what was earned with an expiry before ``until`` less everything already taken."""
    row = (await session.execute(select(_earned_until(until), _debited())
                                 .where(PointsLedger.customer_id == customer_id))).one()
    return max(0, int(row[0]) - int(row[1]))


async def expire_due(service: Runtime, session: AsyncSession, now: datetime) -> int:
    """Nightly: expire points past their date for every customer (one grouped query; only the
    customers with something to expire come back). Returns the points expired."""
    due = _earned_until(now) - _debited()
    rows = (await session.execute(
        select(PointsLedger.customer_id, due).group_by(PointsLedger.customer_id).having(due > 0))).all()
    total = 0
    day = now.date().isoformat()
    for customer_id, points in rows:
        points = min(int(points), await balance(session, customer_id))
        if points > 0 and await debit(session, customer_id, points, "expire", day, now) is not None:
            total += points
    return total


async def recent(session: AsyncSession, customer_id: int, limit: int = 5) -> list[PointsLedger]:
    return list((await session.scalars(select(PointsLedger).where(PointsLedger.customer_id == customer_id)
                                       .order_by(PointsLedger.id.desc()).limit(limit))).all())


def local_date(service: Runtime, now: datetime, zone: str | None = None) -> str:
    tz = ZoneInfo(zone or service.config.service.timezone)
    return now.replace(tzinfo=UTC).astimezone(tz).date().isoformat()


def days(n: int) -> timedelta:
    return timedelta(days=n)
