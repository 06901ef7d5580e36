"""Webhook subscriptions: the config's ``[webhooks.<name>]`` mirrored into the store at start, those made
through the API, and the set of them that emission reads (scrm.webhooks.events.Registry), refreshed
from the store so that every instance sees changes made on another."""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.store.models import WebhookAttempt, WebhookDelivery, WebhookSubscription
from scrm.webhooks.events import EVENT_KINDS, Subscribers

if TYPE_CHECKING:
    from scrm.config import Config

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
#: Why a subscription is off when the config turned it off (or dropped it): a config edit turns it on again.
BY_CONFIG = "config"


def check_secret(secret: str) -> str | None:
    """Why ``secret`` cannot sign Standard Webhooks, or None: ``whsec_`` and base64 of 24 to 64 bytes."""
    if not secret.startswith(SECRET_PREFIX):
        return f"must start with {SECRET_PREFIX} (scrm webhooks secret makes one)"
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        return "is not base64 after whsec_"
    if not 24 <= len(key) <= 64:
        return f"must be 24 to 64 bytes, not {len(key)}"
    return None


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


class SubscriptionError(ValueError):
    """A subscription that cannot be made or changed as asked; the message says why."""


@dataclass(frozen=True)
class SubscriptionView:
    """A subscription as the CLI and the API show it (never its secret)."""

    id: int
    name: str
    url: str
    events: list[str]
    source: str
    enabled: bool
    failures: int
    disabled_reason: str | None
    pending: int = 0

    @classmethod
    def of(cls, row: WebhookSubscription, pending: int = 0) -> SubscriptionView:
        return cls(row.id, row.name, row.url, list(row.events), row.source, row.enabled, row.failures,
                   row.disabled_reason, pending)


async def sync_config(session: AsyncSession, config: Config, now: datetime) -> None:
    """Mirror ``[webhooks.<name>]`` into the store: new ones are added, changed ones updated, dropped
    ones turned off (their events stay for the log). One disabled after failures stays off until
    ``scrm webhooks enable`` (a restart does not start hammering a dead endpoint again)."""
    rows = {r.name: r for r in (await session.scalars(select(WebhookSubscription))).all()}
    for name, sub in config.webhooks.items():
        row = rows.get(name)
        secret = sub.secret.get_secret_value()
        if row is None:
            session.add(WebhookSubscription(
                name=name, url=sub.url, secret=secret, events=list(sub.events), source="config", enabled=sub.enabled,
                failures=0, disabled_at=None if sub.enabled else now, disabled_reason=None if sub.enabled else BY_CONFIG,
                created_at=now, updated_at=now))
            continue
        if row.source != "config":
            log.error("webhooks.%s: a subscription made through the API has this name; the config's is not used",
                      name)
            continue
        if (row.url, row.secret, list(row.events)) != (sub.url, secret, list(sub.events)):
            row.url, row.secret, row.events, row.updated_at = sub.url, secret, list(sub.events), now
        if not sub.enabled and row.enabled:
            row.enabled, row.disabled_at, row.disabled_reason = False, now, BY_CONFIG
        elif sub.enabled and not row.enabled and row.disabled_reason == BY_CONFIG:
            row.enabled, row.disabled_at, row.disabled_reason, row.updated_at = True, None, None, now
    for name, row in rows.items():
        if row.source == "config" and name not in config.webhooks and row.enabled:
            row.enabled, row.disabled_at, row.disabled_reason = False, now, BY_CONFIG


async def current(session: AsyncSession) -> Subscribers:
    """The enabled subscriptions by the kinds they want."""
    rows = (await session.execute(select(WebhookSubscription.id, WebhookSubscription.events)
                                  .where(WebhookSubscription.enabled))).all()
    return Subscribers.of((sid, kinds or ()) for sid, kinds in rows)


def _checked_events(events: list[str]) -> list[str]:
    unknown = sorted(set(events) - set(EVENT_KINDS))
    if unknown:
        raise SubscriptionError(f"unknown event kind(s) {', '.join(unknown)} (known: {', '.join(EVENT_KINDS)})")
    return sorted(set(events))


async def create(session: AsyncSession, name: str, url: str, events: list[str], now: datetime) -> tuple[WebhookSubscription, str]:
    """A new API subscription and its secret (shown once); a name in use (by the config's too) is refused."""
    if await session.scalar(select(WebhookSubscription.id).where(WebhookSubscription.name == name)) is not None:
        raise SubscriptionError(f"a subscription named {name} exists")
    secret = new_secret()
    row = WebhookSubscription(name=name, url=url, secret=secret, events=_checked_events(events), source="api",
                              enabled=True, failures=0, created_at=now, updated_at=now)
    session.add(row)
    await session.flush()
    return row, secret


async def named(session: AsyncSession, name: str) -> WebhookSubscription:
    row = await session.scalar(select(WebhookSubscription).where(WebhookSubscription.name == name))
    if row is None:
        raise LookupError(f"no webhook subscription {name}")
    return row


async def update_api(session: AsyncSession, name: str, now: datetime, *, url: str | None = None,
                     events: list[str] | None = None, enabled: bool | None = None) -> WebhookSubscription:
    """Change an API subscription; turning one on again clears its run of failures."""
    row = await named(session, name)
    if row.source != "api" and (url is not None or events is not None):
        raise SubscriptionError(f"{name} comes from the config: change it there")
    if url is not None:
        row.url = url
    if events is not None:
        row.events = _checked_events(events)
    if enabled is not None:
        set_enabled(row, enabled, now, "api")
    row.updated_at = now
    return row


def set_enabled(row: WebhookSubscription, enabled: bool, now: datetime, by: str) -> None:
    if enabled and not row.enabled:
        row.enabled, row.disabled_at, row.disabled_reason = True, None, None
        row.failures, row.failing_since = 0, None
    elif not enabled and row.enabled:
        row.enabled, row.disabled_at, row.disabled_reason = False, now, by
    row.updated_at = now


async def remove(session: AsyncSession, name: str) -> None:
    """Delete an API subscription with its undelivered events and log."""
    row = await named(session, name)
    if row.source != "api":
        raise SubscriptionError(f"{name} comes from the config: remove it there")
    await session.execute(delete(WebhookAttempt).where(WebhookAttempt.subscription_id == row.id))
    await session.execute(delete(WebhookDelivery).where(WebhookDelivery.subscription_id == row.id))
    await session.delete(row)
