"""The loyalty part of the 360° view (scrm.profile) and the short card staff get in chat."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.store.models import (
    Customer,
    CustomerTag,
    FollowupTask,
    LoyaltyAccount,
    PointsLedger,
    Referral,
    Survey,
    Tag,
)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


async def loyalty_section(session: AsyncSession, customer_id: int, now: datetime | None = None) -> dict[str, Any]:
    """Points, tier, owner, open tasks, survey answers, referral, recommendations and churn scores."""
    from scrm.loyalty.points import expiring

    account = await session.get(LoyaltyAccount, customer_id)
    ledger = (await session.scalars(select(PointsLedger).where(PointsLedger.customer_id == customer_id)
                                    .order_by(PointsLedger.id.desc()).limit(10))).all()
    tasks = (await session.scalars(select(FollowupTask).where(FollowupTask.customer_id == customer_id)
                                   .order_by(FollowupTask.id.desc()).limit(10))).all()
    surveys = (await session.scalars(select(Survey).where(Survey.customer_id == customer_id,
                                                          Survey.status.in_(("asked", "answered")))
                                     .order_by(Survey.id.desc()).limit(10))).all()
    referral = await session.scalar(select(Referral).where(Referral.referee_id == customer_id))
    referred = (await session.scalars(select(Referral).where(Referral.referrer_id == customer_id))).all()
    soon = (now or datetime.now(UTC).replace(tzinfo=None)) + timedelta(days=30)
    return {
        "points": account.balance if account else 0,
        "points_expiring_30d": await expiring(session, customer_id, soon) if ledger else 0,
        "tier": account.tier if account else "",
        "owner": account.owner if account else None,
        "referral_code": account.referral_code if account else None,
        "referred_by": referral.referrer_id if referral else None,
        "referrals": {"captured": len(referred), "converted": sum(1 for r in referred if r.converted_at)},
        "ledger": [{"at": _iso(r.created_at), "delta": r.delta, "reason": r.reason, "ref": r.ref,
                    "balance": r.balance_after} for r in ledger],
        "tasks": [{"id": t.id, "kind": t.kind, "note": t.note, "owner": t.owner, "due_at": _iso(t.due_at),
                   "done_at": _iso(t.done_at)} for t in tasks],
        "surveys": [{"id": s.id, "kind": s.kind, "status": s.status, "score": s.score, "reason": s.reason,
                     "answered_at": _iso(s.answered_at)} for s in surveys],
        "recommendations": (account.recommendations or []) if account else [],
        "churn": {"p_alive": account.p_alive, "expected_purchases_90d": account.expected_purchases,
                  "clv": account.clv, "risk": account.churn_risk, "method": account.churn_method,
                  "scored_at": _iso(account.scored_at)} if account else None,
    }


async def card_text(session: AsyncSession, customer: Customer, now: datetime | None = None) -> str:
    """A few lines a staff member can read on a phone: who, tier and points, tags, last survey, risk."""
    section = await loyalty_section(session, customer.id, now)
    tags = (await session.scalars(select(Tag.name).join(CustomerTag).where(CustomerTag.customer_id == customer.id)
                                  .order_by(Tag.name))).all()
    lines = [(f"#{customer.id} {customer.display_name or ''} · {customer.stage} · "
              f"{section['tier'] or '-'} · {section['points']} 积分")]
    if tags:
        lines.append("标签 tags: " + ", ".join(tags))
    if section["surveys"]:
        s = section["surveys"][0]
        lines.append(f"最近评价 survey: {s['kind']} {s['score'] if s['score'] is not None else '?'}"
                     + (f" {s['reason']}" if s["reason"] else ""))
    if section["owner"]:
        lines.append(f"负责人 owner: {section['owner']}")
    churn = section["churn"]
    if churn and churn["risk"] is not None:
        lines.append(f"流失风险 churn risk: {churn['risk']:.2f} ({churn['method']})")
    if section["recommendations"]:
        lines.append("推荐 recommend: " + ", ".join(r.get("name") or r["sku"] for r in section["recommendations"]))
    return "\n".join(lines)
