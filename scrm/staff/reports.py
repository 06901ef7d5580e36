"""Report commands for managers: /report, /funnel, /cohort, /top, /customer, /digest.

Answers are short enough for a phone; where a picture reads better a PNG chart goes with the text.
Labels follow the staff member's locale when the channel tells it, otherwise both languages.
"""

from __future__ import annotations

import re
from datetime import timedelta

from scrm import charts, digests, reports
from scrm.acquisition import figures
from scrm.audit import audit
from scrm.config import Role
from scrm.conversations.figures import conversation_figures, format_conversations
from scrm.loyalty.report import care_figures, format_care
from scrm.profile import customer_view
from scrm.staff import StaffContext, StaffReply, command, customer_arg

ALL: set[Role] = {"manager", "admin", "operator"}
REPORT_USAGE = "/report [7d|30d|YYYY-MM-DD..YYYY-MM-DD]  |  /report codes [days]"
DIGEST_USAGE = "/digest daily|weekly HH:MM  |  /digest off"
_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


def staff_locale(ctx: StaffContext) -> str | None:
    """The locale a channel passed along (Telegram's language_code), if any."""
    for key in ("locale", "language_code"):
        value = ctx.event.payload.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _lang(ctx: StaffContext) -> reports.Lang:
    return reports.lang_of(staff_locale(ctx))


@command("report", ALL, REPORT_USAGE, reads_only=True)
async def report(ctx: StaffContext, args: str) -> StaffReply:
    config = ctx.service.config
    if args.strip().startswith("codes"):
        return await _codes(ctx, args.strip()[5:].strip())
    period = reports.parse_period(args, ctx.now, config.service.timezone)
    if period is None:
        return StaffReply(f"用法 Usage: {REPORT_USAGE}")
    lang = _lang(ctx)
    summary = await reports.summary(ctx.session, period, attribution_days=config.reports.attribution_days)
    trend = await reports.daily_trend(ctx.session, period, config.service.timezone)
    conversations = await conversation_figures(ctx.session, period.since, period.until, ctx.now)
    text = "\n".join(filter(None, [reports.format_summary(summary, lang),
                                   format_care(await care_figures(ctx.session, period)),
                                   format_conversations(conversations, lang)]))
    return StaffReply(text, (charts.chart(charts.trend_png, trend, lang),))


async def _codes(ctx: StaffContext, args: str) -> StaffReply:
    """``/report codes [days]``: what each channel code brought (scrm.acquisition.figures), with a chart."""
    days = int(args) if args.isdecimal() and 1 <= int(args) <= 366 else 30 if not args else 0
    if not days:
        return StaffReply(f"用法 Usage: {REPORT_USAGE}")
    found = await figures.code_figures(ctx.session, ctx.now - timedelta(days=days), ctx.now,
                                       ctx.service.config.service.timezone, ctx.now)
    text = figures.report_text(found, days)
    if not any(f.new_customers for f in found):
        return StaffReply(text)
    return StaffReply(text, (charts.chart(figures.chart_png, found, days),))


@command("funnel", ALL, "/funnel <campaign>", reads_only=True)
async def funnel(ctx: StaffContext, args: str) -> StaffReply:
    name = args.strip()
    if not name or " " in name:
        return StaffReply("用法 Usage: /funnel <campaign>")
    lang = _lang(ctx)
    result = await reports.funnel(ctx.session, name, ctx.service.config.reports.attribution_days)
    if result is None:
        return StaffReply(f"{reports.label('funnel', lang)}: {name}: {reports.label('no_data', lang)}")
    return StaffReply(reports.format_funnel(result, lang), (charts.chart(charts.funnel_png, result, lang),))


@command("cohort", ALL, "/cohort [weeks]", reads_only=True)
async def cohort(ctx: StaffContext, args: str) -> StaffReply:
    weeks = int(args) if args.strip().isdecimal() and 2 <= int(args) <= 12 else 6
    lang = _lang(ctx)
    result = await reports.cohorts(ctx.session, ctx.now, ctx.service.config.service.timezone, weeks)
    return StaffReply(reports.format_cohorts(result, lang), (charts.chart(charts.cohort_png, result, lang),))


@command("top", ALL, "/top tags", reads_only=True)
async def top(ctx: StaffContext, args: str) -> str:
    if args.strip().lower() not in ("", "tags"):
        return "用法 Usage: /top tags"
    return reports.format_top_tags(await reports.top_tags(ctx.session, ctx.now), _lang(ctx))


@command("customer", ALL, "/customer <#id|channel:id|channel:account:id>")
async def customer(ctx: StaffContext, args: str) -> str:
    if not args.strip():
        return "用法 Usage: /customer <#id|channel:id|channel:account:id>"
    found = await customer_arg(ctx, args.strip())
    await audit(ctx.session, ctx.actor, ctx.role, found.id, "view", "/customer", at=ctx.now)
    return reports.format_customer(await customer_view(ctx.session, found), _lang(ctx))


@command("digest", {"manager", "admin"}, DIGEST_USAGE)
async def digest(ctx: StaffContext, args: str) -> str:
    event, config = ctx.event, ctx.service.config
    parts = args.split()
    if parts == ["off"]:
        removed = await digests.unsubscribe(ctx.session, event.channel, event.account, event.external_id)
        return "已退订报表 Digest off" if removed else "没有订阅 No digest subscribed"
    if len(parts) != 2 or parts[0] not in digests.PERIOD_DAYS or not (match := _HHMM.match(parts[1])):
        return f"用法 Usage: {DIGEST_USAGE}"
    at = f"{int(match.group(1)):02d}:{match.group(2)}"
    row = await digests.subscribe(ctx.session, event.channel, event.account, event.external_id, parts[0], at,
                                  staff_locale(ctx), ctx.now, config.service.timezone)
    return f"已订阅 Digest {row.frequency} {row.at} ({config.service.timezone}); next {row.next_at:%Y-%m-%d %H:%M} UTC"
