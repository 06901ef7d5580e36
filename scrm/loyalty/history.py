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
(:func:`scrm.customers.resolve_refs`); then the inserts of conversions, their loyalty marks and
their line items, one statement each (see :func:`insert_orders`). On SQLite a transaction's orders
go in together, in customer order: the indexes by customer then take each page's new entries at
once, where chunk by chunk each insert found its page anew (a million orders: 55.6 -> ~47 s of CPU).
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import functools
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from math import isfinite
from operator import itemgetter
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, TextIO, cast

from pydantic_core import from_json
from sqlalchemy import Column, Connection, Table, bindparam, func, insert, select, true
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scrm.customers import CustomerRef, CustomerRefError, parse_ref, resolve_refs
from scrm.store.dialect import bulk_writes, dialect_name, json_rows, json_values, sqlite_datetime
from scrm.store.models import Conversion, ConversionItem, LoyaltySeenConversion

#: Orders read and parsed at a time (a transaction takes several: ``batch_size``).
CHUNK = 5000
#: Rejected lines kept for the report (the count goes on): a file of bad lines needs no unbounded list.
MAX_REJECTED_LINES = 1000

Line = tuple[int, dict[str, Any] | str]
_CONVERSIONS, _SEEN, _ITEMS = Conversion.__table__, LoyaltySeenConversion.__table__, ConversionItem.__table__
_CONVERSION_NAMES = ("customer_id", "kind", "order_id", "amount", "currency", "created_at")
_SEEN_NAMES = ("conversion_id", "customer_id", "seen_at")
_ITEM_NAMES = ("conversion_id", "customer_id", "sku", "name", "quantity", "price", "created_at")
#: ``\\u0000`` or half of a surrogate pair in a JSON line: text neither store can keep (checked further).
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89abcdefABCDEF])")
_SUSPECT_ESCAPE_BYTES = re.compile(_SUSPECT_ESCAPE.pattern.encode())
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
    """One parsed order, its rows ready for the store but for the ids only the store knows (the
    customer's, and the conversion's)."""

    line_no: int
    order_id: str
    #: The customer reference as written (the batch's ``refs`` key).
    customer: str
    #: The conversion's row (:data:`_CONVERSION_COLUMNS`) after its id and customer id.
    row: tuple[str, str, float, str, str]
    #: Its line items' rows (:data:`_ITEM_COLUMNS`) after their conversion id and customer id.
    items: list[tuple[str, str | None, float, float, str]]


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


def _orders_jsonl(handle: TextIO | BinaryIO) -> Iterator[Line]:
    """From a binary handle the lines stay UTF-8 bytes: pydantic's parser reads them ~1 µs a line
    faster than text, and they are not decoded first (a UTF-8 byte order mark is left out, as the
    ``utf-8-sig`` codec would; a line that is not UTF-8 raises UnicodeDecodeError, as decoding would)."""
    suspect: Callable[[Any], object] = (_SUSPECT_ESCAPE if isinstance(handle, io.TextIOBase)
                                        else _SUSPECT_ESCAPE_BYTES).search
    lines: Iterable[str | bytes] = handle
    for line_no, line in enumerate(lines, 1):
        if line_no == 1 and isinstance(line, bytes):
            line = line.removeprefix(codecs.BOM_UTF8)
        if line and not line.isspace():
            try:  # pydantic's parser: ~1.5 µs a line less than json's; json says what is wrong, as before
                order = from_json(line)
            except ValueError:
                try:
                    order = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield line_no, f"invalid JSON: {exc.msg}"
                    continue
            yield line_no, (order if suspect(line) is None or _storable(order) else _UNSTORABLE)


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


def read_orders(path: Path, handle: TextIO | BinaryIO) -> Iterator[Line]:
    """The file's orders; a CSV file needs a text handle, JSON Lines takes either."""
    if path.suffix.lower() == ".csv":
        if not isinstance(handle, io.TextIOBase):
            handle = io.TextIOWrapper(cast(BinaryIO, handle), encoding="utf-8-sig", newline="")
        return _orders_csv(cast(TextIO, handle))
    return _orders_jsonl(handle)


def _parse(line_no: int, order: Any, refs: dict[str, CustomerRef | CustomerRefError],
           channels: Mapping[str, Mapping[str, Any]]) -> Order | str:
    """An order checked and written as rows, or why it is rejected (most of the import's Python)."""
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
    rows: dict[str, tuple[str, str | None, float, float, str]] = {}  # one row per SKU: the last one
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
        rows[sku] = (sku, str(name)[:255] if name else None, quantity, price, stamp)
    if customer not in refs:
        try:
            refs[customer] = parse_ref(customer, channels)
        except CustomerRefError as exc:
            refs[customer] = exc
    return Order(line_no, order_id, customer, ("order", order_id, amount, str(get("currency") or "CNY")[:3], stamp),
                 list(rows.values()))


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


