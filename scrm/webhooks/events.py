"""The webhook event kinds, and how core code emits one: into the webhook outbox, inside the transaction of
the change it tells of, so that an event is written exactly when its change is committed and nothing is
lost when the service dies before delivering it.

The subscriptions that want each kind travel with the session (:func:`attach`, done by the service to its
session factory): where no subscription wants a kind, emitting it is one dictionary look-up and writes
nothing. One row is written per event and subscription (the fan-out happens here, in SQL where the
change itself is set-based: :func:`emit_select`).

Most events are the touchpoints core code already writes (:func:`touchpoint_events` maps touchpoint kinds
to event kinds): ``scrm.customers.touchpoint`` emits for the ones written one by one, and the set-based
writers of touchpoints call :func:`emit_touchpoints` with their rows.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, get_args

from sqlalchemy import JSON, ColumnElement, String, cast, event, insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import InstrumentedAttribute, Session

from scrm.messages import MESSAGE_KINDS
from scrm.store.models import WebhookDelivery

EventKind = Literal[
    "customer.created", "customer.merged", "customer.erased",
    "tag.added", "tag.removed", "stage.changed",
    "message.received", "message.sent", "delivery.sent", "delivery.failed",
    "coupon.granted", "coupon.redeemed", "conversion.created", "survey.answered", "consent.changed",
    "conversation.opened", "conversation.assigned", "conversation.first_response", "conversation.resolved",
    "code.scanned",
]
EVENT_KINDS: tuple[EventKind, ...] = get_args(EventKind)

#: Where a session carries the subscriptions (``Session.info``).
_INFO_KEY = "scrm.webhooks"
_WAKES = "scrm.webhooks.wakes"

#: Outbound touchpoint kinds that are a message to a customer.
_SENT = frozenset({"reply", "auto_reply", "staff_reply", "campaign_message"})
_BY_TOUCHPOINT: dict[str, tuple[EventKind, ...]] = {
    "campaign_message": ("message.sent", "delivery.sent"),
    "delivery_failed": ("delivery.failed",),
    "staff_reply_failed": ("delivery.failed",),
    "tag_added": ("tag.added",),
    "tag_removed": ("tag.removed",),
    "tag_expired": ("tag.removed",),
    "stage_changed": ("stage.changed",),
    "coupon_granted": ("coupon.granted",),
    "coupon_redeemed": ("coupon.redeemed",),
    "customers_merged": ("customer.merged",),
    "survey_answered": ("survey.answered",),
    "conversation_opened": ("conversation.opened",),
    "conversation_assigned": ("conversation.assigned",),
    "conversation_first_response": ("conversation.first_response",),
    "conversation_resolved": ("conversation.resolved",),
    "code_scan": ("code.scanned",),
    "order": ("conversion.created",),
}


def touchpoint_events(kind: str, direction: str) -> tuple[EventKind, ...]:
    """The events a touchpoint of this kind and direction tells of (usually none or one)."""
    if direction == "in":
        return ("message.received",) if kind in MESSAGE_KINDS else ()
    found = _BY_TOUCHPOINT.get(kind, ())
    if direction == "out" and kind in _SENT and "message.sent" not in found:
        return ("message.sent", *found)
    return found


@dataclass(frozen=True)
class Subscribers:
    """The enabled subscriptions' ids by the event kinds they want; swapped whole when subscriptions change."""

    by_kind: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, subscriptions: Iterable[tuple[int, Iterable[str]]]) -> Subscribers:
        """From (id, kinds) pairs; no kinds means every kind."""
        by_kind: dict[str, list[int]] = {}
        for sid, kinds in subscriptions:
            for kind in set(kinds) or set(EVENT_KINDS):
                by_kind.setdefault(kind, []).append(sid)
        return cls({kind: tuple(sorted(ids)) for kind, ids in by_kind.items()})


class Registry:
    """The service's current :class:`Subscribers`, shared by every session it opens, and how to wake its
    webhook worker once a transaction that emitted commits."""

    def __init__(self) -> None:
        self.current = Subscribers()
        self.wake: Callable[[], None] | None = None

    def committed(self, _session: Session) -> None:
        if self.wake is not None:
            self.wake()


def attach(sessions: async_sessionmaker[AsyncSession], registry: Registry) -> None:
    """Make every session of ``sessions`` emit to the registry's subscriptions."""
    sessions.configure(info={_INFO_KEY: registry})


async def attach_current(sessions: async_sessionmaker[AsyncSession]) -> Registry:
    """Attach the store's enabled subscriptions as they are now (a command's sessions; the service keeps its
    registry current instead)."""
    from scrm.webhooks.subscriptions import current

    registry = Registry()
    async with sessions() as session:
        registry.current = await current(session)
    attach(sessions, registry)
    return registry


def wanting(session: AsyncSession | Session, kind: str) -> tuple[int, ...]:
    """The subscriptions that want ``kind`` (none for a session of no service, e.g. a migration's)."""
    registry: Registry | None = session.info.get(_INFO_KEY)
    return registry.current.by_kind.get(kind, ()) if registry is not None else ()


