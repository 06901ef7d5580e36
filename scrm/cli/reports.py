"""Reports for managers and operators."""

from __future__ import annotations

import json

import click

from scrm.cli.base import (
    load,
    main,
    open_store,
    out,
    run_async,
)


@main.command()
@click.option("--days", type=click.IntRange(1, 3650), default=7, show_default=True, help="Period length.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def report(ctx: click.Context, days: int, as_json: bool) -> None:
    """Conversion report for the last N days (the same as /report in chat)."""
    from scrm import reports
    from scrm.clock import SystemClock

    config = load(ctx)

    async def go() -> reports.Summary:
        async with open_store(config) as sessions, sessions() as session:
            return await reports.summary(session, SystemClock().now(), days)

    summary = run_async(go())
    if as_json:
        click.echo(json.dumps(summary.as_dict(), ensure_ascii=False, indent=2))
    else:
        out.print(reports.format_summary(summary), markup=False, highlight=False)

