"""Segments: the configured segments with their counts, a preview of one, and a box for an ad-hoc
expression (the segment language of :mod:`scrm.segments`), all read-only and open to managers.

The counts are one pass over the customers for every segment (:func:`scrm.segments.counts`); a
preview is what ``scrm segments show NAME`` prints (:func:`scrm.segments.preview`): the count and the
first customers by id. Over a million customers a count takes a second or more, so counts are kept
as snapshots (:mod:`scrm.snapshots`) and shown with the time they were read; a configured segment's
preview shows the count of the table above it, and the first customers are listed afresh.

What a preview shows, and why it is not audited: id, display name, stage and when last seen, nothing
else. The display name is the one the person chose on the platform, which staff see on every message
they get in chat; phone numbers, birthdays and other personal fields are never listed, neither masked
nor in full. The audit log records reads of personal data (the 360° card, revealed values, exports),
and a preview reads none, so it writes no entry, like ``scrm segments show``; opening a customer's
card from here is audited where that card is read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from scrm import segments
from scrm.console.app import Pages, service, snapshots
from scrm.service import Service
from scrm.store.engine import reading

pages = Pages()
#: Customers listed in a preview (the count covers them all).
PREVIEW = 20


def _count(svc: Service, texts: dict[str, str]) -> Callable[[], Awaitable[dict[str, int]]]:
    """Counts of the expressions ``texts`` (names to expressions), compiled when they are read: a
    segment's ``days_silent`` counts from then."""

    async def read() -> dict[str, int]:
        configured, now = svc.config.segments, svc.clock.now()
        conditions = {name: segments.condition(text, now, configured) for name, text in texts.items()}
        async with reading(svc.sessions) as session:
            return await segments.counts(session, conditions)

    return read


@pages.get("/segments", "manager")
async def segments_page(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    configured = svc.config.segments
    now = svc.clock.now()
    show, expr = request.query.get("show", ""), request.query.get("expr", "")
    context: dict[str, Any] = {"show": show, "expr": expr, "preview": None, "expr_error": None, "show_error": None,
                               "max_chars": segments.MAX_TYPED, "limit": PREVIEW}
    # Every count is a pass over the customers: kept as snapshots, by the config's segments (and the
    # expression) they count, and shown with the time they were read.
    config_key = tuple(sorted(configured.items()))
    counted = await snapshots(request).get(("segments", config_key), _count(svc, dict(configured)))
    where, total = None, None
    if "expr" in request.query:
        try:
            where = segments.typed(expr, now, configured)
        except segments.ExpressionError as exc:
            context["expr_error"] = str(exc)
        else:
            one = await snapshots(request).get(("segment", expr, config_key), _count(svc, {"expr": expr}), warm=False)
            total, context["preview_at"] = one.value["expr"], one.at
    elif show and show not in configured:
        context["show_error"] = f"No segment {show[:64]!r} in the config."
    elif show:
        where = segments.condition(configured[show], now, configured)
        total, context["preview_at"] = counted.value[show], counted.at
    if where is not None and total is not None:
        async with reading(svc.sessions) as session:
            context["preview"] = (total, await segments.members(session, where, PREVIEW))
    context["segments"] = [(name, configured[name], n) for name, n in counted.value.items()]
    context["at"] = counted.at
    status = 400 if context["expr_error"] else 404 if context["show_error"] else 200
    return aiohttp_jinja2.render_template("segments.html", request, context, status=status)
