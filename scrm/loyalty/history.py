"""Order history import (``scrm conversions import FILE``): streamed, batched, idempotent by order id.

Input is JSON Lines (one order per line: ``{"order_id", "customer", "date", "amount", "currency",
"items": [{"sku", "name", "quantity", "price"}]}``) or CSV with one row per line item (columns
order_id, customer, date, amount, currency, sku, name, quantity, price; the order's columns repeat).
``customer`` is a customer reference as everywhere else (``#<id>``, ``<channel>:<id>`` or
``<channel>:<account>:<id>``, see :func:`scrm.customers.parse_ref`). Orders already stored (same order id) are
skipped; imported history is marked as seen by the loyalty sweep, so it earns no points, pays no
referral and asks no survey (it happened before the programme), but it feeds tiers, recommendations
and churn scores.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.customers import CustomerRefError, find_by_ref
from scrm.loyalty.recommend import item_rows
from scrm.store.dialect import insert_ignore
from scrm.store.models import Conversion, ConversionItem, LoyaltySeenConversion


@dataclass
class ImportResult:
    orders: int = 0
    skipped: int = 0
    items: int = 0
    rejected: list[str] = field(default_factory=list)


def _orders_jsonl(handle: TextIO) -> Iterator[tuple[int, dict[str, Any] | str]]:
    for line_no, line in enumerate(handle, 1):
        if line.strip():
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_no, f"invalid JSON: {exc.msg}"


def _orders_csv(handle: TextIO) -> Iterator[tuple[int, dict[str, Any] | str]]:
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


def read_orders(path: Path, handle: TextIO) -> Iterator[tuple[int, dict[str, Any] | str]]:
    return _orders_csv(handle) if path.suffix.lower() == ".csv" else _orders_jsonl(handle)


def _parse(order: dict[str, Any]) -> tuple[str, str, datetime, float, str, list[Any]] | str:
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
        from datetime import UTC

        when = when.astimezone(UTC).replace(tzinfo=None)
    try:
        amount = float(order.get("amount") or 0)
    except (TypeError, ValueError):
        return f"amount {order.get('amount')!r} is not a number"
    return order_id, customer, when, amount, str(order.get("currency") or "CNY")[:3], list(order.get("items") or [])


async def import_batch(session: AsyncSession, batch: list[tuple[int, dict[str, Any] | str]], now: datetime,
                       result: ImportResult, channels: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """One transaction's worth of orders: new order ids become conversions with items, marked seen."""
    for line_no, order in batch:
        parsed = order if isinstance(order, str) else _parse(order)
        if isinstance(parsed, str):
            result.rejected.append(f"line {line_no}: {parsed}")
            continue
        order_id, ref, when, amount, currency, items = parsed
        if await session.scalar(select(Conversion.id).where(Conversion.order_id == order_id)) is not None:
            result.skipped += 1
            continue
        try:
            customer = await find_by_ref(session, ref, channels or {})
        except CustomerRefError as exc:
            result.rejected.append(f"line {line_no}: {exc}")
            continue
        conversion = Conversion(customer_id=customer.id, kind="order", order_id=order_id, amount=amount,
                                currency=currency, created_at=when)
        session.add(conversion)
        await session.flush()
        session.add(LoyaltySeenConversion(conversion_id=conversion.id, customer_id=customer.id, seen_at=now))
        rows = item_rows(conversion.id, customer.id, when, [i for i in items if isinstance(i, dict)])
        if rows:
            result.items += await insert_ignore(session, ConversionItem.__table__, rows)
        result.orders += 1
