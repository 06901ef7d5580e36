"""Conversations: a customer's thread with staff on one channel account, and staff replies into it.

A conversation opens when a customer writes on a staffed channel and nothing answered them (no
command, auto-reply rule or campaign keyword), or when they ask for a person (``转人工``, ``/human``).
It goes ``open`` (waiting for staff) -> ``pending`` (staff answered, waiting for the customer) ->
``resolved``; their next message reopens it. While a person has it (``handled``: asked for, or staff
answered) auto-replies and marketing campaigns pause for the customer, until it is resolved or nobody
has written in it for ``conversations.handoff_idle_minutes``.

Staff replies are deliveries of the reserved campaign :data:`REPLY` in the outbox, so they share its
guarantees (at most once, retried while the platform is unreachable, the channel's rate limits) and
go out one at a time per customer in the order they were written (``scrm.campaigns.outbox``).

The ingest batch calls :func:`note_messages` once and :func:`handled_customers` once (set-based);
staff chat, the console and the API all reply, resolve and assign through the functions here.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, case, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.campaigns import templates
from scrm.conversations.replies import WorkingHours, at_work, staff_zone
from scrm.customers import touchpoint
from scrm.store.models import STAFF_REPLY, Conversation, Customer, Delivery, Identity

_C = Conversation.__table__

if TYPE_CHECKING:
    from scrm.config import Config
    from scrm.runtime import Runtime

#: ``variant`` of a reply delivery sent as the configured notice template (outside the reply window).
AS_NOTICE = "notice"
MAX_REPLY_CHARS = 2000
STATES = ("open", "pending", "resolved")


class ConversationError(Exception):
    """Why a reply, resolve or assignment was refused; ``code`` is the API's error code, the text the
    message every surface shows. Nothing was written."""

    def __init__(self, code: str, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.code, self.status = code, status


@dataclass(frozen=True)
class Noted:
    """A customer message on a staffed channel, as the ingest batch saw it."""

    customer_id: int
    channel: str
    account: str
    #: The customer asked for a person.
    person: bool
    #: A rule, command or campaign keyword answered it: it joins an open conversation, opens none.
    answered: bool


@dataclass(frozen=True)
class ReplyOutcome:
    conversation_id: int
    delivery_id: int
    channel: str
    as_notice: bool


def enabled_for(config: Config, channel: str) -> bool:
    return config.conversations.enabled and channel in config.conversations.channels


def wants_person(config: Config, text: str) -> bool:
    words = config.conversations.person_words
    return text.strip().lower() in {w.lower() for w in words}


def _idle(config: Config) -> timedelta:
    return timedelta(minutes=config.conversations.handoff_idle_minutes)


def _last_activity() -> Any:
    """The later of the customer's and staff's last message (either may be NULL)."""
    customer = func.coalesce(Conversation.last_customer_at, Conversation.opened_at)
    staff = func.coalesce(Conversation.last_staff_at, Conversation.opened_at)
    return case((customer > staff, customer), else_=staff)


def _handling(config: Config, now: datetime) -> Any:
    return and_(Conversation.state != "resolved", Conversation.handled, _last_activity() > now - _idle(config))


async def handled_customers(config: Config, session: AsyncSession, customer_ids: Collection[int],
                            now: datetime) -> set[int]:
    """Those of ``customer_ids`` a person is talking to now (auto-replies pause for them): one query."""
    if not customer_ids or not config.conversations.enabled:
        return set()
    rows = await session.scalars(select(Conversation.customer_id).where(
        Conversation.customer_id.in_(list(customer_ids)), _handling(config, now)))
    return set(rows)


async def handoff_until(config: Config, session: AsyncSession, customer_id: int, now: datetime) -> datetime | None:
    """While a person talks to the customer: when that pause ends unless someone writes again (the
    outbox defers marketing until then; resolving ends it at once)."""
    if not config.conversations.enabled:
        return None
    last = await session.scalar(select(func.max(_last_activity())).where(
        Conversation.customer_id == customer_id, _handling(config, now)))
    return None if last is None else _as_naive(last) + _idle(config)


def _as_naive(value: Any) -> datetime:
    """SQLite hands back CASE results over datetimes as text."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class Opened:
    """A conversation a batch opened or reopened: its ``conversation_opened`` touchpoint is the batch's to
    write (with the batch's other touchpoints), and :func:`alert_new` tells its assignee."""

    conversation_id: int
    customer_id: int
    channel: str
    account: str
    person: bool


