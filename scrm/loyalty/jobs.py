"""The loyalty jobs the scheduler runs: a frequent sweep and a nightly pass.

The sweep handles what events leave behind, set-based and idempotent (running it twice is
harmless): new conversions earn points, pay referrers and plan surveys; referees and WeCom owners
are captured; rule tasks are made; then due surveys are asked, new tasks alerted and digests sent.
The nightly pass expires points, re-evaluates every tier (downgrades), rebuilds recommendations
and scores churn/CLV. Wire them with :func:`add_jobs` from scrm.scheduler.build_scheduler.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.loyalty import churn, followups, points, recommend, referrals, surveys, tiers
from scrm.store.dialect import insert_ignore
from scrm.store.models import Conversion, LoyaltySeenConversion

if TYPE_CHECKING:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from scrm.runtime import Runtime

log = logging.getLogger(__name__)
BATCH = 2000


@dataclass
class SweepResult:
    conversions: int = 0
    points: int = 0
    referrals_paid: int = 0
    referrals_captured: int = 0
    tier_changes: int = 0
    surveys_planned: int = 0
    surveys_sent: int = 0
    tasks: int = 0
    alerts: int = 0
    digests: int = 0
    details: dict[str, Any] = field(default_factory=dict)


async def credit_conversions(service: Runtime, session: AsyncSession, result: SweepResult) -> list[int]:
    """Each conversion not seen before, once: points for orders, the referrer's reward, a survey."""
    now = service.clock.now()
    config = points.loyalty(service)
    rows = list((await session.scalars(
        select(Conversion).outerjoin(LoyaltySeenConversion, LoyaltySeenConversion.conversion_id == Conversion.id)
        .where(LoyaltySeenConversion.conversion_id.is_(None)).order_by(Conversion.id).limit(BATCH))).all())
    touched: set[int] = set()
    fresh: list[Conversion] = []
    for conversion in rows:
        # Claim first: a second instance sweeping at the same time skips what this one took.
        if not await insert_ignore(session, LoyaltySeenConversion.__table__, {
                "conversion_id": conversion.id, "customer_id": conversion.customer_id, "seen_at": now}):
            continue
        fresh.append(conversion)
        touched.add(conversion.customer_id)
        earned = math.floor(conversion.amount * config.points_per_amount) if conversion.kind == "order" else 0
        if earned > 0 and await points.credit(service, session, conversion.customer_id, earned, "order",
                                              str(conversion.id), now) is not None:
            result.points += earned
        if (referrer := await referrals.on_conversion(service, session, conversion.customer_id, now)) is not None:
            result.referrals_paid += 1
            touched.add(referrer)
    result.conversions += len(fresh)
    await recommend.items_from_orders(session, fresh)
    result.surveys_planned += await surveys.plan_after_conversions(service, session, fresh, now)
    result.tier_changes += len(await tiers.evaluate(service, session, now, sorted(touched)))
    return sorted(touched)


async def sweep(service: Runtime) -> SweepResult:
    result = SweepResult()
    if service.config.loyalty is None:
        return result
    now = service.clock.now()
    async with service.sessions() as session, session.begin():
        result.referrals_captured = await referrals.capture_from_sources(session, now, since=now - timedelta(days=7))
        await followups.capture_owners(service, session, now, since=now - timedelta(days=2))
        await credit_conversions(service, session, result)
        result.tasks += await followups.rule_tasks(service, session, now)
        result.tasks += await followups.waiting_tasks(service, session, now)
    async with service.sessions() as session, session.begin():
        result.surveys_sent = await surveys.send_due(service, session, now)
    async with service.sessions() as session, session.begin():
        result.alerts = await followups.alert_new_tasks(service, session, now)
    async with service.sessions() as session, session.begin():
        result.digests = await followups.send_digests(service, session, now)
    return result


@dataclass
class NightlyResult:
    expired: int = 0
    tier_changes: int = 0
    pairs: int = 0
    recommended: int = 0
    churn: churn.ScoreResult | None = None


async def nightly(service: Runtime) -> NightlyResult:
    result = NightlyResult()
    config = service.config.loyalty
    if config is None:
        return result
    now = service.clock.now()
    base = points.base_tier(config)
    async with service.sessions() as session, session.begin():
        result.expired = await points.expire_due(service, session, now)
    async with service.sessions() as session, session.begin():
        result.tier_changes = len(await tiers.evaluate(service, session, now))
    async with service.sessions() as session, session.begin():
        result.pairs = await recommend.compute_pairs(session, now, config.min_pair_customers)
        result.recommended = await recommend.store_recommendations(session, now, tier=base)
    async with service.sessions() as session, session.begin():
        result.churn = await churn.score(session, now, config.churn.method, config.churn.min_repeat,
                                         config.churn.horizon_days, tier=base)
    log.info("loyalty nightly: %s", result)
    return result


def add_jobs(scheduler: AsyncIOScheduler, service: Runtime,
             wrap: Callable[[Callable[[], Awaitable[Any]]], Callable[[], Awaitable[Any]]] | None = None) -> None:
    """Register the sweep and the nightly pass (from scrm.scheduler.build_scheduler, wrapped so that
    only the planner-lease holder runs them: both plan sends and must not run twice at once)."""
    config = service.config.loyalty
    if config is None:
        return
    wrap = wrap or service.job

    async def run_sweep() -> SweepResult:
        return await sweep(service)

    async def run_nightly() -> NightlyResult:
        return await nightly(service)

    scheduler.add_job(wrap(run_sweep), "interval", id="loyalty:sweep", seconds=config.sweep_seconds)
    hour, minute = config.nightly_at.split(":")
    scheduler.add_job(wrap(run_nightly), "cron", id="loyalty:nightly", hour=int(hour), minute=int(minute),
                      timezone=service.config.service.timezone)