def _wake_on_commit(session: AsyncSession | Session) -> None:
    """Wake the worker after this session's commits (registered once a session, when it first emits)."""
    if session.info.get(_WAKES):
        return
    session.info[_WAKES] = True
    registry: Registry = session.info[_INFO_KEY]
    sync = session.sync_session if isinstance(session, AsyncSession) else session
    event.listen(sync, "after_commit", registry.committed)


def active(session: AsyncSession | Session) -> bool:
    """Whether any subscription wants anything: set-based writers skip building rows when not."""
    registry: Registry | None = session.info.get(_INFO_KEY)
    return registry is not None and bool(registry.current.by_kind)


def new_event_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def _rows(subscriptions: tuple[int, ...], kind: str, customer_id: int | None, data: dict[str, Any],
          now: datetime) -> list[dict[str, Any]]:
    event_id = new_event_id()
    return [{"subscription_id": sid, "event_id": event_id, "kind": kind, "customer_id": customer_id,
             "payload": data, "status": "pending", "attempts": 0, "due_at": now, "created_at": now}
            for sid in subscriptions]


def emit(session: AsyncSession, kind: EventKind, customer_id: int | None, data: dict[str, Any], now: datetime) -> None:
    """Write one event for every subscription that wants it; the caller's transaction commits it."""
    if not (subscriptions := wanting(session, kind)):
        return
    session.add_all(WebhookDelivery(**row) for row in _rows(subscriptions, kind, customer_id, data, now))
    _wake_on_commit(session)


async def emit_many(session: AsyncSession, events: Iterable[tuple[EventKind, int | None, dict[str, Any]]],
                    now: datetime) -> None:
    """Several events (kind, customer id, data) in one INSERT: for the writers that are set-based."""
    if not active(session):
        return
    rows = [row for kind, customer_id, data in events
            for row in _rows(wanting(session, kind), kind, customer_id, data, now)]
    if rows:
        await session.execute(insert(WebhookDelivery.__table__), rows)
        _wake_on_commit(session)


async def emit_select(session: AsyncSession, kind: EventKind,
                      customer_ids: ColumnElement[int] | InstrumentedAttribute[int], where: ColumnElement[bool],
                      data: dict[str, Any], now: datetime) -> None:
    """One event per customer of a query (``customer_ids`` selected where ``where`` holds), all with the
    same data, in one INSERT ... SELECT per subscription: a bulk change's events, as set-based as it."""
    if not (subscriptions := wanting(session, kind)):
        return
    prefix = new_event_id() + "_"
    columns = ["subscription_id", "event_id", "kind", "customer_id", "payload", "status", "attempts", "due_at",
               "created_at"]
    for sid in subscriptions:
        await session.execute(insert(WebhookDelivery.__table__).from_select(columns, select(
            literal(sid), literal(prefix) + cast(customer_ids, String), literal(kind), customer_ids,
            literal(data, JSON), literal("pending"), literal(0), literal(now), literal(now)).where(where)))
    _wake_on_commit(session)


async def redact(session: AsyncSession, customer_id: int) -> None:
    """An erased customer's events, sent or not, keep nothing of what they said or were called (their
    texts and names): only that something happened, like their touchpoints."""
    await session.execute(update(WebhookDelivery).where(WebhookDelivery.customer_id == customer_id)
                          .values(payload={"redacted": True}).execution_options(synchronize_session=False))


def touchpoint_data(row: Mapping[str, Any]) -> dict[str, Any]:
    """What an event made from a touchpoint row says: where it happened, its payload, its text."""
    data: dict[str, Any] = {"channel": row["channel"], "account": row["account"], "touchpoint": row["kind"]}
    data.update(row.get("payload") or {})
    for key in ("text", "campaign", "delivery_id", "actor"):
        if row.get(key) is not None:
            data[key] = row[key]
    return data


def _row_events(row: Mapping[str, Any]) -> tuple[EventKind, ...]:
    """A touchpoint row's events; none for staff chat (a staff member's command, its answer, an alert)."""
    if row["customer_id"] is None and str(row.get("actor") or "").startswith("staff:"):
        return ()
    return touchpoint_events(row["kind"], row["direction"])


def emit_touchpoint(session: AsyncSession, row: Mapping[str, Any]) -> None:
    """The events of one touchpoint (scrm.customers.touchpoint)."""
    for kind in _row_events(row):
        emit(session, kind, row["customer_id"], touchpoint_data(row), row["created_at"])


async def emit_touchpoints(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    """The events of touchpoint rows a set-based writer inserted (ingest's batch, profile refreshes)."""
    if not active(session):
        return
    await emit_many(session, [(kind, row["customer_id"], touchpoint_data(row)) for row in rows
                              for kind in _row_events(row)],
                    rows[0]["created_at"] if rows else datetime.min)
