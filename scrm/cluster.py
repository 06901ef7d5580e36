"""Several ``scrm run`` processes on one store: heartbeats, the planner lease, orphaned sends.

Every instance heartbeats into ``instances``. One instance at a time holds the ``planner`` lease
and runs the planning jobs (campaign clock, profile and RFM recomputation, digests, retention);
when it dies, another takes the lease once it expires (``cluster.lease_seconds``). Campaign runs are
unique in the store, so a handover neither loses nor doubles a run. Deliveries of an instance that
stopped heartbeating: ``sending`` ones (handed to the platform, outcome unknown) are marked ``unknown``
and never resent; ``claimed`` ones (never handed to the platform) go back to ``planned``.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.customers import touchpoint
from scrm.store.dialect import insert_ignore, rowcount
from scrm.store.models import Delivery, Instance, Lease

if TYPE_CHECKING:
    from scrm.runtime import Runtime

log = logging.getLogger(__name__)

PLANNER = "planner"


class Cluster:
    def __init__(self, service: Runtime, role: str) -> None:
        self.service = service
        self.role = role
        self.instance_id = f"{socket.gethostname()[:24]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.is_leader = False
        self.became_leader_at: datetime | None = None

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.service.config.cluster.lease_seconds)

    async def heartbeat(self) -> None:
        """Say we are alive, take or renew the planner lease (workers only), mark orphaned sends."""
        now = self.service.clock.now()
        async with self.service.sessions() as session, session.begin():
            await insert_ignore(session, Instance.__table__, {"id": self.instance_id, "role": self.role,
                                                              "started_at": now, "heartbeat_at": now})
            await session.execute(update(Instance).where(Instance.id == self.instance_id).values(heartbeat_at=now))
            if self.role in ("worker", "all"):
                await self._lease(session, now)
            await self._recover_orphans(session, now)

    async def _lease(self, session: AsyncSession, now: datetime) -> None:
        await insert_ignore(session, Lease.__table__, {"name": PLANNER, "holder": None, "expires_at": now})
        taken = await session.execute(
            update(Lease).where(Lease.name == PLANNER, or_(Lease.holder == self.instance_id, Lease.expires_at <= now))
            .values(holder=self.instance_id, expires_at=now + self.lease))
        leader = bool(rowcount(taken))
        if leader and not self.is_leader:
            self.became_leader_at = now
            log.info("instance %s holds the planner lease", self.instance_id)
        elif self.is_leader and not leader:
            log.warning("instance %s lost the planner lease", self.instance_id)
        self.is_leader = leader

    async def _recover_orphans(self, session: AsyncSession, now: datetime) -> None:
        alive = select(Instance.id).where(Instance.heartbeat_at >= now - self.lease)
        stopped = and_(or_(Delivery.claimed_by.is_(None), Delivery.claimed_by.not_in(alive)),
                       Delivery.claimed_by.is_distinct_from(self.instance_id))
        requeued = await session.execute(
            update(Delivery).where(Delivery.status == "claimed", stopped)
            .values(status="planned", claimed_by=None, claimed_at=None).execution_options(synchronize_session=False))
        if rowcount(requeued):
            log.warning("%d deliveries claimed by a stopped instance were never sent; planned again",
                        rowcount(requeued))
        orphans = (await session.scalars(select(Delivery).where(Delivery.status == "sending", stopped))).all()
        for d in orphans:
            d.status, d.reason, d.finished_at = "unknown", "crashed_mid_send", now
            touchpoint(session, customer_id=d.customer_id, channel=d.channel, account=d.account, direction="out",
                       kind="delivery_unknown", now=now, campaign=d.campaign, delivery_id=d.id,
                       payload={"reason": "crashed_mid_send", "instance": d.claimed_by})
        if orphans:
            log.warning("%d deliveries were mid-send in a stopped instance; marked unknown, not resent", len(orphans))

    async def release(self) -> None:
        """On a clean stop: hand the lease over at once instead of letting it expire, and leave the
        instance list (nothing of ours is mid-send any more)."""
        async with self.service.sessions() as session, session.begin():
            await session.execute(update(Lease).where(Lease.name == PLANNER, Lease.holder == self.instance_id)
                                  .values(holder=None, expires_at=self.service.clock.now()))
            await session.execute(delete(Instance).where(Instance.id == self.instance_id))
        self.is_leader = False

    def leader_only(self, fn: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        async def run() -> Any:
            return await fn() if self.is_leader else None

        run.__name__ = getattr(fn, "__name__", "job")
        return run
