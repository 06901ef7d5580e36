"""Reports for managers and operators: the same figures as /report, /funnel and /cohort in chat."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.cli.base import (
    EXIT_FAILED,
    err,
    load,
    main,
    open_store,
    out,
    run_async,
)
from scrm.config import Config
from scrm.loyalty.report import care_figures, format_care

T = TypeVar("T")

_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
_PNG = click.option("--png", type=click.Path(dir_okay=False, writable=True, path_type=Path),
                    help="Also write the chart (the PNG the bot sends) to this file.")


def _query(config: Config, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
    async def go() -> T:
        async with open_store(config) as sessions, sessions() as session:
            return await fn(session)

    return run_async(go())


def _emit(text: str, data: dict[str, Any], as_json: bool, png: Path | None, chart: Callable[[], bytes]) -> None:
    if png is not None:
        png.write_bytes(chart())
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        out.print(text, markup=False, highlight=False, soft_wrap=True)


@main.group(invoke_without_command=True)
@click.option("--days", type=click.IntRange(1, 3650), help="Period: the last N days (default 7).")
@click.option("--range", "span", metavar="YYYY-MM-DD..YYYY-MM-DD", help="Period: whole local days, inclusive.")
@_JSON
@_PNG
@click.pass_context
def report(ctx: click.Context, days: int | None, span: str | None, as_json: bool, png: Path | None) -> None:
    """Conversion report with the change against the previous period (the same as /report in chat)."""
    if ctx.invoked_subcommand is not None:
        return
    from scrm import charts, reports
    from scrm.clock import SystemClock
    from scrm.conversations.figures import ConversationFigures, conversation_figures, format_conversations

    if days is not None and span is not None:
        raise click.UsageError("use --days or --range, not both")
    config = load(ctx)
    tz = config.service.timezone
    period = reports.parse_period(span if span is not None else f"{days or 7}d", SystemClock().now(), tz)
    if period is None:
        raise click.BadParameter("use YYYY-MM-DD..YYYY-MM-DD (start on or before end)", param_hint="--range")

    async def fetch(session: AsyncSession) -> tuple[reports.Summary, dict[str, dict[str, int]], dict[str, Any],
                                                    ConversationFigures]:
        summary = await reports.summary(session, period, attribution_days=config.reports.attribution_days)
        return (summary, await reports.daily_trend(session, period, tz), await care_figures(session, period),
                await conversation_figures(session, period.since, period.until, SystemClock().now()))

    summary, trend, care, conversations = _query(config, fetch)
    text = "\n".join(filter(None, [reports.format_summary(summary), format_care(care),
                                   format_conversations(conversations)]))
    _emit(text, {**summary.as_dict(), **care, "conversations": conversations.as_dict()}, as_json, png,
          lambda: charts.trend_png(trend))


@report.command("funnel")
@click.argument("campaign")
@_JSON
@_PNG
@click.pass_context
def report_funnel(ctx: click.Context, campaign: str, as_json: bool, png: Path | None) -> None:
    """A campaign's funnel by A/B variant and channel, with skips by reason (the same as /funnel)."""
    from scrm import charts, reports

    config = load(ctx)
    result = _query(config, lambda s: reports.funnel(s, campaign, config.reports.attribution_days))
    if result is None:
        err.print(f"no deliveries for campaign {campaign!r}", markup=False, highlight=False)
        sys.exit(EXIT_FAILED)
    _emit(reports.format_funnel(result), result.as_dict(), as_json, png, lambda: charts.funnel_png(result))


@report.command("cohort")
@click.option("--weeks", type=click.IntRange(2, 26), default=6, show_default=True)
@_JSON
@_PNG
@click.pass_context
def report_cohort(ctx: click.Context, weeks: int, as_json: bool, png: Path | None) -> None:
    """Weekly acquisition cohorts and their retention (the same as /cohort)."""
    from scrm import charts, reports
    from scrm.clock import SystemClock

    config = load(ctx)
    result = _query(config, lambda s: reports.cohorts(s, SystemClock().now(), config.service.timezone, weeks))
    _emit(reports.format_cohorts(result), result.as_dict(), as_json, png, lambda: charts.cohort_png(result))


@report.command("rollups")
@click.option("--rebuild", is_flag=True, help="Forget every built day first (after editing the store by hand).")
@click.pass_context
def report_rollups(ctx: click.Context, rebuild: bool) -> None:
    """Sum the closed days reports read (what the service's job does every reports.rollup_minutes)."""
    from scrm import rollups
    from scrm.clock import SystemClock

    config = load(ctx)

    async def go() -> int:
        async with open_store(config) as sessions:
            if rebuild:
                async with sessions() as session, session.begin():
                    await rollups.forget_all(session)
            return await rollups.build(sessions, config.service.timezone, SystemClock().now())

    out.print(f"built {run_async(go())} days ({config.service.timezone})", markup=False, highlight=False)
