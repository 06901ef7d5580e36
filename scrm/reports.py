"""Conversion reports: summary, campaign funnel, cohorts, top tags — SQL aggregates only.

Python receives grouped results (a few rows per channel, stage or variant), never the base's rows;
active customers are unions of per-day sets of customer ids (scrm.rollups keeps the closed days').
Periods are half-open on the left, ``(since, until]``: "the last 7 days" includes this very moment,
and a period and the previous one of equal length never count the same event twice.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from sqlalchemy import and_, case, distinct, exists, func, literal, or_, select, true
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement

from scrm import rollups
from scrm.clock import local_midnight
from scrm.messages import MESSAGE_KINDS
from scrm.store.dialect import dialect_name
from scrm.store.models import (
    STAFF_REPLY,
    Conversion,
    CouponCode,
    Customer,
    CustomerTag,
    Delivery,
    Redemption,
    Tag,
    Touchpoint,
)

Lang = Literal["zh", "en", "both"]

#: Label key -> (Chinese, English). Charts use the same labels (the shipped font subset covers them).
LABELS: dict[str, tuple[str, str]] = {
    "report": ("报告", "Report"),
    "metric": ("指标", "Metric"),
    "value": ("本期", "Now"),
    "change": ("环比", "vs prev"),
    "new_customers": ("新客户", "New customers"),
    "by_channel": ("按渠道", "by channel"),
    "by_source": ("按来源", "by source"),
    "active_customers": ("活跃客户", "Active"),
    "messages_in": ("收到消息", "Messages in"),
    "messages_out": ("发出消息", "Messages out"),
    "opt_outs": ("退订", "Opt-outs"),
    "campaign_sends": ("活动发送", "Campaign sends"),
    "coupons_granted": ("发券", "Coupons out"),
    "coupon_redemptions": ("核销", "Redemptions"),
    "conversions": ("转化", "Conversions"),
    "revenue": ("收入", "Revenue"),
    "attributed_conversions": ("活动转化", "Camp. conv."),
    "attributed_revenue": ("活动收入", "Camp. revenue"),
    "conversion_rate": ("转化率", "Conv. rate"),
    "stages": ("阶段分布", "Stages"),
    "stage_moves": ("阶段变动", "Stage moves"),
    "funnel": ("漏斗", "Funnel"),
    "audience": ("目标", "Audience"),
    "sent": ("发送", "Sent"),
    "delivered": ("送达", "Delivered"),
    "replied": ("回复", "Replied"),
    "clicked": ("点击", "Clicked"),
    "redeemed": ("核销", "Redeemed"),
    "converted": ("转化", "Converted"),
    "variant": ("版本", "Variant"),
    "channel": ("渠道", "Channel"),
    "skips": ("跳过原因", "Skipped by reason"),
    "cohort": ("周留存", "Weekly retention"),
    "week": ("周", "Week"),
    "customers": ("客户", "Customers"),
    "top_tags": ("热门标签", "Top tags"),
    "this_week": ("本周新增", "new 7d"),
    "daily_trend": ("每日趋势", "Daily trend"),
    "day": ("日期", "Day"),
    "no_data": ("暂无数据", "No data"),
}

STEPS = ("audience", "sent", "delivered", "replied", "clicked", "redeemed", "converted")
#: Statuses that reached the channel (the outbox tried to send).
ATTEMPTED = ("sending", "sent", "failed", "unknown")
REPLY_WINDOW = timedelta(hours=48)


def label(key: str, lang: Lang = "both") -> str:
    zh, en = LABELS[key]
    return zh if lang == "zh" else en if lang == "en" else f"{zh} {en}"


def lang_of(locale: str | None) -> Lang:
    """A staff member's locale (``zh-CN``, ``en``) picks the labels; unknown gets both."""
    if not locale:
        return "both"
    lowered = locale.lower()
    return "zh" if lowered.startswith("zh") else "en" if lowered.startswith("en") else "both"


# --- periods -------------------------------------------------------------------------------------

_DAYS = re.compile(r"^(\d{1,4})d$")
_RANGE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.\.(\d{4}-\d{2}-\d{2})$")
_TICK = timedelta(microseconds=1)


