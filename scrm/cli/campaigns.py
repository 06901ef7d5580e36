"""Campaign files and coupons."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.table import Table

from scrm.campaigns.definitions import CampaignDefinition, load_campaigns
from scrm.cli.base import (
    EXIT_FAILED,
    err,
    guard,
    load,
    main,
    no_customer,
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


def describe_trigger(d: CampaignDefinition) -> str:
    t = d.trigger
    if t.cron:
        return f"cron {t.cron}"
    if t.at:
        return f"at {t.at:%Y-%m-%d %H:%M}"
    detail = t.tag or t.stage or (",".join(t.keywords) if t.keywords else "") or (f"{t.days}d" if t.days else "")
    return f"{t.event}{':' + detail if detail else ''}" + (f" +{t.delay}" if t.delay != "0s" else "")


@campaigns.command("list")
@click.pass_context
@guard
def campaigns_list(ctx: click.Context) -> None:
    """List campaigns with their trigger, steps, state and last run (a failed run says why)."""
    from sqlalchemy import select

    from scrm.campaigns.timed import describe_run, last_runs
    from scrm.store.models import Campaign, CampaignRun

    config = load(ctx)
    loaded = load_campaigns(config)

    async def state() -> tuple[set[str], dict[str, CampaignRun]]:
        async with open_store(config) as sessions, sessions() as session:
            paused = set((await session.scalars(select(Campaign.name).where(Campaign.paused))).all())
            return paused, await last_runs(session)

    off, runs = run_async(state())
    table = Table("name", "title", "kind", "trigger", "audience", "steps", "state", "last run", "file")
    for c in loaded:
        d = c.definition
        audience = "groups" if d.audience.groups else d.audience.segment or "the customer"
        table.add_row(d.name, d.title, d.kind, describe_trigger(d), audience, str(len(d.journey)),
                      "paused" if d.name in off else "active", describe_run(runs.get(d.name)), c.path.name)
    out.print(table)
    failed = sorted(name for name, run in runs.items() if run.status == "failed")
    if failed:
        err.print(f"{len(failed)} campaign(s) failed to plan: {', '.join(failed)}")


def _set_paused(ctx: click.Context, name: str, paused: bool) -> None:
    from scrm.campaigns.control import set_paused
    from scrm.clock import SystemClock

    config = load(ctx)
    if name not in {c.definition.name for c in load_campaigns(config)}:
        err.print(f"no campaign {name!r} in {config.campaigns.path}/")
        sys.exit(EXIT_FAILED)

    async def go() -> bool:
        from scrm.service import Service

        service = Service(config)  # syncs campaign files into the store, so a new file can be paused
        try:
            await service.start(scheduler=False)
            async with service.sessions() as session, session.begin():
                return await set_paused(session, name, paused, SystemClock().now())
        finally:
            await service.stop()

    run_async(go())
    out.print(f"{name}: {'paused' if paused else 'resumed'} (running services see it on their next outbox tick)")


@campaigns.command("pause")
@click.argument("name")
@click.pass_context
@guard
def campaigns_pause(ctx: click.Context, name: str) -> None:
    """Stop sending a campaign's deliveries (they wait, planned) until resumed."""
    _set_paused(ctx, name, True)


@campaigns.command("resume")
@click.argument("name")
@click.pass_context
@guard
def campaigns_resume(ctx: click.Context, name: str) -> None:
    """Let a paused campaign send again."""
    _set_paused(ctx, name, False)


@campaigns.command("reload")
@click.pass_context
@guard
def campaigns_reload(ctx: click.Context) -> None:
    """Validate the campaign files; running services pick valid changes up by themselves within seconds."""
    loaded = load_campaigns(load(ctx))
    out.print(f"{len(loaded)} campaign(s) valid; a running `scrm run` reloads changed files within 5 s")


@campaigns.command("preview")
@click.argument("name")
@click.argument("customer", metavar="CUSTOMER")
@click.pass_context
@guard
def campaigns_preview(ctx: click.Context, name: str, customer: str) -> None:
    """Show every step of a campaign as CUSTOMER (#id, channel:id or channel:account:id) would read it
    (on that channel; on the console for #id); nothing is sent."""
    from scrm.campaigns.outbox import preview
    from scrm.customers import CustomerRefError, customer_of, parse_ref

    config = load(ctx)
    loaded = {c.definition.name: c for c in load_campaigns(config)}
    if name not in loaded:
        err.print(f"no campaign {name!r}")
        sys.exit(EXIT_FAILED)

    async def go() -> list[str]:
        async with open_store(config) as sessions, sessions() as session:
            wanted = parse_ref(customer, config.channels)
            found = await customer_of(session, wanted)
            values = {n: p.value for n, p in config.coupons.items()}
            return await preview(session, loaded[name].definition, found, wanted.channel or "console", values)

    try:
        texts = run_async(go())
    except CustomerRefError as exc:
        no_customer(exc)
    for i, text in enumerate(texts, 1):
        out.print(f"[bold]step {i}[/]", highlight=False)
        out.print(text, markup=False, highlight=False)


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




@coupons.command("import")
@click.argument("pool")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--expires", type=click.DateTime(["%Y-%m-%d"]), help="Expiry printed on the codes (else valid_days).")
@click.pass_context
def coupons_import(ctx: click.Context, pool: str, file: Any, expires: Any) -> None:
    """Load a supplier's codes (one per line, or the first CSV column) into POOL; grants use them first."""
    from scrm import coupons as coupon_ops

    config = load(ctx)
    if pool not in config.coupons:
        err.print(f"no coupon pool {pool!r} in the config (known: {', '.join(sorted(config.coupons)) or 'none'})")
        sys.exit(EXIT_FAILED)
    codes = [line.split(",")[0] for line in file if line.strip() and not line.lower().startswith("code")]

    async def go() -> int:
        async with open_store(config) as sessions, sessions() as session, session.begin():
            added = 0
            for i in range(0, len(codes), 1000):
                added += await coupon_ops.import_codes(session, pool, config.coupons[pool], codes[i:i + 1000], expires)
            return added

    added = run_async(go())
    out.print(f"{added} new code(s) in pool {pool} ({len(codes) - added} already known)")
