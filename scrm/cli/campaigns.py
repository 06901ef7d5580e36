"""Campaign files and coupons."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from scrm.campaigns.definitions import (
    CampaignError,
    campaigns_folder,
    check_file,
    describe_trigger,
    load_campaigns,
)
from scrm.cli.base import (
    EXIT_FAILED,
    cli_actor,
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
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_context
@guard
def campaigns_validate(ctx: click.Context, files: tuple[Path, ...]) -> None:
    """Check every campaign file, or only FILES, each as it would load under its name in the campaigns
    folder (a new file beside the others, or a new version of one); errors name the file, key and problem."""
    config = load(ctx)
    if not files:
        out.print(f"{len(load_campaigns(config))} campaign(s) valid")
        return
    folder = campaigns_folder(config)
    problems = [str(p) for file in files for p in check_file(config, folder / file.name, file.read_bytes())[1]]
    if problems:
        raise CampaignError(problems)
    out.print(f"{len(files)} campaign file(s) valid")


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
    table = Table("title", "kind", "trigger", "audience", "steps", "state", "last run", "file")
    table.add_column("name", no_wrap=True)  # what operators type next (pause, preview): never wrapped
    table.columns.insert(0, table.columns.pop())
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


@coupons.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def coupons_list(ctx: click.Context, as_json: bool) -> None:
    """Each pool's codes: issued, redeemed, expired and free (waiting to be given out)."""
    from dataclasses import asdict

    from scrm import coupons as coupon_ops
    from scrm.clock import SystemClock

    config = load(ctx)

    async def go() -> list[coupon_ops.PoolCounts]:
        async with open_store(config) as sessions, sessions() as session:
            return await coupon_ops.pool_counts(session, config.coupons, SystemClock().now())

    pools = run_async(go())
    if as_json:
        click.echo(json.dumps([asdict(p) for p in pools], ensure_ascii=False, indent=2))
        return
    table = Table("pool", "value", "issued", "redeemed", "expired", "free")
    for p in pools:
        free = f"{p.free}" + (" (+ generated)" if p.generate else "")
        table.add_row(p.name + ("" if p.configured else " (not in config)"), f"{p.value:g}", str(p.issued),
                      str(p.redeemed), str(p.expired), free)
    out.print(table)


@coupons.command("redeem")
@click.argument("code")
@click.pass_context
def coupons_redeem(ctx: click.Context, code: str) -> None:
    """Record a redemption at the till (any customer's valid code)."""
    from scrm import coupons as coupon_ops
    from scrm.clock import SystemClock

    config = load(ctx)

    async def go() -> coupon_ops.RedeemOutcome:
        async with open_store(config) as sessions, sessions() as session, session.begin():
            return await coupon_ops.redeem_at_till(session, code, SystemClock().now(), via="cli", actor=cli_actor(None))

    result = run_async(go())
    (out if result.status == "redeemed" else err).print(result.reply)
    sys.exit(0 if result.status == "redeemed" else EXIT_FAILED)


@coupons.command("import")
@click.argument("pool")
@click.argument("file", type=click.File("rb"))
@click.option("--expires", type=click.DateTime(["%Y-%m-%d"]),
              help="Expiry printed on the codes, valid through that day (else valid_days from the grant).")
@click.pass_context
def coupons_import(ctx: click.Context, pool: str, file: Any, expires: Any) -> None:
    """Load a supplier's codes (one per line, or the first CSV column) into POOL; grants use them first.
    A file with a line that is not a code is refused whole."""
    from scrm import coupons as coupon_ops

    config = load(ctx)
    if pool not in config.coupons:
        err.print(f"no coupon pool {pool!r} in the config (known: {', '.join(sorted(config.coupons)) or 'none'})")
        sys.exit(EXIT_FAILED)
    try:
        codes = coupon_ops.parse_codes(file.read())
    except coupon_ops.CodeFileError as exc:
        err.print(f"{file.name}: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(EXIT_FAILED)
    expires_at = coupon_ops.expiry_of(expires.date(), config.service.timezone) if expires else None

    async def go() -> coupon_ops.ImportResult:
        async with open_store(config) as sessions, sessions() as session, session.begin():
            return await coupon_ops.import_codes(session, pool, config.coupons[pool], codes, expires_at)

    out.print(run_async(go()).text, highlight=False)
