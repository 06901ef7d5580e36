"""The satisfaction and follow-up part of ``/report`` and ``scrm report``: CSAT/NPS and task completion."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from scrm.loyalty.followups import completion_rates
from scrm.loyalty.surveys import survey_summary
from scrm.reports import Period


async def care_figures(session: AsyncSession, period: Period) -> dict[str, Any]:
    return {"surveys": await survey_summary(session, period.since, period.until),
            "followups": await completion_rates(session, period.since, period.until)}


def format_care(figures: dict[str, Any]) -> str:
    """A few short lines for a phone screen; empty when there was nothing to report."""
    lines = []
    for kind, section in figures["surveys"].items():
        total = section["total"]
        if kind == "nps":
            lines.append(f"NPS {total['nps']} ({total['answers']} answers)")
        else:
            lines.append(f"满意度 CSAT {total['csat']}% · avg {total['average']} ({total['answers']} answers)")
    tasks = sum(row["tasks"] for row in figures["followups"])
    if tasks:
        done = sum(row["done"] for row in figures["followups"])
        on_time = sum(row["on_time"] for row in figures["followups"])
        lines.append(f"跟进 Follow-ups {done}/{tasks} done, {on_time} on time")
    return "\n".join(lines)
