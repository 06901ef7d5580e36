"""What each channel code brought, per code and per local day: scans, new customers, re-engagements,
unfollows within 7 days, first messages, conversions and revenue, and what each customer cost.

Attribution: **first touch** credits a conversion to the code that brought the customer (their
new-customer scan), made at or after that scan; **last touch** credits it to the code the customer
came through last before it (any scan, new or again). Both are shown side by side. The period
selects scans (and, for last touch, conversions) by when they happened; first-touch conversions of
the customers scanned in the period are counted whenever they came. The CLI, chat ``/report codes``,
the API and the console page read these functions.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import and_, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.messages import MESSAGE_KINDS
from scrm.store.models import AcquisitionCode, CodeScan, Conversion, Touchpoint

#: Unfollows this soon after a new customer's scan count against the code.
UNFOLLOW_WINDOW = timedelta(days=7)
UNFOLLOW_KINDS = ("unsubscribe", "contact_removed", "blocked")


@dataclass
class CodeDay:
    day: date
    scans: int = 0
    new_customers: int = 0


@dataclass
class CodeFigures:
    """One code's figures over the period."""

    name: str
    channel: str
    state: str
    cost: float | None
    scans: int = 0
    new_customers: int = 0
    reengaged: int = 0
    unfollowed_7d: int = 0
    first_messages: int = 0
    #: First touch: customers the code brought who converted, their conversions and revenue.
    converted: int = 0
    conversions: int = 0
    revenue: float = 0.0
    #: Last touch: conversions in the period credited to the code scanned last before them.
    last_touch_conversions: int = 0
    last_touch_revenue: float = 0.0
    days: list[CodeDay] = field(default_factory=list)

    @property
    def cost_per_new(self) -> float | None:
        return self.cost / self.new_customers if self.cost is not None and self.new_customers else None

    @property
    def cost_per_converted(self) -> float | None:
        return self.cost / self.converted if self.cost is not None and self.converted else None