@dataclass(frozen=True)
class Period:
    since: datetime
    until: datetime
    #: How the period was asked for ("7d", "2026-11-01..2026-11-07"), for headings.
    name: str = ""

    @property
    def length(self) -> timedelta:
        return self.until - self.since

    def previous(self) -> Period:
        return Period(self.since - self.length, self.since, "prev")

    def window(self, column: Any) -> ColumnElement[bool]:
        return (column > self.since) & (column <= self.until)


def last_days(now: datetime, days: int) -> Period:
    return Period(now - timedelta(days=days), now, f"{days}d")


def date_range(start: date, end: date, timezone: str) -> Period:
    """Whole local days ``start``..``end`` inclusive, as naive UTC bounds.

    Moving both bounds back one microsecond turns ``(since, until]`` into ``[midnight, midnight)``.
    """
    return Period(local_midnight(start, timezone) - _TICK, local_midnight(end + timedelta(days=1), timezone) - _TICK,
                  f"{start}..{end}")


def parse_period(text: str, now: datetime, timezone: str) -> Period | None:
    """``""`` (7 days), ``30d`` or ``2026-11-01..2026-11-07``; None when it is none of those."""
    text = text.strip()
    if not text:
        return last_days(now, 7)
    if match := _DAYS.match(text):
        days = int(match.group(1))
        return last_days(now, days) if 0 < days <= 3650 else None
    if match := _RANGE.match(text):
        try:
            start, end = date.fromisoformat(match.group(1)), date.fromisoformat(match.group(2))
        except ValueError:
            return None
        return date_range(start, end, timezone) if start <= end else None
    return None


# --- dialect-specific time arithmetic ------------------------------------------------------------

def _shift(session: AsyncSession, column: Any, delta: timedelta) -> ColumnElement[Any]:
    """``column + delta``, exact to the microsecond on both stores.

    SQLite keeps ``YYYY-MM-DD HH:MM:SS.ffffff`` text: shift the whole seconds with strftime and
    keep the stored fraction, so comparisons stay string-exact.
    """
    if dialect_name(session) == "postgresql":
        return column + literal(delta)
    seconds = int(delta.total_seconds())
    assert delta == timedelta(seconds=seconds), "whole seconds only"
    return func.strftime("%Y-%m-%d %H:%M:%S", column, f"{seconds:+d} seconds").concat(func.substr(column, 20))


# --- attribution ---------------------------------------------------------------------------------

def attribution_rule(days: int, lang: Lang = "both") -> str:
    zh = (f"归因: 转化计入 {days} 天内最后一次活动触达(已发送)的活动; "
          "已带活动的转化(如券核销)保持原活动。")
    en = (f"Attribution: a conversion counts for the last campaign message sent within {days} days "
          "before it; conversions recorded with a campaign (coupon redemptions) keep it.")
    return zh if lang == "zh" else en if lang == "en" else f"{zh}\n{en}"


def attributed_conversions(session: AsyncSession, days: int, *where: ColumnElement[bool]) -> Any:
    """One row per conversion with the delivery it is credited to (or NULL): a subquery.

    Unlabelled conversions go to the last sent delivery of any campaign within ``days`` before
    them; conversions that already name a campaign go to that campaign's last sent delivery to
    the customer before them (any age), so they keep their campaign and still get a variant.
    """
    last = aliased(Delivery)
    touch = (select(last.id)
             .where(last.customer_id == Conversion.customer_id, last.status == "sent",
                    last.campaign != STAFF_REPLY, last.finished_at <= Conversion.created_at)
             .order_by(last.finished_at.desc(), last.id.desc()).limit(1))
    any_campaign = touch.where(last.finished_at >= _shift(session, Conversion.created_at, -timedelta(days=days)))
    same_campaign = touch.where(last.campaign == Conversion.campaign)
    delivery_id = case((Conversion.campaign.is_(None), any_campaign.scalar_subquery()),
                       else_=same_campaign.scalar_subquery())
    return (select(Conversion.id, Conversion.customer_id, Conversion.amount, Conversion.created_at,
                   Conversion.campaign.label("own_campaign"), delivery_id.label("delivery_id"))
            .where(*where).subquery("attributed"))


