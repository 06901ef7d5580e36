"""Channel codes (渠道活码): ``scrm codes create|update|list|show|disable|image|report``."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.table import Column, Table

from scrm.acquisition import codes, figures, render
from scrm.cli.base import EXIT_FAILED, EXIT_USAGE, cli_actor, err, guard, load, main, out, run_async
from scrm.config import Config

T = TypeVar("T")


@asynccontextmanager
async def _service(config: Config) -> AsyncIterator[Any]:
    """The service without its scheduler: its channels talk to the platforms, its store is migrated."""
    from scrm.service import Service

    service = Service(config)
    await service.start(scheduler=False)
    try:
        yield service
    finally:
        await service.stop()


def _run(config: Config, work: Callable[[Any], Awaitable[T]]) -> T:
    async def go() -> T:
        async with _service(config) as service:
            return await work(service)

    try:
        return run_async(go())
    except codes.CodeProblem as exc:
        err.print(f"[bold red]{exc.field}:[/] {exc.message}", highlight=False)
        sys.exit(EXIT_USAGE if exc.status < 500 else EXIT_FAILED)


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


@main.group("codes")
def codes_group() -> None:
    """Channel codes: QR codes, contact-me ways and deep links with their own figures."""


@codes_group.command("create")
@click.argument("name")
@click.option("--channel", required=True, help="Account as type:name, e.g. wechat:brand, wecom:acme, telegram:main.")
@click.option("--permanent", is_flag=True, help="A permanent code (WeChat: one of the account's 100,000).")
@click.option("--expires", help="Lifetime of a temporary code: 30d (the default), 12h, 90m.")
@click.option("--staff", help="WeCom: staff user ids the code adds, comma-separated.")
@click.option("--groups", help="WeCom: group chat ids for a group join code, comma-separated.")
@click.option("--tags", help="Tags for everyone who comes through it, comma-separated.")
@click.option("--welcome", help="Welcome text (a template: {{ customer.name }}, {{ coupon.code }}).")
@click.option("--campaign", help="A campaign to start for everyone who comes through it.")
@click.option("--coupon", help="A coupon pool: one code per customer, on their first arrival.")
@click.option("--cost", type=float, help="What the code cost (posters, ads), for cost per customer.")
@click.option("--by", help="Who creates it, for the record (default: the OS user).")
@click.pass_context
@guard
def codes_create(ctx: click.Context, name: str, channel: str, permanent: bool, expires: str | None,
                 staff: str | None, groups: str | None, tags: str | None, welcome: str | None,
                 campaign: str | None, coupon: str | None, cost: float | None, by: str | None) -> None:
    """Make the code NAME on the channel's platform and keep it."""
    config = load(ctx)
    try:
        spec = codes.CodeSpec(name, channel, permanent, codes.parse_lifetime(expires) if expires else None,
                              _csv(staff), _csv(groups), _csv(tags), welcome, campaign, coupon, cost)
        codes.check(config, spec, _campaign_names(config))
    except codes.CodeProblem as exc:
        err.print(f"[bold red]{exc.field}:[/] {exc.message}", highlight=False)
        sys.exit(EXIT_USAGE)
    view = _run(config, lambda service: codes.create(service, spec, cli_actor(by)))
    out.print(f"code {view.name} ({view.kind}) on {view.channel}:{view.account}: {view.url}", highlight=False)
    if view.expires_at:
        out.print(f"expires {view.expires_at:%Y-%m-%d %H:%M} UTC")


@codes_group.command("update")
@click.argument("name")
@click.option("--staff", help="WeCom: the staff user ids the code adds from now on, comma-separated.")
@click.option("--groups", help="WeCom: the group chats of a group join code from now on, comma-separated.")
@click.option("--tags", help="Tags from now on, comma-separated (\"\" for none).")
@click.option("--welcome", help="Welcome text from now on (\"\" for none).")
@click.option("--campaign", help="Campaign from now on (\"\" for none).")
@click.option("--coupon", help="Coupon pool from now on (\"\" for none).")
@click.option("--cost", help="What the code cost (\"\" for unknown).")
@click.pass_context
@guard
def codes_update(ctx: click.Context, name: str, staff: str | None, groups: str | None, tags: str | None,
                 welcome: str | None, campaign: str | None, coupon: str | None, cost: str | None) -> None:
    """Change what the code NAME does; the printed code stays the same (WeCom: its staff members change on
    the platform)."""
    config = load(ctx)
    cleared = frozenset(f for f, v in (("welcome", welcome), ("campaign", campaign), ("coupon", coupon),
                                       ("cost", cost)) if v == "")
    try:
        amount = float(cost) if cost else None
    except ValueError:
        err.print(f"[bold red]cost:[/] {cost!r} is not an amount", highlight=False)
        sys.exit(EXIT_USAGE)
    change = codes.CodeChange(
        staff=None if staff is None else _csv(staff), groups=None if groups is None else _csv(groups),
        tags=None if tags is None else _csv(tags), welcome=welcome or None, campaign=campaign or None,
        coupon=coupon or None, cost=amount, clear=cleared)
    view = _run(config, lambda service: codes.change(service, name, change, cli_actor(None)))
    out.print(f"code {view.name} updated: staff {', '.join(view.staff) or '-'}; tags {', '.join(view.tags) or '-'}; "
              f"welcome {'set' if view.welcome else '-'}; campaign {view.campaign or '-'}; coupon {view.coupon or '-'}; "
              f"cost {'-' if view.cost is None else f'{view.cost:g}'}", highlight=False, markup=False)


