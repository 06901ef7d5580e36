"""Dashboard: the manager's ``/report`` for a period against the one before (figures, stages and their
moves, CSAT/NPS and follow-up completion, conversation response times), the daily trend chart, top
tags and the open follow-up tasks, from the same core functions the chat command and ``scrm report`` use.

The trend chart is its own route: the page reads its figures in one snapshot and answers at once,
and the browser fetches the PNG, which is drawn in a worker thread (:meth:`scrm.messages.Chart.png`)
so a cold matplotlib never holds up the event loop.

Over a large store the figures take seconds to read (a million customers: ~1-2 s), so they and the
chart are kept as snapshots (:mod:`scrm.snapshots`: a minute fresh, then refreshed in the background
while the page shows the last ones, and kept warm for a while after a view) and the page says when
they were read. The top tags, the same for every period, are a snapshot of their own, read beside
the period's figures. The open follow-up tasks are read on every view: they are work to do, and cheap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from scrm import charts, reports
from scrm.console.app import Pages, service, snapshots
from scrm.conversations.figures import ConversationFigures, conversation_figures, duration
from scrm.loyalty import followups
from scrm.loyalty.report import care_figures
from scrm.service import Service
from scrm.store.engine import reading

pages = Pages()
#: Open follow-up tasks listed on the dashboard (the count covers them all).
TASKS_SHOWN = 20
#: Figures in the dashboard's grid, in order; each with the period before.
FIGURES = ("new_customers", "active_customers", "messages_in", "messages_out", "opt_outs", "campaign_sends",
           "coupons_granted", "coupon_redemptions", "conversions", "attributed_conversions")
PERIOD_HINT = "7d, 30d or YYYY-MM-DD..YYYY-MM-DD"
#: The periods the page links to, whose snapshots are kept warm (other periods are read when asked).
KEPT_WARM = ("7d", "30d")


def chosen_period(request: web.Request) -> tuple[str, reports.Period, str | None]:
    """The asked period (``?period=``), or the last 7 days and what was wrong with the asked one (the
    channel codes' page asks the same way)."""
    svc = service(request)
    arg = request.query.get("period", "7d")
    period = reports.parse_period(arg, svc.clock.now(), svc.config.service.timezone)
    if period is not None:
        return arg, period, None
    fallback = reports.parse_period("7d", svc.clock.now(), svc.config.service.timezone)
    assert fallback is not None
    return "7d", fallback, f"Not a period: {arg[:80]!r} ({PERIOD_HINT})"


def _rows(now: dict[str, int], before: dict[str, int]) -> list[tuple[str, int, int]]:
    """(key, now, before) for every key of either, most now first."""
    keys = sorted(set(now) | set(before), key=lambda k: (-now.get(k, 0), k))
    return [(k, now.get(k, 0), before.get(k, 0)) for k in keys]


def _care(figures: dict[str, Any]) -> dict[str, Any]:
    """CSAT/NPS totals and follow-up completion from :func:`care_figures`, for the template."""
    surveys = {kind: section["total"] for kind, section in figures["surveys"].items()}
    rows = figures["followups"]
    return {"surveys": surveys, "tasks": sum(r["tasks"] for r in rows), "done": sum(r["done"] for r in rows),
            "on_time": sum(r["on_time"] for r in rows)}


@dataclass(frozen=True)
class Figures:
    """The period's slow figures, read in one snapshot and kept a short while (:mod:`scrm.snapshots`)."""

    summary: reports.Summary
    care: dict[str, Any]
    care_before: dict[str, Any]
    conversations: ConversationFigures


def period_now(svc: Service, arg: str) -> reports.Period:
    """The period ``arg`` (already checked) stands for now: a snapshot read again later reads the last
    7 days of then."""
    period = reports.parse_period(arg, svc.clock.now(), svc.config.service.timezone)
    assert period is not None
    return period


def _figures(svc: Service, arg: str) -> Callable[[], Awaitable[Figures]]:
    async def read() -> Figures:
        period, now = period_now(svc, arg), svc.clock.now()
        async with reading(svc.sessions) as session:
            return Figures(
                await reports.summary(session, period, attribution_days=svc.config.reports.attribution_days),
                _care(await care_figures(session, period)), _care(await care_figures(session, period.previous())),
                await conversation_figures(session, period.since, period.until, now))

    return read


def _top_tags(svc: Service) -> Callable[[], Awaitable[list[tuple[str, int, int]]]]:
    async def read() -> list[tuple[str, int, int]]:
        async with reading(svc.sessions) as session:
            return await reports.top_tags(session, svc.clock.now())

    return read


@pages.get("/", "manager")
async def dashboard(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    config = svc.config
    arg, _period_now, error = chosen_period(request)
    now = svc.clock.now()
    # The top tags are the same for every period: a snapshot of their own, read beside the period's.
    report, tags = await asyncio.gather(
        snapshots(request).get(("dashboard", arg, config.reports.attribution_days), _figures(svc, arg),
                               warm=arg in KEPT_WARM),
        snapshots(request).get(("top tags",), _top_tags(svc)))
    async with reading(svc.sessions) as session:  # the tasks are work to do: always as they are now
        tasks = await followups.open_tasks(session, None, TASKS_SHOWN)
        open_count, overdue = await followups.open_task_counts(session, now)
    figures = report.value
    summary = figures.summary
    cur, prev = summary.current, summary.previous
    return aiohttp_jinja2.render_template("dashboard.html", request, {
        "summary": summary, "period": arg, "period_error": error, "period_hint": PERIOD_HINT,
        "at": min(report.at, tags.at),
        "current": cur, "previous": prev, "figures": FIGURES, "label": reports.label,
        "stages": _rows(cur.stages, prev.stages), "moves": _rows(cur.stage_moves, prev.stage_moves),
        "by_channel": _rows(cur.new_by_channel, prev.new_by_channel),
        "care": figures.care, "care_before": figures.care_before, "top_tags": tags.value,
        "tasks": followups.task_rows(tasks, now, config.service.timezone), "open_tasks": open_count,
        "overdue_tasks": overdue, "timezone": config.service.timezone,
        "conversations": figures.conversations, "duration": duration,
        "attribution": reports.attribution_rule(summary.attribution_days, "both")})


@pages.get("/charts/trend.png", "manager")
async def trend_chart(request: web.Request) -> web.StreamResponse:
    """The ``/report`` trend chart (new customers, messages in, conversions per local day) as a PNG,
    kept as a snapshot like the page's figures."""
    svc = service(request)
    arg, _period_now, error = chosen_period(request)
    if error:
        raise web.HTTPBadRequest(text=error)

    async def draw() -> bytes:
        async with reading(svc.sessions) as session:
            trend = await reports.daily_trend(session, period_now(svc, arg), svc.config.service.timezone)
        return await charts.chart(charts.trend_png, trend, "both").png()

    png = (await snapshots(request).get(("trend.png", arg), draw, warm=arg in KEPT_WARM)).value
    return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "private, max-age=60"})