# --- summary -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Figures:
    new_customers: int
    new_by_channel: dict[str, int]
    new_by_source: dict[str, int]
    active_customers: int
    messages_in: int
    messages_out: int
    opt_outs: int
    campaign_sends: int
    coupons_granted: int
    coupon_redemptions: int
    conversions: int
    revenue: float
    attributed_conversions: int
    attributed_revenue: float
    #: Attributed conversions and revenue per campaign.
    by_campaign: dict[str, dict[str, float]]
    reached_customers: int
    converted_customers: int
    #: Customers per stage at the end of the period.
    stages: dict[str, int]
    #: ``"from>to"`` -> customers moved during the period.
    stage_moves: dict[str, int]

    @property
    def conversion_rate(self) -> float:
        """Customers with a conversion / customers a campaign reached, in the period."""
        return self.converted_customers / self.reached_customers if self.reached_customers else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["revenue"], data["attributed_revenue"] = round(self.revenue, 2), round(self.attributed_revenue, 2)
        data["conversion_rate"] = round(self.conversion_rate, 4)
        return data


@dataclass(frozen=True)
class Summary:
    period: Period
    current: Figures
    previous: Figures
    attribution_days: int

    @property
    def since(self) -> datetime:
        return self.period.since

    @property
    def until(self) -> datetime:
        return self.period.until

    def as_dict(self) -> dict[str, Any]:
        """The current figures at the top level (what scripts read), the previous period beside them."""
        return {
            "since": self.since.isoformat(), "until": self.until.isoformat(), "period": self.period.name,
            **self.current.as_dict(),
            "previous": {"since": self.period.previous().since.isoformat(), **self.previous.as_dict()},
            "attribution": attribution_rule(self.attribution_days, "en"),
        }


async def _count(session: AsyncSession, query: Any) -> int:
    return int(await session.scalar(query) or 0)


async def _groups(session: AsyncSession, query: Any) -> dict[str, int]:
    return {str(key): int(n) for key, n in (await session.execute(query)).all()}


async def stages_at(session: AsyncSession, *moments: datetime) -> list[dict[str, int]]:
    """Customers per stage at each of ``moments``: today's stages, undone by the moves recorded after it.

    Moves telescope (a customer's stage at ``moment`` is the ``from`` of their first later move),
    so summing ``from`` minus ``to`` per stage needs no per-customer work. Stage changes that left
    no ``stage_changed`` touchpoint (a removed contact set to ``lost``) count as always so. One pass
    over the customers counts for every moment.
    """
    per_moment: list[dict[str, int]] = [{} for _ in moments]
    for stage, *seen_by in await session.execute(select(
            Customer.stage, *(func.count().filter(Customer.first_seen_at <= m) for m in moments))
            .group_by(Customer.stage)):
        for counts, n in zip(per_moment, seen_by, strict=True):
            counts[str(stage)] = int(n)
    source, target = Touchpoint.payload["from"].as_string(), Touchpoint.payload["to"].as_string()
    for moment, counts in zip(moments, per_moment, strict=True):
        # EXISTS, not a join: SQLite would walk every customer seen by then instead of the few moves.
        seen = exists().where(Customer.id == Touchpoint.customer_id, Customer.first_seen_at <= moment)
        moves = (await session.execute(
            select(source, target, func.count())
            .where(Touchpoint.kind == "stage_changed", Touchpoint.created_at > moment, seen)
            .group_by(source, target))).all()
        for old, new, n in moves:
            counts[old] = counts.get(old, 0) + n
            counts[new] = counts.get(new, 0) - n
    return [{stage: n for stage, n in sorted(counts.items()) if n} for counts in per_moment]


