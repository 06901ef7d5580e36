"""APScheduler wiring: which jobs run on which instance, and how often."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from scrm.personal import retention_job
from scrm.runtime import Runtime

if TYPE_CHECKING:
    from scrm.campaigns.outbox import Outbox
    from scrm.channels import Channel
    from scrm.cluster import Cluster


class Scheduled(Runtime, Protocol):
    """The service as its jobs see it: the runtime plus the parts and the work the jobs run."""

    cluster: Cluster
    outbox: Outbox

    @property
    def channels(self) -> Mapping[tuple[str, str], Channel]: ...

    async def refresh_touched(self) -> object: ...

    async def refresh_all(self) -> object: ...

    async def run_campaign_clock(self) -> object: ...

    async def reload_campaigns(self) -> bool: ...

    async def reload_replies(self) -> bool: ...

    async def recompute_rfm(self) -> int: ...

log = logging.getLogger(__name__)

OUTBOX_JOB = "outbox"
PROFILES_JOB = "profiles:touched"
HEARTBEAT_JOB = "cluster:heartbeat"
CLOCK_JOB = "campaigns:clock"
#: Sends the report digests managers subscribed to (``/digest``) when they fall due.
DIGESTS_JOB = "reports:digests"
#: Sums closed days for reports (scrm.rollups).
ROLLUPS_JOB = "reports:rollups"


#: Assigns newly opened conversations and alerts their assignee (scrm.conversations.routing).
CONVERSATIONS_JOB = "conversations:alerts"


def build_scheduler(service: Scheduled) -> AsyncIOScheduler:
    """Jobs by role: web instances ingest, workers send, and only the planner-lease holder plans."""
    scheduler = AsyncIOScheduler(timezone=UTC, job_defaults={"coalesce": True, "max_instances": 1,
                                                             "misfire_grace_time": 30})
    config, role = service.config, service.cluster.role
    job = service.job

    def leader(fn: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        return job(service.cluster.leader_only(fn))

    scheduler.add_job(job(service.cluster.heartbeat), "interval", id=HEARTBEAT_JOB,
                      seconds=config.cluster.heartbeat_seconds)
    scheduler.add_job(job(service.reload_campaigns), "interval", id="campaigns:reload", seconds=5)
    scheduler.add_job(job(service.reload_replies), "interval", id="replies:reload", seconds=5)
    if role in ("web", "all"):
        scheduler.add_job(job(service.refresh_touched), "interval", id=PROFILES_JOB, seconds=5)
    if role in ("worker", "all"):
        # A second instance only tells the running tick to claim again (Outbox.scheduled_tick).
        scheduler.add_job(job(service.outbox.scheduled_tick), "interval", id=OUTBOX_JOB, max_instances=2,
                          seconds=config.scheduler.outbox_tick_seconds)
        scheduler.add_job(leader(service.run_campaign_clock), "interval", id=CLOCK_JOB,
                          seconds=config.scheduler.campaign_check_seconds, next_run_time=datetime.now(UTC))
        scheduler.add_job(leader(service.refresh_all), "interval", id="profiles:all",
                          minutes=config.profiles.refresh_minutes)
        hour, minute = config.profiles.rfm_at.split(":")
        scheduler.add_job(leader(service.recompute_rfm), "cron", id="rfm", hour=int(hour), minute=int(minute),
                          timezone=config.service.timezone)
        hour, minute = config.privacy.retention_at.split(":")
        scheduler.add_job(leader(retention_job(service)), "cron", id="privacy:retention", hour=int(hour),
                          minute=int(minute), timezone=config.service.timezone)
        from scrm import (  # reports and charts load only with a scheduler
            digests,
            rollups,
        )

        scheduler.add_job(leader(functools.partial(digests.send_due, service)), "interval", id=DIGESTS_JOB,
                          seconds=60)
        scheduler.add_job(leader(rollups.job(service)), "interval", id=ROLLUPS_JOB,
                          minutes=config.reports.rollup_minutes)
        from scrm.loyalty.jobs import (
            add_jobs as add_loyalty_jobs,  # points, tiers, surveys, tasks, scores
        )

        add_loyalty_jobs(scheduler, service, leader)
        from scrm.conversations import routing

        scheduler.add_job(leader(functools.partial(routing.alert_new, service)), "interval", id=CONVERSATIONS_JOB,
                          seconds=5)
        for (kind, account), channel in service.channels.items():
            for name, fn, seconds in channel.jobs():
                scheduler.add_job(leader(fn), "interval", id=f"{kind}:{account}:{name}", seconds=seconds)
    return scheduler


def run_soon(scheduler: AsyncIOScheduler, job_id: str) -> None:
    """Bring a job's next run forward to now (e.g. the outbox after an event planned a send)."""
    if scheduler.running and (job := scheduler.get_job(job_id)) is not None:
        job.modify(next_run_time=datetime.now(UTC))
