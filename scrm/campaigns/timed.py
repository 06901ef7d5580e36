"""The campaign clock: scheduled (cron / one-off) and timed (inactivity, birthday, coupon expiry)
campaigns, planned set-based from the store.

APScheduler calls :func:`run_due` on an interval; fire times come from APScheduler's own cron
trigger but are read against the service clock, and every run is a ``campaign_runs`` row
(unique per campaign and fire time). So a run is never doubled — by a restart, a second instance
or a re-planned job — and a run missed while the service was down is run late within the
campaign's grace, or recorded as skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import ColumnElement, String, and_, cast, func, literal, or_, select, update
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import metrics, segments
from scrm.campaigns.definitions import LoadedCampaign, parse_duration
from scrm.campaigns.planner import plan_many
from scrm.store.dialect import insert_ignore, insert_select_ignore, rowcount
from scrm.store.models import (
    Campaign,
    CampaignRun,
    ChatGroup,
    CouponCode,
    Customer,
    Delivery,
    Identity,
)

if TYPE_CHECKING:
    from scrm.runtime import Runtime

log = logging.getLogger(__name__)


#: The campaign_runs row of a timed campaign (inactivity, birthday, coupon expiry): its last tick that
#: failed, or that planned after a failure. Scheduled campaigns have one row per fire time instead.
CLOCK_OCCURRENCE = "clock"


@dataclass
class ClockResult:
    planned: dict[str, int] = field(default_factory=dict)
    runs: list[tuple[str, str, str]] = field(default_factory=list)  # (campaign, occurrence, status)
    #: Campaigns that failed to plan in this tick, with the reason; the others were planned.
    failed: dict[str, str] = field(default_factory=dict)
    #: Of those, the ones that were not failing before this tick (staff are told once a streak).
    newly_failed: set[str] = field(default_factory=set)
    #: The fire time a scheduled campaign was planning when it failed.
    attempting: dict[str, datetime] = field(default_factory=dict)


def _utc(naive: datetime) -> datetime:
    return naive.replace(tzinfo=UTC)


def _naive(aware: datetime) -> datetime:
    return aware.astimezone(UTC).replace(tzinfo=None)


def fire_times(loaded: LoadedCampaign, since: datetime, until: datetime, zone: str) -> list[datetime]:
    """Scheduled fire times in (since, until], naive UTC."""
    t = loaded.definition.trigger
    if t.at is not None:
        at = _naive(t.at.replace(tzinfo=ZoneInfo(zone)) if t.at.tzinfo is None else t.at)
        return [at] if since < at <= until else []
    assert t.cron is not None
    trigger = CronTrigger.from_crontab(t.cron, timezone=ZoneInfo(zone))
    times: list[datetime] = []
    previous, now = None, _utc(since)
    while (nxt := trigger.get_next_fire_time(previous, now)) is not None and nxt <= _utc(until):
        if nxt > _utc(since):
            times.append(_naive(nxt))
        previous, now = nxt, nxt + timedelta(microseconds=1)
    return times


async def run_due(service: Runtime, session: AsyncSession, now: datetime) -> ClockResult:
    """Plan every due campaign, each in a savepoint of its own: a campaign that fails to plan (a
    segment the store refuses, a bug) is rolled back alone and recorded as a failed run, and the
    campaigns due with it still go out."""
    result = ClockResult()
    created = {c.name: c.created_at for c in (await session.scalars(select(Campaign))).all()}
    failing = {name for name, run in (await last_runs(session)).items() if run.status == "failed"}
    for name, loaded in service.campaigns.items():
        if name in service.paused or not _clocked(loaded):
            continue
        try:
            async with session.begin_nested():
                await _plan_campaign(service, session, loaded, now, created.get(name) or now, result)
        except SQLAlchemyError as exc:
            if _store_down(exc):
                raise  # the store itself is unreachable: no campaign can plan, the job fails as a whole
            await _failed(service, session, loaded, now, exc, result, name not in failing)
        except Exception as exc:  # noqa: BLE001 - whatever broke one campaign must not stop the others
            await _failed(service, session, loaded, now, exc, result, name not in failing)
    return result


async def last_runs(session: AsyncSession) -> dict[str, CampaignRun]:
    """Each campaign's latest run (the clock's own record for timed campaigns): what `scrm campaigns
    list`, staff's /campaigns and /metrics show, and how the clock knows a failure streak began."""
    latest = (select(CampaignRun.campaign, func.max(CampaignRun.ran_at).label("at"))
              .group_by(CampaignRun.campaign).subquery())
    rows = (await session.scalars(
        select(CampaignRun).join(latest, and_(CampaignRun.campaign == latest.c.campaign,
                                              CampaignRun.ran_at == latest.c.at))
        .order_by(CampaignRun.id))).all()
    return {run.campaign: run for run in rows}


async def recent_runs(session: AsyncSession, campaign: str, limit: int = 10) -> list[CampaignRun]:
    """A campaign's latest runs, newest first (the console's campaign page shows them, failures with their reason)."""
    return list((await session.scalars(select(CampaignRun).where(CampaignRun.campaign == campaign)
                                       .order_by(CampaignRun.ran_at.desc(), CampaignRun.id.desc())
                                       .limit(limit))).all())


