"""Prometheus metrics: what an operator watches to know the service is taking messages and sending.

Counters live in the process-wide prometheus-client registry, so every part of the service (ingest,
the outbox, channels, the scheduler) counts into one place and ``GET /metrics`` exposes them all.
Outbox depth and age are not counted but read from the store at scrape time: a counter kept in memory
would be wrong after a restart, the store never is.

Channels time their platform calls with :func:`platform_call`; the outbox reports each finished
delivery with :func:`delivery_finished`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from scrm.store.models import Delivery, InboundJournal, Touchpoint

if TYPE_CHECKING:
    from apscheduler.events import JobExecutionEvent
    from apscheduler.schedulers.base import BaseScheduler
    from sqlalchemy.ext.asyncio import AsyncSession

    from scrm.messages import InboundEvent, Reaction

INBOUND = Counter("scrm_inbound_events_total", "Inbound events handed to the core, by channel and kind.",
                  ["channel", "kind"])
INBOUND_DUPLICATES = Counter("scrm_inbound_duplicates_total", "Inbound events dropped as platform retries.",
                             ["channel"])
TOUCHPOINTS = Counter("scrm_touchpoints_written_total", "Touchpoints committed to the store.",
                      ["channel", "direction"])
DELIVERIES = Counter("scrm_deliveries_total", "Outbox deliveries finished, by channel, status and reason.",
                     ["channel", "status", "reason"])
PLATFORM_LATENCY = Histogram(
    "scrm_platform_api_seconds", "Platform API call latency, by channel, method and outcome.",
    ["channel", "method", "outcome"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
JOB_RUNS = Counter("scrm_scheduler_job_runs_total", "Scheduler job runs, by job and outcome (ok, error).",
                   ["job", "outcome"])
JOB_MISFIRES = Counter("scrm_scheduler_misfires_total", "Scheduler runs missed (past the grace time) or "
                       "skipped because the previous run was still going.", ["job", "kind"])
STORE_ERRORS = Counter("scrm_store_errors_total", "Store operations that failed, by where.", ["where"])
API_REQUESTS = Counter("scrm_api_requests_total", "Integration API requests, by route and status.",
                       ["route", "status"])
IMPORTED = Counter("scrm_import_rows_total", "Customer import rows, by outcome.", ["outcome"])
CAMPAIGN_PLAN_FAILURES = Counter("scrm_campaign_plan_failures_total",
                                 "Campaign clock ticks in which a campaign failed to plan, by campaign.", ["campaign"])
CAMPAIGNS_FAILING = Gauge("scrm_campaign_failing", "1 while a campaign's latest run failed to plan (read from the "
                          "store at scrape time, so every instance tells the same).", ["campaign"])
CONSOLE_SIGN_INS = Counter("scrm_console_sign_ins_total", "Console sign-in attempts, by outcome (ok, invalid, "
                           "throttled, link, link_invalid).", ["outcome"])
OUTBOX_DUE = Gauge("scrm_outbox_due", "Planned deliveries already due (waiting for the outbox worker).")
OUTBOX_PLANNED = Gauge("scrm_outbox_planned", "Planned deliveries, due now or later.")
OUTBOX_SENDING = Gauge("scrm_outbox_sending", "Deliveries claimed and being sent.")
OUTBOX_AGE = Gauge("scrm_outbox_oldest_due_seconds", "How long the oldest due delivery has waited past its due time.")
INGEST_BACKLOG = Gauge("scrm_ingest_backlog", "Inbound events durable (acknowledged) but not applied yet.")
INGEST_LAG = Gauge("scrm_ingest_lag_seconds", "How long the oldest inbound event not applied yet has waited.")
CHANNEL_DEGRADED = Gauge("scrm_channel_degraded", "1 while sends through a channel account cannot reach its "
                         "platform (they are retried later), 0 again after its next successful send.",
                         ["channel", "account"])

_REASON = re.compile(r"[^a-z0-9_]+")


def _label(value: str | None, default: str = "none", limit: int = 40) -> str:
    """Labels must stay a small set: platform error texts are cut to their leading code word."""
    if not value:
        return default
    head = _REASON.sub("_", value.strip().lower().split(":")[0].split(" ")[0])[:limit].strip("_")
    return head or default


def received(event: InboundEvent, reaction: Reaction) -> None:
    """Count one committed inbound event (a platform retry as a duplicate)."""
    if reaction.duplicate:
        INBOUND_DUPLICATES.labels(event.channel).inc()
    else:
        INBOUND.labels(event.channel, _label(event.kind, "unknown", 24)).inc()


def delivery_finished(channel: str, status: str, reason: str | None = None) -> None:
    """Call once per delivery when the outbox records its outcome (sent, skipped, failed, unknown)."""
    DELIVERIES.labels(channel, _label(status, "unknown", 16), _label(reason)).inc()


def channel_degraded(channel: str, account: str, degraded: bool) -> None:
    """The outbox found a channel account's platform unreachable (True), or sent through it again (False)."""
    CHANNEL_DEGRADED.labels(channel, account).set(1 if degraded else 0)