async def note_messages(session: AsyncSession, noted: Iterable[Noted], now: datetime) -> list[Opened]:
    """Open, reopen or update the conversations of a batch's customer messages; returns those that opened
    or reopened. New conversations are one multi-row INSERT ... RETURNING: through the ORM, SQLite (whose
    RETURNING keeps no row order) would take one statement per row."""
    latest: dict[tuple[int, str, str], Noted] = {}
    for n in noted:
        key = (n.customer_id, n.channel, n.account)
        before = latest.get(key)
        latest[key] = Noted(*key, person=n.person or bool(before and before.person),
                            answered=n.answered and (before is None or before.answered))
    if not latest:
        return []
    existing = {(c.customer_id, c.channel, c.account): c for c in (await session.scalars(
        select(Conversation).where(Conversation.customer_id.in_({k[0] for k in latest})))).all()}
    opened: list[Opened] = []
    new: list[dict[str, Any]] = []
    for key, n in latest.items():
        conv = existing.get(key)
        if conv is None:
            if n.answered and not n.person:
                continue
            new.append({"customer_id": n.customer_id, "channel": n.channel, "account": n.account, "state": "open",
                        "handled": n.person, "opened_at": now, "waiting_since": now, "last_customer_at": now,
                        "updated_at": now})
            continue
        conv.last_customer_at, conv.updated_at = now, now
        if conv.state == "resolved":
            if n.answered and not n.person:
                continue
            conv.state, conv.opened_at, conv.waiting_since = "open", now, now
            conv.handled, conv.first_response_at, conv.resolved_at, conv.resolved_by = n.person, None, None, None
            conv.alerted_at = None
            opened.append(Opened(conv.id, conv.customer_id, conv.channel, conv.account, n.person))
        elif not n.answered or n.person:
            conv.state = "open"
            conv.waiting_since = conv.waiting_since or now
            conv.handled = conv.handled or n.person
            if n.person and not conv.alerted_at:
                opened.append(Opened(conv.id, conv.customer_id, conv.channel, conv.account, bool(conv.handled)))
    await session.flush()
    if new:
        opened += [Opened(*row) for row in await session.execute(insert(_C).returning(
            _C.c.id, _C.c.customer_id, _C.c.channel, _C.c.account, _C.c.handled), new)]
    return opened


async def current(session: AsyncSession, customer_id: int, channel: str | None = None) -> Conversation | None:
    """The customer's conversation staff would answer: the most recently active one (on ``channel``)."""
    query = select(Conversation).where(Conversation.customer_id == customer_id)
    if channel is not None:
        query = query.where(Conversation.channel == channel)
    return await session.scalar(query.order_by(Conversation.state == "resolved",
                                               Conversation.last_customer_at.desc().nulls_last(),
                                               Conversation.id.desc()).limit(1))


def _ensure_text(text: str) -> str:
    text = text.strip()
    if not text:
        raise ConversationError("empty_reply", "the reply is empty", 400)
    if len(text) > MAX_REPLY_CHARS:
        raise ConversationError("reply_too_long", f"the reply is longer than {MAX_REPLY_CHARS} characters", 413)
    return text


