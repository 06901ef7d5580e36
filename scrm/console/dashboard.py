"""Dashboard: the manager's ``/report`` figures for a period against the one before, from the same
report functions the chat command and ``scrm report`` use."""

from __future__ import annotations

import aiohttp_jinja2
from aiohttp import web

from scrm import reports
from scrm.console.app import Pages, service
from scrm.store.engine import reading

pages = Pages()


@pages.get("/", "manager")
async def dashboard(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    config = svc.config
    arg = request.query.get("period", "7d")
    period = reports.parse_period(arg, svc.clock.now(), config.service.timezone)
    error = None
    if period is None:
        error, arg = f"Not a period: {arg!r} (7d, 30d or YYYY-MM-DD..YYYY-MM-DD)", "7d"
        period = reports.parse_period(arg, svc.clock.now(), config.service.timezone)
        assert period is not None
    async with reading(svc.sessions) as session:
        summary = await reports.summary(session, period, attribution_days=config.reports.attribution_days)
    return aiohttp_jinja2.render_template("dashboard.html", request, {
        "summary": summary, "period": arg, "period_error": error, "current": summary.current,
        "previous": summary.previous})
