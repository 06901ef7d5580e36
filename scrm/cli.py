"""The ``scrm`` command line: init, run, chat, and the operator's tools for the store."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from functools import wraps
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scrm.campaigns.definitions import CampaignError, load_campaigns
from scrm.config import Config, ConfigError, load_config

out = Console()
err = Console(stderr=True)
T = TypeVar("T")

EXIT_FAILED = 1
EXIT_USAGE = 2


def demo_file(name: str) -> Path:
    """A file shipped with the demo set: inside the installed package, or the source checkout."""
    packaged = Path(str(resources.files("scrm"))) / "demo" / name
    return packaged if packaged.exists() else Path(__file__).resolve().parent.parent / name


def _load(ctx: click.Context) -> Config:
    path = ctx.obj["config_path"]
    try:
        return load_config(path)
    except ConfigError as exc:
        err.print(f"[bold red]{path}: configuration has {len(exc.problems)} problem(s):[/]", highlight=False)
        for line in exc.problems:
            err.print(f"  {line}", markup=False, highlight=False)
        sys.exit(EXIT_USAGE)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@asynccontextmanager
async def _store(config: Config) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    from scrm.store.engine import make_engine, make_sessionmaker
    from scrm.store.migrate import upgrade

    engine = make_engine(config.store_url, config.store.schema_name)
    try:
        await upgrade(engine)
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()


def _guard(fn: Callable[..., T]) -> Callable[..., T]:
    """Campaign file problems are user errors: print them, no traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except CampaignError as exc:
            err.print(f"[bold red]campaign definitions have {len(exc.problems)} problem(s):[/]")
            for line in exc.problems:
                err.print(f"  {line}", markup=False, highlight=False)
            sys.exit(EXIT_USAGE)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", default="config.toml", envvar="SCRM_CONFIG", show_default=True,
              type=click.Path(dir_okay=False), help="Config file (env SCRM_CONFIG).")
@click.pass_context
def main(ctx: click.Context, config_path: str) -> None:
    """SCRM bot service: capture, tag and nurture customers from chat channels."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@main.command()
@click.option("--force", is_flag=True, help="Overwrite an existing config.toml.")
@click.pass_context
def init(ctx: click.Context, force: bool) -> None:
    """Write a working config.toml (SQLite, console channel, demo campaigns) here."""
    target = Path(ctx.obj["config_path"])
    if target.exists() and not force:
        err.print(f"{target} already exists; use --force to overwrite it")
        sys.exit(EXIT_FAILED)
    shutil.copyfile(demo_file("config.example.toml"), target)
    campaigns = target.parent / "campaigns"
    if not campaigns.exists():
        shutil.copytree(demo_file("campaigns"), campaigns)
    out.print(f"wrote {target} and {campaigns}/ — start with: scrm run")


@main.command()
@click.option("--host", help="Override service.host.")
@click.option("--port", type=int, help="Override service.port.")
@click.pass_context
@_guard
def run(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Serve webhooks and run the scheduler until SIGINT/SIGTERM."""
    from aiohttp import web

    from scrm.web import create_app

    config = _load(ctx)
    host, port = host or config.service.host, config.service.port if port is None else port
    web.run_app(create_app(config), host=host, port=port,
                print=lambda _: out.print(f"scrm serving on http://{host}:{port} (store: {config.store.url})"))


@main.command()
@click.option("--as", "who", required=True, metavar="ROLE:NAME",
              help="Who you are in the chat: customer:alice or manager:bob.")
@click.option("--url", help="Service URL (default: the configured host/port, else an in-process service).")
@click.pass_context
@_guard
def chat(ctx: click.Context, who: str, url: str | None) -> None:
    """Chat with the bot from the terminal; reads one message per line when stdin is not a terminal."""
    from scrm.chat import run_chat, stdin_lines

    role, sep, name = who.partition(":")
    if not sep or role not in ("customer", "manager", "operator", "admin", "staff") or not name:
        raise click.BadParameter("use customer:<name> or manager:<name>", param_hint="--as")
    config = _load(ctx)
    logging.getLogger().setLevel(logging.WARNING)
    lines = None if sys.stdin.isatty() else stdin_lines()
    sys.exit(_run(run_chat(config, name, url, lines, out=click.echo)))