async def reply(service: Runtime, session: AsyncSession, customer: Customer, text: str, actor: str,
                now: datetime, *, channel: str | None = None, as_notice: bool = False) -> ReplyOutcome:
    """Queue a staff reply into the customer's conversation; the outbox sends it (in order per customer)
    and records it as a ``staff_reply`` touchpoint with ``actor``. Refused (ConversationError, nothing
    written) when empty, when there is no open conversation, or outside the channel's reply window
    without ``as_notice`` (which sends ``conversations.notice`` instead, when configured)."""
    text = _ensure_text(text)
    conv = await current(session, customer.id, channel)
    if conv is None:
        raise ConversationError("no_conversation", f"#{customer.id} has no conversation to answer")
    if conv.state == "resolved":
        raise ConversationError("conversation_resolved",
                                f"conversation #{conv.id} with #{customer.id} is resolved; it reopens when they write")
    sender = service.channel(conv.channel, conv.account)
    if sender is None:
        raise ConversationError("channel_not_configured", f"{conv.channel}:{conv.account} is not configured here")
    notice = service.config.conversations.notice
    window = sender.reply_window
    last = conv.last_customer_at
    outside = window is not None and (last is None or now - last >= window)
    if as_notice and notice is None:
        raise ConversationError("no_notice", "no notice template is configured ([conversations.notice])", 400)
    if outside and not as_notice:
        hours = window.total_seconds() / 3600 if window else 0
        offer = (" Send it as the notice template instead (template message)." if notice is not None
                 else " Configure [conversations.notice] to send a template message instead.")
        raise ConversationError("outside_window",
                                f"{conv.channel} allows replies only within {hours:g} hours of the customer's last "
                                f"message ({last:%Y-%m-%d %H:%M} UTC);{offer}" if last else
                                f"{conv.channel}: the customer has not written on this account.{offer}")
    external_id = await session.scalar(select(Identity.external_id).where(
        Identity.customer_id == customer.id, Identity.channel == conv.channel, Identity.account == conv.account)
        .order_by(Identity.id).limit(1))
    if external_id is None:
        raise ConversationError("no_identity", f"#{customer.id} has no {conv.channel}:{conv.account} identity")
    delivery = Delivery(campaign=STAFF_REPLY, step=0, target=f"c{customer.id}", occurrence=uuid.uuid4().hex,
                        customer_id=customer.id, channel=conv.channel, account=conv.account, external_id=external_id,
                        variant=AS_NOTICE if as_notice else None, status="planned", attempts=0, text=text,
                        actor=actor, due_at=now, created_at=now)
    session.add(delivery)
    if conv.first_response_at is None:
        conv.first_response_at = now
        touchpoint(session, customer_id=customer.id, channel=conv.channel, account=conv.account,
                   direction="internal", kind="conversation_first_response", now=now, actor=actor,
                   payload={"conversation": conv.id, "seconds": (now - conv.opened_at).total_seconds()})
    conv.state, conv.handled, conv.waiting_since = "pending", True, None
    conv.last_staff_at, conv.updated_at = now, now
    if conv.assignee is None:
        conv.assignee, conv.assigned_at = _identity_of(actor), now
    await session.flush()
    return ReplyOutcome(conv.id, delivery.id, conv.channel, as_notice)


def _identity_of(actor: str) -> str:
    """``staff:telegram:1`` (chat) -> ``telegram:1``; console and API actors stay as they are."""
    return actor.removeprefix("staff:")


def notice_fields(config: Config, text: str, customer_name: str) -> dict[str, str]:
    notice = config.conversations.notice
    assert notice is not None
    context = {"text": text, "customer": {"name": customer_name}}
    return {k: templates.render(v, context) for k, v in notice.fields.items()}


async def resolve(session: AsyncSession, customer: Customer, actor: str, now: datetime,
                  channel: str | None = None) -> Conversation:
    """Resolve the customer's conversation: auto-replies and paused marketing resume at once."""
    conv = await current(session, customer.id, channel)
    if conv is None:
        raise ConversationError("no_conversation", f"#{customer.id} has no conversation to resolve")
    if conv.state == "resolved":
        raise ConversationError("conversation_resolved", f"conversation #{conv.id} with #{customer.id} is "
                                                         "already resolved")
    touchpoint(session, customer_id=customer.id, channel=conv.channel, account=conv.account, direction="internal",
               kind="conversation_resolved", now=now, actor=actor,
               payload={"conversation": conv.id, "seconds": (now - conv.opened_at).total_seconds(),
                        "assignee": conv.assignee})
    conv.state, conv.handled, conv.waiting_since = "resolved", False, None
    conv.resolved_at, conv.resolved_by, conv.updated_at = now, actor, now
    # Marketing that waited for the person to finish goes out now rather than at the idle deadline.
    await session.execute(update(Delivery).where(
        Delivery.customer_id == customer.id, Delivery.status == "planned", Delivery.reason == "deferred:handoff")
        .values(due_at=now).execution_options(synchronize_session=False))
    return conv


