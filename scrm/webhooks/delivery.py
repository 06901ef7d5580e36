"""The webhook worker: claims due events from the webhook outbox, signs them per Standard Webhooks, posts
them and records each attempt in the delivery log.

At least once: an event is ``claimed`` (on PostgreSQL with SKIP LOCKED, so two instances never post the
same one), posted, and its outcome committed after the answer; after a crash its claim goes back to
``pending`` (when the instance's heartbeat is older than ``cluster.lease_seconds``) and it is posted
again. In order per customer: an event is not claimed while an earlier one of the same customer to the
same subscription is still to be delivered, so a failing event holds back that customer's later ones.
A failed attempt backs off exponentially (5 s doubling, at most an hour) until ``retry_hours`` after
the event; then it is ``dead``. A subscription whose every attempt failed for ``disable_after_hours``
is disabled and the admins in ``[staff]`` are told in chat.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiohttp
from sqlalchemy import bindparam, exists, func, insert, or_, select, update
from sqlalchemy.orm import aliased
from standardwebhooks import Webhook

from scrm.store.engine import writing
from scrm.store.models import Instance, WebhookAttempt, WebhookDelivery, WebhookSubscription
from scrm.webhooks.log import prune
from scrm.webhooks import subscriptions
from scrm.webhooks.events import Registry

if TYPE_CHECKING:
    from scrm.runtime import Runtime

log = logging.getLogger(__name__)

FIRST_WAIT = 5.0
MAX_WAIT = 3600.0
#: Events claimed per round, in requests in flight (``concurrency``): enough to keep them busy, few enough
#: that several instances share a backlog.
BATCH_PER_REQUEST = 4
_ERROR_CHARS = 255
PRUNE_SECONDS = 3600.0


@dataclass(frozen=True)
class Claimed:
    """One event to post, with its subscription's endpoint and key."""

    id: int
    subscription_id: int
    url: str
    secret: str
    event_id: str
    kind: str
    customer_id: int | None
    payload: dict[str, Any]
    created_at: datetime
    attempts: int
    retry_until: datetime | None


@dataclass(frozen=True)
class Answer:
    """How one attempt went: ``http_status`` None when no answer came (refused, timeout)."""

    ok: bool
    http_status: int | None
    latency_ms: float
    error: str | None
    at: datetime


def body(kind: str, customer_id: int | None, payload: dict[str, Any], created_at: datetime) -> bytes:
    """The JSON posted: Standard Webhooks' ``type``, ``timestamp`` and ``data``."""
    data = {"customer_id": customer_id, **payload} if customer_id is not None else dict(payload)
    return json.dumps({"type": kind, "timestamp": created_at.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z"),
                       "data": data}, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def backoff(attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt."""
    return min(FIRST_WAIT * 2 ** (attempts - 1), MAX_WAIT)


class WebhookWorker:
    """Posts the webhook outbox; one per service (its ``--role`` worker or all)."""

    def __init__(self, service: Runtime, registry: Registry, alert: Callable[[str], Any]) -> None:
        self.service = service
        self.registry = registry
        #: Tells the admins (a coroutine function taking the text), after a subscription was disabled.
        self._alert = alert
        self._http: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._signers: dict[str, Webhook] = {}
        self._last_recovery = 0.0
        self._last_prune = 0.0

    async def start(self, run: bool = True) -> None:
        cfg = self.service.config.webhook_delivery
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=cfg.timeout_seconds),
            connector=aiohttp.TCPConnector(limit=cfg.concurrency),
            headers={"User-Agent": "scrm-webhooks", "Content-Type": "application/json"})
        loop = asyncio.get_running_loop()

        def wake() -> None:  # from a commit, on whatever thread ran it
            loop.call_soon_threadsafe(self._wake.set)

        self.registry.wake = wake
        if run:
            self._task = asyncio.create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        """After the round under way has recorded its outcomes."""
        self.registry.wake = None
        if self._task is not None:
            self._wake.set()
            await self._task
            self._task = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        tick = self.service.config.scheduler.outbox_tick_seconds
        while not self.service.stopping:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - a store outage: the events wait in the store, tried next tick
                log.exception("webhook delivery round failed; trying again")
            if self.service.stopping:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), tick)
            except TimeoutError:
                pass
            self._wake.clear()

    async def tick(self) -> int:
        """Post what is due, round after round, until nothing is; returns the attempts made. Without an
        enabled subscription there is nothing to post: no transaction at all (SQLite's writer stays free)."""
        made = 0
        if not self.registry.current.by_kind:
            return made
        await self._recover()
        await self._prune()
        while not self.service.stopping:
            claimed = await self.claim()
            if not claimed:
                return made
            answers = await asyncio.gather(*(self.post(c) for c in claimed))
            await self.record(list(zip(claimed, answers)))
            made += len(claimed)
        return made

    async def _recover(self) -> None:
        """Claims of instances that stopped heartbeating go back to pending (at most every heartbeat)."""
        if time.monotonic() - self._last_recovery < self.service.config.cluster.heartbeat_seconds:
            return
        self._last_recovery = time.monotonic()
        now = self.service.clock.now()
        lease = timedelta(seconds=self.service.config.cluster.lease_seconds)
        alive = select(Instance.id).where(Instance.heartbeat_at >= now - lease)
        async with writing(self.service.sessions) as session:
            await session.execute(update(WebhookDelivery).where(
                WebhookDelivery.status == "claimed", WebhookDelivery.claimed_by.is_distinct_from(self.service.instance_id),
                or_(WebhookDelivery.claimed_by.is_(None), WebhookDelivery.claimed_by.not_in(alive)))
                .values(status="pending", claimed_by=None, claimed_at=None).execution_options(synchronize_session=False))

    async def _prune(self) -> None:
        """Drop delivered and dead events past retention, at most hourly per instance."""
        if self._last_prune and time.monotonic() - self._last_prune < PRUNE_SECONDS:
            return
        self._last_prune = time.monotonic()
        async with writing(self.service.sessions) as session:
            await prune(session, self.service.clock.now(), self.service.config.webhook_delivery.retention_days)

    async def claim(self) -> list[Claimed]:
        """Due events of enabled subscriptions whose customer has no earlier event still to deliver."""
        svc = self.service
        now = svc.clock.now()
        earlier = aliased(WebhookDelivery)
        d = WebhookDelivery
        due = (select(d.id).join(WebhookSubscription, WebhookSubscription.id == d.subscription_id)
               .where(d.status == "pending", d.due_at <= now, WebhookSubscription.enabled,
                      ~exists().where(earlier.subscription_id == d.subscription_id,
                                      earlier.customer_id == d.customer_id, earlier.id < d.id,
                                      earlier.status.in_(("pending", "claimed"))))
               .order_by(d.id).limit(svc.config.webhook_delivery.concurrency * BATCH_PER_REQUEST)
               .with_for_update(of=d, skip_locked=True))
        async with writing(svc.sessions) as session:
            ids = (await session.scalars(due)).all()
            if not ids:
                return []
            claimed = (await session.scalars(
                update(d).where(d.id.in_(ids), d.status == "pending")
                .values(status="claimed", attempts=d.attempts + 1, claimed_by=svc.instance_id, claimed_at=now)
                .returning(d.id).execution_options(synchronize_session=False))).all()
            rows = (await session.execute(
                select(d.id, d.subscription_id, WebhookSubscription.url, WebhookSubscription.secret, d.event_id, d.kind,
                       d.customer_id, d.payload, d.created_at, d.attempts, d.retry_until)
                .join(WebhookSubscription, WebhookSubscription.id == d.subscription_id)
                .where(d.id.in_(claimed)).order_by(d.id))).all()
        return [Claimed(*row) for row in rows]

    async def post(self, c: Claimed) -> Answer:
        """One signed POST; never raises (every failure is an answer to record)."""
        assert self._http is not None
        signer = self._signers.get(c.secret)
        if signer is None:
            signer = self._signers[c.secret] = Webhook(c.secret)
        now = self.service.clock.now()
        data = body(c.kind, c.customer_id, c.payload, c.created_at)
        # The receiver checks the signature's time against its own clock: the wall clock's, not the service's.
        signed_at = datetime.now(UTC)
        headers = {"webhook-id": c.event_id, "webhook-timestamp": str(int(signed_at.timestamp())),
                   "webhook-signature": signer.sign(c.event_id, signed_at, data)}
        started = time.perf_counter()
        try:
            async with self._http.post(c.url, data=data, headers=headers, allow_redirects=False) as response:
                await response.read()
                status: int | None = response.status
                error = None if 200 <= response.status < 300 else f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            status, error = None, f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]
        latency = (time.perf_counter() - started) * 1000
        return Answer(error is None, status, round(latency, 3), error, now)

    async def record(self, outcomes: list[tuple[Claimed, Answer]]) -> None:
        """Each attempt in the log, each event delivered or backed off (or dead), each subscription's run
        of failures; in one transaction. Admins are told of a subscription disabled, after it commits."""
        cfg = self.service.config.webhook_delivery
        now = self.service.clock.now()
        d = WebhookDelivery
        updates: list[dict[str, Any]] = []
        for c, answer in outcomes:
            if answer.ok:
                updates.append({"row": c.id, "st": "delivered", "due": None, "done": now, "err": None})
            elif now + timedelta(seconds=backoff(c.attempts)) < (
                    c.retry_until or c.created_at + timedelta(hours=cfg.retry_hours)):
                updates.append({"row": c.id, "st": "pending", "due": now + timedelta(seconds=backoff(c.attempts)),
                                "done": None, "err": answer.error})
            else:
                updates.append({"row": c.id, "st": "dead", "due": None, "done": now, "err": answer.error})
        disabled: list[tuple[str, str]] = []
        async with writing(self.service.sessions) as session:
            await session.execute(
                update(d.__table__).where(d.__table__.c.id == bindparam("row"),
                                          d.__table__.c.claimed_by == self.service.instance_id)
                .values(status=bindparam("st"), finished_at=bindparam("done"), last_error=bindparam("err"),
                        claimed_by=None,
                        due_at=_coalesce_due()), updates)
            await session.execute(insert(WebhookAttempt.__table__), [
                {"delivery_id": c.id, "subscription_id": c.subscription_id, "at": a.at,
                 "status": "delivered" if a.ok else "failed", "http_status": a.http_status, "latency_ms": a.latency_ms,
                 "error": a.error} for c, a in outcomes])
            runs: dict[int, list[Answer]] = {}
            for c, answer in outcomes:
                runs.setdefault(c.subscription_id, []).append(answer)
            subs = {s.id: s for s in (await session.scalars(
                select(WebhookSubscription).where(WebhookSubscription.id.in_(runs)))).all()}
            for sid, answers in runs.items():
                sub = subs[sid]
                for answer in sorted(answers, key=lambda a: a.latency_ms):  # the order they ended in
                    if answer.ok:
                        sub.failures, sub.failing_since = 0, None
                    else:
                        sub.failures += 1
                        sub.failing_since = sub.failing_since or answer.at
                if (sub.enabled and sub.failing_since is not None and sub.failures >= cfg.disable_after_failures
                        and now - sub.failing_since >= timedelta(hours=cfg.disable_after_hours)):
                    subscriptions.set_enabled(sub, False, now, "failures")
                    disabled.append((sub.name, answers[-1].error or "failed"))
        for name, error in disabled:
            log.error("webhook subscription %s disabled: every attempt failed for %s hours (last: %s)",
                      name, cfg.disable_after_hours, error)
            await self._alert(f"Webhook 订阅 {name} 已停用 Webhook subscription {name} disabled: every delivery "
                              f"failed for {cfg.disable_after_hours:g} hours (last: {error}). Its events wait; "
                              f"`scrm webhooks enable {name}` resumes it.")
        if disabled:
            await self.refresh()

    async def refresh(self) -> None:
        """Read the enabled subscriptions again (changes made here or on another instance)."""
        async with self.service.sessions() as session:
            self.registry.current = await subscriptions.current(session)


def _coalesce_due() -> Any:
    """The new due time where one is given (a retry), else the row's own."""
    return func.coalesce(bindparam("due", type_=WebhookDelivery.__table__.c.due_at.type),
                         WebhookDelivery.__table__.c.due_at)

