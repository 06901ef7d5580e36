"""Report commands for managers."""

from __future__ import annotations

import re

from scrm import reports
from scrm.staff import StaffContext, command

_PERIOD = re.compile(r"^(\d{1,3})d$")


def report_days(args: str) -> int | None:
    """``/report`` takes ``7d`` or ``30d`` style periods; None for anything else."""
    if not args:
        return 7
    match = _PERIOD.match(args)
    return int(match.group(1)) if match and int(match.group(1)) > 0 else None


@command("report", {"manager", "admin", "operator"}, "/report [7d|30d]")
async def report(ctx: StaffContext, args: str) -> str:
    days = report_days(args)
    if days is None:
        return "用法 Usage: /report [7d|30d]"
    return reports.format_summary(await reports.summary(ctx.session, ctx.now, days))