async def figures(session: AsyncSession, period: Period, attribution_days: int, stages: dict[str, int]) -> Figures:
    """One period's figures, with its end's ``stages``; the additive ones from the daily rollups where
    built (scrm.rollups)."""
    window = period.window
    sent = (Delivery.status == "sent") & (Delivery.campaign != STAFF_REPLY) & window(Delivery.finished_at)
    tally = await rollups.tally(session, period.since, period.until)
    conv = attributed_conversions(session, attribution_days, window(Conversion.created_at))
    credited = aliased(Delivery)
    campaign = func.coalesce(conv.c.own_campaign, credited.campaign)
    per_campaign = (await session.execute(
        select(campaign, func.count(), func.coalesce(func.sum(conv.c.amount), 0.0))
        .select_from(conv).outerjoin(credited, credited.id == conv.c.delivery_id)
        .where(campaign.is_not(None)).group_by(campaign))).all()
    totals = (await session.execute(
        select(func.count(), func.coalesce(func.sum(Conversion.amount), 0.0)).where(window(Conversion.created_at)))).one()
    sends = (await session.execute(
        select(func.count(), func.count(distinct(Delivery.customer_id))).where(sent))).one()
    return Figures(
        new_customers=tally.new_customers,
        new_by_channel=dict(tally.new_by_channel),
        new_by_source=dict(tally.new_by_source),
        active_customers=tally.active_customers,
        messages_in=tally.messages_in,
        messages_out=tally.messages_out,
        opt_outs=tally.opt_outs,
        campaign_sends=int(sends[0]),
        coupons_granted=await _count(session, select(func.count()).where(window(CouponCode.granted_at))),
        coupon_redemptions=await _count(session, select(func.count()).where(window(Redemption.redeemed_at))),
        conversions=int(totals[0]),
        revenue=float(totals[1]),
        attributed_conversions=sum(int(n) for _, n, _ in per_campaign),
        attributed_revenue=sum(float(r) for _, _, r in per_campaign),
        by_campaign={str(c): {"conversions": int(n), "revenue": round(float(r), 2)} for c, n, r in per_campaign},
        reached_customers=int(sends[1]),
        converted_customers=await _count(
            session, select(func.count(distinct(Conversion.customer_id))).where(window(Conversion.created_at))),
        stages=stages,
        stage_moves=dict(tally.stage_moves),
    )


async def summary(session: AsyncSession, period: Period | datetime, days: int = 7,
                  attribution_days: int = 7) -> Summary:
    """The report for ``period`` and the one before it (``summary(session, now, 7)`` = last 7 days)."""
    if isinstance(period, datetime):
        period = last_days(period, days)
    stages, stages_before = await stages_at(session, period.until, period.since)
    return Summary(period, await figures(session, period, attribution_days, stages),
                   await figures(session, period.previous(), attribution_days, stages_before), attribution_days)


# --- text for a phone ----------------------------------------------------------------------------