@dataclass
class Seen:
    """What a transaction's earlier chunks found, so later ones need not ask the store again."""

    #: Order ids stored, or matched to be inserted.
    order_ids: set[str | None] = field(default_factory=set)
    #: Each customer reference read so far: its customer id, or why it names none.
    customers: dict[str, int | CustomerRefError] = field(default_factory=dict)


async def match_orders(session: AsyncSession, batch: ParsedBatch, result: ImportResult,
                       seen: Seen | None = None) -> list[tuple[Order, int]]:
    """The chunk's orders to insert, with their customer ids, in two or three queries.

    In file order, as one order at a time would: an order id stored before, or earlier in the file
    (``seen``: earlier in the transaction), is skipped (before its customer is looked at); an order
    whose customer is no one is rejected with the words every surface uses; the rest are returned."""
    seen = seen or Seen()
    lines = list(batch.rejected)
    stored = seen.order_ids
    if batch.orders:
        stored.update((await session.scalars(
            select(Conversion.order_id).where(Conversion.order_id.in_(json_values(session, "ids"))),
            {"ids": json.dumps([o.order_id for o in batch.orders if o.order_id not in stored])})).all())
    customer_of = seen.customers
    refs = {o.customer: batch.refs[o.customer] for o in batch.orders
            if o.order_id not in stored and o.customer not in customer_of}
    found = await resolve_refs(session, [r for r in refs.values() if isinstance(r, CustomerRef)])
    customer_of.update({text: r if isinstance(r, CustomerRefError) else found[r] for text, r in refs.items()})
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
    """Insert matched orders: their conversions, loyalty marks and line items, one statement each. Rows
    go in by customer, so that the indexes by customer take them in sequence. ``store_busy`` is
    called when the store's work may run beside the next chunk's parser (see :func:`import_file`).

    SQLite: one executemany each, of plain tuples, with the conversion ids numbered here from the
    largest stored (nothing else writes in the transaction, whose write lock :func:`import_file` holds
    from its start; without that lock, a write since the match fails the insert rather than mixing
    ids up). So no statement returns rows, and none needs the rows as a JSON value, which took as
    much of SQLite's time (json_each, and json_extract for each column) and the parser's to write.
    sqlite3 hands the GIL back and forth for each row, which a parser running beside it would stall,
    so the parser only runs after. PostgreSQL: one INSERT ... SELECT each of the rows as one JSON
    value (a statement of thousands of parameters binds each in Python), the conversions' insert
    ignoring an order id another writer stored since the match, and returning the ids of the ones
    it took."""
    if not new:
        store_busy()
        return
    new = sorted(new, key=itemgetter(1))
    stamp = sqlite_datetime(now)
    if dialect_name(session) == "sqlite":
        connection = await session.connection()
        first = await session.scalar(select(func.max(Conversion.id))) or 0
        ids = range(first + 1, first + 1 + len(new))
        await connection.run_sync(_executemany, _sqlite_insert(_CONVERSIONS, ("id", *_CONVERSION_NAMES)),
                                  [(i, customer, *o.row) for i, (o, customer) in zip(ids, new)])
        await connection.run_sync(_executemany, _sqlite_insert(_SEEN, _SEEN_NAMES),
                                  [(i, customer, stamp) for i, (_, customer) in zip(ids, new)])
        items = [(i, customer, *item) for i, (o, customer) in zip(ids, new) for item in o.items]
        if items:
            await connection.run_sync(_executemany, _sqlite_insert(_ITEMS, _ITEM_NAMES), items)
        store_busy()
        result.orders += len(new)
        result.items += len(items)
        return
    conversion_of: dict[str, int] = dict((await session.execute(
        postgresql.insert(_CONVERSIONS)
        .from_select(_CONVERSION_NAMES, json_rows(session, _columns(_CONVERSIONS, _CONVERSION_NAMES)).where(true()))
        .on_conflict_do_nothing(index_elements=["order_id"])
        .returning(_CONVERSIONS.c.order_id, _CONVERSIONS.c.id),
        {"rows": json.dumps([(customer, *o.row) for o, customer in new], ensure_ascii=False)})).all())
    seen: list[tuple[int, int, str]] = []
    items_pg: list[tuple[Any, ...]] = []
    for o, customer in new:
        conversion_id = conversion_of.get(o.order_id)
        if conversion_id is None:  # stored by another writer since the match
            result.skipped += 1
            continue
        seen.append((conversion_id, customer, stamp))
        items_pg.extend([(conversion_id, customer, *item) for item in o.items])
    # The conversions are new: their marks and items cannot conflict with anything stored.
    await session.execute(insert(_SEEN).from_select(_SEEN_NAMES, json_rows(session, _columns(_SEEN, _SEEN_NAMES))),
                          {"rows": json.dumps(seen)})
    store_busy()
    if items_pg:
        await session.execute(insert(_ITEMS).from_select(_ITEM_NAMES, json_rows(session, _columns(_ITEMS, _ITEM_NAMES))),
                              {"rows": json.dumps(items_pg, ensure_ascii=False)})
    result.orders += len(seen)
    result.items += len(items_pg)


