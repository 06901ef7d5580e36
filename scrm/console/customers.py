"""Customers: one search box, a page of results at a time, a tag for a whole result, a CSV of it.

What the box reads (:func:`search`), in this order:

- ``#12`` (or ``12``): a store id; ``wechat:oAbC`` / ``wechat:brand:oAbC``: a channel identity;
  ``phone:138…`` or anything shaped like a phone number: the customer with that number, found by
  its keyed hash (never by plaintext). All through :func:`scrm.customers.resolve_refs`, with the
  same words as the CLI and the API for a reference that names no one.
- ``tag:奶粉``, ``stage:active``: customers holding the tag (unexpired) or in the stage.
- a segment expression (``tag('奶粉') and days_silent >= 30``), anything with brackets, comparisons
  or ``and`` / ``or`` / ``not`` / ``in``: compiled by :mod:`scrm.segments`; its error is shown at the box.
- anything else, or ``name:<text>``: display names containing the text (case-insensitive).

Each is one condition on customers, which the list, the bulk tag and the CSV all use. Pages go by
the last id seen (``before`` / ``after``), never by OFFSET: page 20,000 of a million customers costs
what page 1 does. A search that few customers match (a rare name: no index holds parts of names)
reads the customers a window of ids at a time and, past a time budget, shows what it found so far
and where it stopped; the next page goes on from there (:func:`result_page`). The list shows no
count (counting a million rows on every page is the slow part); the bulk-tag confirmation counts, once.

A phone number is shown as its last four digits, to every role: what staff screens, ``scrm customers
show`` and the exports without personal data show (the API's view shows none). A list of results is
not audited, as a segment preview is not (:mod:`scrm.console.segments`); opening a customer is.
"""

from __future__ import annotations

import io
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import aiohttp_jinja2
from aiohttp import web
from sqlalchemy import ColumnElement, exists, false, func, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import exporter, segments
from scrm.audit import audit
from scrm.console.app import Pages, service, staff
from scrm.customers import (
    MAX_ID,
    AmbiguousCustomer,
    BadCustomerRef,
    CustomerRefError,
    parse_ref,
    phone_ref,
    resolve_refs,
)
from scrm.personal import masked_phone
from scrm.service import Service
from scrm.store.dialect import dialect_name
from scrm.store.engine import reading, writing
from scrm.store.models import Customer, CustomerTag, Identity, Tag
from scrm.store.sqlite_driver import statements_in_thread
from scrm.tagging import TAG_NAME, tag_where

pages = Pages()
SearchKind = Literal["all", "id", "identity", "phone", "name", "tag", "stage", "expression"]
#: Text the box treats as a segment expression: brackets, comparisons, or a boolean word.
_EXPRESSION = re.compile(r"[()=<>!]|\b(?:and|or|not|in)\b|^opted_out$")
#: A phone number as people type it: digits with an optional +, spaces, dashes, dots, brackets.
_PHONE = re.compile(r"^\+?[\d\s\-.()]+$")
#: Rows read per query while a CSV streams (each batch one short read, by id).
CSV_BATCH = exporter.CHUNK
#: The longest text the box reads (a segment expression longer than this is not typed by hand).
_BOX_LIMIT = 2000
#: A search reads the customers a window of this many ids at a time (:func:`result_page`)...
SCAN_WINDOW = 100_000
#: ...and a page stops after the window that takes it past this many seconds: a full page or not,
#: its server time stays well under 300 ms over a million customers (a window is ~20-40 ms of
#: names on SQLite), and the next page goes on from where it stopped.
SCAN_BUDGET = 0.15
#: Searches that name one customer (an index look-up: nothing to scan).
_ONE: set[SearchKind] = {"id", "identity", "phone"}


@dataclass(frozen=True)
class Search:
    """What the box asked for, as one condition on customers (``where``), or why it cannot be one:
    ``error`` (the text is wrong: shown at the box) or ``nobody`` (a reference that names no one)."""

    text: str
    kind: SearchKind
    where: ColumnElement[bool]
    error: str | None = None
    nobody: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.nobody is None


def _failed(text: str, kind: SearchKind, error: str | None = None, nobody: str | None = None) -> Search:
    return Search(text, kind, false(), error, nobody)


async def search(session: AsyncSession, svc: Service, text: str, now: datetime) -> Search:
    """Read the box (see the module's docstring) into a condition on customers."""
    text = text.strip()
    config = svc.config
    if not text:
        return Search(text, "all", true())
    if len(text) > _BOX_LIMIT:
        return _failed(text, "expression", f"at most {_BOX_LIMIT} characters, got {len(text)}")
    prefix, sep, rest = text.partition(":")
    prefix = prefix.strip().lower() if sep else ""
    rest = rest.strip()
    if prefix == "name":
        return Search(text, "name", _name_contains(session, rest)) if rest \
            else _failed(text, "name", "name: needs some text to look for")
    if prefix == "stage":
        return Search(text, "stage", Customer.stage == rest) if rest \
            else _failed(text, "stage", "stage: needs the stage's name, e.g. stage:active")
    if prefix == "tag":
        return Search(text, "tag", segments.condition(f"tag({rest!r})", now, config.segments)) \
            if TAG_NAME.match(rest) else _failed(text, "tag", "tag: needs a tag of 1 to 64 characters without spaces")
    digits = text.removeprefix("#")
    is_phone = prefix == "phone" or (_PHONE.match(text) is not None and sum(c.isdigit() for c in text) >= 8)
    if is_phone or (digits.isascii() and digits.isdigit()) or (prefix and prefix in config.channels):
        kind: SearchKind = "phone" if is_phone else "identity" if prefix else "id"
        try:
            ref = phone_ref(rest if prefix == "phone" else text) if is_phone else parse_ref(text, config.channels)
        except BadCustomerRef as exc:
            return _failed(text, kind, str(exc))
        found = (await resolve_refs(session, [ref], svc.keyring))[ref]
        if isinstance(found, (BadCustomerRef, AmbiguousCustomer)):
            return _failed(text, kind, str(found))
        if isinstance(found, CustomerRefError):
            return _failed(text, kind, nobody=str(found))
        return Search(text, kind, Customer.id == found)
    if _EXPRESSION.search(text):
        try:
            return Search(text, "expression", segments.condition(text, now, config.segments))
        except segments.ExpressionError as exc:
            return _failed(text, "expression", str(exc))
    return Search(text, "name", _name_contains(session, text))


