"""Customers: one search box, a page of results at a time, a tag for a whole result, a CSV of it.

The box and the pages are :mod:`scrm.customer_search` (what the box reads, paging by id, never by
OFFSET, and the time budget of a search few customers match). The list shows no count; the bulk-tag
confirmation counts, once.

A phone number is shown as its last four digits, to every role: what staff screens, ``scrm customers
show`` and the exports without personal data show (the API's view shows none). A list of results is
not audited, as a segment preview is not (:mod:`scrm.console.segments`); opening a customer is.
"""

from __future__ import annotations

import io
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
from aiohttp import web
from sqlalchemy import ColumnElement, exists, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import exporter
from scrm.audit import audit
from scrm.console.app import Pages, service, staff
from scrm.customer_search import ONE, ResultPage, result_page, search
from scrm.customers import MAX_ID
from scrm.store.engine import reading, writing
from scrm.store.models import Customer, CustomerTag, Tag
from scrm.store.sqlite_driver import statements_in_thread
from scrm.tagging import TAG_NAME, tag_where

pages = Pages()
#: Rows read per query while a CSV streams (each batch one short read, by id).
CSV_BATCH = exporter.CHUNK


def cursor(request: web.Request, name: str) -> int | None:
    """A page's cursor from the query: a store id, or None (absent, not a number, beyond any id)."""
    value = request.query.get(name, "")
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 10 and int(value) <= MAX_ID else None


def _href(path: str, **params: Any) -> str:
    given = {k: v for k, v in params.items() if v not in (None, "")}
    return f"{path}?{urlencode(given)}" if given else path


