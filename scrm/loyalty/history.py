"""Order history import (``scrm conversions import FILE``): streamed, set-based per batch, idempotent by order id.

Input is JSON Lines (one order per line: ``{"order_id", "customer", "date", "amount", "currency",
"items": [{"sku", "name", "quantity", "price"}]}``) or CSV with one row per line item (columns
order_id, customer, date, amount, currency, sku, name, quantity, price; the order's columns repeat).
``customer`` is a customer reference as everywhere else (``#<id>``, ``<channel>:<id>`` or
``<channel>:<account>:<id>``, see :func:`scrm.customers.parse_ref`). Orders already stored (same
order id, or the same id earlier in the file) are skipped; imported history is marked as seen by the
loyalty sweep, so it earns no points, pays no referral and asks no survey (it happened before the
programme), but it feeds tiers, recommendations and churn scores. It writes no touchpoints and
invalidates no report rollup (orders are counted live, never rolled up).

Why set-based: a brand's history can be millions of orders, and one order at a time (a lookup, an
insert and a flush each) ran at ~350 orders/s. Each chunk of orders is a few statements whatever its
size: one query for the order ids already stored, the customers resolved together
(:func:`scrm.customers.resolve_refs`), then one INSERT ... SELECT each for conversions (returning
their ids), their loyalty marks and their line items. Rows go in as one JSON value
(:func:`scrm.store.dialect.json_rows`) instead of being bound one by one; a worker thread reads and
writes them as JSON (see :func:`import_file`), and the event loop only puts the ids only the store
knows in front of them. Marks and items are not joined to their conversions in the store: PostgreSQL
estimates a JSON value at 100 rows and scanned every conversion for each chunk (~10,000 orders/s).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from json.encoder import encode_basestring
from math import isfinite
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from pydantic_core import from_json
from sqlalchemy import insert, select, true
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scrm.customers import CustomerRef, CustomerRefError, parse_ref, resolve_refs
from scrm.store.dialect import bulk_writes, dialect_of, json_rows, json_values, sqlite_datetime
from scrm.store.models import Conversion, ConversionItem, LoyaltySeenConversion

#: Orders read and parsed at a time (a transaction takes several: ``batch_size``).
CHUNK = 5000
#: Rejected lines kept for the report (the count goes on): a file of bad lines needs no unbounded list.
MAX_REJECTED_LINES = 1000

Line = tuple[int, dict[str, Any] | str]
_CONVERSIONS = Conversion.__table__
_CONVERSION_COLUMNS = tuple(_CONVERSIONS.c[n] for n in ("customer_id", "kind", "order_id", "amount", "currency",
                                                         "created_at"))
_SEEN_COLUMNS = tuple(LoyaltySeenConversion.__table__.c[n] for n in ("conversion_id", "customer_id", "seen_at"))
_ITEM_COLUMNS = tuple(ConversionItem.__table__.c[n] for n in ("conversion_id", "customer_id", "sku", "name", "quantity",
                                                            "price", "created_at"))
#: ``\\u0000`` or half of a surrogate pair in a JSON line: text neither store can keep (checked further).
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89abcdefABCDEF])")
_UNSTORABLE = "a text holds a NUL character or half a UTF-16 surrogate pair"


@dataclass
class ImportResult:
    orders: int = 0
    skipped: int = 0
    items: int = 0
    #: ``line N: reason`` for the first :data:`MAX_REJECTED_LINES` rejected orders.
    rejected: list[str] = field(default_factory=list)
    rejected_count: int = 0

    def reject(self, line_no: int, reason: str) -> None:
        self.rejected_count += 1
        if len(self.rejected) < MAX_REJECTED_LINES:
            self.rejected.append(f"line {line_no}: {reason}")


class Order(NamedTuple):
    """One parsed order, its rows already JSON for :func:`scrm.store.dialect.json_rows` but for the
    ids only the store knows (the customer's, and the conversion's for the items)."""

    line_no: int
    order_id: str
    #: The order id as JSON (the stored-ids query takes a JSON array of them).
    id_json: str
    #: The customer reference as written (the batch's ``refs`` key).
    customer: str
    #: The conversion's row (:data:`_CONVERSION_COLUMNS`) after its customer id and the comma.
    row: str
    #: Its line items' rows (:data:`_ITEM_COLUMNS`) cut where the conversion and customer ids go:
    #: ``ids.join(items)`` is them all, comma-separated (one C call an order, not a string an item).
    items: list[str]
    item_count: int


@dataclass
class ParsedBatch:
    orders: list[Order] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    #: Each reference the orders name, read once.
    refs: dict[str, CustomerRef | CustomerRefError] = field(default_factory=dict)


def _storable(value: Any) -> bool:
    """Whether every text in a parsed JSON value can be stored: PostgreSQL refuses NUL in text and
    neither store's UTF-8 holds a lone surrogate (which JSON's ``\\ud800`` escapes can make)."""
    if isinstance(value, str):
        return "\x00" not in value and (value.isascii() or not any("\ud800" <= c <= "\udfff" for c in value))
    if isinstance(value, dict):
        return all(_storable(k) and _storable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_storable(v) for v in value)
    return True


def _orders_jsonl(handle: TextIO) -> Iterator[Line]:
    for line_no, line in enumerate(handle, 1):
        if line and not line.isspace():
            try:  # pydantic's parser: ~1.5 µs a line less than json's; json says what is wrong, as before
                order = from_json(line)
            except ValueError:
                try:
                    order = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield line_no, f"invalid JSON: {exc.msg}"
                    continue
            yield line_no, (order if _SUSPECT_ESCAPE.search(line) is None or _storable(order) else _UNSTORABLE)


def _orders_csv(handle: TextIO) -> Iterator[Line]:
    """Consecutive rows with the same order_id are one order (files are written order by order)."""
    current: dict[str, Any] | None = None
    start = 0
    for line_no, row in enumerate(csv.DictReader(handle), 2):
        if current is not None and row.get("order_id") != current["order_id"]:
            yield start, current if _storable(current) else _UNSTORABLE
            current = None
        if current is None:
            current, start = {k: row.get(k) for k in ("order_id", "customer", "date", "amount", "currency")}, line_no
            current["items"] = []
        if row.get("sku"):
            current["items"].append({k: row.get(k) for k in ("sku", "name", "quantity", "price")})
    if current is not None:
        yield start, current if _storable(current) else _UNSTORABLE


def read_orders(path: Path, handle: TextIO) -> Iterator[Line]:
    return _orders_csv(handle) if path.suffix.lower() == ".csv" else _orders_jsonl(handle)


def _parse(line_no: int, order: Any, refs: dict[str, CustomerRef | CustomerRefError],
           channels: Mapping[str, Mapping[str, Any]]) -> Order | str:
    """An order checked and written as JSON rows, or why it is rejected. Written for speed (it is most
    of the import's Python): strings go through the json module's C encoder, numbers are finite
    floats (whose repr is JSON) and the date is ASCII, so no json.dumps of a list (~3 µs of set-up
    each) is needed."""
    if not isinstance(order, dict):
        return "not a JSON object"
    get = order.get
    order_id = str(get("order_id") or "").strip()
    if not order_id or len(order_id) > 64:
        return "order_id missing or longer than 64"
    customer = str(get("customer") or "").strip()
    if not customer:
        return "customer missing"
    try:
        when = datetime.fromisoformat(str(get("date") or "").strip())
    except ValueError:
        return f"date {get('date')!r} is not ISO 8601"
    if when.tzinfo is not None:
        when = when.astimezone(UTC).replace(tzinfo=None)
    try:
        amount = float(get("amount") or 0)
    except (TypeError, ValueError):
        amount = float("nan")
    if not isfinite(amount):
        return f"amount {get('amount')!r} is not a number"
    items = get("items") or []
    if not isinstance(items, list):
        return "items is not a list"
    # The date as SQLAlchemy stores it in SQLite (scrm.store.dialect.sqlite_datetime), inlined.
    stamp = when.isoformat(" ", "microseconds")
    rows: dict[str, str] = {}  # one row per SKU: the last one
    for item in items:
        if not isinstance(item, dict):
            continue
        sku = str(item.get("sku") or "").strip()[:64]
        if not sku:
            continue
        name = item.get("name")
        try:
            quantity, price = float(item.get("quantity") or 1), float(item.get("price") or 0)
        except (TypeError, ValueError):
            return "items: a quantity or price is not a number"
        if not (isfinite(quantity) and isfinite(price)):
            return "items: a quantity or price is not a number"
        rows[sku] = (f"{encode_basestring(sku)},{encode_basestring(str(name)[:255]) if name else 'null'},"
                     f'{quantity!r},{price!r},"{stamp}"]')
    if customer not in refs:
        try:
            refs[customer] = parse_ref(customer, channels)
        except CustomerRefError as exc:
            refs[customer] = exc
    id_json = encode_basestring(order_id)
    tails = list(rows.values())
    return Order(line_no, order_id, id_json, customer,
                 f'"order",{id_json},{amount!r},{encode_basestring(str(get("currency") or "CNY")[:3])},"{stamp}"]',
                 ["[", *[tail + ",[" for tail in tails[:-1]], tails[-1]] if tails else [], len(tails))


def parse_batch(lines: list[Line], channels: Mapping[str, Mapping[str, Any]]) -> ParsedBatch:
    """Parse a chunk's orders, customer references included (pure Python, no store: safe to run
    in a worker thread)."""
    batch = ParsedBatch()
    for line_no, raw in lines:
        parsed = raw if isinstance(raw, str) else _parse(line_no, raw, batch.refs, channels)
        if isinstance(parsed, str):
            batch.rejected.append((line_no, parsed))
        else:
            batch.orders.append(parsed)
    return batch


async def import_batch(session: AsyncSession, batch: list[Line], now: datetime, result: ImportResult,
                       channels: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Import orders as :func:`read_orders` gives them in the session's transaction (callers that
    hold their orders in memory; a file goes through :func:`import_file`)."""
    parsed = parse_batch(batch, channels or {})
    await insert_orders(session, await match_orders(session, parsed, result), now, result)


