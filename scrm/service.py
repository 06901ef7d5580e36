"""The running service: configuration, store, tagger, campaigns, channels, ingest, outbox, scheduler.

Built synchronously (so a web app can collect each channel's routes) and started/stopped from the
app's cleanup context, or by the CLI for in-process work.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from scrm import metrics, profiles, rfm, staff
from scrm.campaigns import timed
from scrm.campaigns.definitions import DefinitionError, LoadedCampaign, load_campaigns
from scrm.campaigns.outbox import Outbox
from scrm.channels import Channel, channel_types
from scrm.clock import Clock, SystemClock
from scrm.cluster import Cluster
from scrm.config import Config, Role
from scrm.conversations.replies import ReplyBook, load_replies
from scrm.ingest import Accepted, Consumer, Journal
from scrm.ingest.replying import may_answer
from scrm.keyring import Keyring, KeyringError, KeyringMissing
from scrm.messages import InboundEvent, Reaction, cleaned
from scrm.personal import open_keyring
from scrm.scheduler import OUTBOX_JOB, build_scheduler, run_soon
from scrm.store import migrate
from scrm.store.engine import make_engine, make_sessionmaker, writing
from scrm.store.models import Campaign, Customer
from scrm.store.sqlite_driver import statements_in_thread
from scrm.tagging import KeywordTagger
from scrm.webhooks import events, subscriptions
from scrm.webhooks.delivery import WebhookWorker

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class Service:
    def __init__(self, config: Config, clock: Clock | None = None, role: str = "all") -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        dictionary = config.resolve(config.tagging.dictionary) if config.tagging.dictionary else None
        self.tagger = KeywordTagger(config.tagging.rules, dictionary)
        self.campaigns: dict[str, LoadedCampaign] = {c.definition.name: c for c in load_campaigns(config)}
        self.replies: ReplyBook = load_replies(config)
        self.paused: set[str] = set()
        #: Customers whose events were committed since the last incremental profile refresh.
        self.touched: set[int] = set()
        self._stopping = False
        #: The problems last logged per kind of definition file, so a broken edit is logged once.
        self._reported_problems: dict[str, tuple[str, ...]] = {}
        self._running_jobs: set[asyncio.Task[Any]] = set()
        types = channel_types()
        self.channels: dict[tuple[str, str], Channel] = {
            (kind, account): types[kind](account, types[kind].settings_model.model_validate(settings), self)
            for kind, accounts in config.channels.items()
            for account, settings in accounts.items()
        }
        self.engine: AsyncEngine = make_engine(config.store_url, config.store.schema_name)
        self.sessions: async_sessionmaker[AsyncSession] = make_sessionmaker(self.engine)
        try:
            self._keyring: Keyring | None = Keyring.from_config(config)
        except KeyringMissing:
            self._keyring = None  # a new store gets its key file in start(); a used one fails there
        self.cluster = Cluster(self, role)
        self.journal = Journal(self)
        #: Workers apply the journal's events; a ``--role web`` instance only makes them durable.
        self.consumer = Consumer(self, self.journal) if role in ("worker", "all") else None
        self.outbox = Outbox(self)
        #: Webhook subscriptions: every session this service opens emits to them (scrm.webhooks.events).
        self.webhooks = events.Registry()
        events.attach(self.sessions, self.webhooks)
        self.webhook_worker = WebhookWorker(self, self.webhooks, self.alert_admins)
        self.scheduler = build_scheduler(self)
        # Subscriptions made or disabled on another instance reach this one's emission within seconds.
        self.scheduler.add_job(self.job(self.webhook_worker.refresh), "interval", id="webhooks:subscriptions",
                               seconds=5)

    @property
    def keyring(self) -> Keyring:
        """The privacy keys (scrm.personal): every read or write of a phone number or birthday needs them."""
        if self._keyring is None:
            raise KeyringError("privacy keys not opened yet: Service.start() opens them")
        return self._keyring

    @property
    def instance_id(self) -> str:
        return self.cluster.instance_id

    @property
    def stopping(self) -> bool:
        """True once stop() has begun: a job that loops (the outbox) takes no new work."""
        return self._stopping

    def channel(self, kind: str, account: str) -> Channel | None:
        return self.channels.get((kind, account))

    def receive(self, event: InboundEvent) -> asyncio.Future[Reaction]:
        """A future resolved with the event's reaction once its effects are committed."""
        return self.accept(event).applied

    def accept(self, event: InboundEvent) -> Accepted:
        """Hand an event to the journal: ``durable`` resolves once it may be acknowledged, ``applied``
        with its reaction once its effects are committed (scrm.ingest)."""
        event = cleaned(event)
        role = staff.role_of(self, event)
        if role is not None and staff.reads_only(event.text, role):
            # A staff report is read beside the writer first; the consumer records its answer.
            return self.journal.accept_after(event, staff.answer_beside_writer(self, event, role))
        return replace(self.journal.accept(event), answers=may_answer(self, event))

    def wake_outbox(self) -> None:
        run_soon(self.scheduler, OUTBOX_JOB)

    def touch(self, customer_ids: set[int]) -> None:
        """Queue customers for the incremental profile refresh (behaviour tags, stages), which runs
        every few seconds: waking it per batch would make it fight ingest for the store's writer."""
        self.touched |= customer_ids

    async def refresh_touched(self) -> profiles.RefreshResult | None:
        ids, self.touched = sorted(self.touched), set()
        if not ids:
            return None
        return await self._refresh([Customer.id.in_(ids[i:i + profiles.CHUNK])
                                    for i in range(0, len(ids), profiles.CHUNK)])

    async def refresh_all(self) -> profiles.RefreshResult:
        async with self.sessions() as session:
            first, last = (await session.execute(select(func.min(Customer.id), func.max(Customer.id)))).one()
        if first is None:
            return profiles.RefreshResult()
        return await self._refresh([Customer.id.between(low, low + profiles.RANGE - 1)
                                    for low in range(first, last + 1, profiles.RANGE)])

    async def _refresh(self, scopes: list[ColumnElement[bool]]) -> profiles.RefreshResult:
        """One short transaction per scope (a chunk of customers), queued with ingest's writers
        (scrm.store.engine.writing): one transaction over thousands of customers held SQLite's writer
        for half a second or more, while ingest waited in SQLite's busy loop (up to 100 ms a try).
        A chunk in which nothing changes is found by a read, beside the writer, and skipped."""
        now = self.clock.now()
        result = profiles.RefreshResult()
        for scope in scopes:
            async with self.sessions() as session:
                if not await profiles.pending(self, session, now, scope):
                    continue
            async with writing(self.sessions) as session:
                await statements_in_thread(session)  # behaviour conditions count touchpoints: off the loop
                result.add(await profiles.refresh(self, session, now, scope))
        if result.planned:
            self.wake_outbox()
        return result

    async def run_campaign_clock(self) -> timed.ClockResult:
        """Plan what scheduled and timed campaigns owe as of now (see scrm.campaigns.timed).

        A writing transaction: on SQLite each campaign's savepoint must sit inside a real transaction
        (the driver begins none for reads), and planning statements may run long, so off the loop."""
        async with writing(self.sessions) as session:
            await statements_in_thread(session)
            result = await timed.run_due(self, session, self.clock.now())
        if result.planned:
            self.wake_outbox()
        if result.newly_failed:
            await self._campaigns_failed({name: result.failed[name] for name in sorted(result.newly_failed)})
        return result

    async def _campaigns_failed(self, failed: dict[str, str]) -> None:
        """Tell operators and admins in chat, once a failure streak, which campaigns did not plan."""
        lines = [f"活动计划失败 Campaign {name} failed to plan: {reason}" for name, reason in failed.items()]
        text = "\n".join([*lines, "其他活动照常 The other campaigns went out; `scrm campaigns list` shows the runs."])
        await self._alert_staff(text, ("operator", "admin"))

    async def alert_admins(self, text: str) -> None:
        """Tell the admins of ``[staff]`` in chat (a webhook subscription disabled after failures)."""
        await self._alert_staff(text, ("admin",))

    async def _alert_staff(self, text: str, roles: tuple[Role, ...]) -> None:
        from scrm.loyalty.followups import send_to_staff

        now = self.clock.now()
        for identity, role in sorted(self.config.staff.items()):
            if role not in roles:
                continue
            try:
                async with self.sessions() as session, session.begin():
                    await send_to_staff(self, session, identity, text, now, kind="staff_alert")
            except Exception:  # noqa: BLE001 - what failed is recorded and counted; the alert is a courtesy
                log.exception("could not alert %s: %s", identity, text.splitlines()[0])

    def _read_again(self, what: str, load: Callable[[Config], _T]) -> _T | None:
        """Definition files read again for a reload, or None when they have problems: logged once (until
        they change), and the running set stays."""
        try:
            loaded = load(self.config)
        except DefinitionError as exc:
            problems = tuple(sorted(exc.problems))
            if problems != self._reported_problems.get(what):
                self._reported_problems[what] = problems
                log.error("%s not reloaded:\n  %s", what, "\n  ".join(exc.problems))
            return None
        self._reported_problems.pop(what, None)
        return loaded

    async def reload_campaigns(self) -> bool:
        """Pick up edited campaign files without a restart; a broken edit keeps the running set."""
        found = self._read_again("campaign files", load_campaigns)
        if found is None:
            return False
        loaded = {c.definition.name: c for c in found}
        if {n: c.digest for n, c in loaded.items()} == {n: c.digest for n, c in self.campaigns.items()}:
            return False
        self.campaigns = loaded
        await self._sync_campaigns()
        log.info("campaigns reloaded: %s", ", ".join(sorted(loaded)))
        return True

    async def reload_replies(self) -> bool:
        """Pick up edited reply rule files without a restart; a broken edit keeps the running rules. Ingest
        batches under way keep the book they began with."""
        book = self._read_again("reply rules", load_replies)
        if book is None or book.digest == self.replies.digest:
            return False
        self.replies = book
        log.info("reply rules reloaded: %d rule(s), %s", len(book.rules),
                 "a fallback" if book.fallback else "no fallback")
        return True

    async def recompute_rfm(self) -> int:
        async with self.sessions() as session, session.begin():
            return await rfm.recompute(session)

    async def start(self, scheduler: bool = True) -> None:
        await migrate.upgrade(self.engine)
        self._keyring = await open_keyring(self.config, self.sessions, self.clock.now())
        await self._sync_campaigns()
        await self.cluster.heartbeat()
        for channel in self.channels.values():
            await channel.start()
        await self.journal.start()
        if self.consumer is not None:
            await self.consumer.start()
        await self.outbox.start()
        async with self.sessions() as session, session.begin():
            await subscriptions.sync_config(session, self.config, self.clock.now())
        await self.webhook_worker.refresh()
        # Workers post webhooks beside the outbox; in-process work without the scheduler only emits them.
        await self.webhook_worker.start(run=scheduler and self.cluster.role in ("worker", "all"))
        if scheduler:
            self.scheduler.start()

    def job(self, fn: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        """Wrap a scheduler job so that stop() can wait for it: a job cut off mid-transaction
        would leave a connection behind and its work half recorded."""

        @functools.wraps(fn)
        async def run() -> Any:
            if self._stopping:
                return None
            task = asyncio.current_task()
            assert task is not None
            self._running_jobs.add(task)
            try:
                return await fn()
            finally:
                self._running_jobs.discard(task)

        return run

    async def stop(self) -> None:
        self._stopping = True
        # APScheduler's asyncio executor cancels running jobs on shutdown: let them finish first.
        await asyncio.gather(*self._running_jobs, return_exceptions=True)
        # Events already handed over are committed, and applied here when this instance applies.
        await self.journal.stop()
        if self.consumer is not None:
            await self.consumer.stop()
        await self.journal.close()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        await self.outbox.stop()
        await self.webhook_worker.stop()
        for channel in self.channels.values():
            await channel.stop()
        try:
            await self.cluster.release()
        except SQLAlchemyError:
            log.warning("could not release the planner lease; it expires by itself")
        await self.engine.dispose()

    async def health(self) -> dict[str, str]:
        status = {"scheduler": "running" if self.scheduler.running else "stopped", "role": self.cluster.role,
                  "planner": "leader" if self.cluster.is_leader else "standby"}
        try:
            async with self.sessions() as session:
                backlog, lag = await metrics.refresh_ingest(session, self.clock.now())
            status["store"] = "ok"
            # Acknowledged events whose effects have not followed yet, and how long the oldest has waited.
            status["ingest_backlog"], status["ingest_lag_seconds"] = str(backlog), f"{lag:.1f}"
        except Exception as exc:  # noqa: BLE001 - any driver error means the same thing to an operator
            status["store"] = f"unreachable: {type(exc).__name__}"
        # A platform that is down is no reason to take this instance out of service: named, not failed.
        for (kind, account), since in sorted(self.outbox.degraded.items()):
            status[f"channel:{kind}:{account}"] = f"degraded: platform unreachable since {since.isoformat()}Z"
        return status

    async def _sync_campaigns(self) -> None:
        """Mirror campaign files into the store; pause state lives in the store and survives restarts."""
        now = self.clock.now()
        async with self.sessions() as session, session.begin():
            rows = {c.name: c for c in (await session.scalars(select(Campaign))).all()}
            for name, loaded in self.campaigns.items():
                row = rows.get(name)
                if row is None:
                    session.add(Campaign(name=name, paused=False, definition_hash=loaded.digest, created_at=now,
                                         updated_at=now))
                elif row.definition_hash != loaded.digest:
                    row.definition_hash, row.updated_at = loaded.digest, now
            self.paused = {name for name, row in rows.items() if row.paused}
