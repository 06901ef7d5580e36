"""The webhook delivery log as the CLI and the API read it, and what operators do with it: replay a
subscription's events since a moment, send a test event, drop what is past retention."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.store.dialect import rowcount
from scrm.store.models import WebhookAttempt, WebhookDelivery, WebhookSubscription
from scrm.webhooks.events import new_event_id
from scrm.webhooks.subscriptions import named


@dataclass(frozen=True)
class AttemptView:
    """One request made to an endpoint."""

    at: datetime
    subscription: str
    event_id: str
    kind: str
    customer_id: int | None
    status: str
    http_status: int | None
    latency_ms: float
    error: str | None


async def attempts(session: AsyncSession, subscription: str | None = None, since: datetime | None = None,
                   limit: int = 50) -> list[AttemptView]:
    """The latest attempts, newest first."""
    query = (select(WebhookAttempt.at, WebhookSubscription.name, WebhookDelivery.event_id, WebhookDelivery.kind,
                    WebhookDelivery.customer_id, WebhookAttempt.status, WebhookAttempt.http_status,
                    WebhookAttempt.latency_ms, WebhookAttempt.error)
             .join(WebhookSubscription, WebhookSubscription.id == WebhookAttempt.subscription_id)
             .join(WebhookDelivery, WebhookDelivery.id == WebhookAttempt.delivery_id)
             .order_by(WebhookAttempt.id.desc()).limit(limit))
    if subscription is not None:
        query = query.where(WebhookSubscription.name == subscription)
    if since is not None:
        query = query.where(WebhookAttempt.at >= since)
    return [AttemptView(*row) for row in (await session.execute(query)).all()]


async def pending_counts(session: AsyncSession) -> dict[int, int]:
    """Events still to deliver, by subscription id."""
    return {sid: int(n) for sid, n in (await session.execute(
        select(WebhookDelivery.subscription_id, func.count()).where(WebhookDelivery.status.in_(("pending", "claimed")))
        .group_by(WebhookDelivery.subscription_id))).all()}


async def replay(session: AsyncSession, subscription: str, since: datetime, now: datetime, retry_hours: float) -> int:
    """Send a subscription's events since ``since`` again (delivered or dead ones; those still pending go
    anyway), in their order, with their ``webhook-id``; returns how many. The log keeps the earlier tries."""
    sub = await named(session, subscription)
    result = await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.subscription_id == sub.id, WebhookDelivery.created_at >= since,
               WebhookDelivery.status.in_(("delivered", "dead")))
        .values(status="pending", due_at=now, attempts=0, finished_at=None, last_error=None,
                retry_until=now + timedelta(hours=retry_hours))
        .execution_options(synchronize_session=False))
    return rowcount(result)


async def send_test(session: AsyncSession, subscription: str, now: datetime) -> str:
    """Queue a ``webhook.test`` event for one subscription (disabled or not, whatever its filter); returns
    its ``webhook-id``."""
    sub = await named(session, subscription)
    event_id = new_event_id()
    session.add(WebhookDelivery(subscription_id=sub.id, event_id=event_id, kind="webhook.test", customer_id=None,
                                payload={"subscription": sub.name}, status="pending", attempts=0, due_at=now,
                                created_at=now))
    return event_id


async def prune(session: AsyncSession, now: datetime, retention_days: int) -> int:
    """Drop delivered and dead events and log rows older than the retention; returns events dropped."""
    cutoff = now - timedelta(days=retention_days)
    await session.execute(delete(WebhookAttempt).where(WebhookAttempt.at < cutoff))
    result = await session.execute(delete(WebhookDelivery).where(
        WebhookDelivery.status.in_(("delivered", "dead")), WebhookDelivery.finished_at < cutoff))
    return rowcount(result)