async def match_orders(session: AsyncSession, batch: ParsedBatch, result: ImportResult) -> list[tuple[Order, int]]:
    """The chunk's orders to insert, with their customer ids, in two or three queries.

    In file order, as one order at a time would: an order id stored before, or earlier in the file,
    is skipped (before its customer is looked at); an order whose customer is no one is rejected
    with the words every surface uses; the rest are returned."""
    lines = list(batch.rejected)
    stored: set[str | None] = set()
    if batch.orders:
        stored.update((await session.scalars(
            select(Conversion.order_id).where(Conversion.order_id.in_(json_values(session, "ids"))),
            {"ids": "[" + ",".join([o.id_json for o in batch.orders]) + "]"})).all())
    wanted = {o.customer for o in batch.orders if o.order_id not in stored} if stored else batch.refs.keys()
    refs = {text: batch.refs[text] for text in wanted}
    found = await resolve_refs(session, [r for r in refs.values() if isinstance(r, CustomerRef)])
    customer_of = {text: r if isinstance(r, CustomerRefError) else found[r] for text, r in refs.items()}
    new: list[tuple[Order, int]] = []
    for o in batch.orders:
        if o.order_id in stored:
            result.skipped += 1
            continue
        customer = customer_of[o.customer]
        if isinstance(customer, CustomerRefError):
            lines.append((o.line_no, str(customer)))
            continue
        stored.add(o.order_id)
        new.append((o, customer))
    for line_no, reason in sorted(lines):
        result.reject(line_no, reason)
    return new


