"""The order history import, set-based per batch (issue 21, item 4), on SQLite and PostgreSQL: the same
outcome as one order at a time, whatever the batch size — file order decides repeats, stored ids are
skipped before their customer is looked at, rejects keep their line numbers — and the same rows:
conversions with their dates, loyalty marks (so the sweep pays nothing for history) and line items."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select

from scrm.clock import ManualClock
from scrm.customers import CustomerRef
from scrm.loyalty import jobs
from scrm.loyalty.history import (
    MAX_REJECTED_LINES,
    ImportResult,
    import_batch,
    import_file,
    parse_batch,
    read_orders,
)
from scrm.service import Service
from scrm.store.models import (
    Conversion,
    ConversionItem,
    Customer,
    Identity,
    LoyaltySeenConversion,
    Touchpoint,
)
from tests.conftest import cli_env
from tests.test_loyalty import LOYALTY

NOW = datetime(2026, 11, 27, 3, 0)
CHANNELS = {"console": {"local": {}}}


@pytest.fixture
async def svc(make_config):
    service = Service(make_config(LOYALTY), ManualClock(NOW))
    await service.start(scheduler=False)
    async with service.sessions() as s, s.begin():
        for c in (1, 2, 3):
            s.add(Customer(id=c, display_name=f"c{c}", first_seen_at=NOW - timedelta(days=500), last_seen_at=NOW,
                           attributes={}))
        await s.flush()
        s.add(Identity(customer_id=2, channel="console", account="local", external_id="bo", created_at=NOW))
    yield service
    await service.stop()


def order(order_id: str, customer: str, date: str = "2026-03-01T10:00:00", amount: Any = 10,
          items: list[dict[str, Any]] | None = None, **extra: Any) -> str:
    return json.dumps({"order_id": order_id, "customer": customer, "date": date, "amount": amount,
                       "items": items or [], **extra}, ensure_ascii=False)


LINES = [
    order("A1", "#1", "2026-03-01T18:30:00+08:00", 120.5, [
        {"sku": "A", "name": "奶粉", "quantity": 1, "price": 100},
        {"sku": "A", "name": "奶粉 again", "quantity": 2, "price": 50},  # one row per SKU: the last one
        {"sku": " ", "name": "no SKU"}, {"sku": "B", "name": "奶瓶", "quantity": "2", "price": "10.25"}],
        currency="USD"),
    order("A2", "console:local:bo", items=[{"sku": "C", "name": "辅食"}]),
    order("A1", "#2"),                       # repeat of line 1's id: skipped, whoever it names
    order("A3", "console:nobody"),           # no one: rejected, and its id stays free ...
    order("A3", "console:bo"),               # ... for this later line
    "not json",
    "[1, 2]",
    order("A4", "#3", amount="NaN"),
    order("", "#3"),
    order("A5", "#3", date="yesterday"),
    order("A6", "#3", items=[{"sku": "D", "quantity": "lots"}]),
    order("A7", "#999"),
    order("A8", "#3", "2026-04-02"),
]
REJECTED = ["line 4: no customer console:nobody", "line 6: invalid JSON: Expecting value",
            "line 7: not a JSON object", "line 8: amount 'NaN' is not a number",
            "line 9: order_id missing or longer than 64", "line 10: date 'yesterday' is not ISO 8601",
            "line 11: items: a quantity or price is not a number", "line 12: no customer #999"]


async def stored(service: Any) -> dict[str, Any]:
    async with service.sessions() as s:
        conversions = {c.order_id: (c.customer_id, c.kind, c.amount, c.currency, c.created_at, c.campaign,
                                    c.coupon_code)
                       for c in (await s.scalars(select(Conversion))).all()}
        seen = {(r.conversion_id, r.customer_id, r.seen_at)
                for r in (await s.scalars(select(LoyaltySeenConversion))).all()}
        ids = {c.id: c.order_id for c in (await s.scalars(select(Conversion))).all()}
        items = sorted((ids[i.conversion_id], i.customer_id, i.sku, i.name, i.quantity, i.price, i.created_at)
                       for i in (await s.scalars(select(ConversionItem))).all())
        touchpoints = await s.scalar(select(func.count()).select_from(Touchpoint))
    return {"conversions": conversions, "seen": {(ids[c], cid, at) for c, cid, at in seen}, "items": items,
            "touchpoints": touchpoints}


@pytest.mark.parametrize("batch_size", [1, 4, 1000])
async def test_any_batch_size_imports_as_one_order_at_a_time(svc, tmp_path, batch_size):
    path = tmp_path / "orders.jsonl"
    path.write_text("\n".join(LINES) + "\n", "utf-8")
    read: list[int] = []
    result = await import_file(svc.sessions, path, NOW, CHANNELS, batch_size, read.append)
    assert (result.orders, result.skipped, result.items) == (4, 1, 3)
    assert result.rejected == REJECTED and result.rejected_count == len(REJECTED)
    assert read[-1] == path.stat().st_size  # the progress bar ends full
    first = await stored(svc)
    assert first["conversions"] == {
        "A1": (1, "order", 120.5, "USD", datetime(2026, 3, 1, 10, 30), None, None),  # +08:00 stored as UTC
        "A2": (2, "order", 10.0, "CNY", datetime(2026, 3, 1, 10, 0), None, None),
        "A3": (2, "order", 10.0, "CNY", datetime(2026, 3, 1, 10, 0), None, None),
        "A8": (3, "order", 10.0, "CNY", datetime(2026, 4, 2), None, None)}
    assert first["seen"] == {("A1", 1, NOW), ("A2", 2, NOW), ("A3", 2, NOW), ("A8", 3, NOW)}
    at = datetime(2026, 3, 1, 10, 30)
    assert first["items"] == [("A1", 1, "A", "奶粉 again", 2.0, 50.0, at), ("A1", 1, "B", "奶瓶", 2.0, 10.25, at),
                              ("A2", 2, "C", "辅食", 1.0, 0.0, datetime(2026, 3, 1, 10, 0))]
    assert first["touchpoints"] == 0
    assert (await jobs.sweep(svc)).conversions == 0  # history earns no points, pays no referral, asks nothing

    again = await import_file(svc.sessions, path, NOW + timedelta(days=1), CHANNELS, batch_size)
    assert (again.orders, again.skipped, again.items) == (0, 6, 0)  # A1 twice, A2, A3 twice, A8
    assert again.rejected == [r for r in REJECTED if "line 4" not in r]  # A3 is stored now: line 4 is skipped
    assert await stored(svc) == first


async def test_import_batch_takes_read_lines(svc, tmp_path):
    """The batch function the CLI's predecessor and other callers use: lines as read_orders gives them."""
    path = tmp_path / "orders.csv"
    path.write_text("order_id,customer,date,amount,sku,name,quantity,price\n"
                    "C1,console:local:bo,2026-01-05,120,A,奶粉,1,100\n"
                    "C1,console:local:bo,2026-01-05,120,B,奶瓶,1,20\n"
                    "C2,#1,2026-03-01,80,,,,\n", "utf-8")
    result = ImportResult()
    with path.open(encoding="utf-8", newline="") as handle:
        lines = list(read_orders(path, handle))
    async with svc.sessions() as s, s.begin():
        await import_batch(s, lines, NOW, result, CHANNELS)
    assert (result.orders, result.items, result.rejected) == (2, 2, [])
    assert [i[2] for i in (await stored(svc))["items"]] == ["A", "B"]


