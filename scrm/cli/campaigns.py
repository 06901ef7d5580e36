"""Campaign files and coupons."""

from __future__ import annotations

import sys

import click
from rich.table import Table

from scrm.campaigns.definitions import load_campaigns
from scrm.cli.base import (
    EXIT_FAILED,
    err,
    guard,
    load,
    main,
    open_store,
    out,
    run_async,
)


@main.group()
def campaigns() -> None:
    """Campaign definitions in the campaigns folder."""


@campaigns.command("validate")
@click.pass_context
@guard
def campaigns_validate(ctx: click.Context) -> None:
    """Check every campaign file; errors name the file, key and problem."""
    loaded = load_campaigns(load(ctx))
    out.print(f"{len(loaded)} campaign(s) valid")


@campaigns.command("list")
@click.pass_context
@guard
def campaigns_list(ctx: click.Context) -> None:
    """List campaigns with their trigger and state."""
    from sqlalchemy import select

    from scrm.store.models import Campaign

    config = load(ctx)
    loaded = load_campaigns(config)

    async def paused() -> set[str]:
        async with open_store(config) as sessions, sessions() as session:
            return set((await session.scalars(select(Campaign.name).where(Campaign.paused))).all())

    off = run_async(paused())
    table = Table("name", "title", "kind", "trigger", "coupon", "state", "file")
    for c in loaded:
        d = c.definition
        trigger = d.trigger.event + (f":{d.trigger.tag}" if d.trigger.tag else "") + f" +{d.trigger.delay}"
        table.add_row(d.name, d.title, d.kind, trigger, d.coupon.pool if d.coupon else "",
                      "paused" if d.name in off else "active", c.path.name)
    out.print(table)


@main.group()
def coupons() -> None:
    """Coupon codes."""


@coupons.command("redeem")
@click.argument("code")
@click.pass_context
def coupons_redeem(ctx: click.Context, code: str) -> None:
    """Record a redemption at the till (any customer's valid code)."""
    from scrm import coupons as coupon_ops
    from scrm.clock import SystemClock
    from scrm.customers import touchpoint

    config = load(ctx)

    async def go() -> coupon_ops.RedeemOutcome:
        async with open_store(config) as sessions, sessions() as session, session.begin():
            now = SystemClock().now()
            result = await coupon_ops.redeem(session, code, now, via="cli")
            if result.status == "redeemed":
                touchpoint(session, customer_id=result.customer_id, channel="cli", account="-", direction="internal",
                           kind="coupon_redeemed", now=now, payload={"code": result.code})
            return result

    result = run_async(go())
    (out if result.status == "redeemed" else err).print(result.reply)
    sys.exit(0 if result.status == "redeemed" else EXIT_FAILED)


