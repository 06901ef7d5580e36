"""The outbox worker: claims due deliveries, applies the customer's protections, renders, sends and
records every outcome — and plans a journey's next step in the same transaction.

At most once: a due delivery is first ``claimed`` (with the rest of its batch), then marked ``sending``
in a commit right before its platform call, and its outcome is committed as soon as the call returns
(marks and outcomes of the sends in flight share their commits: scrm.group_commit). So after a
crash only the sends actually in flight (at most ``delivery.concurrency`` per instance) are in doubt:
a ``sending`` row of a stopped instance becomes ``unknown``, never resent, while its ``claimed`` rows,
never handed to the platform, go back to ``planned`` (scrm.cluster).

A send that never reached the platform (``SendResult.unreachable``: refused, DNS failure, connect timeout)
delivered nothing, so it is planned again, backing off, until ``delivery.unreachable_retry_hours`` after
its first such try: an outage of the platform delays messages instead of losing them (and the coupons
they carry stay reserved). Meanwhile the channel account is reported degraded (``/healthz``, the
``scrm_channel_degraded`` gauge) until a send through it succeeds again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Collection, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import aliased
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import consent, coupons, metrics, segments
from scrm.acquisition import links
from scrm.campaigns import templates
from scrm.campaigns.definitions import CampaignDefinition, Step, parse_duration
from scrm.campaigns.ratelimit import limiters
from scrm.conversations import threads
from scrm.customers import touchpoint
from scrm.group_commit import GroupCommit, Outcome
from scrm.messages import Article, NoticeTemplate, OutboundMessage, SendResult
from scrm.store.dialect import insert_ignore
from scrm.store.engine import writing
from scrm.store.models import (
    STAFF_REPLY,
    Campaign,
    ChatGroup,
    Coupon,
    CouponCode,
    Customer,
    CustomerTag,
    Delivery,
    LoyaltyAccount,
    Tag,
)

if TYPE_CHECKING:
    from scrm.runtime import Runtime

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
#: The longest wait between two tries of a send whose platform could not be reached.
UNREACHABLE_MAX_WAIT = 300.0
#: Skip reasons after which the customer's journey goes no further.
JOURNEY_ENDS = frozenset({"opted_out", "exited", "campaign_removed", "step_removed", "not_in_segment", "blocked",
                          "consent_withdrawn", "no_consent"})


#: Deliveries prepared per transaction: a short one, so that SQLite's single writer is free for the
#: commits of the sends in flight between two of them.
PREPARE_GROUP = 8


@dataclass
class _Prepared:
    delivery_id: int
    message: OutboundMessage | None
    skip_reason: str | None = None
    #: The tracked links its text writes, stored in the transaction that prepared it (before it is sent).
    tracked: links.Links | None = None


class _Flight:
    """The sends of one tick: at most ``limit`` at once. Each records its own outcome; ``wait`` returns
    once all have ended and raises the first error, as gathering them would."""

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors: list[BaseException] = []

    async def start(self, send: Coroutine[Any, Any, None]) -> None:
        """Start a send once fewer than ``limit`` are in flight."""
        await self._slots.acquire()
        task = asyncio.create_task(send)
        self._tasks.add(task)
        task.add_done_callback(self._ended)

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    async def settle(self, timeout: float) -> None:
        """Until a send ends, or ``timeout`` seconds."""
        await asyncio.wait(self._tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and (error := task.exception()) is not None:
            self._errors.append(error)

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._errors:
            raise self._errors[0]


class Outbox:
    def __init__(self, service: Runtime) -> None:
        self.service = service
        self._lock = asyncio.Lock()
        #: Set when more work was announced while a tick runs: that tick claims once more before it ends.
        self._woken = False
        #: Deliveries prepared for sending and not yet recorded (the frequency cap counts them).
        self._in_flight: set[int] = set()
        self._limiters = limiters(service.sessions, service.engine.dialect.name, service.config.delivery.rate_limits)
        self._marks: GroupCommit[int, bool] = GroupCommit("outbox", service.sessions, self._mark_sending)
        self._outcomes: GroupCommit[tuple[_Prepared, SendResult], None] = GroupCommit(
            "outbox", service.sessions, self._record_outcomes)
        #: Channel accounts whose platform this instance's sends cannot reach, and since when.
        self.degraded: dict[tuple[str, str], datetime] = {}
        for kind, account in service.channels:
            metrics.channel_degraded(kind, account, False)

    async def start(self) -> None:
        await self._marks.start()
        await self._outcomes.start()

    async def stop(self) -> None:
        """After the last tick: commit the marks and outcomes still queued."""
        await self._marks.stop()
        await self._outcomes.stop()

    async def scheduled_tick(self) -> None:
        """The scheduler's entry (its interval, and :meth:`Service.wake_outbox`): while a tick runs, the
        running one claims again before it ends instead of a second waiting for it, so a wake is never lost
        and the scheduler never finds the job busy."""
        if self._lock.locked():
            self._woken = True
            return
        await self.tick()

    async def tick(self) -> int:
        """Send what is due, until nothing more is and no send is out (or the service stops); returns the
        number of deliveries handled (sent, skipped, deferred).

        A pipeline, so that the platform sees a steady stream at the limiter's pace instead of a pause per
        batch: while up to ``delivery.concurrency`` sends are in flight, the next deliveries are claimed and
        prepared, a few per short transaction (SQLite's single writer stays free for the sends' commits)."""
        async with self._lock:
            self._in_flight = set()
            flight = _Flight(self.service.config.delivery.concurrency)
            try:
                return await self._feed(flight)
            finally:
                await flight.wait()

    async def _feed(self, flight: _Flight) -> int:
        handled = 0
        while not self.service.stopping:
            self._woken = False
            claimed = await self._claim()
            if not claimed:
                if self._woken:  # announced while this claim ran: what it planned may be due now
                    continue
                if not flight.busy:
                    return handled
                # Sends are still out: what they plan, or what falls due meanwhile, joins this stream.
                await flight.settle(self.service.config.scheduler.outbox_tick_seconds)
                continue
            for start in range(0, len(claimed), PREPARE_GROUP):
                prepared, deferred = await self._prepare_claimed(claimed[start:start + PREPARE_GROUP])
                handled += len(prepared) + deferred
                skips = [self._outcomes.submit((p, SendResult("skipped", p.skip_reason)))
                         for p in prepared if p.message is None]
                await asyncio.gather(*skips)
                for p in prepared:
                    if p.message is not None:
                        await flight.start(self._send_and_record(p))
        return handled

    # -- claiming and preparing

    async def _claim(self) -> list[int]:
        """Claim up to ``outbox_batch`` due deliveries for this instance, in one short transaction."""
        svc = self.service
        now = svc.clock.now()
        async with writing(svc.sessions) as session:
            # Pause state lives in the store, so `scrm campaigns pause` reaches every running instance.
            svc.paused = set((await session.scalars(select(Campaign.name).where(Campaign.paused))).all())
            due = (
                select(Delivery.id)
                .where(Delivery.status == "planned", Delivery.due_at <= now)
                .order_by(Delivery.due_at, Delivery.id)
                .limit(svc.config.scheduler.outbox_batch)
                # Other instances skip rows this one is claiming instead of waiting (PostgreSQL).
                .with_for_update(skip_locked=True)
            )
            if svc.paused:
                due = due.where(Delivery.campaign.not_in(svc.paused))
            # Staff replies go out one at a time per customer, in the order they were written: a reply
            # waits while an earlier one to the same customer is unsent.
            earlier = aliased(Delivery)
            due = due.where(or_(Delivery.campaign != STAFF_REPLY, ~exists().where(
                earlier.customer_id == Delivery.customer_id, earlier.campaign == STAFF_REPLY,
                earlier.id < Delivery.id, earlier.status.in_(("planned", "claimed", "sending")))))
            # Locked first, claimed second. As a subquery of the UPDATE, PostgreSQL may run the locking
            # SELECT again for every candidate row, and each run skips the rows the UPDATE has just
            # claimed: the LIMIT no longer bounds the claim, and one instance took every due delivery.
            ids = (await session.scalars(due)).all()
            if not ids:
                return []
            claimed = (await session.scalars(
                update(Delivery)
                .where(Delivery.id.in_(ids), Delivery.status == "planned")
                .values(status="claimed", attempts=Delivery.attempts + 1, claimed_by=svc.instance_id,
                        claimed_at=now)
                .returning(Delivery.id)
                .execution_options(synchronize_session=False))).all()
        return sorted(claimed)

    async def _prepare_claimed(self, ids: list[int]) -> tuple[list[_Prepared], int]:
        """Prepare claimed deliveries in one transaction; returns them and how many were deferred."""
        now = self.service.clock.now()
        prepared: list[_Prepared] = []
        deferred = 0
        async with writing(self.service.sessions) as session:
            # A few queries for the group instead of a few per delivery.
            group = (await session.scalars(select(Delivery).where(Delivery.id.in_(ids)).order_by(Delivery.id))).all()
            customers: dict[int | None, Customer] = {c.id: c for c in (await session.scalars(select(Customer).where(
                Customer.id.in_({d.customer_id for d in group if d.customer_id is not None})))).all()}
            extras = await customer_extras(session, [cid for cid in customers if cid is not None])
            granted = await coupons.granted_for(session, [d.id for d in group])
            for d in group:
                # On SQLite the statements run on the loop's thread while the write lock is held (they cannot
                # wait for it): let the loop run between deliveries, or sends paced to the platform's rate
                # wake a group's worth of statements late.
                await asyncio.sleep(0)
                if d.status != "claimed" or d.claimed_by != self.service.instance_id:
                    continue  # handed back to planned while this instance stalled; another one owns it now
                p = await self._prepare(session, d, customers.get(d.customer_id),
                                        extras.get(d.customer_id or 0, ([], [])), granted.get(d.id), now)
                if p is None:
                    deferred += 1
                else:
                    if p.tracked is not None:
                        await p.tracked.save(session)
                    prepared.append(p)
                    if p.message is not None:
                        self._in_flight.add(p.delivery_id)
        return prepared, deferred

    async def _prepare(self, session: AsyncSession, d: Delivery, customer: Customer | None, extras: _Extras,
                       granted: CouponCode | None, now: datetime) -> _Prepared | None:
        """The message to send, a skip, or None when the delivery was deferred (quiet hours); ``customer`` is
        the delivery's (None for a group, or when it is gone), ``extras`` its tags and recommendations,
        ``granted`` the coupon code it was given when an earlier claim prepared it."""
        svc = self.service
        if d.campaign == STAFF_REPLY:
            return self._staff_reply(d, customer)
        loaded = svc.campaigns.get(d.campaign)
        if loaded is None:
            return _Prepared(d.id, None, "campaign_removed")
        definition = loaded.definition
        if d.step >= len(definition.journey):
            return _Prepared(d.id, None, "step_removed")
        step = definition.journey[d.step]
        if svc.channel(d.channel, d.account) is None:
            return _Prepared(d.id, None, "channel_not_configured")
        context: dict[str, Any] = {"campaign": {"name": definition.name, "title": definition.title}}
        if d.group_id is not None:
            group = await session.get(ChatGroup, d.group_id)
            if group is None or not group.active:
                return _Prepared(d.id, None, "group_dismissed")
            context["group"] = {"id": group.id, "title": group.title or "", "channel": group.channel}
            return self._message(d, step, definition, context, None, to_group=True)

        if customer is None or customer.opted_out:
            return _Prepared(d.id, None, "opted_out")
        if definition.exit and await self._holds(session, definition.exit, customer.id, now):
            return _Prepared(d.id, None, "exited")
        segment = definition.audience.segment
        if segment and not definition.trigger.scheduled and not await self._holds(
                session, svc.config.segments[segment], customer.id, now):
            return _Prepared(d.id, None, "not_in_segment")
        if step.when and not await self._holds(session, step.when, customer.id, now):
            return _Prepared(d.id, None, "condition_not_met")
        if definition.kind == "marketing":
            if (refusal := await consent.may_market(session, customer, d.channel, svc.config)) is not None:
                return _Prepared(d.id, None, refusal)
            if await self._over_cap(session, customer.id, d.id, now):
                return _Prepared(d.id, None, "frequency_cap")
            if (resume := self._quiet_until(customer, now)) is not None:
                d.status, d.reason, d.due_at = "planned", "deferred:quiet_hours", resume
                d.unreachable_since = None  # the night is no try: an unreachable platform gets its hours after it
                return None
            if (resume := await threads.handoff_until(svc.config, session, customer.id, now)) is not None:
                # A person is talking to the customer: marketing waits until they resolve it or go quiet.
                d.status, d.reason, d.due_at = "planned", "deferred:handoff", resume
                return None

        context["customer"] = customer_context(customer, d.channel, extras)
        coupon = await self._coupon(session, d, definition, step, customer.id, granted, now)
        if isinstance(coupon, str):
            return _Prepared(d.id, None, coupon)
        if coupon is not None:
            context["coupon"] = coupon
        return self._message(d, step, definition, context, customer.last_inbound_at)

    def _staff_reply(self, d: Delivery, customer: Customer | None) -> _Prepared:
        """A staff member's reply: its text as written, or the configured notice template carrying it
        (outside the channel's reply window); no campaign rules apply to an answer the customer awaits."""
        if self.service.channel(d.channel, d.account) is None:
            return _Prepared(d.id, None, "channel_not_configured")
        if customer is None:
            return _Prepared(d.id, None, "erased")
        notice = self.service.config.conversations.notice
        template = None
        if d.variant == threads.AS_NOTICE and notice is not None:
            template = NoticeTemplate(notice.template_id, threads.notice_fields(
                self.service.config, d.text or "", customer.display_name or ""), notice.url)
        last = None if template is not None else customer.last_inbound_at
        return _Prepared(d.id, OutboundMessage(d.channel, d.account, d.external_id, d.text or "", d.id, None, last,
                                               template))

    def _message(self, d: Delivery, step: Step, definition: CampaignDefinition, context: dict[str, Any],
                 last_inbound_at: datetime | None, to_group: bool = False) -> _Prepared:
        source = step.channel_text.get(d.channel, step.text)
        if step.variants:
            d.variant = d.variant or pick_variant(definition.name, d.target, step)
            source = next(v.text for v in step.variants if v.name == d.variant)
        tracked = links.for_delivery(self.service.config, self.service.keyring, d, self.service.clock.now())
        context = {**context, links.CONTEXT_KEY: tracked}
        d.text = templates.render(source, context)
        notice = None
        if (spec := step.template) is not None:
            notice = NoticeTemplate(spec.template_id, {k: templates.render(v, context) for k, v in spec.fields.items()},
                                    spec.url)
        article = None
        if (card := step.article) is not None:
            article = Article(templates.render(card.title, context), templates.render(card.description, context),
                              card.url, card.picurl)
        return _Prepared(d.id, OutboundMessage(d.channel, d.account, d.external_id, d.text, d.id, d.campaign,
                                               last_inbound_at, notice, to_group=to_group,
                                               buttons=tuple((b.text, b.url) for b in step.buttons),
                                               article=article), tracked=tracked)

    async def _coupon(self, session: AsyncSession, d: Delivery, definition: CampaignDefinition, step: Step,
                      customer_id: int, granted: CouponCode | None, now: datetime) -> dict[str, str] | str | None:
        """Template data for the coupon this message carries, a skip reason when one was due but
        cannot be had, or None when the step carries no coupon."""
        if definition.trigger.event == "coupon_expiring":
            code = d.occurrence  # the reminder is about this customer's code
        elif step.coupon:
            fresh = granted is None
            if granted is None:
                granted = await coupons.grant(session, step.coupon, self.service.config.coupons[step.coupon],
                                              customer_id, now, delivery_id=d.id)
            if granted is None:
                return "coupon_limit_reached"
            if fresh:
                touchpoint(session, customer_id=customer_id, channel=d.channel, account=d.account,
                           direction="internal", kind="coupon_granted", now=now, campaign=d.campaign, delivery_id=d.id,
                           payload={"code": granted.code, "pool": step.coupon})
            return coupons.template_data(granted, self.service.config.coupons.get(step.coupon))
        else:
            return None
        row = (await session.execute(
            select(CouponCode, Coupon.name).join(Coupon).where(CouponCode.code == code))).first()
        if row is None:
            return "coupon_unavailable"
        return coupons.template_data(row[0], self.service.config.coupons.get(row[1]))

    async def _holds(self, session: AsyncSession, expression: str, customer_id: int, now: datetime) -> bool:
        condition = segments.condition(expression, now, self.service.config.segments)
        return await session.scalar(select(Customer.id).where(Customer.id == customer_id, condition)) is not None

    async def _over_cap(self, session: AsyncSession, customer_id: int, delivery_id: int, now: datetime) -> bool:
        cfg = self.service.config.delivery
        marketing = [n for n, c in self.service.campaigns.items() if c.definition.kind == "marketing"]
        sent = await session.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.customer_id == customer_id, Delivery.id != delivery_id, Delivery.campaign.in_(marketing),
            # Messages on their way count too: prepared here and not yet recorded, or in flight on another instance.
            or_(and_(Delivery.status.in_(("claimed", "sending")),
                     or_(Delivery.id.in_(self._in_flight), Delivery.claimed_by != self.service.instance_id)),
                and_(Delivery.status == "sent", Delivery.finished_at > now - timedelta(days=cfg.frequency_cap_days)))))
        return int(sent or 0) >= cfg.frequency_cap

    def _quiet_until(self, customer: Customer, now: datetime) -> datetime | None:
        """When quiet hours end, if the customer's local time is inside them (naive UTC), else None."""
        cfg = self.service.config.delivery
        zone = ZoneInfo(customer.timezone or self.service.config.service.timezone)
        local = now.replace(tzinfo=UTC).astimezone(zone)
        start, end = (time.fromisoformat(t) for t in (cfg.quiet_hours_start, cfg.quiet_hours_end))
        clock = local.time()
        quiet = (start <= clock or clock < end) if start > end else (start <= clock < end)
        if not quiet:
            return None
        resume = datetime.combine(local.date(), end, zone)
        if resume <= local:
            resume += timedelta(days=1)
        return resume.astimezone(UTC).replace(tzinfo=None)

    # -- sending and recording

    async def _send_and_record(self, p: _Prepared) -> None:
        """One send: ``sending`` committed right before the platform call, the outcome right after it."""
        assert p.message is not None
        channel = self.service.channel(p.message.channel, p.message.account)
        assert channel is not None
        limiter = self._limiters.get(f"{p.message.channel}:{p.message.account}")
        try:
            if limiter is not None:
                await limiter.acquire()
            if not await self._marks.submit(p.delivery_id):
                log.warning("delivery %s was taken back from this instance before its send; not sent here",
                            p.delivery_id)
                return
            try:
                result = await channel.send(p.message)
            except Exception as exc:  # a channel bug must not leave the delivery in limbo
                log.exception("channel %s failed to send delivery %s", p.message.channel, p.delivery_id)
                result = SendResult("failed", f"error:{type(exc).__name__}")
            self._note_reach(p.message.channel, p.message.account, result)
            await self._outcomes.submit((p, result))
        finally:
            self._in_flight.discard(p.delivery_id)

    def _note_reach(self, channel: str, account: str, result: SendResult) -> None:
        """Mark the account degraded when its platform could not be reached; its next successful send
        clears the mark (other answers say nothing of whether a message can get through)."""
        key = (channel, account)
        if result.status == "retry" and result.unreachable:
            if key not in self.degraded:
                self.degraded[key] = self.service.clock.now()
                metrics.channel_degraded(channel, account, True)
                log.warning("%s:%s: platform unreachable (%s); sends are retried later", channel, account,
                            result.reason)
        elif result.status == "sent" and self.degraded.pop(key, None) is not None:
            metrics.channel_degraded(channel, account, False)
            log.info("%s:%s: platform reachable again", channel, account)

    async def _mark_sending(self, session: AsyncSession, ids: list[int]) -> Outcome[bool]:
        """claimed -> sending, only while this instance still holds the claim (a stalled instance's
        claims go back to planned for others, see scrm.cluster); a result per delivery id."""
        marked = set((await session.scalars(
            update(Delivery).where(Delivery.id.in_(ids), Delivery.status == "claimed",
                                   Delivery.claimed_by == self.service.instance_id)
            .values(status="sending").returning(Delivery.id).execution_options(synchronize_session=False))).all())
        return [i in marked for i in ids], None

    async def _record_outcomes(self, session: AsyncSession,
                               outcomes: list[tuple[_Prepared, SendResult]]) -> Outcome[None]:
        now = self.service.clock.now()
        ids = [p.delivery_id for p, _ in outcomes]
        rows = {d.id: d for d in (await session.scalars(select(Delivery).where(Delivery.id.in_(ids)))).all()}
        finished: list[tuple[str, str, str | None]] = []  # counted once committed
        for p, result in outcomes:
            d = rows.get(p.delivery_id)
            if d is None or d.claimed_by != self.service.instance_id:
                continue  # handed back to planned while this instance stalled; another one owns it now
            if result.status == "retry":
                if (due := self._retry_at(d, result, now)) is not None:
                    d.status, d.reason, d.due_at = "planned", result.reason or "retry", due
                    continue
                if result.unreachable:
                    result = SendResult("failed", f"unreachable: {result.reason}")
            d.status = "failed" if result.status == "retry" else result.status
            d.reason, d.finished_at = result.reason, now
            finished.append((d.channel, d.status, d.reason))
            if d.status in ("skipped", "failed") and d.customer_id is not None:
                for code in await coupons.revoke_for_delivery(session, d.id):
                    touchpoint(session, customer_id=d.customer_id, channel=d.channel, account=d.account,
                               direction="internal", kind="coupon_revoked", now=now, campaign=d.campaign,
                               delivery_id=d.id, payload={"code": code, "reason": d.reason})
            if d.reason == "blocked" and d.customer_id is not None:
                # The platform says the person blocked us: stop every push, in this transaction.
                await session.execute(update(Customer).where(Customer.id == d.customer_id).values(opted_out=True))
            d.platform_msg_id = result.platform_msg_id
            kind = {"sent": "campaign_message", "skipped": "delivery_skipped",
                    "unknown": "delivery_unknown"}.get(d.status, "delivery_failed")
            if d.campaign == STAFF_REPLY:
                kind = "staff_reply" if d.status == "sent" else f"staff_reply_{d.status}"
            payload: dict[str, Any] = {"step": d.step}
            if result.reason:
                payload["reason"] = result.reason
            if result.platform_msg_id:
                payload["platform_msg_id"] = result.platform_msg_id
            if d.variant:
                payload["variant"] = d.variant
            touchpoint(session, customer_id=d.customer_id, channel=d.channel, account=d.account, direction="out",
                       kind=kind, now=now, text=d.text if d.status == "sent" else None,
                       campaign=None if d.campaign == STAFF_REPLY else d.campaign, delivery_id=d.id, payload=payload,
                       actor=f"group:{d.group_id}" if d.group_id is not None else d.actor)
            if d.status in ("sent", "skipped") and d.reason not in JOURNEY_ENDS:
                await self._plan_next(session, d, now)

        def committed() -> None:
            for channel, status, reason in finished:
                metrics.delivery_finished(channel, status, reason)

        return [None] * len(outcomes), committed

    def _retry_at(self, d: Delivery, result: SendResult, now: datetime) -> datetime | None:
        """When to try a ``retry`` outcome again, or None once it has had its tries.

        An unreachable platform delivered nothing, so trying again cannot send twice: the delivery is
        tried until ``unreachable_retry_hours`` after its first unreachable try, each wait as long as it
        has been unreachable so far (doubling, from the channel's own wait up to UNREACHABLE_MAX_WAIT).
        Throttling and busy answers get MAX_ATTEMPTS tries, or that same horizon once the delivery has
        been through an outage (the tries it spent waiting for the platform are not theirs to lose).
        """
        if result.unreachable and d.unreachable_since is None:
            d.unreachable_since = now
        wait = max(result.retry_after, 1.0)
        if d.unreachable_since is None:
            return now + timedelta(seconds=wait) if d.attempts < MAX_ATTEMPTS else None
        end = d.unreachable_since + timedelta(hours=self.service.config.delivery.unreachable_retry_hours)
        if now >= end:
            return None
        if result.unreachable:
            wait = min(max(wait, (now - d.unreachable_since).total_seconds()), UNREACHABLE_MAX_WAIT)
        return min(now + timedelta(seconds=wait), end)

    async def _plan_next(self, session: AsyncSession, d: Delivery, now: datetime) -> None:
        loaded = self.service.campaigns.get(d.campaign)
        if loaded is None or d.step + 1 >= len(loaded.definition.journey):
            return
        nxt = loaded.definition.journey[d.step + 1]
        await insert_ignore(session, Delivery.__table__, {
            "campaign": d.campaign, "step": d.step + 1, "target": d.target, "occurrence": d.occurrence,
            "customer_id": d.customer_id, "group_id": d.group_id, "channel": d.channel, "account": d.account,
            "external_id": d.external_id, "variant": d.variant, "status": "planned", "attempts": 0,
            "due_at": now + parse_duration(nxt.wait), "created_at": now})