@pages.get("/customers", "manager")
async def customers_page(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    q = request.query.get("q", "")
    before, after = cursor(request, "before"), cursor(request, "after")
    size = svc.config.console.page_size
    page = ResultPage([], False)
    async with reading(svc.sessions) as session:
        found = await search(session, svc, q, svc.clock.now())
        if found.ok:
            page = await result_page(session, found.where, size, before, after, svc.config.service.timezone,
                                     scan=found.kind not in ONE)
    rows = page.rows
    paged = before is not None or after is not None
    older = newer = None
    if page.stopped_at is not None:  # the search goes on from where it stopped, in the direction it read
        if after is None:
            older = _href("/console/customers", q=q, before=page.stopped_at)
            newer = _href("/console/customers", q=q, after=rows[0].id) if rows and paged else None
        else:
            newer = _href("/console/customers", q=q, after=page.stopped_at)
            older = _href("/console/customers", q=q, before=rows[-1].id if rows else after + 1)
    elif rows:
        # "more" is about the direction the page was read in: older rows on the way down (and on the
        # first page), newer ones on the way up; the other direction is where the reader came from.
        has_older, has_newer = (page.more, paged) if after is None else (True, page.more)
        if has_older:
            older = _href("/console/customers", q=q, before=rows[-1].id)
        if has_newer:
            newer = _href("/console/customers", q=q, after=rows[0].id)
    return aiohttp_jinja2.render_template("customers.html", request, {
        "q": q, "search": found, "rows": rows, "older": older, "newer": newer, "paged": paged,
        "stopped_at": page.stopped_at, "upward": after is not None,
        "first": _href("/console/customers", q=q), "csv": _href("/console/customers/export", q=q),
        "timezone": svc.config.service.timezone, "notice": _notice(request)},
        status=400 if found.error else 200)


def _notice(request: web.Request) -> str | None:
    """The outcome of a bulk tag, after its redirect (words fixed here; only the figures and tag vary)."""
    done, tag, count = (request.query.get(k, "") for k in ("done", "tag", "n"))
    if done not in ("add", "remove") or not count.isdigit() or not TAG_NAME.match(tag):
        return None
    if done == "add":
        return f"Tag {tag} added to {count} customer(s). 已为 {count} 位客户添加标签 {tag}。"
    return f"Tag {tag} removed from {count} customer(s). 已为 {count} 位客户移除标签 {tag}。"


async def _bulk_counts(session: AsyncSession, where: ColumnElement[bool], tag: str) -> tuple[int, int]:
    """Customers in the result, and of them those the change would change (who lack the tag, for an
    add; who hold it, for a remove: the second figure of each is ``total - held``, ``held``)."""
    held = exists().where(CustomerTag.customer_id == Customer.id, CustomerTag.tag_id == Tag.id,
                          Tag.name == tag).correlate(Customer)
    total, holding = (await session.execute(
        select(func.count(), func.count().filter(held)).select_from(Customer).where(where))).one()
    return int(total), int(holding)


def _bulk_form(form: Any) -> tuple[str, str, str, str | None]:
    q, tag, op = (str(form.get(k, "")).strip() for k in ("q", "tag", "op"))
    problem = None
    if op not in ("add", "remove"):
        problem = "Choose add or remove."
    elif not TAG_NAME.match(tag):
        problem = "A tag is 1 to 64 characters without spaces. 标签为 1-64 个非空白字符。"
    return q, tag, op, problem


@pages.get("/customers/tag", "operator")
async def bulk_tag_confirm(request: web.Request) -> web.StreamResponse:
    """How many customers the change would touch, and a button to make it (nothing is written here)."""
    svc = service(request)
    q, tag, op, problem = _bulk_form(request.query)
    total = changes = 0
    async with reading(svc.sessions) as session:
        found = await search(session, svc, q, svc.clock.now())
        if found.ok and problem is None:
            total, holding = await _bulk_counts(session, found.where, tag)
            changes = total - holding if op == "add" else holding
    problem = problem or found.error or found.nobody
    return aiohttp_jinja2.render_template("customers_tag.html", request, {
        "q": q, "tag": tag, "op": op, "problem": problem, "total": total, "changes": changes,
        "back": _href("/console/customers", q=q)}, status=400 if problem else 200)


@pages.post("/customers/tag", "operator")
async def bulk_tag(request: web.Request) -> web.StreamResponse:
    """One set-based change for the whole result (:func:`scrm.tagging.tag_where`), recorded per customer
    as ``scrm customers tag`` records it, then back to the result with how many changed."""
    svc = service(request)
    q, tag, op, problem = _bulk_form(await request.post())
    if problem is not None:
        raise web.HTTPSeeOther(_href("/console/customers/tag", q=q, tag=tag, op=op))
    now = svc.clock.now()
    async with writing(svc.sessions) as session:
        await statements_in_thread(session)  # over a large result the statements take a while: off the loop
        found = await search(session, svc, q, now)
        if not found.ok:
            raise web.HTTPSeeOther(_href("/console/customers/tag", q=q, tag=tag, op=op))
        changed = await tag_where(svc, session, found.where, tag, op == "add", staff(request).actor, now)
    if changed and op == "add":
        svc.wake_outbox()  # a tag_added campaign may have been planned
    raise web.HTTPSeeOther(_href("/console/customers", q=q, done=op, tag=tag, n=changed))


@pages.get("/customers/export", "operator")
async def export_csv(request: web.Request) -> web.StreamResponse:
    """The result as CSV (the columns of ``scrm customers export``, phone as its last four digits),
    streamed: a batch of rows at a time, each read by id after the last, so memory and each read stay
    small for a million rows. One audit entry records who took which result."""
    svc = service(request)
    who = staff(request)
    q = request.query.get("q", "")
    now = svc.clock.now()
    async with reading(svc.sessions) as session:
        found = await search(session, svc, q, now)
    if not found.ok:
        raise web.HTTPSeeOther(_href("/console/customers", q=q))
    async with writing(svc.sessions) as session:
        await audit(session, who.actor, who.role, None, "export",
                    f"console customers CSV, search {q.strip()[:200]!r}" if q.strip() else "console customers CSV, all",
                    via="console", at=now)
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="customers-{now:%Y%m%d-%H%M}.csv"',
        "Cache-Control": "no-store"})
    await response.prepare(request)
    buffer = io.StringIO()
    buffer.write("\ufeff")  # a BOM: spreadsheet programs then read the UTF-8 names correctly
    writer = exporter.Writer(buffer, "csv", exporter.customer_columns(with_personal=False))
    query = exporter.customers_query(found.where).limit(CSV_BATCH)
    last = 0
    while True:
        async with reading(svc.sessions) as session:
            rows = (await session.execute(query.where(Customer.id > last))).all()
        for row in rows:
            writer.write(exporter.customer_record(row))
        await response.write(buffer.getvalue().encode("utf-8"))
        buffer.seek(0)
        buffer.truncate()
        if len(rows) < CSV_BATCH:
            break
        last = rows[-1].id
    await response.write_eof()
    return response

