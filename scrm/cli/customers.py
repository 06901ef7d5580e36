"""Customers and segments: the 360° view, manual tags, segment counts."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from scrm.cli.base import (
    EXIT_FAILED,
    err,
    load,
    main,
    no_customer,
    open_store,
    out,
    run_async,
)


@main.group()
def customers() -> None:
    """Look customers up."""


@customers.command("show")
@click.argument("ref", metavar="CUSTOMER")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def customers_show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """The 360° view: identities, tags and their sources, stage, coupons, last touchpoints.
    CUSTOMER is #id, channel:id, channel:account:id or phone:<number> (found by its keyed hash).
    Each view is written to the audit log."""
    from scrm.customers import CustomerRefError, find_by_ref
    from scrm.profile import customer_view

    config = load(ctx)

    async def go() -> dict[str, Any]:
        from scrm.audit import audit
        from scrm.cli.base import cli_actor, open_private_store
        from scrm.personal import masked_phone

        async with open_private_store(config) as (sessions, keyring), sessions() as session, session.begin():
            customer = await find_by_ref(session, ref, config.channels, keyring)
            view = await customer_view(session, customer)
            view.update(phone=masked_phone(customer), birthday_md=customer.birthday_md)
            await audit(session, cli_actor(None), "admin", customer.id, "view", "360° view (scrm customers show)",
                        via="cli")
            return view

    from scrm.keyring import KeyringError

    try:
        view = run_async(go())
    except CustomerRefError as exc:
        no_customer(exc)
    except KeyringError as exc:
        err.print(f"privacy keys: {exc}", markup=False)
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
    """Add (+vip) or remove (-vip) tags by hand; CUSTOMER is #id, channel:id or channel:account:id."""
    from scrm.clock import SystemClock
    from scrm.customers import CustomerRefError, find_by_ref
    from scrm.service import Service
    from scrm.tagging import change_tags, tag_changes

    parsed = tag_changes(" ".join((ref, *changes)))
    if parsed is None:
        raise click.BadParameter("each change is +tag or -tag", param_hint="CHANGES")
    config = load(ctx)

    async def go() -> list[str]:
        service = Service(config)
        try:
            await service.start(scheduler=False)
            async with service.sessions() as session, session.begin():
                customer = await find_by_ref(session, ref, config.channels)
                return await change_tags(service, session, customer, parsed[1], f"operator:{by}", SystemClock().now())
        finally:
            await service.stop()

    try:
        done = run_async(go())
    except CustomerRefError as exc:
        no_customer(exc)
    out.print(f"{ref}: {' '.join(done) or 'no change'}")


def _print_view(view: dict[str, Any]) -> None:
    out.print(f"[bold]{view['display_name'] or '-'}[/] #{view['id']}  stage={view['stage']}  "
              f"opted_out={view['opted_out']}  source={view['acquisition_source']}")
    if view.get("phone") or view.get("birthday_md"):
        out.print(f"phone: {view.get('phone') or '-'}  birthday: {view.get('birthday_md') or '-'}", highlight=False)
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
def segments() -> None:
    """Named segments from the config."""


@segments.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def segments_list(ctx: click.Context, as_json: bool) -> None:
    """Every configured segment with its count (one pass over the customers for all of them)."""
    from scrm import segments as seg
    from scrm.clock import SystemClock

    config = load(ctx)

    async def go() -> dict[str, int]:
        now = SystemClock().now()
        conditions = {name: seg.condition(text, now, config.segments) for name, text in config.segments.items()}
        async with open_store(config) as sessions, sessions() as session:
            return await seg.counts(session, conditions)

    found = run_async(go())
    if as_json:
        click.echo(json.dumps([{"segment": name, "expression": config.segments[name], "count": n}
                               for name, n in found.items()], ensure_ascii=False, indent=2))
        return
    table = Table("segment", "customers", "expression")
    for name, n in found.items():
        table.add_row(name, str(n), Text(config.segments[name]))
    out.print(table)


@segments.command("show")
@click.argument("name")
@click.option("--limit", type=click.IntRange(0, 10_000), default=20, show_default=True, help="Customers to preview.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def segments_show(ctx: click.Context, name: str, limit: int, as_json: bool) -> None:
    """Count a segment's customers and preview some (one SQL query each)."""
    from scrm import segments as seg
    from scrm.clock import SystemClock

    config = load(ctx)
    if name not in config.segments:
        err.print(f"no segment {name!r} (configured: {', '.join(sorted(config.segments)) or 'none'})")
        sys.exit(EXIT_FAILED)

    async def go() -> tuple[int, list[seg.Member]]:
        condition = seg.condition(config.segments[name], SystemClock().now(), config.segments)
        async with open_store(config) as sessions, sessions() as session:
            return await seg.preview(session, condition, limit)

    total, members = run_async(go())
    if as_json:
        preview = [{"id": m.id, "name": m.name, "stage": m.stage, "last_seen_at": m.last_seen_at.isoformat()}
                   for m in members]
        click.echo(json.dumps({"segment": name, "expression": config.segments[name], "count": total,
                               "preview": preview}, ensure_ascii=False, indent=2))
        return
    out.print(f"[bold]{name}[/]: {total} customer(s)  ({config.segments[name]})", highlight=False)
    table = Table("id", "name", "stage", "last seen")
    for m in members:
        table.add_row(str(m.id), m.name or "", m.stage, m.last_seen_at.isoformat())
    out.print(table)




@customers.command("merge")
@click.argument("keep_ref", metavar="KEEP")
@click.argument("dup_ref", metavar="DUPLICATE")
@click.option("--by", default="cli", show_default=True, help="Who merges (recorded on the merge touchpoint).")
@click.pass_context
def customers_merge(ctx: click.Context, keep_ref: str, dup_ref: str, by: str) -> None:
    """Fold DUPLICATE into KEEP (#id, channel:id or channel:account:id): identities, tags, touchpoints,
    coupons, orders move."""
    from scrm.clock import SystemClock
    from scrm.customers import CustomerRefError, find_by_ref
    from scrm.identity import merge_customers
    from scrm.service import Service

    config = load(ctx)

    async def go() -> str | None:
        service = Service(config)
        try:
            await service.start(scheduler=False)
            async with service.sessions() as session, session.begin():
                keep = await find_by_ref(session, keep_ref, config.channels)
                dup = await find_by_ref(session, dup_ref, config.channels)
                if keep.id == dup.id:
                    return "both name the same customer"
                await merge_customers(session, keep, dup, f"operator:{by}", SystemClock().now())
                return None
        finally:
            await service.stop()

    try:
        problem = run_async(go())
    except CustomerRefError as exc:
        no_customer(exc)
    if problem:
        err.print(problem)
        sys.exit(EXIT_FAILED)
    out.print(f"{dup_ref} merged into {keep_ref}")