def store_error(where: str) -> None:
    STORE_ERRORS.labels(where).inc()


@contextmanager
def platform_call(channel: str, method: str) -> Iterator[None]:
    """Time one platform API call: ``with metrics.platform_call("wechat", "message/custom/send"): ...``.

    Works inside ``async`` code too (the ``with`` wraps the ``await``); an exception is counted as
    outcome ``error`` and re-raised.
    """
    start = time.perf_counter()
    outcome = "error"
    try:
        yield
        outcome = "ok"
    finally:
        PLATFORM_LATENCY.labels(channel, _label(method, "call", 48), outcome).observe(time.perf_counter() - start)


def watch_scheduler(scheduler: BaseScheduler) -> None:
    """Count job runs, errors and misfires from APScheduler's own events."""
    from apscheduler.events import (
        EVENT_JOB_ERROR,
        EVENT_JOB_EXECUTED,
        EVENT_JOB_MAX_INSTANCES,
        EVENT_JOB_MISSED,
    )

    def listener(ev: JobExecutionEvent) -> None:
        job = _job_label(ev.job_id)
        if ev.code == EVENT_JOB_EXECUTED:
            JOB_RUNS.labels(job, "ok").inc()
        elif ev.code == EVENT_JOB_ERROR:
            JOB_RUNS.labels(job, "error").inc()
        elif ev.code == EVENT_JOB_MISSED:
            JOB_MISFIRES.labels(job, "missed").inc()
        elif ev.code == EVENT_JOB_MAX_INSTANCES:
            JOB_MISFIRES.labels(job, "still_running").inc()

    scheduler.add_listener(listener, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)


def _job_label(job_id: str) -> str:
    """``campaign:<name>:<occurrence>``-style ids would grow without bound: keep the first two parts."""
    return ":".join(job_id.split(":")[:2])[:64]


async def refresh_outbox(session: AsyncSession, now: datetime) -> None:
    """Set the outbox gauges from one aggregate query (run at scrape time)."""
    due = (Delivery.status == "planned") & (Delivery.due_at <= now)
    row = (await session.execute(select(
        func.count().filter(due),
        func.min(Delivery.due_at).filter(due),
        func.count().filter(Delivery.status == "planned"),
        func.count().filter(Delivery.status.in_(("claimed", "sending"))),
    ).where(Delivery.status.in_(("planned", "claimed", "sending"))))).one()
    OUTBOX_DUE.set(row[0] or 0)
    OUTBOX_AGE.set(max(0.0, (now - row[1]).total_seconds()) if row[1] is not None else 0.0)
    OUTBOX_PLANNED.set(row[2] or 0)
    OUTBOX_SENDING.set(row[3] or 0)


async def refresh_ingest(session: AsyncSession, now: datetime) -> tuple[int, float]:
    """Set the ingest gauges (scrm.ingest) from the journal's unapplied rows, and return them: the backlog
    and the lag, in seconds (run at scrape time and by /healthz)."""
    count, oldest = (await session.execute(select(func.count(), func.min(InboundJournal.received_at))
                                           .where(InboundJournal.applied_at.is_(None)))).one()
    lag = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
    INGEST_BACKLOG.set(count or 0)
    INGEST_LAG.set(lag)
    return count or 0, lag


def campaigns_failing(campaigns: Iterable[str], failing: set[str]) -> None:
    for name in campaigns:
        CAMPAIGNS_FAILING.labels(name).set(1 if name in failing else 0)


def exposition() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# Touchpoints are counted when their transaction commits (not when added): a rolled-back batch wrote
# nothing, and every writer (ingest, outbox, staff commands, API) goes through a Session.
_PENDING = "scrm_metrics_touchpoints"


@event.listens_for(Session, "after_flush")
def _count_flushed(session: Session, _context: Any) -> None:
    written = [(o.channel, o.direction) for o in session.new if isinstance(o, Touchpoint)]
    if written:
        session.info.setdefault(_PENDING, []).extend(written)


def bulk_touchpoints(session: Session | AsyncSession, rows: Iterable[dict[str, Any]]) -> None:
    """Touchpoints written by a bulk insert (no ORM objects to see at flush): counted at commit too."""
    session.info.setdefault(_PENDING, []).extend((r["channel"], r["direction"]) for r in rows)


@event.listens_for(Session, "after_commit")
def _count_committed(session: Session) -> None:
    for channel, direction in session.info.pop(_PENDING, ()):
        TOUCHPOINTS.labels(channel, direction).inc()


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING, None)