def display_width(text: str) -> int:
    """Columns on a monospace screen: CJK characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - display_width(text))


def _num(value: float) -> str:
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


def _delta(now: float, before: float) -> str:
    diff = now - before
    if not diff:
        return "0"
    return f"{diff:+,.2f}" if isinstance(diff, float) else f"{diff:+d}"


def table(rows: list[tuple[str, str, str]]) -> list[str]:
    """Label, value and change columns, aligned by display width (CJK-aware)."""
    width = max(display_width(r[0]) for r in rows)
    value_w = max(len(r[1]) for r in rows)
    change_w = max(len(r[2]) for r in rows)
    return [f"{_pad(a, width)}  {b:>{value_w}}  {c:>{change_w}}".rstrip() for a, b, c in rows]


def _breakdown(now: dict[str, int], before: dict[str, int], limit: int = 5) -> list[tuple[str, str, str]]:
    keys = sorted(set(now) | set(before), key=lambda k: (-now.get(k, 0), k))[:limit]
    return [(f"  {k}", str(now.get(k, 0)), _delta(now.get(k, 0), before.get(k, 0))) for k in keys]


def _heading(period: Period, key: str, lang: Lang) -> str:
    if period.name and ".." in period.name:
        span = period.name
    else:
        span = f"{period.since:%m-%d %H:%M}..{period.until:%m-%d %H:%M} UTC"
    return f"{label(key, lang)} {span}"


def format_summary(s: Summary, lang: Lang = "both") -> str:
    cur, prev = s.current, s.previous

    def row(key: str) -> tuple[str, str, str]:
        a, b = getattr(cur, key), getattr(prev, key)
        return label(key, lang), _num(a), _delta(a, b)

    rows = [(label("metric", lang), label("value", lang), label("change", lang)), row("new_customers")]
    if cur.new_by_channel or prev.new_by_channel:
        rows += [(f" {label('by_channel', lang)}", "", ""), *_breakdown(cur.new_by_channel, prev.new_by_channel)]
    if (set(cur.new_by_source) | set(prev.new_by_source)) - {"-"}:
        rows += [(f" {label('by_source', lang)}", "", ""), *_breakdown(cur.new_by_source, prev.new_by_source)]
    rows += [row(k) for k in ("active_customers", "messages_in", "messages_out", "opt_outs", "campaign_sends",
                              "coupons_granted", "coupon_redemptions", "conversions", "revenue",
                              "attributed_conversions", "attributed_revenue")]
    rate_change = (cur.conversion_rate - prev.conversion_rate) * 100
    rows.append((label("conversion_rate", lang), f"{cur.conversion_rate:.1%}",
                 "0" if not rate_change else f"{rate_change:+.1f}pp"))
    rows.append((label("stages", lang), "", ""))
    rows += _breakdown(cur.stages, prev.stages, limit=6)
    if cur.stage_moves or prev.stage_moves:
        rows.append((label("stage_moves", lang), "", ""))
        rows += _breakdown(cur.stage_moves, prev.stage_moves)
    lines = [_heading(s.period, "report", lang), *table(rows)]
    lines.append(attribution_rule(s.attribution_days, lang))
    return "\n".join(lines)


# --- funnel --------------------------------------------------------------------------------------

@dataclass
class FunnelRow:
    audience: int = 0
    sent: int = 0
    delivered: int = 0
    replied: int = 0
    #: Customers who followed a tracked link of the deliveries (each once, however often they clicked).
    clicked: int = 0
    redeemed: int = 0
    converted: int = 0
    conversions: int = 0
    revenue: float = 0.0

    def add(self, other: FunnelRow) -> None:
        for name in STEPS + ("conversions", "revenue"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def rates(self) -> dict[str, float]:
        """Sent and delivered against the step before; replies, clicks, redemptions and conversions against
        delivered."""
        base = {"sent": self.audience, "delivered": self.sent, "replied": self.delivered, "clicked": self.delivered,
                "redeemed": self.delivered, "converted": self.delivered}
        return {step: round(getattr(self, step) / n, 4) if n else 0.0 for step, n in base.items()}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "revenue": round(self.revenue, 2), "rates": self.rates()}


@dataclass
class Funnel:
    campaign: str
    total: FunnelRow
    by_variant: dict[str, FunnelRow]
    by_channel: dict[str, FunnelRow]
    #: Deliveries that were not delivered, by reason (or by status when no reason was recorded).
    skips: dict[str, int]
    #: Conversions credited to the campaign with no delivery to pin them on (no variant or channel).
    unassigned_conversions: int
    attribution_days: int

    def as_dict(self) -> dict[str, Any]:
        return {"campaign": self.campaign, **self.total.as_dict(),
                "by_variant": {k: v.as_dict() for k, v in self.by_variant.items()},
                "by_channel": {k: v.as_dict() for k, v in self.by_channel.items()},
                "skips": self.skips, "unassigned_conversions": self.unassigned_conversions,
                "attribution": attribution_rule(self.attribution_days, "en")}


async def funnel(session: AsyncSession, campaign: str, attribution_days: int = 7) -> Funnel | None:
    """The campaign's funnel over its whole life, split by A/B variant and channel; None if it never planned."""
    return (await funnels(session, [campaign], attribution_days)).get(campaign)


