"""Outbound webhooks: subscriptions, the delivery log, test events and replays (scrm.webhooks)."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
from rich.markup import escape
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scrm.cli.base import EXIT_FAILED, err, load, main, open_store, out, run_async
from scrm.clock import SystemClock
from scrm.config import Config

T = TypeVar("T")


@main.group()
def webhooks() -> None:
    """Outbound webhook subscriptions ([webhooks.<name>] in the config, or made through the API)."""


@webhooks.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON lines for machines.")
@click.pass_context
def webhooks_list(ctx: click.Context, as_json: bool) -> None:
    """Subscriptions with their events, state and the events still to deliver."""
    from sqlalchemy import select

    from scrm.store.models import WebhookSubscription
    from scrm.webhooks.log import pending_counts
    from scrm.webhooks.subscriptions import SubscriptionView

    config = load(ctx)

    async def read() -> list[SubscriptionView]:
        async with _store(config) as sessions, sessions() as session:
            pending = await pending_counts(session)
            rows = (await session.scalars(select(WebhookSubscription).order_by(WebhookSubscription.name))).all()
            return [SubscriptionView.of(r, pending.get(r.id, 0)) for r in rows]

    views = run_async(read())
    if as_json:
        for v in views:
            out.print(json.dumps(dataclasses.asdict(v), ensure_ascii=False), markup=False, highlight=False, soft_wrap=True)
        return
    if not views:
        out.print("no webhook subscriptions (add [webhooks.<name>] to the config, or POST /api/v1/webhooks)")
        return
    table = Table("name", "url", "events", "source", "state", "failures in a row", "to deliver")
    for v in views:
        state = "enabled" if v.enabled else f"disabled ({v.disabled_reason})"
        table.add_row(v.name, escape(v.url), ", ".join(v.events) or "all", v.source, state, str(v.failures),
                      str(v.pending))
    out.print(table)


@webhooks.command("log")
@click.argument("name", required=False)
@click.option("--since", help="Only attempts at or after this date/time (UTC).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="JSON lines for machines.")
@click.pass_context
def webhooks_log(ctx: click.Context, name: str | None, since: str | None, limit: int, as_json: bool) -> None:
    """The delivery log, newest first: each attempt's status, HTTP answer and latency."""
    from scrm.webhooks.log import AttemptView, attempts

    config = load(ctx)
    since_at = _moment(since)

    async def read() -> list[AttemptView]:
        async with _store(config) as sessions, sessions() as session:
            return await attempts(session, name, since_at, limit)

    found = run_async(read())
    if as_json:
        for a in found:
            out.print(json.dumps(dataclasses.asdict(a), ensure_ascii=False, default=str), markup=False, highlight=False,
                      soft_wrap=True)
        return
    table = Table("at (UTC)", "subscription", "webhook-id", "event", "customer", "status", "HTTP", "ms", "error")
    for a in found:
        table.add_row(a.at.isoformat(sep=" ", timespec="seconds"), a.subscription, a.event_id, a.kind,
                      "" if a.customer_id is None else f"#{a.customer_id}", a.status,
                      "" if a.http_status is None else str(a.http_status), f"{a.latency_ms:.1f}", escape(a.error or ""))
    out.print(table)


@webhooks.command("test")
@click.argument("name")
@click.pass_context
def webhooks_test(ctx: click.Context, name: str) -> None:
    """Queue a webhook.test event for subscription NAME; a running service posts it (see `scrm webhooks log`)."""
    from scrm.webhooks.log import send_test

    config = load(ctx)

    async def queue() -> str:
        async with _store(config) as sessions, sessions() as session, session.begin():
            return await send_test(session, name, SystemClock().now())

    event_id = _or_exit(queue)
    out.print(f"queued webhook.test {event_id} for {name}")


@webhooks.command("replay")
@click.argument("name")
@click.option("--since", required=True, help="Events written at or after this date/time (UTC).")
@click.pass_context
def webhooks_replay(ctx: click.Context, name: str, since: str) -> None:
    """Send subscription NAME's events since a moment again, in order, with their webhook-ids."""
    from scrm.webhooks.log import replay

    config = load(ctx)
    since_at = _moment(since)
    assert since_at is not None

    async def run() -> int:
        async with _store(config) as sessions, sessions() as session, session.begin():
            return await replay(session, name, since_at, SystemClock().now(), config.webhook_delivery.retry_hours)

    out.print(f"{_or_exit(run)} event(s) of {name} queued again")


@webhooks.command("enable")
@click.argument("name")
@click.pass_context
def webhooks_enable(ctx: click.Context, name: str) -> None:
    """Turn subscription NAME on again (after it was disabled for failing); its waiting events go out."""
    from scrm.webhooks.subscriptions import named, set_enabled

    config = load(ctx)

    async def run() -> str:
        async with _store(config) as sessions, sessions() as session, session.begin():
            row = await named(session, name)
            set_enabled(row, True, SystemClock().now(), "cli")
            return row.name

    out.print(f"{_or_exit(run)} enabled")


@webhooks.command("secret")
def webhooks_secret() -> None:
    """Print a new signing secret (whsec_...) for a [webhooks.<name>] table."""
    from scrm.webhooks.subscriptions import new_secret

    out.print(new_secret(), highlight=False)


@asynccontextmanager
async def _store(config: Config) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """The store with the config's subscriptions mirrored in, as a starting service would."""
    from scrm.webhooks.subscriptions import sync_config

    async with open_store(config) as sessions:
        async with sessions() as session, session.begin():
            await sync_config(session, config, SystemClock().now())
        yield sessions


def _or_exit(run: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the command's coroutine function; an unknown subscription is a message and exit 1."""
    try:
        return run_async(run())
    except LookupError as exc:
        err.print(f"[bold red]{escape(str(exc.args[0]))}[/]")
        sys.exit(EXIT_FAILED)


def _moment(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("use a date (2026-01-31) or date and time (2026-01-31T09:00)",
                                 param_hint="--since") from None
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment
