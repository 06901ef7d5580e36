"""Scheduled report digests for managers (``/digest weekly 09:00``), sent by one scheduler job.

A due digest is claimed (its ``next_at`` moved on) and committed before it is sent: a crash
mid-send loses one digest instead of sending it twice, the rule the outbox follows too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import TYPE_CHECKING, Literal
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import charts, reports
from scrm.customers import staff_last_inbound, staff_message_touchpoint
from scrm.messages import Chart, OutboundMessage
from scrm.store.models import ReportDigest

if TYPE_CHECKING:
    from scrm.runtime import Runtime

log = logging.getLogger(__name__)

Frequency = Literal["daily", "weekly"]
#: Weekly digests go out on this weekday (Monday), covering the week before.
WEEKLY_ON = 0
PERIOD_DAYS: dict[str, int] = {"daily": 1, "weekly": 7}


def next_due(after: datetime, frequency: str, at: str, timezone: str) -> datetime:
    """The first ``at`` (local time; Mondays for weekly) strictly after ``after``, as naive UTC."""
    zone, utc = ZoneInfo(timezone), ZoneInfo("UTC")
    local = after.replace(tzinfo=utc).astimezone(zone)
    hour, minute = (int(part) for part in at.split(":"))
    day = local.date()
    while True:
        candidate = datetime.combine(day, time(hour, minute), zone)
        if candidate > local and (frequency == "daily" or day.weekday() == WEEKLY_ON):
            return candidate.astimezone(utc).replace(tzinfo=None)
        day += timedelta(days=1)


async def subscribe(session: AsyncSession, channel: str, account: str, external_id: str, frequency: str,
                    at: str, locale: str | None, now: datetime, timezone: str) -> ReportDigest:
    row = await session.scalar(select(ReportDigest).where(
        ReportDigest.channel == channel, ReportDigest.account == account, ReportDigest.external_id == external_id))
    if row is None:
        row = ReportDigest(channel=channel, account=account, external_id=external_id, created_at=now)
        session.add(row)
    row.frequency, row.at, row.locale = frequency, at, locale
    row.next_at = next_due(now, frequency, at, timezone)
    await session.flush()
    return row


async def unsubscribe(session: AsyncSession, channel: str, account: str, external_id: str) -> bool:
    row = await session.scalar(select(ReportDigest).where(
        ReportDigest.channel == channel, ReportDigest.account == account, ReportDigest.external_id == external_id))
    if row is None:
        return False
    await session.delete(row)
    return True


@dataclass(frozen=True)
class _Due:
    channel: str
    account: str
    external_id: str
    frequency: str
    text: str
    image: Chart
    last_inbound_at: datetime | None


async def send_due(service: Runtime) -> int:
    """Send every digest that is due now; returns how many were handed to their channel."""
    now = service.clock.now()
    timezone = service.config.service.timezone
    attribution = service.config.reports.attribution_days
    due: list[_Due] = []
    async with service.sessions() as session, session.begin():
        rows = (await session.scalars(select(ReportDigest).where(ReportDigest.next_at <= now)
                                      .order_by(ReportDigest.id).with_for_update(skip_locked=True))).all()
        for row in rows:
            row.next_at, row.last_sent_at = next_due(now, row.frequency, row.at, timezone), now
            lang = reports.lang_of(row.locale)
            period = reports.last_days(now, PERIOD_DAYS.get(row.frequency, 7))
            text = reports.format_summary(await reports.summary(session, period, attribution_days=attribution), lang)
            trend = await reports.daily_trend(session, period, timezone)
            image = charts.chart(charts.trend_png, trend, lang)  # drawn when sent, after this transaction
            seen = await staff_last_inbound(session, row.channel, row.account, row.external_id)
            due.append(_Due(row.channel, row.account, row.external_id, row.frequency, text, image, seen))
    sent = 0
    for d in due:
        channel = service.channel(d.channel, d.account)
        if channel is None:
            log.warning("digest for %s:%s: channel account %s is not configured", d.channel, d.external_id, d.account)
            continue
        message = OutboundMessage(d.channel, d.account, d.external_id, d.text, image=d.image,
                                  last_inbound_at=d.last_inbound_at)
        result = await channel.send(message)
        sent += result.status == "sent"
        async with service.sessions() as session, session.begin():
            staff_message_touchpoint(session, message, result, "report_digest", now, frequency=d.frequency)
    return sent