def _columns(table: Table, names: tuple[str, ...]) -> tuple[Column[Any], ...]:
    return tuple(table.c[n] for n in names)


def _executemany(connection: Connection, statement: str, rows: list[tuple[Any, ...]]) -> None:
    """Run from :meth:`AsyncConnection.run_sync`, which, unlike its ``exec_driver_sql``, allows a
    statement that never leaves the event loop (:func:`scrm.store.sqlite_driver.hold_write_lock`)."""
    connection.exec_driver_sql(statement, rows)


@functools.cache
def _sqlite_insert(table: Table, names: tuple[str, ...]) -> str:
    """``INSERT INTO table (names) VALUES (?, ...)`` for an executemany of plain tuples, which SQLAlchemy
    passes to the driver as they are (its own executemany converts each row's values in Python)."""
    return str(insert(table).values({n: bindparam(n) for n in names}).compile(dialect=sqlite.dialect()))


async def import_file(sessions: async_sessionmaker[AsyncSession], path: Path, now: datetime,
                      channels: Mapping[str, Mapping[str, Any]], batch_size: int = 50_000,
                      progress: Callable[[int], None] = lambda done: None) -> ImportResult:
    """Import a whole file, one transaction per ``batch_size`` orders; ``progress`` gets the bytes read.

    A worker thread reads and parses the file :data:`CHUNK` orders at a time, at most one chunk ahead
    of the one being written, so memory holds two chunks and the event loop only resolves customers
    and runs the statements. The parser runs only while the store works without the GIL:
    on PostgreSQL while it inserts a chunk's line items and commits; on SQLite, whose statements run
    on the event loop (below) and take the GIL back for each row, while it commits (every handover
    to a parser holding the GIL waits up to 5 ms, which was a third of the import's time). A process
    of its own for the parser was slower on two cores (pickling, and a third busy thread).
    On SQLite each transaction holds the write lock from its start
    (:func:`scrm.store.sqlite_driver.hold_write_lock`): nothing else writes between the match and the
    inserts, and the statements run on the event loop, without a trip to the driver's thread each.
    Transactions are larger than chunks because on SQLite each commit writes every page the
    transaction touched, and the indexes by customer are touched all over: at a million orders a
    commit of 5,000 orders wrote most of them again. Batches already written stay when a later one
    fails; running the import again skips them."""
    from scrm.importer import CountingReader
    from scrm.store.sqlite_driver import hold_write_lock

    result = ImportResult()
    with path.open("rb") as raw:
        # Progress is told once a chunk is written (told by the reader every 8 KiB, rich's progress
        # bar took a third of the import's time).
        counter = CountingReader(raw, lambda done: None)
        lines = read_orders(path, io.BufferedReader(counter))
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
                    await hold_write_lock(session)
                    await bulk_writes(session)
                    together = dialect_name(session) == "sqlite"
                    seen, matched, taken = Seen(), [], 0
                    while chunk is not None and taken < batch_size:
                        new = await match_orders(session, chunk[1], result, seen)
                        taken += chunk[0]
                        if together:
                            matched += new
                        else:
                            await insert_orders(session, new, now, result, parse_next)
                        progress(counter.done)
                        if taken < batch_size:
                            if together:
                                parse_next()
                            chunk = await pending
                    if together:
                        await insert_orders(session, matched, now, result, parse_next)
                if chunk is not None:  # committed while the next chunk was parsed
                    chunk = await pending
        finally:  # a failed batch: let the reader thread finish before the file closes
            await asyncio.gather(pending, return_exceptions=True)
    progress(counter.done)
    return result
