"""Audit log, for admins only: who read or changed whose personal data, newest first, filtered by
customer, staff member and date, a page at a time with the last id seen as the cursor (a page stays
the same while new entries arrive above it).

The filters mean what ``scrm audit --customer --actor --since --until`` means (:func:`scrm.audit.entries`);
dates are whole local days of ``service.timezone``, the zone the times are shown in.
"""

from __future__ import annotations

from datetime import UTC, date, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp_jinja2
from aiohttp import web

from scrm import audit
from scrm.clock import local_midnight
from scrm.console.app import Pages, service
from scrm.customers import CustomerRefError
from scrm.store.engine import reading

pages = Pages()
FILTERS = ("customer", "actor", "since", "until")


def _day(text: str, errors: dict[str, str], field: str) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        errors[field] = f"Not a date: {text[:40]!r} (YYYY-MM-DD)"
        return None


@pages.get("/audit", "admin")
async def audit_page(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    zone = svc.config.service.timezone
    asked = {name: request.query.get(name, "").strip() for name in FILTERS}
    errors: dict[str, str] = {}
    since, until = _day(asked["since"], errors, "since"), _day(asked["until"], errors, "until")
    if since and until and since > until:
        errors["until"] = "The last day comes before the first."
    before_text = request.query.get("before", "")
    before = int(before_text) if before_text.isascii() and before_text.isdigit() and len(before_text) <= 10 else None
    page_size = svc.config.console.page_size
    rows: list[Any] = []
    async with reading(svc.sessions) as session:
        customer_id = None
        if asked["customer"]:
            try:
                customer_id = await audit.customer_filter(session, asked["customer"], svc.config.channels, svc.keyring)
            except CustomerRefError as exc:
                errors["customer"] = str(exc)
        if not errors:
            rows = await audit.entries(
                session, customer_id, local_midnight(since, zone) if since else None, page_size + 1,
                actor=asked["actor"] or None, until=local_midnight(until + timedelta(days=1), zone) if until else None,
                before=before)
        actors = await audit.actors(session)
    more = len(rows) > page_size  # the row beyond the page (the oldest fetched) says there are older ones
    shown = list(reversed(rows[1:] if more else rows))
    filters = {name: value for name, value in asked.items() if value}
    tz = ZoneInfo(zone)
    return aiohttp_jinja2.render_template("audit.html", request, {
        "entries": shown, "asked": asked, "errors": errors, "actors": actors, "timezone": zone,
        "older": {**filters, "before": shown[-1].id} if more else None, "paged": before is not None,
        "filters": filters, "local": lambda at: at.replace(tzinfo=UTC).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")},
        status=400 if errors else 200)