def describe_run(run: CampaignRun | None) -> str:
    """A run in a few words, for operators (the CLI's list and staff's /campaigns)."""
    if run is None:
        return "-"
    when = f"{run.ran_at:%Y-%m-%d %H:%M}"
    if run.status == "failed":
        return f"FAILED {when}: {run.error}"
    if run.status == "skipped_misfire":
        return f"skipped (missed) {when}"
    return f"{run.status} {when}, {run.planned} planned"


def _clocked(loaded: LoadedCampaign) -> bool:
    t = loaded.definition.trigger
    return t.scheduled or t.event in ("inactivity", "birthday", "coupon_expiring")


def _store_down(exc: SQLAlchemyError) -> bool:
    return isinstance(exc, (OperationalError, InterfaceError)) and exc.connection_invalidated


async def _plan_campaign(service: Runtime, session: AsyncSession, loaded: LoadedCampaign, now: datetime,
                         active_since: datetime, result: ClockResult) -> None:
    name, t = loaded.definition.name, loaded.definition.trigger
    if t.scheduled:
        await _scheduled(service, session, loaded, now, active_since, result)
        return
    planners = {"inactivity": _inactivity, "birthday": _birthdays, "coupon_expiring": _expiring}
    assert t.event is not None  # _clocked let only these through
    planned = await planners[t.event](service, session, loaded, now)
    await _count(result, name, planned)
    # A timed campaign's row only changes when it recovers from a failure (or keeps planning after one).
    await session.execute(update(CampaignRun).where(CampaignRun.campaign == name,
                                                    CampaignRun.occurrence == CLOCK_OCCURRENCE,
                                                    CampaignRun.status == "failed")
                          .values(status="ran", ran_at=now, scheduled_at=now, planned=planned, error=None))


async def _failed(service: Runtime, session: AsyncSession, loaded: LoadedCampaign, now: datetime,
                  exc: Exception, result: ClockResult, first: bool) -> None:
    """Record a campaign's failed planning where operators look (campaign_runs, /metrics), log it once
    a streak with its traceback, and let the caller tell staff."""
    d = loaded.definition
    reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    result.failed[d.name] = reason
    if first:
        result.newly_failed.add(d.name)
        log.error("campaign %s failed to plan; the other campaigns go on", d.name, exc_info=exc)
    else:
        log.warning("campaign %s still fails to plan: %s", d.name, reason)
    metrics.CAMPAIGN_PLAN_FAILURES.labels(d.name).inc()
    if d.trigger.scheduled:
        occurrence_at = result.attempting.pop(d.name, now)
        occurrence = occurrence_at.isoformat(timespec="minutes")
    else:
        occurrence_at, occurrence = now, CLOCK_OCCURRENCE
    values = {"status": "failed", "ran_at": now, "planned": 0, "error": reason}
    updated = await session.execute(update(CampaignRun).where(CampaignRun.campaign == d.name,
                                                              CampaignRun.occurrence == occurrence)
                                    .values(**values))
    if not rowcount(updated):
        await insert_ignore(session, CampaignRun.__table__, {"campaign": d.name, "occurrence": occurrence,
                                                             "scheduled_at": occurrence_at, **values})
    result.runs.append((d.name, occurrence, "failed"))


async def _count(result: ClockResult, name: str, planned: int) -> None:
    if planned:
        result.planned[name] = result.planned.get(name, 0) + planned


async def _scheduled(service: Runtime, session: AsyncSession, loaded: LoadedCampaign, now: datetime,
                     active_since: datetime, result: ClockResult) -> None:
    """Runs due since the last one; a failed run is tried again on later ticks while its misfire
    policy would still run it late (a passing store error, or a campaign file fixed meanwhile)."""
    d = loaded.definition
    latest = (await session.execute(select(CampaignRun.scheduled_at, CampaignRun.status)
                                    .where(CampaignRun.campaign == d.name,
                                           CampaignRun.occurrence != CLOCK_OCCURRENCE)
                                    .order_by(CampaignRun.scheduled_at.desc()).limit(1))).first()
    since = max(latest.scheduled_at if latest else active_since, active_since)
    if latest is not None and latest.status == "failed":
        since -= timedelta(microseconds=1)  # the failed run is due again
    due = fire_times(loaded, since, now, service.config.service.timezone)
    grace = parse_duration(d.trigger.grace)
    for i, when in enumerate(due):
        occurrence = when.isoformat(timespec="minutes")
        late = now - when
        # Only the newest missed run may still go out; older ones (and any beyond grace) are skipped.
        runnable = i == len(due) - 1 and (late <= timedelta(minutes=1) or
                                           (d.trigger.misfire == "run_late" and late <= grace))
        status = "ran" if runnable else "skipped_misfire"
        result.attempting[d.name] = when
        claimed = await insert_ignore(session, CampaignRun.__table__, {
            "campaign": d.name, "occurrence": occurrence, "status": status, "scheduled_at": when, "ran_at": now,
            "planned": 0})
        if not claimed and runnable:
            # a failed run of ours, taken again (by one instance: the update is the claim)
            claimed = rowcount(await session.execute(
                update(CampaignRun).where(CampaignRun.campaign == d.name, CampaignRun.occurrence == occurrence,
                                          CampaignRun.status == "failed")
                .values(status="ran", ran_at=now, error=None)))
        if not claimed:
            continue  # another instance (or an earlier tick) owns this run, or a failed run is past its grace
        result.runs.append((d.name, occurrence, status))
        if not runnable:
            log.warning("campaign %s: run scheduled at %s missed (%s late), skipped", d.name, when, late)
            continue
        planned = await _plan_audience(service, session, loaded, now, occurrence)
        await session.execute(update(CampaignRun).where(CampaignRun.campaign == d.name,
                                                        CampaignRun.occurrence == occurrence)
                              .values(planned=planned))
        await _count(result, d.name, planned)
    result.attempting.pop(d.name, None)


