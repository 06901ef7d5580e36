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
their ids), their loyalty marks and their line items, whose rows go in as one JSON value
(:func:`scrm.store.dialect.json_rows`) instead of being bound one by one. :func:`import_file` reads
and parses the next chunk in a worker thread, down to the rows' JSON, while the current one is
written: the event loop only resolves customers and puts the ids in front of the rows.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import insert, select, true
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scrm.customers import CustomerRef, CustomerRefError, parse_ref, resolve_refs
from scrm.loyalty.recommend import item_rows
from scrm.store.dialect import bulk_writes, dialect_of, json_rows, json_values, sqlite_datetime
from scrm.store.models import Conversion, ConversionItem, LoyaltySeenConversion

#: Orders read and parsed at a time (a transaction takes several: ``batch_size``).
CHUNK = 5000
#: Rejected lines kept for the report (the count goes on): a file of bad lines needs no unbounded list.
MAX_REJECTED_LINES = 1000

Line = tuple[int, dict[str, Any] | str]
_CONVERSION_COLUMNS = tuple(Conversion.__table__.c[n] for n in ("customer_id", "kind", "order_id", "amount", "currency",
                                                               "created_at"))
_SEEN_COLUMNS = tuple(LoyaltySeenConversion.__table__.c[n] for n in ("conversion_id", "customer_id", "seen_at"))
_ITEM_COLUMNS = tuple(ConversionItem.__table__.c[n] for n in ("conversion_id", "customer_id", "sku", "name", "quantity",
                                                            "price", "created_at"))


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


@dataclass(frozen=True)
class Order:
    """One parsed order, its rows already JSON for :func:`scrm.store.dialect.json_rows`, but for the
    ids that only the store knows: ``row`` is the conversion's (:data:`_CONVERSION_COLUMNS`) after its
    customer id, ``items`` its line items' (:data:`_ITEM_COLUMNS`) after conversion and customer ids."""

    line_no: int
    order_id: str
    customer: CustomerRef | CustomerRefError
    row: str
    items: list[str]


@dataclass
class ParsedBatch:
    orders: list[Order] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)


def _orders_jsonl(handle: TextIO) -> Iterator[Line]:
    for line_no, line in enumerate(handle, 1):
        if line.strip():
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_no, f"invalid JSON: {exc.msg}"


def _orders_csv(handle: TextIO) -> Iterator[Line]:
    """Consecutive rows with the same order_id are one order (files are written order by order)."""
    current: dict[str, Any] | None = None
    start = 0
    for line_no, row in enumerate(csv.DictReader(handle), 2):
        if current is not None and row.get("order_id") != current["order_id"]:
            yield start, current
            current = None
        if current is None:
            current, start = {k: row.get(k) for k in ("order_id", "customer", "date", "amount", "currency")}, line_no
            current["items"] = []
        if row.get("sku"):
            current["items"].append({k: row.get(k) for k in ("sku", "name", "quantity", "price")})
    if current is not None:
        yield start, current


def read_orders(path: Path, handle: TextIO) -> Iterator[Line]:
    return _orders_csv(handle) if path.suffix.lower() == ".csv" else _orders_jsonl(handle)


def _json(value: str | None) -> str:
    """A string (or null) as JSON: json.dumps takes a fast path for these, not for lists."""
    return "null" if value is None else json.dumps(value)


def _parse(line_no: int, order: Any, refs: dict[str, CustomerRef | CustomerRefError],
           channels: Mapping[str, Mapping[str, Any]]) -> Order | str:
    if not isinstance(order, dict):
        return "not a JSON object"
    order_id = str(order.get("order_id") or "").strip()
    if not order_id or len(order_id) > 64:
        return "order_id missing or longer than 64"
    customer = str(order.get("customer") or "").strip()
    if not customer:
        return "customer missing"
    try:
        when = datetime.fromisoformat(str(order.get("date") or "").strip())
    except ValueError:
        return f"date {order.get('date')!r} is not ISO 8601"
    if when.tzinfo is not None:
        when = when.astimezone(UTC).replace(tzinfo=None)
    try:
        amount = float(order.get("amount") or 0)
    except (TypeError, ValueError):
        return f"amount {order.get('amount')!r} is not a number"
    if not math.isfinite(amount):
        return f"amount {order.get('amount')!r} is not a number"
    try:
        rows = item_rows(0, 0, when, [i for i in list(order.get("items") or []) if isinstance(i, dict)])
    except (TypeError, ValueError):
        return "items: a quantity or price is not a number"
    if not all(math.isfinite(r["quantity"]) and math.isfinite(r["price"]) for r in rows):
        return "items: a quantity or price is not a number"
    if customer not in refs:
        try:
            refs[customer] = parse_ref(customer, channels)
        except CustomerRefError as exc:
            refs[customer] = exc
    # Rows as JSON arrays without their opening bracket (the ids go in front later), written by hand:
    # a json.dumps of a list costs ~3 µs of set-up each, more than the rest of an order's parsing.
    # Numbers are finite floats, whose repr is JSON; the date is plain ASCII.
    stamp = sqlite_datetime(when)
    currency = str(order.get("currency") or "CNY")[:3]
    return Order(line_no, order_id, refs[customer],
                 f'"order",{_json(order_id)},{amount!r},{_json(currency)},"{stamp}"]',
                 [f'{_json(r["sku"])},{_json(r["name"])},{r["quantity"]!r},{r["price"]!r},"{stamp}"]' for r in rows])


