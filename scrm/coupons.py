"""Coupon pools, unique codes, grants and redemptions (a redemption is a conversion).

Also what the till and the supplier's files need, for every face (``scrm coupons``, the API, the
console): reading a file of codes, importing it, redeeming a code at the till and each pool's counts.
"""

from __future__ import annotations

import csv
import re
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Literal

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.clock import local_midnight
from scrm.config import CouponPool
from scrm.customers import touchpoint
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


async def code_for(session: AsyncSession, name: str, pool: CouponPool, customer_id: int,
                   now: datetime) -> tuple[CouponCode | None, bool]:
    """A code for a customer who asks for one (a keyword auto-reply): a fresh one while they are under the
    pool's per-customer limit, else the latest one they hold unused and unexpired; and whether it is fresh."""
    fresh = await grant(session, name, pool, customer_id, now)
    if fresh is not None:
        return fresh, True
    held = await session.scalar(
        select(CouponCode).where(CouponCode.coupon_id == await _pool_id(session, name, pool),
                                 CouponCode.customer_id == customer_id, CouponCode.redeemed_at.is_(None),
                                 (CouponCode.expires_at.is_(None)) | (CouponCode.expires_at > now))
        .order_by(CouponCode.id.desc()).limit(1), execution_options=_NO_FLUSH)
    return held, False


def template_data(code: CouponCode, pool: CouponPool | None) -> dict[str, str]:
    """What a message template may say of its coupon (``{{ coupon.code }}``, ``value``, ``expires``)."""
    return {"code": code.code, "value": f"{pool.value:g}" if pool else "",
            "expires": code.expires_at.date().isoformat() if code.expires_at else ""}


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


#: What a code may be: what the till reads out and the API accepts (``RedeemIn.code``), and no longer
#: than a conversion's ``coupon_code`` column, so every imported code can be redeemed.
CODE = re.compile(r"^[A-Z0-9-]{1,32}$")
#: First cells that make a file's first row a header rather than a code.
_HEADERS = frozenset({"code", "codes", "coupon", "coupon_code", "券码", "优惠券", "兑换码"})
#: Codes per INSERT: a supplier's file of 100,000 codes is a hundred statements in one transaction.
_IMPORT_CHUNK = 1000


class CodeFileError(ValueError):
    """A file of codes that cannot be imported as a whole; the message says which lines and why."""


def parse_codes(data: bytes | str) -> list[str]:
    """The codes in a supplier's file: one per line, or the first column of a CSV (a header row such as
    ``code,expires`` is skipped), upper-cased. UTF-8 (with or without a BOM) or GB18030, as Chinese
    spreadsheets save it. Raises :class:`CodeFileError` for a file with no codes or with lines that are
    not codes (A-Z, 0-9 and ``-``, up to 32): a file is imported whole or not at all."""
    text = data if isinstance(data, str) else _decode(data)
    codes: list[str] = []
    bad: list[str] = []
    rows = ((n, row) for n, row in enumerate(csv.reader(text.lstrip("\ufeff").splitlines()), 1) if row)
    for n, row in rows:
        cell = row[0].strip().upper()
        if not cell or (not codes and not bad and cell.lower() in _HEADERS):
            continue
        if CODE.match(cell):
            codes.append(cell)
        else:
            bad.append(f"line {n}: {cell[:40]!r}")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CodeFileError(f"not a code (A-Z, 0-9 and '-', up to 32 characters): {'; '.join(bad[:3])}{more}")
    if not codes:
        raise CodeFileError("the file holds no codes (one per line, or the first column of a CSV)")
    return codes


def _decode(data: bytes) -> str:
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise CodeFileError("the file is not text (UTF-8 or GB18030)")


def expiry_of(day: date, timezone: str) -> datetime:
    """A printed expiry date as the moment it ends: the next local midnight (naive UTC), so a code
    "valid until 2026-12-31" redeems all of that day in the brand's time zone."""
    return local_midnight(day + timedelta(days=1), timezone)