@main.group()
def db() -> None:
    """The customer store's schema."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply the shipped migrations (scrm run also does this at start)."""
    from scrm.store.engine import make_engine
    from scrm.store.migrate import current_revision, upgrade

    config = _load(ctx)

    async def go() -> str | None:
        engine = make_engine(config.store_url, config.store.schema_name)
        try:
            await upgrade(engine)
            return await current_revision(engine)
        finally:
            await engine.dispose()

    out.print(f"store at revision {_run(go())}")


@main.group()
def customers() -> None:
    """Look customers up."""


@customers.command("show")
@click.argument("identity", metavar="CHANNEL:EXTERNAL_ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def customers_show(ctx: click.Context, identity: str, as_json: bool) -> None:
    """The 360° view: identities, tags and their sources, stage, coupons, last touchpoints."""
    from scrm.customers import find_customer
    from scrm.profile import customer_view

    channel, sep, external_id = identity.partition(":")
    if not sep or not external_id:
        raise click.BadParameter("use <channel>:<external id>, e.g. console:alice", param_hint="IDENTITY")
    config = _load(ctx)

    async def go() -> dict[str, Any] | None:
        async with _store(config) as sessions, sessions() as session:
            customer = await find_customer(session, channel, external_id)
            return await customer_view(session, customer) if customer else None

    view = _run(go())
    if view is None:
        err.print(f"no customer with identity {identity}")
        sys.exit(EXIT_FAILED)
    if as_json:
        click.echo(json.dumps(view, ensure_ascii=False, indent=2))
        return
    _print_view(view)


@customers.command("tag", context_settings={"ignore_unknown_options": True})
@click.argument("ref", metavar="CUSTOMER")
@click.argument("changes", nargs=-1, required=True, metavar="+TAG|-TAG...")
@click.option("--by", default="cli", show_default=True, help="Who is making the change (recorded).")
@click.pass_context
def customers_tag(ctx: click.Context, ref: str, changes: tuple[str, ...], by: str) -> None:
    """Add (+vip) or remove (-vip) tags by hand; CUSTOMER is #id or channel:external_id."""
    from scrm import commands
    from scrm.clock import SystemClock
    from scrm.customers import find_by_ref
    from scrm.pipeline import change_tags
    from scrm.service import Service

    parsed = commands.tag_changes(" ".join((ref, *changes)))
    if parsed is None:
        raise click.BadParameter("each change is +tag or -tag", param_hint="CHANGES")
    config = _load(ctx)

    async def go() -> list[str] | None:
        service = Service(config)
        try:
            await service.start(scheduler=False)
            async with service.sessions() as session, session.begin():
                customer = await find_by_ref(session, ref)
                if customer is None:
                    return None
                return await change_tags(service, session, customer, parsed[1], f"operator:{by}", SystemClock().now())
        finally:
            await service.stop()

    done = _run(go())
    if done is None:
        err.print(f"no customer {ref}")
        sys.exit(EXIT_FAILED)
    out.print(f"{ref}: {' '.join(done) or 'no change'}")


def _print_view(view: dict[str, Any]) -> None:
    out.print(f"[bold]{view['display_name'] or '-'}[/] #{view['id']}  stage={view['stage']}  "
              f"opted_out={view['opted_out']}  source={view['acquisition_source']}")
    out.print("identities: " + ", ".join(f"{i['channel']}:{i['account']}:{i['external_id']}" for i in view["identities"]))
    for title, rows, cols in (
        ("Tags", view["tags"], ("name", "source", "detail", "added_at", "expires_at")),
        ("Coupons", view["coupons"], ("code", "pool", "granted_at", "expires_at", "redeemed_at")),
        ("Touchpoints", view["touchpoints"], ("at", "direction", "kind", "campaign", "text")),
    ):
        table = Table(title=title, title_justify="left")
        for col in cols:
            table.add_column(col)
        for row in rows:
            table.add_row(*(_cell(row[c]) for c in cols))
        out.print(table)


def _cell(value: Any, width: int = 40) -> str:
    text = "" if value is None else " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


@main.group()
def campaigns() -> None:
    """Campaign definitions in the campaigns folder."""


@campaigns.command("validate")
@click.pass_context
@_guard
def campaigns_validate(ctx: click.Context) -> None:
    """Check every campaign file; errors name the file, key and problem."""
    loaded = load_campaigns(_load(ctx))
    out.print(f"{len(loaded)} campaign(s) valid")


@campaigns.command("list")
@click.pass_context
@_guard
def campaigns_list(ctx: click.Context) -> None:
    """List campaigns with their trigger and state."""
    from sqlalchemy import select

    from scrm.store.models import Campaign

    config = _load(ctx)
    loaded = load_campaigns(config)

    async def paused() -> set[str]:
        async with _store(config) as sessions, sessions() as session:
            return set((await session.scalars(select(Campaign.name).where(Campaign.paused))).all())

    off = _run(paused())
    table = Table("name", "title", "kind", "trigger", "coupon", "state", "file")
    for c in loaded:
        d = c.definition
        trigger = d.trigger.event + (f":{d.trigger.tag}" if d.trigger.tag else "") + f" +{d.trigger.delay}"
        table.add_row(d.name, d.title, d.kind, trigger, d.coupon.pool if d.coupon else "",
                      "paused" if d.name in off else "active", c.path.name)
    out.print(table)


@main.group()
def segments() -> None:
    """Named segments from the config."""


@segments.command("show")
@click.argument("name")
@click.option("--limit", type=click.IntRange(0, 10_000), default=20, show_default=True, help="Customers to preview.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def segments_show(ctx: click.Context, name: str, limit: int, as_json: bool) -> None:
    """Count a segment's customers and preview some (one SQL query each)."""
    from sqlalchemy import func, select

    from scrm import segments as seg
    from scrm.clock import SystemClock
    from scrm.store.models import Customer

    config = _load(ctx)
    if name not in config.segments:
        err.print(f"no segment {name!r} (configured: {', '.join(sorted(config.segments)) or 'none'})")
        sys.exit(EXIT_FAILED)

    async def go() -> tuple[int, list[Any]]:
        condition = seg.condition(config.segments[name], SystemClock().now(), config.segments)
        async with _store(config) as sessions, sessions() as session:
            total = await session.scalar(select(func.count()).select_from(Customer).where(condition))
            rows = (await session.execute(
                select(Customer.id, Customer.display_name, Customer.stage, Customer.last_seen_at)
                .where(condition).order_by(Customer.id).limit(limit))).all()
            return int(total or 0), list(rows)

    total, rows = _run(go())
    preview = [{"id": r.id, "name": r.display_name, "stage": r.stage, "last_seen_at": r.last_seen_at.isoformat()}
               for r in rows]
    if as_json:
        click.echo(json.dumps({"segment": name, "expression": config.segments[name], "count": total,
                               "preview": preview}, ensure_ascii=False, indent=2))
        return
    out.print(f"[bold]{name}[/]: {total} customer(s)  ({config.segments[name]})", highlight=False)
    table = Table("id", "name", "stage", "last seen")
    for p in preview:
        table.add_row(str(p["id"]), p["name"] or "", p["stage"], p["last_seen_at"])
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

    config = _load(ctx)

    async def go() -> coupon_ops.RedeemOutcome:
        async with _store(config) as sessions, sessions() as session, session.begin():
            now = SystemClock().now()
            result = await coupon_ops.redeem(session, code, now, via="cli")
            if result.status == "redeemed":
                touchpoint(session, customer_id=result.customer_id, channel="cli", account="-", direction="internal",
                           kind="coupon_redeemed", now=now, payload={"code": result.code})
            return result

    result = _run(go())
    (out if result.status == "redeemed" else err).print(result.reply)
    sys.exit(0 if result.status == "redeemed" else EXIT_FAILED)


@main.command()
@click.option("--days", type=click.IntRange(1, 3650), default=7, show_default=True, help="Period length.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def report(ctx: click.Context, days: int, as_json: bool) -> None:
    """Conversion report for the last N days (the same as /report in chat)."""
    from scrm import reports
    from scrm.clock import SystemClock

    config = _load(ctx)

    async def go() -> reports.Summary:
        async with _store(config) as sessions, sessions() as session:
            return await reports.summary(session, SystemClock().now(), days)

    summary = _run(go())
    if as_json:
        click.echo(json.dumps(summary.as_dict(), ensure_ascii=False, indent=2))
    else:
        out.print(reports.format_summary(summary), markup=False, highlight=False)


def _mount_channel_commands() -> None:
    from scrm.channels import channel_types

    for kind, cls in channel_types().items():
        if cls.cli is not None:
            main.add_command(cls.cli, kind)


_mount_channel_commands()
