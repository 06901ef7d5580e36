"""Conversation figures: first-response and resolution times (p50, p90) by staff member and channel,
and the conversations open now. ``/report``, ``scrm report`` and the console dashboard all show
:func:`conversation_figures`.

The times come from the touchpoints :mod:`scrm.conversations.threads` records once per episode:
``conversation_first_response`` (the staff member who answered first; seconds from the customer's
first message to that answer) and ``conversation_resolved`` (seconds from the first message to the
resolve; credited to the conversation's assignee, or to who resolved it when nobody was assigned).
An episode counts in the period its answer or resolve falls in; periods are ``(since, until]`` like
every report. Percentiles are nearest-rank: p90 is the longest of the fastest 90 %, a time that
actually happened. The open and pending counts are the store's state now, whatever the period.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.conversations import threads
from scrm.reports import Lang, display_width
from scrm.store.models import Conversation, Touchpoint

FIRST_RESPONSE = "conversation_first_response"
RESOLVED = "conversation_resolved"

LABELS: dict[str, tuple[str, str]] = {
    "conversations": ("会话", "Conversations"),
    "waiting": ("待回复", "Waiting for staff"),
    "oldest": ("最久", "oldest"),
    "pending": ("待客户", "Waiting for customer"),
    "first_response": ("首次响应", "First response"),
    "resolution": ("解决", "Resolution"),
}


def _label(key: str, lang: Lang) -> str:
    zh, en = LABELS[key]
    return zh if lang == "zh" else en if lang == "en" else f"{zh} {en}"


def percentile(ordered: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of ascending ``ordered``: the smallest value with at least ``p`` % of
    the values at or below it (None for no values)."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Times:
    """How many, and their p50 and p90 in seconds (None when there were none)."""

    count: int = 0
    p50: float | None = None
    p90: float | None = None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Times:
        ordered = sorted(seconds)
        return cls(len(ordered), percentile(ordered, 50), percentile(ordered, 90))

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "p50_seconds": self.p50, "p90_seconds": self.p90}


@dataclass(frozen=True)
class StaffTimes:
    #: A staff identity as in ``[staff]`` (``telegram:42``), or an API key's or console account's actor.
    staff: str
    channel: str
    first_response: Times
    resolution: Times

    def as_dict(self) -> dict[str, Any]:
        return {"staff": self.staff, "channel": self.channel, "first_response": self.first_response.as_dict(),
                "resolution": self.resolution.as_dict()}


@dataclass(frozen=True)
class ConversationFigures:
    since: datetime
    until: datetime
    #: Per staff member and channel, by staff then channel.
    rows: list[StaffTimes]
    first_response: Times
    resolution: Times
    #: Now: conversations waiting for staff (``open``), and for the customer (``pending``).
    open: int
    pending: int
    #: When the longest-waiting open conversation's unanswered message came (None: nobody waits).
    oldest_waiting_since: datetime | None
    #: The moment ``open``, ``pending`` and the oldest wait were read.
    now: datetime

    @property
    def any(self) -> bool:
        """Something to show: a conversation answered or resolved in the period, or one open now."""
        return bool(self.rows or self.open or self.pending)

    @property
    def oldest_wait_seconds(self) -> float | None:
        since = self.oldest_waiting_since
        return None if since is None else max(0.0, (self.now - since).total_seconds())

    def as_dict(self) -> dict[str, Any]:
        return {"since": self.since.isoformat(), "until": self.until.isoformat(),
                "first_response": self.first_response.as_dict(), "resolution": self.resolution.as_dict(),
                "by_staff": [r.as_dict() for r in self.rows], "open": self.open, "pending": self.pending,
                "oldest_waiting_since": self.oldest_waiting_since.isoformat() if self.oldest_waiting_since else None,
                "oldest_wait_seconds": self.oldest_wait_seconds}


def times_query(since: datetime, until: datetime) -> Select[Any]:
    """The period's episode figures: a range over ``ix_touchpoints_created_kind`` (created_at, kind)."""
    return (select(Touchpoint.kind, Touchpoint.actor, Touchpoint.channel, Touchpoint.payload)
            .where(Touchpoint.created_at > since, Touchpoint.created_at <= until,
                   Touchpoint.kind.in_((FIRST_RESPONSE, RESOLVED))))