async def funnels(session: AsyncSession, campaigns: Iterable[str], attribution_days: int = 7) -> dict[str, Funnel]:
    """:func:`funnel` for each of ``campaigns`` (those that never planned are left out), each figure
    one query grouped by campaign: a list of campaigns costs what its largest campaign does, not a
    round of queries per campaign.

    A conversion is credited to one delivery (:func:`attributed_conversions`), so grouping the
    credited deliveries by campaign splits the conversions exactly as asking campaign by campaign:
    a conversion that names a campaign is credited to that campaign's delivery, and one that names
    none to a delivery the customer got, so the customers of the campaigns asked cover them all.
    """
    names = sorted(set(campaigns))
    if not names:
        return {}
    d = Delivery
    delivered = d.status == "sent"
    reply_end = _shift(session, d.finished_at, REPLY_WINDOW)
    replied = exists().where(Touchpoint.customer_id == d.customer_id, Touchpoint.direction == "in",
                             Touchpoint.kind.in_(MESSAGE_KINDS), Touchpoint.created_at > d.finished_at,
                             Touchpoint.created_at <= reply_end)
    clicked = exists().where(Touchpoint.customer_id == d.customer_id, Touchpoint.kind == "click",
                             Touchpoint.delivery_id == d.id)
    redeemed = exists().where(CouponCode.delivery_id == d.id, CouponCode.redeemed_at.is_not(None))
    variant = d.variant  # NULL (no A/B test) becomes "-" in Python: PostgreSQL cannot match bound GROUP BY expressions

    def flag(condition: ColumnElement[bool]) -> Any:
        return func.sum(case((condition, 1), else_=0))

    steps = (await session.execute(
        select(d.campaign, variant, d.channel, func.count(), flag(d.status.in_(ATTEMPTED)), flag(delivered),
               flag(and_(delivered, replied)),
               func.count(distinct(case((and_(delivered, clicked), d.customer_id)))), flag(and_(delivered, redeemed)))
        .where(d.campaign.in_(names)).group_by(d.campaign, variant, d.channel))).all()
    if not steps:
        return {}

    customers = select(Delivery.customer_id).where(Delivery.campaign.in_(names), Delivery.customer_id.is_not(None))
    conv = attributed_conversions(session, attribution_days, or_(
        Conversion.campaign.in_(names), Conversion.campaign.is_(None) & Conversion.customer_id.in_(customers)))
    credited = aliased(Delivery)
    converted = (await session.execute(
        select(credited.campaign, credited.variant, credited.channel, func.count(distinct(credited.id)),
               func.count(), func.sum(conv.c.amount))
        .select_from(conv).join(credited, credited.id == conv.c.delivery_id)
        .where(credited.campaign.in_(names))
        .group_by(credited.campaign, credited.variant, credited.channel))).all()
    unassigned = {str(c): int(n) for c, n in (await session.execute(
        select(conv.c.own_campaign, func.count()).select_from(conv)
        .where(conv.c.own_campaign.in_(names), conv.c.delivery_id.is_(None))
        .group_by(conv.c.own_campaign))).all()}
    reason = func.coalesce(d.reason, d.status)
    skips: dict[str, dict[str, int]] = {}
    for c, why, n in (await session.execute(
            select(d.campaign, reason, func.count())
            .where(d.campaign.in_(names), d.status.in_(("skipped", "failed", "unknown")))
            .group_by(d.campaign, reason))).all():
        skips.setdefault(str(c), {})[str(why)] = int(n)

    cells: dict[str, dict[tuple[str, str], FunnelRow]] = {}
    for c, v, ch, audience, sent, deliv, rep, clk, red in steps:
        cells.setdefault(c, {})[(v or "-", ch)] = FunnelRow(
            int(audience), int(sent or 0), int(deliv or 0), int(rep or 0), int(clk or 0), int(red or 0))
    for c, v, ch, n_deliveries, n_conversions, revenue in converted:
        cell = cells[c].setdefault((v or "-", ch), FunnelRow())
        cell.converted, cell.conversions, cell.revenue = int(n_deliveries), int(n_conversions), float(revenue or 0)
    out: dict[str, Funnel] = {}
    for c in names:
        if c not in cells:
            continue
        total = FunnelRow()
        by_variant: dict[str, FunnelRow] = {}
        by_channel: dict[str, FunnelRow] = {}
        for (v, ch), cell in sorted(cells[c].items()):
            total.add(cell)
            by_variant.setdefault(v, FunnelRow()).add(cell)
            by_channel.setdefault(ch, FunnelRow()).add(cell)
        total.conversions += unassigned.get(c, 0)
        out[c] = Funnel(c, total, by_variant, by_channel,
                        dict(sorted(skips.get(c, {}).items(), key=lambda kv: -kv[1])), unassigned.get(c, 0),
                        attribution_days)
    return out


def _pct(rate: float) -> str:
    return f"{rate:.0%}"


def format_funnel(f: Funnel, lang: Lang = "both") -> str:
    t = f.total
    rates = t.rates()
    rows = [(label(step, lang), str(getattr(t, step)), _pct(rates[step]) if step in rates else "")
            for step in STEPS]
    lines = [f"{label('funnel', lang)}: {f.campaign}", *table(rows)]
    lines.append(f"{label('conversions', lang)} {t.conversions}  {label('revenue', lang)} {_num(t.revenue)}")

    def split(key: str, groups: dict[str, FunnelRow]) -> None:
        head = "zh" if lang == "both" else lang
        lines.append(f"{label(key, lang)}: " + ">".join(label(s, head) for s in STEPS if s != "sent"))
        lines.extend(table([(f"  {name}", ">".join(str(getattr(g, s)) for s in STEPS if s != "sent"),
                             _pct(g.rates()["converted"])) for name, g in groups.items()]))

    if set(f.by_variant) != {"-"}:
        split("variant", f.by_variant)
    split("channel", f.by_channel)
    if f.skips:
        lines.append(label("skips", lang) + ":")
        lines.extend(table([(f"  {reason}", str(n), "") for reason, n in f.skips.items()]))
    lines.append(f"({label('replied', lang)}: 48h; {label('clicked', lang)}/{label('redeemed', lang)}/"
                 f"{label('converted', lang)} "
                 f"% of {label('delivered', lang)})")
    lines.append(attribution_rule(f.attribution_days, lang))
    return "\n".join(lines)