def parse_batch(lines: list[Line], channels: Mapping[str, Mapping[str, Any]]) -> ParsedBatch:
    """Parse a chunk's orders, customer references included (pure Python, no store: safe to run
    in a worker thread)."""
    batch = ParsedBatch()
    refs: dict[str, CustomerRef | CustomerRefError] = {}
    for line_no, raw in lines:
        parsed = raw if isinstance(raw, str) else _parse(line_no, raw, refs, channels)
        if isinstance(parsed, str):
            batch.rejected.append((line_no, parsed))
        else:
            batch.orders.append(parsed)
    return batch


async def import_batch(session: AsyncSession, batch: list[Line], now: datetime, result: ImportResult,
                       channels: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """One transaction's worth of orders: new order ids become conversions with items, marked seen."""
    await write_batch(session, parse_batch(batch, channels or {}), now, result)


async def write_batch(session: AsyncSession, batch: ParsedBatch, now: datetime, result: ImportResult) -> None:
    """Write a parsed chunk in the session's transaction with a few set-based statements."""
    await insert_orders(session, await match_orders(session, batch, result), now, result)


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
            {"ids": json.dumps([o.order_id for o in batch.orders])})).all())
    found = await resolve_refs(session, {o.customer for o in batch.orders
                                         if o.order_id not in stored and isinstance(o.customer, CustomerRef)})
    new: list[tuple[Order, int]] = []
    for o in batch.orders:
        if o.order_id in stored:
            result.skipped += 1
            continue
        customer = o.customer if isinstance(o.customer, CustomerRefError) else found[o.customer]
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
    order id another writer stored since the match is skipped (the insert ignores a taken order id).
    ``store_busy`` is called just before the line items' insert, the longest statement, which returns
    no rows (see :func:`import_file`)."""
    if not new:
        store_busy()
        return
    conversions = Conversion.__table__
    inserted = await session.execute(
        dialect_of(session).insert(conversions)
        .from_select([c.name for c in _CONVERSION_COLUMNS], json_rows(session, _CONVERSION_COLUMNS).where(true()))
        .on_conflict_do_nothing(index_elements=["order_id"]).returning(conversions.c.id, conversions.c.order_id),
        {"rows": "[" + ",".join([f"[{customer},{o.row}" for o, customer in new]) + "]"})
    conversion_of = {order_id: conversion_id for conversion_id, order_id in inserted.all()}
    seen: list[str] = []
    items: list[str] = []
    stamp = json.dumps(sqlite_datetime(now))
    for o, customer in new:
        conversion_id = conversion_of.get(o.order_id)
        if conversion_id is None:  # stored by another writer since the check above
            result.skipped += 1
            continue
        seen.append(f"[{conversion_id},{customer},{stamp}]")
        ids = f"[{conversion_id},{customer},"
        items += [ids + tail for tail in o.items]
    # The conversions are new: their marks and items cannot conflict with anything stored.
    await session.execute(insert(LoyaltySeenConversion.__table__).from_select(
        [c.name for c in _SEEN_COLUMNS], json_rows(session, _SEEN_COLUMNS)), {"rows": "[" + ",".join(seen) + "]"})
    store_busy()
    if items:
        await session.execute(insert(ConversionItem.__table__).from_select(
            [c.name for c in _ITEM_COLUMNS], json_rows(session, _ITEM_COLUMNS)), {"rows": "[" + ",".join(items) + "]"})
    result.orders += len(seen)
    result.items += len(items)


async def import_file(sessions: async_sessionmaker[AsyncSession], path: Path, now: datetime,
                      channels: Mapping[str, Mapping[str, Any]], batch_size: int = 50_000,
                      progress: Callable[[int], None] = lambda done: None) -> ImportResult:
    """Import a whole file, one transaction per ``batch_size`` orders; ``progress`` gets the bytes read.

    A worker thread reads and parses the file :data:`CHUNK` orders at a time, one chunk ahead of the
    one being written, so memory holds two chunks and the event loop only resolves customers and runs
    the statements. The parser runs while the store inserts a chunk's line items and commits (its C
    code runs without the GIL), not beside the shorter statements: each hands the GIL between the
    loop and the driver's thread (and back for each row it returns), and every handover waited up to
    5 ms for a parser holding it (a third of the import's time). A process of its own for the parser
    was slower still on two cores (pickling, and a third busy thread).
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
    return result
