"""Conversion reports, computed with SQL aggregates (Python only formats the results)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import distinct, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.channels import MESSAGE_KINDS
from scrm.store.models import (
    Conversion,
    CouponCode,
    Customer,
    Delivery,
    Redemption,
    Touchpoint,
)


@dataclass(frozen=True)
class Summary:
    since: datetime
    until: datetime
    new_customers: int
    messages_in: int
    messages_out: int
    campaign_sends: int
    coupons_granted: int
    coupon_redemptions: int
    conversions: int
    reached_customers: int
    converted_customers: int

    @property
    def conversion_rate(self) -> float:
        """Customers with a conversion / customers a campaign reached, in the period."""
        return self.converted_customers / self.reached_customers if self.reached_customers else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["since"], data["until"] = self.since.isoformat(), self.until.isoformat()
        data["conversion_rate"] = round(self.conversion_rate, 4)
        return data


async def summary(session: AsyncSession, until: datetime, days: int = 7) -> Summary:
    since = until - timedelta(days=days)

    async def count(query: Any) -> int:
        return int(await session.scalar(query) or 0)

    def window(column: Any) -> Any:
        return (column >= since) & (column <= until)

    sent = (Delivery.status == "sent") & window(Delivery.finished_at)
    customer_tp = Touchpoint.customer_id.is_not(None) & window(Touchpoint.created_at)
    return Summary(
        since=since,
        until=until,
        new_customers=await count(select(func.count()).where(window(Customer.first_seen_at))),
        messages_in=await count(select(func.count()).where(
            customer_tp, Touchpoint.direction == "in", Touchpoint.kind.in_(MESSAGE_KINDS))),
        messages_out=await count(select(func.count()).where(customer_tp, Touchpoint.direction == "out",
                                                            Touchpoint.kind.in_(("reply", "campaign_message")))),
        campaign_sends=await count(select(func.count()).where(sent)),
        coupons_granted=await count(select(func.count()).where(window(CouponCode.granted_at))),
        coupon_redemptions=await count(select(func.count()).where(window(Redemption.redeemed_at))),
        conversions=await count(select(func.count()).where(window(Conversion.created_at))),
        reached_customers=await count(select(func.count(distinct(Delivery.customer_id))).where(sent)),
        converted_customers=await count(
            select(func.count(distinct(Conversion.customer_id))).where(window(Conversion.created_at))),
    )


def format_summary(s: Summary) -> str:
    rows = [
        ("新客户 New customers", s.new_customers),
        ("收到消息 Messages in", s.messages_in),
        ("发出消息 Messages out", s.messages_out),
        ("活动发送 Campaign sends", s.campaign_sends),
        ("发券 Coupons granted", s.coupons_granted),
        ("核销 Redemptions", s.coupon_redemptions),
        ("转化 Conversions", s.conversions),
        ("转化率 Conversion rate", f"{s.conversion_rate:.1%}"),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"报告 Report {s.since:%m-%d}..{s.until:%m-%d} ({(s.until - s.since).days}d)"]
    lines += [f"{label.ljust(width)} {value:>6}" for label, value in rows]
    lines.append("转化率 = 有转化的客户 / 活动触达的客户 (rate = converted / reached customers)")
    return "\n".join(lines)