# --- daily trend ---------------------------------------------------------------------------------

def _day_buckets(period: Period, timezone: str) -> list[datetime]:
    """Local midnights (as naive UTC) starting the days the period touches, plus the end."""
    zone, utc = ZoneInfo(timezone), ZoneInfo("UTC")
    first = (period.since + _TICK).replace(tzinfo=utc).astimezone(zone).date()
    last = period.until.replace(tzinfo=utc).astimezone(zone).date()
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    return [local_midnight(d, zone) for d in days]


def _bucket(column: Any, starts: list[datetime]) -> Any:
    """Index of the bucket (by start time) a timestamp falls in: comparisons only, portable."""
    return case(*[(column >= start, i) for i, start in reversed(list(enumerate(starts)))], else_=-1)


async def daily_trend(session: AsyncSession, period: Period, timezone: str) -> dict[str, dict[str, int]]:
    """Per local day: new customers, inbound messages, conversions (for the trend chart).

    Days the rollup holds in ``timezone`` come from it; the rest (and conversions) are counted live.
    """
    starts = _day_buckets(period, timezone)
    zone = ZoneInfo(timezone)
    names = [f"{s.replace(tzinfo=ZoneInfo('UTC')).astimezone(zone):%m-%d}" for s in starts]
    days = await rollups.built_days(session, period.since, period.until, timezone)
    uncovered = rollups.gaps(period.since, period.until, days)
    series: dict[str, dict[str, int]] = {}
    for key, column, where, rolled_up in (("new_customers", Customer.first_seen_at, true(), True),
                                          ("messages_in", Touchpoint.created_at, rollups.INBOUND, True),
                                          ("conversions", Conversion.created_at, true(), False)):
        spans = uncovered if rolled_up else [(period.since, period.until)]
        found: Counter[int] = Counter()
        if spans:
            bucket = _bucket(column, starts)
            found.update({int(i): int(n) for i, n in (await session.execute(
                select(bucket, func.count()).where(rollups.within(column, spans), where).group_by(bucket))).all()})
        for day in days if rolled_up else []:
            found[starts.index(day.starts_at)] += getattr(day, key)
        series[key] = {name: found[i] for i, name in enumerate(names)}
    return series


# --- cohorts -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cohorts:
    #: Cohort week starts (local dates), oldest first.
    weeks: list[date]
    sizes: list[int]
    #: ``retention[i][n]``: share of cohort ``i`` with an inbound message in week ``n`` after acquisition
    #: (week 0 = the acquisition week); only weeks that have begun are present.
    retention: list[list[float]]
    active: list[list[int]]

    def as_dict(self) -> dict[str, Any]:
        return {"weeks": [w.isoformat() for w in self.weeks], "sizes": self.sizes,
                "retention": self.retention, "active": self.active}


def week_starts(now: datetime, weeks: int, timezone: str) -> list[datetime]:
    """Local Monday midnights (naive UTC) of the last ``weeks`` weeks, oldest first, plus next week's."""
    zone, utc = ZoneInfo(timezone), ZoneInfo("UTC")
    today = now.replace(tzinfo=utc).astimezone(zone).date()
    monday = today - timedelta(days=today.weekday())
    days = [monday - timedelta(weeks=weeks - 1 - i) for i in range(weeks + 1)]
    return [local_midnight(d, zone) for d in days]