def _name_contains(session: AsyncSession, text: str) -> ColumnElement[bool]:
    """Display names containing ``text``, ignoring case. SQLite's LIKE ignores the case of ASCII letters
    and only those, as its lower() lowers only those: the same names as ``lower(name) LIKE lower(text)``
    without lowering every name first (a third of a look at a million names)."""
    if dialect_name(session) == "sqlite":
        return Customer.display_name.contains(text, autoescape=True)
    return Customer.display_name.icontains(text, autoescape=True)


@dataclass(frozen=True)
class Row:
    """A customer as the list shows them."""

    id: int
    name: str | None
    phone: str | None
    stage: str
    opted_out: bool
    last_seen: str
    identities: list[str]
    tags: list[str]


@dataclass(frozen=True)
class ResultPage:
    """A page of results, newest first."""

    rows: list[Row]
    #: More results in the direction the page was read.
    more: bool
    #: The search ran out of time before the page was full: the customers beyond this id (below it on
    #: the way down, above it on the way up) are not searched yet; the next page starts there.
    stopped_at: int | None = None


async def result_page(session: AsyncSession, where: ColumnElement[bool], size: int, before: int | None,
                      after: int | None, zone: str, scan: bool = True, window: int | None = None,
                      budget: float | None = None) -> ResultPage:
    """Newest first: the ``size`` customers below ``before`` (or just above ``after``, for the page
    before), and whether there are more in that direction. Walks the primary key; no OFFSET.

    With ``scan`` (any search but a single customer's reference), the customers are read by id a
    ``window`` of ids at a time (:data:`SCAN_WINDOW`), and once a window ends past ``budget`` seconds
    (:data:`SCAN_BUDGET`) with the page not full the page stops there (``stopped_at``): a name only a
    few customers have is a look at every customer's name, which over a million takes longer than a
    page may. The reader goes on from there with the next page, as from any other.
    """
    window = SCAN_WINDOW if window is None else window
    budget = SCAN_BUDGET if budget is None else budget
    started = time.perf_counter()
    upward = after is not None
    found: list[Customer] = []
    stopped_at = None
    if not scan:
        bounds = [Customer.id > after] if after is not None else [Customer.id < before] if before is not None else []
        found = await _read(session, where, bounds, upward, size + 1)
    else:
        last = int(await session.scalar(select(func.max(Customer.id))) or 0)
        if upward:
            assert after is not None
            low = after + 1
            while low <= last:
                high = low + window
                found += await _read(session, where, [Customer.id >= low, Customer.id < high], True,
                                     size + 1 - len(found))
                if len(found) > size or high > last:
                    break
                low = high
                if time.perf_counter() - started > budget:
                    stopped_at = low - 1
                    break
        else:
            high = min(before, last + 1) if before is not None else last + 1
            while high > 1:
                low = max(high - window, 1)
                found += await _read(session, where, [Customer.id >= low, Customer.id < high], False,
                                     size + 1 - len(found))
                if len(found) > size or low <= 1:
                    break
                high = low
                if time.perf_counter() - started > budget:
                    stopped_at = high
                    break
    more = len(found) > size
    found = found[:size]
    if upward:
        found.reverse()
    ids = [c.id for c in found]
    identities: dict[int, list[str]] = defaultdict(list)
    tags: dict[int, list[str]] = defaultdict(list)
    if ids:
        for cid, channel, external_id in (await session.execute(
                select(Identity.customer_id, Identity.channel, Identity.external_id)
                .where(Identity.customer_id.in_(ids)).order_by(Identity.id))).all():
            identities[cid].append(f"{channel}:{external_id}")
        for cid, name in (await session.execute(
                select(CustomerTag.customer_id, Tag.name).join(Tag, Tag.id == CustomerTag.tag_id)
                .where(CustomerTag.customer_id.in_(ids)).order_by(Tag.name))).all():
            tags[cid].append(name)
    tz = ZoneInfo(zone)
    return ResultPage([Row(c.id, c.display_name, masked_phone(c), c.stage, c.opted_out,
                           c.last_seen_at.replace(tzinfo=UTC).astimezone(tz).strftime("%Y-%m-%d %H:%M"),
                           identities[c.id], tags[c.id]) for c in found], more, stopped_at)


async def _read(session: AsyncSession, where: ColumnElement[bool], bounds: list[ColumnElement[bool]], upward: bool,
                limit: int) -> list[Customer]:
    """Up to ``limit`` matching customers within ``bounds``, by id: ascending ``upward``, else descending."""
    order = Customer.id if upward else Customer.id.desc()
    return list((await session.scalars(select(Customer).where(where, *bounds).order_by(order).limit(limit))).all())


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
                                     scan=found.kind not in _ONE)
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