async def insert_orders(session: AsyncSession, new: list[tuple[Order, int]], now: datetime, result: ImportResult,
                        store_busy: Callable[[], object] = lambda: None) -> None:
    """Insert matched orders: their conversions, loyalty marks and line items, one statement each. An
    order id another writer stored since the match is skipped (the insert ignores a taken order id,
    and returns the ids of the ones it took). Rows go in by customer, so that the indexes by customer
    take them in sequence. ``store_busy`` is called just before the line items' insert, the longest
    statement, which returns no rows (see :func:`import_file`)."""
    if not new:
        store_busy()
        return
    new = sorted(new, key=itemgetter(1))
    conversion_of = dict((await session.execute(
        dialect_of(session).insert(_CONVERSIONS)
        .from_select([c.name for c in _CONVERSION_COLUMNS], json_rows(session, _CONVERSION_COLUMNS).where(true()))
        .on_conflict_do_nothing(index_elements=["order_id"])
        .returning(_CONVERSIONS.c.order_id, _CONVERSIONS.c.id),
        {"rows": "[" + ",".join([f"[{customer},{o.row}" for o, customer in new]) + "]"})).all())
    seen: list[str] = []
    items: list[str] = []
    stamp = encode_basestring(sqlite_datetime(now))
    for o, customer in new:
        conversion_id = conversion_of.get(o.order_id)
        if conversion_id is None:  # stored by another writer since the match
            result.skipped += 1
            continue
        seen.append(f"[{conversion_id},{customer},{stamp}]")
        if o.items:
            items.append(f"{conversion_id},{customer},".join(o.items))
            result.items += o.item_count
    # The conversions are new: their marks and items cannot conflict with anything stored.
    await session.execute(insert(LoyaltySeenConversion.__table__).from_select(
        [c.name for c in _SEEN_COLUMNS], json_rows(session, _SEEN_COLUMNS)), {"rows": "[" + ",".join(seen) + "]"})
    store_busy()
    if items:
        await session.execute(insert(ConversionItem.__table__).from_select(
            [c.name for c in _ITEM_COLUMNS], json_rows(session, _ITEM_COLUMNS)), {"rows": "[" + ",".join(items) + "]"})
    result.orders += len(seen)