def _staff(name: str | None) -> str:
    """Chat actors are ``staff:<identity>``; figures name the identity (as assignees do)."""
    return (name or "-").removeprefix("staff:")


def _seconds(payload: Any) -> float | None:
    value = payload.get("seconds") if isinstance(payload, dict) else None
    return float(value) if isinstance(value, int | float) and value >= 0 else None


async def conversation_figures(session: AsyncSession, since: datetime, until: datetime,
                               now: datetime | None = None) -> ConversationFigures:
    """First-response and resolution times in ``(since, until]`` by staff member and channel, with the
    conversations open and pending at ``now`` (default ``until``): three small queries."""
    first: dict[tuple[str, str], list[float]] = {}
    resolved: dict[tuple[str, str], list[float]] = {}
    for kind, actor, channel, payload in (await session.execute(times_query(since, until))).all():
        seconds = _seconds(payload)
        if seconds is None:
            continue
        if kind == FIRST_RESPONSE:
            first.setdefault((_staff(actor), channel), []).append(seconds)
        else:
            owner = payload.get("assignee") or actor
            resolved.setdefault((_staff(owner), channel), []).append(seconds)
    rows = [StaffTimes(staff, channel, Times.of(first.get((staff, channel), [])),
                       Times.of(resolved.get((staff, channel), [])))
            for staff, channel in sorted(set(first) | set(resolved))]
    counts = await threads.counts(session)
    oldest = await session.scalar(select(func.min(Conversation.waiting_since)).where(Conversation.state == "open"))
    return ConversationFigures(
        since, until, rows, Times.of([s for v in first.values() for s in v]),
        Times.of([s for v in resolved.values() for s in v]), counts["open"], counts["pending"],
        oldest, until if now is None else now)


def duration(seconds: float | None) -> str:
    """``42s``, ``12m``, ``3m20s``, ``1h05m``, ``2d3h``: short enough for a phone; ``-`` for none."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        m, rest = divmod(s, 60)
        return f"{m}m{rest:02d}s" if rest else f"{m}m"
    m = round(s / 60)
    if m < 24 * 60:
        h, rest = divmod(m, 60)
        return f"{h}h{rest:02d}m" if rest else f"{h}h"
    h = round(s / 3600)
    d, rest = divmod(h, 24)
    return f"{d}d{rest}h" if rest else f"{d}d"


def _p(times: Times) -> str:
    return f"p50 {duration(times.p50)}  p90 {duration(times.p90)}  ({times.count})"


def format_conversations(f: ConversationFigures, lang: Lang = "both") -> str:
    """A short section for ``/report`` and ``scrm report``; empty when there were no conversations."""
    if not f.any:
        return ""
    waiting = str(f.open)
    if f.oldest_wait_seconds is not None:
        waiting += f"  {_label('oldest', lang)} {duration(f.oldest_wait_seconds)}"
    rows = [(f" {_label('waiting', lang)}", waiting), (f" {_label('pending', lang)}", str(f.pending))]
    if f.first_response.count:
        rows.append((f" {_label('first_response', lang)}", _p(f.first_response)))
    if f.resolution.count:
        rows.append((f" {_label('resolution', lang)}", _p(f.resolution)))
    width = max(display_width(name) for name, _ in rows)
    lines = [f"{_label('conversations', lang)}:"]
    lines += [name + " " * (width - display_width(name)) + "  " + value for name, value in rows]
    short = {"first_response": _label("first_response", "zh" if lang != "en" else "en"),
             "resolution": _label("resolution", "zh" if lang != "en" else "en")}
    for r in f.rows:
        parts = [f"{short[key]} {duration(t.p50)}/{duration(t.p90)} ({t.count})"
                 for key, t in (("first_response", r.first_response), ("resolution", r.resolution)) if t.count]
        lines.append(f"  {r.staff} [{r.channel}] " + " · ".join(parts))
    if f.rows:
        lines.append("  (p50/p90)")
    return "\n".join(lines)