#: A customer's tag names and loyalty recommendations, for templates.
_Extras = tuple[list[str], list[Any]]


async def customer_extras(session: AsyncSession, customer_ids: Collection[int]) -> dict[int, _Extras]:
    """Tags and recommendations of several customers in two queries (a prepare group's)."""
    found: dict[int, _Extras] = {cid: ([], []) for cid in customer_ids}
    if not found:  # a group campaign's deliveries have no customer
        return found
    for cid, name in await session.execute(select(CustomerTag.customer_id, Tag.name).join(Tag).where(
            CustomerTag.customer_id.in_(found)).order_by(Tag.name)):
        found[cid][0].append(name)
    for cid, recommendations in await session.execute(select(
            LoyaltyAccount.customer_id, LoyaltyAccount.recommendations).where(LoyaltyAccount.customer_id.in_(found))):
        found[cid] = (found[cid][0], recommendations or [])
    return found


def customer_context(customer: Customer, channel: str, extras: _Extras) -> dict[str, Any]:
    """What templates know about a customer (never phone numbers or birthdays)."""
    tags, recommendations = extras
    return {"id": customer.id, "name": customer.display_name or "朋友", "stage": customer.stage, "tags": list(tags),
            "channel": channel, "recommendations": list(recommendations)}


async def preview(session: AsyncSession, definition: CampaignDefinition, customer: Customer, channel: str,
                  pool_values: dict[str, float]) -> list[str]:
    """Every step as this customer would read it, without granting coupons or sending anything."""
    texts = []
    extras = (await customer_extras(session, [customer.id]))[customer.id]
    for step in definition.journey:
        source = step.channel_text.get(channel, step.text)
        if step.variants:
            source = next(v.text for v in step.variants
                          if v.name == pick_variant(definition.name, f"c{customer.id}", step))
        pool = step.coupon or (definition.coupon.pool if definition.coupon else None)
        context: dict[str, Any] = {
            "campaign": {"name": definition.name, "title": definition.title},
            "customer": customer_context(customer, channel, extras),
            "coupon": {"code": "(code given at send)", "value": f"{pool_values.get(pool or '', 0):g}",
                       "expires": "(date at send)"},
        }
        texts.append(templates.render(source, context))
    return texts


def pick_variant(campaign: str, target: str, step: Step) -> str:
    """A stable A/B assignment: the same customer always lands in the same variant of a campaign."""
    bucket = int(hashlib.sha256(f"{campaign}:{target}".encode()).hexdigest(), 16) % sum(v.weight for v in step.variants)
    for variant in step.variants:
        if bucket < variant.weight:
            return variant.name
        bucket -= variant.weight
    raise AssertionError("weights cover every bucket")


async def pending_for(session: AsyncSession, customer_id: int, due_by: datetime) -> int:
    """Deliveries to the customer not yet finished and due by then (the console's "more coming")."""
    count = await session.scalar(select(func.count()).select_from(Delivery).where(
        Delivery.customer_id == customer_id, Delivery.status.in_(("planned", "claimed", "sending")),
        Delivery.due_at <= due_by))
    return int(count or 0)
