"""Member tiers: by points earned or money spent in the trailing 12 months, thresholds in config.

One query computes the tier every account should have and returns only the accounts whose tier
differs, so the nightly pass (downgrades included) costs one grouped scan, and the per-event pass
is the same query restricted to the customers just changed. A tier is also a tag (``tier:金卡``):
a tier-up adds it, which starts any campaign triggered by ``tag_added`` on that tag (the shipped
``tier-up-*`` campaigns send the congratulations through the outbox).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    String,
    case,
    cast,
    false,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.campaigns.planner import plan_triggered
from scrm.config import LoyaltyConfig
from scrm.customers import touchpoint
from scrm.loyalty.points import EARNS, base_tier, loyalty
from scrm.store.dialect import insert_select_ignore
from scrm.store.models import Conversion, LoyaltyAccount, PointsLedger
from scrm.tagging import add_tag, remove_tag

if TYPE_CHECKING:
    from scrm.runtime import Runtime

YEAR = timedelta(days=365)
TAG_PREFIX = "tier:"
CHUNK = 500


@dataclass(frozen=True)
class TierChange:
    customer_id: int
    old: str
    new: str
    up: bool


def _target(config: LoyaltyConfig, points: Any, spend: Any) -> ColumnElement[str]:
    whens = []
    for tier in reversed(config.tiers[1:]):
        conditions = []
        if tier.min_points is not None:
            conditions.append(points >= tier.min_points)
        if tier.min_spend is not None:
            conditions.append(spend >= tier.min_spend)
        whens.append((or_(*conditions) if conditions else false(), tier.name))
    return case(*whens, else_=literal(base_tier(config))) if whens else literal(base_tier(config))


async def evaluate(service: Runtime, session: AsyncSession, now: datetime,
                   ids: Sequence[int] | None = None) -> list[TierChange]:
    """Move every account (or those of ``ids``) to the tier its last 12 months earn; returns the moves."""
    config = loyalty(service)
    if not config.tiers:
        return []
    since = now - YEAR
    if ids is None:  # customers who bought but never touched loyalty still deserve their tier
        await insert_select_ignore(
            session, LoyaltyAccount.__table__, ["customer_id", "balance", "tier", "updated_at"],
            select(Conversion.customer_id, literal(0), literal(base_tier(config)), literal(now)).distinct()
            .where(Conversion.created_at > since))
    earned = (select(PointsLedger.customer_id.label("cid"), func.sum(PointsLedger.delta).label("points"))
              .where(PointsLedger.delta > 0, PointsLedger.reason.in_(EARNS), PointsLedger.created_at > since)
              .group_by(PointsLedger.customer_id).subquery())
    spent = (select(Conversion.customer_id.label("cid"), func.sum(Conversion.amount).label("spend"))
             .where(Conversion.created_at > since).group_by(Conversion.customer_id).subquery())
    target = _target(config, func.coalesce(earned.c.points, 0), func.coalesce(spent.c.spend, 0))
    query = (select(LoyaltyAccount.customer_id, LoyaltyAccount.tier, target)
             .outerjoin(earned, earned.c.cid == LoyaltyAccount.customer_id)
             .outerjoin(spent, spent.c.cid == LoyaltyAccount.customer_id)
             .where(LoyaltyAccount.tier != cast(target, String)))
    rows: list[Any] = []
    if ids is None:
        rows = list((await session.execute(query)).all())
    else:
        for start in range(0, len(ids), CHUNK):
            rows += (await session.execute(query.where(LoyaltyAccount.customer_id.in_(ids[start:start + CHUNK])))).all()
    order = {t.name: i for i, t in enumerate(config.tiers)}
    changes = [TierChange(cid, old, new, order.get(new, 0) > order.get(old, -1)) for cid, old, new in rows]
    await _apply(service, session, changes, now)
    return changes


async def _apply(service: Runtime, session: AsyncSession, changes: list[TierChange], now: datetime) -> None:
    config = loyalty(service)
    base = base_tier(config)
    raised: dict[str, list[int]] = defaultdict(list)
    for change in changes:
        account = await session.get(LoyaltyAccount, change.customer_id)
        assert account is not None
        account.tier, account.tier_at, account.updated_at = change.new, now, now
        for tier in config.tiers:
            if tier.name != change.new:
                await remove_tag(session, change.customer_id, TAG_PREFIX + tier.name)
        if change.new != base and await add_tag(session, change.customer_id, TAG_PREFIX + change.new, "loyalty",
                                                 "tier", now) and change.up:
            raised[change.new].append(change.customer_id)
        touchpoint(session, customer_id=change.customer_id, channel="system", account="-", direction="internal",
                   kind="tier_changed", now=now, payload={"from": change.old, "to": change.new,
                                                          "direction": "up" if change.up else "down"})
    planned = 0
    for tier_name, ids in raised.items():
        planned += await plan_triggered(service, session, "tag_added", ids, now, tag=TAG_PREFIX + tier_name)
    if planned:
        service.wake_outbox()