async def import_file(sessions: async_sessionmaker[AsyncSession], path: Path, now: datetime,
                      channels: Mapping[str, Mapping[str, Any]], batch_size: int = 50_000,
                      progress: Callable[[int], None] = lambda done: None) -> ImportResult:
    """Import a whole file, one transaction per ``batch_size`` orders; ``progress`` gets the bytes read.

    A worker thread reads and parses the file :data:`CHUNK` orders at a time, one chunk ahead of the
    one being written, so memory holds two chunks and the event loop only resolves customers and runs
    the statements. The parser runs while the store inserts a chunk's line items and commits (its C
    code runs without the GIL), not beside the other statements: sqlite3 hands the GIL back and forth
    for each row a statement returns, and every handover waited up to 5 ms for a parser holding it (a
    third of the import's time); even the loyalty marks' insert, which returns none, took twice as long
    beside it (~4 s more at a million orders). A process of its own for the parser was slower still on
    two cores (pickling, and a third busy thread).
    Transactions are larger than chunks because on SQLite each commit writes every page the
    transaction touched, and the indexes by customer are touched all over: at a million orders a
    commit of 5,000 orders wrote most of them again. Batches already written stay when a later one
    fails; running the import again skips them."""
    from scrm.importer import CountingReader

    result = ImportResult()
    with path.open("rb") as raw:
        # Progress is told once a chunk is written (told by the reader every 8 KiB, rich's progress
        # bar took a third of the import's time).
        counter = CountingReader(raw, lambda done: None)
        handle = io.TextIOWrapper(io.BufferedReader(counter), encoding="utf-8-sig", newline="")
        lines = read_orders(path, handle)
        size = min(batch_size, CHUNK)

        def next_chunk() -> tuple[int, ParsedBatch] | None:
            chunk = list(islice(lines, size))
            return (len(chunk), parse_batch(chunk, channels)) if chunk else None

        pending = asyncio.create_task(asyncio.to_thread(next_chunk))

        def parse_next() -> None:
            nonlocal pending
            pending = asyncio.create_task(asyncio.to_thread(next_chunk))

        try:
            chunk = await pending
            while chunk is not None:
                async with sessions() as session, session.begin():
                    await bulk_writes(session)
                    taken = 0
                    while chunk is not None and taken < batch_size:
                        new = await match_orders(session, chunk[1], result)
                        await insert_orders(session, new, now, result, parse_next)
                        taken += chunk[0]
                        progress(counter.done)
                        if taken < batch_size:
                            chunk = await pending
                if chunk is not None:  # committed while the next chunk was parsed
                    chunk = await pending
        finally:  # a failed batch: let the reader thread finish before the file closes
            await asyncio.gather(pending, return_exceptions=True)
    progress(counter.done)
    return result
