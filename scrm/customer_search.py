"""Finding customers: one search text read into a condition on customers (:func:`search`), and a page
of them at a time by id (:func:`result_page`). The console's customer list, its bulk tag and CSV, and
the API's ``GET /customers`` all read customers through these.

What the text reads, in this order:

- ``#12`` (or ``12``): a store id; ``wechat:oAbC`` / ``wechat:brand:oAbC``: a channel identity;
  ``phone:138…`` or anything shaped like a phone number: the customer with that number, found by
  its keyed hash (never by plaintext). All through :func:`scrm.customers.resolve_refs`, with the
  same words as the CLI and the API for a reference that names no one.
- ``tag:奶粉``, ``stage:active``: customers holding the tag (unexpired) or in the stage.
- a segment expression (``tag('奶粉') and days_silent >= 30``), anything with brackets, comparisons
  or ``and`` / ``or`` / ``not`` / ``in``: compiled by :mod:`scrm.segments`; its error is shown at the box.
- anything else, or ``name:<text>``: display names containing the text (case-insensitive).

Pages go by the last id seen (``before`` / ``after``), never by OFFSET: page 20,000 of a million
customers costs what page 1 does. A search that few customers match (a rare name: no index holds
parts of names) reads the customers a window of ids at a time and, past a time budget, returns what it
found so far and where it stopped; the next page goes on from there (:func:`result_page`). No count is
read (counting a million rows on every page is the slow part).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, false, func, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import segments
from scrm.customers import (
    AmbiguousCustomer,
    BadCustomerRef,
    CustomerRefError,
    parse_ref,
    phone_ref,
    resolve_refs,
)
from scrm.personal import masked_phone
from scrm.runtime import Runtime
from scrm.store.dialect import dialect_name
from scrm.store.models import Customer, CustomerTag, Identity, Tag
from scrm.tagging import TAG_NAME

SearchKind = Literal["all", "id", "identity", "phone", "name", "tag", "stage", "expression"]
#: Text the box treats as a segment expression: brackets, comparisons, or a boolean word.
_EXPRESSION = re.compile(r"[()=<>!]|\b(?:and|or|not|in)\b|^opted_out$")
#: A phone number as people type it: digits with an optional +, spaces, dashes, dots, brackets.
_PHONE = re.compile(r"^\+?[\d\s\-.()]+$")
#: The longest text the box reads (a segment expression longer than this is not typed by hand).
_BOX_LIMIT = 2000
#: A search reads the customers a window of this many ids at a time (:func:`result_page`)...
SCAN_WINDOW = 100_000
#: ...and a page stops after the window that takes it past this many seconds: a full page or not,
#: its server time stays well under 300 ms over a million customers (a window is ~20-40 ms of
#: names on SQLite), and the next page goes on from where it stopped.
SCAN_BUDGET = 0.15
#: Searches that name one customer (an index look-up: nothing to scan).
ONE: set[SearchKind] = {"id", "identity", "phone"}


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


async def search(session: AsyncSession, svc: Runtime, text: str, now: datetime) -> Search:
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
    #: The same, naive UTC.
    last_seen_at: datetime
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
                           c.last_seen_at, identities[c.id], tags[c.id]) for c in found], more, stopped_at)


async def _read(session: AsyncSession, where: ColumnElement[bool], bounds: list[ColumnElement[bool]], upward: bool,
                limit: int) -> list[Customer]:
    """Up to ``limit`` matching customers within ``bounds``, by id: ascending ``upward``, else descending."""
    order = Customer.id if upward else Customer.id.desc()
    return list((await session.scalars(select(Customer).where(where, *bounds).order_by(order).limit(limit))).all())