def _campaign_names(config: Config) -> set[str]:
    from scrm.campaigns.definitions import load_campaigns

    return {c.definition.name for c in load_campaigns(config)}


@codes_group.command("list")
@click.pass_context
@guard
def codes_list(ctx: click.Context) -> None:
    """Every code with its state and the last 30 days' scans and new customers."""
    config = load(ctx)

    async def work(service: Any) -> tuple[list[codes.CodeView], list[figures.CodeFigures]]:
        now = service.clock.now()
        async with service.sessions() as session:
            return (await codes.listing(session, now),
                    await figures.code_figures(session, now - timedelta(days=30), now, config.service.timezone, now))

    views, figs = _run(config, work)
    by_name = {f.name: f for f in figs}
    table = Table("channel", "kind", "state", "expires", "scans 30d", "new 30d", "url")
    table.columns.insert(0, Column("name", no_wrap=True))
    for v in views:
        f = by_name.get(v.name)
        table.add_row(v.name, f"{v.channel}:{v.account}", v.kind, v.state,
                      f"{v.expires_at:%Y-%m-%d}" if v.expires_at else "-", str(f.scans if f else 0),
                      str(f.new_customers if f else 0), v.url)
    out.print(table)


@codes_group.command("show")
@click.argument("name")
@click.pass_context
@guard
def codes_show(ctx: click.Context, name: str) -> None:
    """One code: what it does and its figures since it was made."""
    config = load(ctx)

    async def work(service: Any) -> tuple[codes.CodeView, figures.CodeFigures | None]:
        now = service.clock.now()
        async with service.sessions() as session:
            view = codes.CodeView.of(await codes.find(session, name), now)
            figs = await figures.code_figures(session, view.created_at - timedelta(seconds=1), now,
                                              config.service.timezone, now)
        return view, next((f for f in figs if f.name == name), None)

    view, f = _run(config, work)
    for label, value in (("name", view.name), ("channel", f"{view.channel}:{view.account}"), ("kind", view.kind),
                         ("state", view.state), ("url", view.url), ("staff", ", ".join(view.staff) or "-"),
                         ("tags", ", ".join(view.tags) or "-"), ("welcome", view.welcome or "-"),
                         ("campaign", view.campaign or "-"), ("coupon", view.coupon or "-"),
                         ("cost", "-" if view.cost is None else f"{view.cost:g}"),
                         ("expires", f"{view.expires_at:%Y-%m-%d %H:%M}" if view.expires_at else "never"),
                         ("created", f"{view.created_at:%Y-%m-%d %H:%M} by {view.created_by or '-'}")):
        out.print(f"{label:>9}: {value}", highlight=False, markup=False)
    if f is not None:
        out.print(figures.text(f), highlight=False, markup=False)


@codes_group.command("disable")
@click.argument("name")
@click.pass_context
@guard
def codes_disable(ctx: click.Context, name: str) -> None:
    """Withdraw the code on its platform (where the platform can) and stop honouring it."""
    config = load(ctx)
    view = _run(config, lambda service: codes.disable(service, name, cli_actor(None)))
    out.print(f"code {view.name} disabled")


@codes_group.command("image")
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["png", "svg"]), default="png", show_default=True)
@click.option("--poster", is_flag=True, help="Large enough to print on a poster.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="File to write (default: NAME.png or NAME.svg).")
@click.pass_context
@guard
def codes_image(ctx: click.Context, name: str, fmt: str, poster: bool, output: Path | None) -> None:
    """Draw the code as PNG or SVG."""
    config = load(ctx)

    async def work(service: Any) -> str:
        async with service.sessions() as session:
            return (await codes.find(session, name)).url

    url = _run(config, work)
    path = output or Path(f"{name}.{fmt}")
    path.write_bytes(render.image(url, "svg" if fmt == "svg" else "png", poster=poster))
    out.print(f"wrote {path}")


@codes_group.command("report")
@click.option("--days", type=click.IntRange(1, 3660), default=30, show_default=True)
@click.pass_context
@guard
def codes_report(ctx: click.Context, days: int) -> None:
    """Figures per code: scans, new customers, unfollows, first messages, conversions, revenue, cost."""
    config = load(ctx)

    async def work(service: Any) -> list[figures.CodeFigures]:
        now = service.clock.now()
        async with service.sessions() as session:
            return await figures.code_figures(session, now - timedelta(days=days), now, config.service.timezone, now)

    table = Table(title=f"channel codes, last {days} days")
    table.add_column("code", no_wrap=True)
    for column in ("scans", "new", "again", "left 7d", "wrote", "converted", "revenue", "last-touch", "cost/new",
                   "cost/converted"):
        table.add_column(column, justify="right")
    for f in _run(config, work):
        table.add_row(f.name, str(f.scans), str(f.new_customers), str(f.reengaged), str(f.unfollowed_7d),
                      str(f.first_messages), str(f.converted), f"{f.revenue:,.2f}",
                      f"{f.last_touch_conversions} / {f.last_touch_revenue:,.2f}", _money(f.cost_per_new),
                      _money(f.cost_per_converted))
    out.print(table)


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"