async def cohorts(session: AsyncSession, now: datetime, timezone: str, weeks: int = 6) -> Cohorts:
    """Weekly acquisition cohorts (by ``first_seen_at``) and their weekly retention, up to ``now``."""
    starts = week_starts(now, weeks, timezone)
    in_range = (Customer.first_seen_at >= starts[0]) & (Customer.first_seen_at < starts[-1]) & (
        Customer.first_seen_at <= now)
    cohort = _bucket(Customer.first_seen_at, starts[:-1])
    sizes = {int(i): int(n) for i, n in (await session.execute(
        select(cohort, func.count()).where(in_range).group_by(cohort))).all()}
    week = _bucket(Touchpoint.created_at, starts[:-1])
    active = (await session.execute(
        select(cohort, week, func.count(distinct(Customer.id)))
        .join(Touchpoint, Touchpoint.customer_id == Customer.id)
        .where(in_range, Touchpoint.direction == "in", Touchpoint.kind.in_(MESSAGE_KINDS),
               Touchpoint.created_at >= Customer.first_seen_at, Touchpoint.created_at <= now)
        .group_by(cohort, week))).all()
    counts = {(int(c), int(w)): int(n) for c, w, n in active}
    zone = ZoneInfo(timezone)
    labels = [s.replace(tzinfo=ZoneInfo("UTC")).astimezone(zone).date() for s in starts[:-1]]
    size_list = [sizes.get(i, 0) for i in range(weeks)]
    actives = [[counts.get((i, i + n), 0) for n in range(weeks - i)] for i in range(weeks)]
    retention = [[round(a / size_list[i], 4) if size_list[i] else 0.0 for a in row] for i, row in enumerate(actives)]
    return Cohorts(labels, size_list, retention, actives)


def format_cohorts(c: Cohorts, lang: Lang = "both") -> str:
    lines = [f"{label('cohort', lang)} ({label('week', lang)} 0..{len(c.weeks) - 1})"]
    size_w = max(len(str(n)) for n in c.sizes)
    for week, size, row in zip(c.weeks, c.sizes, c.retention, strict=True):
        cells = " ".join(f"{r:>4.0%}" for r in row) if size else ""
        lines.append(f"{week:%m-%d} {size:>{size_w}} {cells}".rstrip())
    lines.append(f"({label('customers', lang)} / % {label('week', lang)} N)")
    return "\n".join(lines)


# --- top tags ------------------------------------------------------------------------------------

async def top_tags(session: AsyncSession, now: datetime, limit: int = 10) -> list[tuple[str, int, int]]:
    """(tag, customers holding it, added in the last 7 days), most held first."""
    recent = func.sum(case((CustomerTag.added_at > now - timedelta(days=7), 1), else_=0))
    rows = (await session.execute(
        select(Tag.name, func.count(), recent).join(CustomerTag, CustomerTag.tag_id == Tag.id)
        .where(or_(CustomerTag.expires_at.is_(None), CustomerTag.expires_at > now))
        .group_by(Tag.name).order_by(func.count().desc(), Tag.name).limit(limit))).all()
    return [(name, int(n), int(r or 0)) for name, n, r in rows]


def format_top_tags(rows: list[tuple[str, int, int]], lang: Lang = "both") -> str:
    if not rows:
        return f"{label('top_tags', lang)}: {label('no_data', lang)}"
    header = (label("top_tags", lang), label("customers", lang), label("this_week", lang))
    return "\n".join(table([header, *[(name, str(n), f"+{r}") for name, n, r in rows]]))


# --- the 360° card -------------------------------------------------------------------------------

def format_customer(view: dict[str, Any], lang: Lang = "both", touchpoints: int = 5) -> str:
    """scrm.profile.customer_view, short enough for a phone screen."""
    ids = ", ".join(f"{i['channel']}:{i['external_id']}" for i in view["identities"])
    flags = " opted-out" if view["opted_out"] else ""
    lines = [f"#{view['id']} {view['display_name'] or '-'} [{view['stage']}]{flags}", ids,
             (f"src {view['acquisition_source'] or '-'}  first {(view['first_seen_at'] or '-')[:10]}"
              f"  last in {(view['last_inbound_at'] or '-')[:10]}")]
    if view["tags"]:
        lines.append("tags: " + " ".join(f"{t['name']}({t['source'][0]})" for t in view["tags"]))
    for c in view["coupons"][-3:]:
        state = "used" if c["redeemed_at"] else f"exp {(c['expires_at'] or '-')[:10]}"
        lines.append(f"coupon {c['code']} {state}")
    for d in view["deliveries"][-3:]:
        lines.append(f"msg {d['campaign']}#{d['step']} {d['status']}{' ' + d['reason'] if d['reason'] else ''}")
    for t in view["touchpoints"][-touchpoints:]:
        text = (t["text"] or t["campaign"] or "").replace("\n", " ")
        short = text if len(text) <= 24 else text[:23] + "…"
        arrow = {"in": "<", "out": ">"}.get(t["direction"], "·")
        lines.append(f"{t['at'][5:16]} {arrow} {t['kind']} {short}".rstrip())
    return "\n".join(lines)