@dataclass(frozen=True)
class ImportResult:
    pool: str
    #: New codes now waiting in the pool.
    imported: int
    #: Codes the store knew already, or that the file gave more than once.
    duplicates: int

    @property
    def text(self) -> str:
        """What ``scrm coupons import`` prints and the console shows."""
        return f"{self.imported} new code(s) in pool {self.pool} ({self.duplicates} duplicate(s) skipped)"


async def import_codes(session: AsyncSession, name: str, pool: CouponPool, codes: list[str],
                       expires_at: datetime | None = None) -> ImportResult:
    """Add codes (from :func:`parse_codes`) to a pool; codes already known are skipped. Grants hand
    imported codes out first, oldest first."""
    coupon = await pool_row(session, name, pool)
    _empty_pools(session).discard(coupon.id)
    rows = [{"coupon_id": coupon.id, "code": c.strip().upper(), "expires_at": expires_at} for c in codes if c.strip()]
    added = 0
    for i in range(0, len(rows), _IMPORT_CHUNK):
        added += await insert_ignore(session, CouponCode.__table__, rows[i:i + _IMPORT_CHUNK])
    return ImportResult(name, added, len(rows) - added)


@dataclass(frozen=True)
class PoolCounts:
    """One pool's codes: ``issued`` to customers (ever), of those ``redeemed``; ``expired``: past their
    expiry unredeemed (issued or not); ``free``: waiting to be given out (imported or returned) and
    not expired. A pool that ``generate``s makes new codes when no free one is left."""

    name: str
    value: float
    issued: int = 0
    redeemed: int = 0
    expired: int = 0
    free: int = 0
    #: Whether ``[coupons.<name>]`` is still in the config (a removed pool keeps its codes).
    configured: bool = True
    generate: bool = False


async def pool_counts(session: AsyncSession, pools: Mapping[str, CouponPool], now: datetime) -> list[PoolCounts]:
    """Every configured pool (and any the store still has codes of), counted in one grouped query."""
    c = CouponCode
    current = c.expires_at.is_(None) | (c.expires_at >= now)
    rows = (await session.execute(
        select(Coupon.name, Coupon.value, func.count(c.id).filter(c.customer_id.is_not(None)),
               func.count(c.id).filter(c.redeemed_at.is_not(None)),
               func.count(c.id).filter(c.redeemed_at.is_(None), c.expires_at < now),
               func.count(c.id).filter(c.customer_id.is_(None), current))
        .outerjoin(c, c.coupon_id == Coupon.id).group_by(Coupon.id, Coupon.name, Coupon.value))).all()
    found = {str(name): PoolCounts(str(name), float(value), int(issued), int(redeemed), int(expired), int(free),
                                   name in pools, pools[name].generate if name in pools else False)
             for name, value, issued, redeemed, expired, free in rows}
    for name, pool in pools.items():
        found.setdefault(name, PoolCounts(name, pool.value, generate=pool.generate))
    return sorted(found.values(), key=lambda p: (not p.configured, p.name))


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


async def redeem_at_till(session: AsyncSession, code: str, now: datetime, via: str, account: str = "-",
                         actor: str | None = None, customer_id: int | None = None) -> RedeemOutcome:
    """A redemption staff record at the till (``scrm coupons redeem``, the API, the console): any
    customer's valid code, or only ``customer_id``'s when given; a ``coupon_redeemed`` touchpoint on the
    customer's timeline says where (``via``, ``account``) and who (``actor``)."""
    outcome = await redeem(session, code, now, via=via, customer_id=customer_id)
    if outcome.status == "redeemed":
        touchpoint(session, customer_id=outcome.customer_id, channel=via, account=account, direction="internal",
                   kind="coupon_redeemed", now=now, actor=actor, payload={"code": outcome.code})
    return outcome