async def assign(session: AsyncSession, conv: Conversation, assignee: str, actor: str, now: datetime) -> None:
    conv.assignee, conv.assigned_at, conv.alerted_at, conv.updated_at = assignee, now, None, now
    touchpoint(session, customer_id=conv.customer_id, channel=conv.channel, account=conv.account,
               direction="internal", kind="conversation_assigned", now=now, actor=actor,
               payload={"conversation": conv.id, "assignee": assignee})


def agents(config: Config) -> list[str]:
    """Who takes conversations in turn: ``conversations.agents``, else every operator and admin."""
    return config.conversations.agents or sorted(k for k, role in config.staff.items() if role in ("operator", "admin"))


class Rota:
    """Round-robin among the agents on duty (inside ``hours`` in their own time zone; all of them when
    none is, or without hours): the one whose last assignment is the oldest, never assigned first. Read
    once for a batch of assignments, and kept current as it hands them out."""

    def __init__(self, names: list[str], last: dict[str, datetime], now: datetime) -> None:
        self._names, self._last, self._now = names, last, now
        self._turn: dict[str, int] = {}  # name -> the number of the turn it last took in this batch

    @classmethod
    async def read(cls, config: Config, session: AsyncSession, now: datetime,
                   hours: WorkingHours | None = None) -> Rota:
        names = agents(config)
        if hours is not None:
            names = [n for n in names if at_work(hours, staff_zone(config, n), now)] or names
        rows = (await session.execute(select(Conversation.assignee, func.max(Conversation.assigned_at))
                                      .where(Conversation.assignee.in_(names))
                                      .group_by(Conversation.assignee))).all() if names else []
        return cls(names, {name: at for name, at in rows if name is not None and at is not None}, now)

    def next(self) -> str | None:
        if not self._names:
            return None
        name = min(self._names, key=lambda n: (self._last.get(n) is not None, self._last.get(n) or datetime.min,
                                               self._turn.get(n, 0), n))
        self._last[name] = self._now
        self._turn[name] = max(self._turn.values(), default=0) + 1
        return name


@dataclass(frozen=True)
class InboxRow:
    conversation_id: int
    customer_id: int
    name: str | None
    channel: str
    account: str
    state: str
    assignee: str | None
    handled: bool
    waiting_since: datetime | None
    last_customer_at: datetime | None
    last_text: str | None


async def inbox(session: AsyncSession, *, assignee: str | None = None, states: Collection[str] = ("open", "pending"),
                limit: int = 50) -> list[InboxRow]:
    """Unresolved conversations, those waiting longest first (then the pending ones by last message)."""
    from scrm.store.models import Touchpoint

    last_text = (select(Touchpoint.text).where(
        Touchpoint.customer_id == Conversation.customer_id, Touchpoint.channel == Conversation.channel,
        Touchpoint.account == Conversation.account, Touchpoint.direction == "in")
        .order_by(Touchpoint.id.desc()).limit(1).correlate(Conversation).scalar_subquery())
    query = (select(Conversation, Customer.display_name, last_text).join(Customer, Customer.id == Conversation.customer_id)
             .where(Conversation.state.in_(list(states)))
             .order_by(Conversation.waiting_since.is_(None), Conversation.waiting_since,
                       Conversation.last_customer_at.desc(), Conversation.id).limit(limit))
    if assignee is not None:
        query = query.where(or_(Conversation.assignee == assignee, Conversation.assignee.is_(None)))
    return [InboxRow(c.id, c.customer_id, name, c.channel, c.account, c.state, c.assignee, c.handled,
                     c.waiting_since, c.last_customer_at, text)
            for c, name, text in (await session.execute(query)).all()]


async def counts(session: AsyncSession) -> dict[str, int]:
    """Unresolved conversations by state (``open`` is waiting for staff)."""
    rows = (await session.execute(select(Conversation.state, func.count()).where(Conversation.state != "resolved")
                                  .group_by(Conversation.state))).all()
    found = {state: n for state, n in rows}
    return {"open": found.get("open", 0), "pending": found.get("pending", 0)}