async def code_figures(session: AsyncSession, since: datetime, until: datetime, timezone: str,
                       now: datetime) -> list[CodeFigures]:
    """Every code's figures for scans in (since, until], each with its days (local to ``timezone``)."""
    codes = {row.id: row for row in await session.scalars(select(AcquisitionCode).order_by(AcquisitionCode.name))}
    figures = {
        cid: CodeFigures(c.name, f"{c.channel}:{c.account}",
                         "disabled" if c.disabled_at else "expired" if c.expires_at and c.expires_at <= now else "active",
                         c.cost)
        for cid, c in codes.items()}
    if not figures:
        return []
    in_period = and_(CodeScan.scanned_at > since, CodeScan.scanned_at <= until)
    zone, utc = ZoneInfo(timezone), ZoneInfo("UTC")
    days: dict[int, dict[date, CodeDay]] = defaultdict(dict)
    for code_id, at, new in await session.execute(
            select(CodeScan.code_id, CodeScan.scanned_at, CodeScan.new_customer).where(in_period)):
        f = figures[code_id]
        f.scans += 1
        local = at.replace(tzinfo=utc).astimezone(zone).date()
        day = days[code_id].setdefault(local, CodeDay(local))
        day.scans += 1
        if new:
            f.new_customers += 1
            day.new_customers += 1
        else:
            f.reengaged += 1
    for code_id, by_day in days.items():
        figures[code_id].days = [by_day[d] for d in sorted(by_day)]

    brought = select(CodeScan.code_id, CodeScan.customer_id, CodeScan.scanned_at).where(
        in_period, CodeScan.new_customer.is_(True)).subquery()
    # the 7 days are compared here: date arithmetic in SQL differs between the stores
    left: dict[int, set[int]] = defaultdict(set)
    for code_id, customer_id, scanned_at, at in await session.execute(
            select(brought.c.code_id, brought.c.customer_id, brought.c.scanned_at, Touchpoint.created_at)
            .join(Touchpoint, and_(Touchpoint.customer_id == brought.c.customer_id,
                                   Touchpoint.kind.in_(UNFOLLOW_KINDS), Touchpoint.created_at >= brought.c.scanned_at))):
        if at - scanned_at <= UNFOLLOW_WINDOW:
            left[code_id].add(customer_id)
    for code_id, customers in left.items():
        figures[code_id].unfollowed_7d = len(customers)
    wrote = (select(brought.c.code_id, func.count(func.distinct(brought.c.customer_id)))
             .join(Touchpoint, and_(Touchpoint.customer_id == brought.c.customer_id, Touchpoint.direction == "in",
                                    Touchpoint.kind.in_(sorted(MESSAGE_KINDS)),
                                    Touchpoint.created_at >= brought.c.scanned_at))
             .group_by(brought.c.code_id))
    for code_id, n in await session.execute(wrote):
        figures[code_id].first_messages = n
    first_touch = (select(brought.c.code_id, func.count(func.distinct(Conversion.customer_id)), func.count(),
                          func.coalesce(func.sum(Conversion.amount), 0.0))
                   .join(Conversion, and_(Conversion.customer_id == brought.c.customer_id,
                                          Conversion.created_at >= brought.c.scanned_at))
                   .group_by(brought.c.code_id))
    for code_id, customers, n, revenue in await session.execute(first_touch):
        f = figures[code_id]
        f.converted, f.conversions, f.revenue = customers, n, float(revenue)
    latest = (select(CodeScan.code_id).where(CodeScan.customer_id == Conversion.customer_id,
                                             CodeScan.scanned_at <= Conversion.created_at)
              .order_by(CodeScan.scanned_at.desc(), CodeScan.id.desc()).limit(1)
              .correlate(Conversion).scalar_subquery())
    credited = select(latest.label("code_id"), Conversion.amount).where(
        Conversion.created_at > since, Conversion.created_at <= until).subquery()
    for code_id, n, revenue in await session.execute(
            select(credited.c.code_id, func.count(), func.coalesce(func.sum(credited.c.amount), 0.0))
            .where(credited.c.code_id.is_not(None)).group_by(credited.c.code_id)):
        figures[code_id].last_touch_conversions, figures[code_id].last_touch_revenue = n, float(revenue)
    return list(figures.values())


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def text(f: CodeFigures) -> str:
    """One code's figures as lines of text (``scrm codes show``, chat)."""
    return "\n".join([
        f"{f.name} ({f.channel}, {f.state})",
        f"  scans {f.scans}: new {f.new_customers}, again {f.reengaged}; left within 7 days {f.unfollowed_7d}; "
        f"wrote {f.first_messages}",
        f"  first touch: {f.converted} converted, {f.conversions} orders, revenue {f.revenue:,.2f}",
        f"  last touch: {f.last_touch_conversions} orders, revenue {f.last_touch_revenue:,.2f}",
        f"  cost {_money(f.cost)}: per new customer {_money(f.cost_per_new)}, "
        f"per converting customer {_money(f.cost_per_converted)}",
    ])


def report_text(figures: list[CodeFigures], days: int) -> str:
    """``/report codes``: the codes that had scans, most new customers first."""
    active = sorted((f for f in figures if f.scans or f.conversions or f.last_touch_conversions),
                    key=lambda f: (-f.new_customers, f.name))
    if not active:
        return f"Channel codes, last {days} days: no scans."
    return "\n".join([f"Channel codes, last {days} days:", *(text(f) for f in active)])


def chart_png(figures: list[CodeFigures], days: int) -> bytes:
    """New customers per day, one line per code (the codes with most new customers, at most eight)."""
    from scrm import charts

    top = sorted((f for f in figures if f.new_customers), key=lambda f: -f.new_customers)[:8]
    every = sorted({d.day for f in top for d in f.days})
    series = {f.name: {f"{day:%m-%d}": next((d.new_customers for d in f.days if d.day == day), 0) for day in every}
              for f in top}
    return charts.lines_png(series, f"新客户 New customers per code, last {days} days")