async def _plan_audience(service: Runtime, session: AsyncSession, loaded: LoadedCampaign, now: datetime,
                         occurrence: str) -> int:
    d = loaded.definition
    due = now + d.delay
    if d.audience.groups:
        query = select(
            literal(d.name), literal(0), literal("g") + cast(ChatGroup.id, String), literal(occurrence),
            ChatGroup.id, ChatGroup.channel, ChatGroup.account, ChatGroup.external_id, literal("planned"),
            literal(0), literal(due), literal(now),
        ).where(ChatGroup.active.is_(True))
        if d.channels:
            query = query.where(ChatGroup.channel.in_(d.channels))
        columns = ["campaign", "step", "target", "occurrence", "group_id", "channel", "account", "external_id",
                   "status", "attempts", "due_at", "created_at"]
        return await insert_select_ignore(session, Delivery.__table__, columns, query)
    return await plan_many(session, d.name, 0, _audience(service, loaded, now), due, now, d.channels, occurrence)


def _audience(service: Runtime, loaded: LoadedCampaign, now: datetime,
              extra: ColumnElement[bool] | None = None) -> ColumnElement[bool]:
    segment = loaded.definition.audience.segment
    parts: list[ColumnElement[bool]] = [Customer.opted_out.is_(False)]
    if segment:
        parts.append(segments.condition(service.config.segments[segment], now, service.config.segments))
    if extra is not None:
        parts.append(extra)
    return and_(*parts)


async def _inactivity(service: Runtime, session: AsyncSession, loaded: LoadedCampaign, now: datetime) -> int:
    """Customers silent for N days, once per silence: the occurrence is their last inbound time."""
    d = loaded.definition
    assert d.trigger.days is not None
    last = func.coalesce(Customer.last_inbound_at, Customer.first_seen_at)
    where = _audience(service, loaded, now, last <= now - timedelta(days=d.trigger.days))
    return await plan_many(session, d.name, 0, where, now + d.delay, now, d.channels, cast(last, String))


async def _birthdays(service: Runtime, session: AsyncSession, loaded: LoadedCampaign, now: datetime) -> int:
    """Today's birthdays in each customer's own time zone, from the configured local hour, once a year."""
    d = loaded.definition
    default_zone = service.config.service.timezone
    zones = (await session.scalars(select(func.coalesce(Customer.timezone, default_zone)).distinct()
                                   .where(Customer.birthday_md.is_not(None)))).all()
    planned = 0
    for zone in zones:
        try:
            local = _utc(now).astimezone(ZoneInfo(zone))
        except (KeyError, ValueError):
            continue
        if local.hour < d.trigger.hour:
            continue
        in_zone = (Customer.timezone == zone) if zone != default_zone else or_(
            Customer.timezone.is_(None), Customer.timezone == zone)
        where = _audience(service, loaded, now, and_(in_zone, Customer.birthday_md == local.strftime("%m-%d")))
        planned += await plan_many(session, d.name, 0, where, now + d.delay, now, d.channels, str(local.year))
    return planned


async def _expiring(service: Runtime, session: AsyncSession, loaded: LoadedCampaign, now: datetime) -> int:
    """Granted, unredeemed codes expiring within N days: one reminder per code."""
    d = loaded.definition
    assert d.trigger.days is not None
    first_identity = (select(func.min(Identity.id)).where(Identity.customer_id == CouponCode.customer_id)
                      .correlate(CouponCode).scalar_subquery())
    query = (
        select(literal(d.name), literal(0), literal("c") + cast(CouponCode.customer_id, String), CouponCode.code,
               CouponCode.customer_id, Identity.channel, Identity.account, Identity.external_id, literal("planned"),
               literal(0), literal(now + d.delay), literal(now))
        .join(Identity, Identity.id == first_identity)
        .join(Customer, Customer.id == CouponCode.customer_id)
        .where(CouponCode.redeemed_at.is_(None), CouponCode.expires_at > now,
               CouponCode.expires_at <= now + timedelta(days=d.trigger.days), _audience(service, loaded, now))
    )
    columns = ["campaign", "step", "target", "occurrence", "customer_id", "channel", "account", "external_id",
               "status", "attempts", "due_at", "created_at"]
    return await insert_select_ignore(session, Delivery.__table__, columns, query)