async def test_rejected_lines_kept_are_bounded(svc, tmp_path):
    path = tmp_path / "orders.jsonl"
    path.write_text("not json\n" * (MAX_REJECTED_LINES + 5), "utf-8")
    result = await import_file(svc.sessions, path, NOW, CHANNELS, 300)
    assert len(result.rejected) == MAX_REJECTED_LINES and result.rejected_count == MAX_REJECTED_LINES + 5
    assert result.rejected[-1] == f"line {MAX_REJECTED_LINES}: invalid JSON: Expecting value"


async def test_a_failing_batch_keeps_the_ones_before(svc, tmp_path, monkeypatch):
    """Each batch is its own transaction: a store error stops the import, what was written stays, and
    running it again imports the rest (and the file is closed after the reader thread is done)."""
    from scrm.loyalty import history

    path = tmp_path / "orders.jsonl"
    path.write_text("\n".join(order(f"F{n}", "#1") for n in range(10)) + "\n", "utf-8")
    real = history.insert_orders
    calls = 0

    async def fail_third(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("store gone")
        await real(*args)

    monkeypatch.setattr(history, "insert_orders", fail_third)
    with pytest.raises(RuntimeError, match="store gone"):
        await import_file(svc.sessions, path, NOW, CHANNELS, 2)
    assert sorted((await stored(svc))["conversions"]) == ["F0", "F1", "F2", "F3"]
    monkeypatch.setattr(history, "insert_orders", real)
    result = await import_file(svc.sessions, path, NOW, CHANNELS, 2)
    assert (result.orders, result.skipped) == (6, 4)


def test_parse_is_pure(tmp_path: Path):
    """What runs in the reader thread needs no store: rows come out whole, but for the store's ids."""
    batch = parse_batch([(1, json.loads(LINES[0])), (2, "invalid JSON: x")], CHANNELS)
    assert [o.order_id for o in batch.orders] == ["A1"] and batch.rejected == [(2, "invalid JSON: x")]
    first = batch.orders[0]
    assert first.customer == "#1" and batch.refs == {"#1": CustomerRef("#1", id=1)}
    at = "2026-03-01 10:30:00.000000"
    assert first.row == ("order", "A1", 120.5, "USD", at)
    assert first.items == [("A", "奶粉 again", 2.0, 50.0, at), ("B", "奶瓶", 2.0, 10.25, at)]


async def test_statements_do_not_grow_with_the_orders(svc, tmp_path):
    """Set-based: a chunk of a thousand orders for a thousand customers (named all three ways) is as
    many statements as one of three orders; one order at a time was several statements an order."""
    async with svc.sessions() as s, s.begin():
        for c in range(10, 1010):
            s.add(Customer(id=c, display_name=f"c{c}", first_seen_at=NOW, last_seen_at=NOW, attributes={}))
        await s.flush()
        for c in range(10, 1010):
            s.add(Identity(customer_id=c, channel="console", account="local", external_id=f"u{c}", created_at=NOW))
    assert svc.consumer is not None
    await svc.consumer.stop()  # its polls of the inbound journal would be counted with the import's statements
    engine = svc.sessions.kw["bind"].sync_engine
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    refs = ("#{}", "console:local:u{}", "console:u{}")
    counts = []
    for name, n in (("few", 3), ("many", 1000)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(order(f"{name}{c}", refs[c % 3].format(c), items=[{"sku": "A"}, {"sku": "B"}]) + "\n"
                                for c in range(10, 10 + n)), "utf-8")
        event.listen(engine, "before_cursor_execute", count)
        try:
            result = await import_file(svc.sessions, path, NOW, CHANNELS)
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert (result.orders, result.items, result.rejected) == (n, 2 * n, [])
        counts.append(len(statements))
        statements.clear()
    assert counts[0] == counts[1] <= 10, counts
    async with svc.sessions() as s:
        owners = dict((await s.execute(select(Conversion.order_id, Conversion.customer_id)
                                       .where(Conversion.order_id.like("many%")))).all())
    assert owners == {f"many{c}": c for c in range(10, 1010)}


async def test_the_file_is_streamed(svc, tmp_path, monkeypatch):
    """Memory holds two chunks whatever the file's size, and a transaction's matched orders: the
    reader is never more than one chunk ahead of the matching, and progress moves as the file is read."""
    from scrm.loyalty import history

    monkeypatch.setattr(history, "CHUNK", 100)
    path = tmp_path / "orders.jsonl"
    path.write_text("".join(order(f"S{n}", "#1") + "\n" for n in range(2000)), "utf-8")
    parsed = matched = ahead = 0
    real_parse, real_match = history.parse_batch, history.match_orders

    def parse(*args: Any) -> Any:
        nonlocal parsed, ahead
        parsed += 1
        ahead = max(ahead, parsed - matched)
        return real_parse(*args)

    async def match(*args: Any) -> Any:
        nonlocal matched
        new = await real_match(*args)
        matched += 1
        return new

    monkeypatch.setattr(history, "parse_batch", parse)
    monkeypatch.setattr(history, "match_orders", match)
    read: list[int] = []
    result = await import_file(svc.sessions, path, NOW, CHANNELS, 1000, read.append)
    assert result.orders == 2000 and (parsed, matched) == (20, 20) and ahead <= 2
    assert read == sorted(read) and read[0] < path.stat().st_size // 4 and read[-1] == path.stat().st_size


async def test_text_no_store_can_keep_is_rejected(svc, tmp_path):
    """A NUL (PostgreSQL refuses it in text) or half a surrogate pair (no UTF-8 holds it) rejects its
    order, with its line, and nothing of it is written; escapes that make real characters are fine."""
    path = tmp_path / "orders.jsonl"
    path.write_text("".join(json.dumps({"order_id": n, "customer": "#1", "date": "2026-01-01", "items": [item]}) + "\n"
                            for n, item in (("N1", {"sku": "A\u0000"}), ("N2", {"sku": "A", "name": "\ud83d"}),
                                            ("N3", {"sku": "A", "name": "奶粉😀"}))), "utf-8")
    (tmp_path / "orders.csv").write_text("order_id,customer,date,amount,sku\nN4,#1,2026-01-01,1,A\x00\n", "utf-8")
    result = await import_file(svc.sessions, path, NOW, CHANNELS)
    unstorable = "a text holds a NUL character or half a UTF-16 surrogate pair"
    assert (result.orders, result.rejected) == (1, [f"line 1: {unstorable}", f"line 2: {unstorable}"])
    result = await import_file(svc.sessions, tmp_path / "orders.csv", NOW, CHANNELS)
    assert (result.orders, result.rejected) == (0, [f"line 2: {unstorable}"])
    assert [(i[0], i[3]) for i in (await stored(svc))["items"]] == [("N3", "奶粉😀")]


def test_the_command(svc, tmp_path, store):
    """``scrm conversions import`` as a script runs it: no progress bar when stderr is no terminal, the
    summary, each rejected line with its reason and exit 1; run again, nothing is imported twice."""
    (tmp_path / "config.toml").write_text("[channels.console.local]\n", "utf-8")
    path = tmp_path / "orders.jsonl"
    path.write_text("\n".join(LINES) + "\n", "utf-8")

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "scrm", "conversions", "import", str(path)], cwd=tmp_path,
                              env=cli_env(store), capture_output=True, text=True, timeout=120, check=False)

    first = run()
    assert first.returncode == 1, first.stderr
    assert first.stdout == "imported 4 orders (3 items), 1 already present, 8 rejected\n"
    assert first.stderr.splitlines()[-8:] == [f"  {r}" for r in REJECTED]
    assert "importing" not in first.stderr and "━" not in first.stderr
    again = run()
    assert again.stdout == "imported 0 orders (0 items), 6 already present, 7 rejected\n"
