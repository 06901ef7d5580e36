"""``/reports``: the manager's reports as JSON, read by the functions chat's ``/report``, ``/cohort`` and
``/report codes`` and the console's dashboard read (:mod:`scrm.reports`, :mod:`scrm.acquisition.figures`).
A campaign's funnel is ``GET /campaigns/{name}/funnel``."""

from __future__ import annotations

from datetime import timedelta

from scrm import reports
from scrm.acquisition import figures
from scrm.api import models as m
from scrm.api.codes import code_figures
from scrm.api.framework import ApiError, Call, Endpoint
from scrm.conversations.figures import conversation_figures
from scrm.loyalty.report import care_figures
from scrm.store.engine import reading


async def report_summary(call: Call) -> m.ReportSummary:
    query: m.SummaryQuery = call.query
    svc = call.service
    period = reports.parse_period(query.period, svc.clock.now(), svc.config.service.timezone)
    if period is None:
        problem = "7d, 30d (up to 3650d) or a date range 2026-11-01..2026-11-07"
        raise ApiError(422, "validation_error", f"query.period: {problem}", [{"field": "query.period",
                                                                              "problem": problem}])
    async with reading(svc.sessions) as session:
        summary = await reports.summary(session, period, attribution_days=svc.config.reports.attribution_days)
        care = await care_figures(session, period)
        conversations = await conversation_figures(session, period.since, period.until, svc.clock.now())
    return m.ReportSummary.model_validate({**summary.as_dict(), "care": care, "conversations": conversations.as_dict()})


async def report_cohorts(call: Call) -> m.Cohorts:
    query: m.CohortQuery = call.query
    svc = call.service
    async with reading(svc.sessions) as session:
        found = await reports.cohorts(session, svc.clock.now(), svc.config.service.timezone, query.weeks)
    return m.Cohorts.model_validate(found.as_dict())


async def codes_report(call: Call) -> m.CodeReport:
    query: m.DaysQuery = call.query
    svc = call.service
    now = svc.clock.now()
    since = now - timedelta(days=query.days)
    async with reading(svc.sessions) as session:
        found = await figures.code_figures(session, since, now, svc.config.service.timezone, now)
    return m.CodeReport(since=since.isoformat(timespec="seconds"), until=now.isoformat(timespec="seconds"),
                        days=query.days, codes=[code_figures(f) for f in found])


ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", "/reports/summary", report_summary, "reports:read",
             "The period's figures beside the period before's (chat's /report)", m.ReportSummary,
             query=m.SummaryQuery,
             description="New and active customers, messages, sends, coupons, conversions and revenue (attributed "
                         "by the rule in attribution), stages and their moves; CSAT/NPS and follow-ups; "
                         "conversations' first-response and resolution times."),
    Endpoint("GET", "/reports/cohort", report_cohorts, "reports:read",
             "Weekly acquisition cohorts and their retention (chat's /cohort)", m.Cohorts, query=m.CohortQuery),
    Endpoint("GET", "/reports/codes", codes_report, "reports:read",
             "What each channel code brought: scans, new customers, conversions, revenue, cost per customer",
             m.CodeReport, query=m.DaysQuery,
             description="First-touch figures (the customers a code brought) beside last-touch ones, per code "
                         "and local day; the same figures as `scrm codes report` and /report codes in chat."),
]
