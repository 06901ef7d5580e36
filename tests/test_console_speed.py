"""What keeps the console's pages fast over a large store (``python -m bench.console`` times them over a
million customers), checked for what it must not change: the answers.

- A phone number is looked up in its keyed hash's index, also once the store's statistics say most
  customers have no phone (SQLite then walked every customer in id order).
- A name search on SQLite finds what ``lower(name) LIKE lower(text)`` finds, without lowering each name.
- A search that few customers match reads them a window of ids at a time and stops at a time budget;
  following its pages, stopped or full, finds every match exactly once, in order, either way.
- A report's live tally hands the event loop back every few thousand rows and adds up the same.
- Slow figures (dashboard, funnels, segment counts) are snapshots (:mod:`scrm.snapshots`): served
  while fresh, served stale while one refresh runs in the background, waited for when missing or too
  old, computed once for requests that ask together, kept warm for a while after a view, and never
  left half-done at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sqlalchemy import event, insert, select, text

from scrm import customer_search, reports, rollups
from scrm.clock import ManualClock
from scrm.console import accounts
from scrm.customer_search import result_page, search
from scrm.customers import phone_ref, resolve_refs
from scrm.keyring import LOOKUP_ID, Keyring, new_key_entry
from scrm.personal import phone_hash
from scrm.snapshots import Snapshots
from scrm.store.engine import make_engine, make_sessionmaker, writing
from scrm.store.migrate import upgrade
from scrm.store.models import Customer
from scrm.web import SERVICE, create_app
from tests.test_reports import NOW as WORLD_NOW
from tests.test_reports import world  # noqa: F401 (fixture)

NOW = datetime(2026, 11, 27, 12, 0, 0)


async def test_a_phone_number_is_looked_up_in_its_index(tmp_path: Path) -> None:
    keyring = Keyring.parse(f"{new_key_entry(LOOKUP_ID)}\n{new_key_entry('k1')}")
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'scrm.db'}")
    await upgrade(engine)
    sessions = make_sessionmaker(engine)
    number = "+86 138 0013 8000"
    digest = phone_hash(number, keyring)
    async with sessions() as session, session.begin():  # most customers have no phone; two share one
        await session.execute(insert(Customer), [
            {"id": i, "display_name": f"c{i}", "first_seen_at": NOW, "last_seen_at": NOW,
             "phone_hash": digest if i in (900, 40) else None} for i in range(1, 3001)])
        await session.execute(text("ANALYZE"))
    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if "phone_hash" in statement:
            statements.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    try:
        async with sessions() as session:
            ref = phone_ref(number)
            assert (await resolve_refs(session, [ref], keyring))[ref] == 40  # the first customer with it
            [(statement, parameters)] = statements
            connection = await session.connection()
            plan = " / ".join(str(row[-1]) for row in (await connection.exec_driver_sql(
                f"EXPLAIN QUERY PLAN {statement}", parameters)).all())
        assert "ix_customers_phone_hash" in plan and "SCAN customers" not in plan, plan
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", seen)
        await engine.dispose()


async def turns() -> None:
    """Let the tasks started so far run as far as they can."""
    for _ in range(5):
        await asyncio.sleep(0)


class Figures:
    """A stand-in for a slow computation: counts its runs, and can be held until released."""

    def __init__(self) -> None:
        self.runs = 0
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def __call__(self) -> int:
        self.runs += 1
        run = self.runs
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("store unreachable")
        return run


async def test_a_snapshot_is_served_fresh_then_stale_while_one_refresh_runs() -> None:
    clock = ManualClock(NOW)
    cache = Snapshots(clock, fresh=timedelta(minutes=1), keep=timedelta(minutes=30))
    figures = Figures()
    first = await cache.get("k", figures)
    assert (first.value, first.at, figures.runs) == (1, NOW, 1)
    clock.advance(59)
    assert (await cache.get("k", figures)).value == 1 and figures.runs == 1  # fresh: not read again
    assert (await cache.get("other", figures)).value == 2  # another key, its own figures

    clock.advance(2)  # stale: served at once, and one refresh starts in the background
    figures.gate = asyncio.Event()
    stale = await asyncio.wait_for(cache.get("k", figures), 10)  # not waiting for the refresh
    assert (stale.value, stale.at) == (1, NOW)
    await turns()
    assert (await cache.get("k", figures)).value == 1 and figures.runs == 3  # still one refresh
    figures.gate.set()
    await turns()
    newer = await cache.get("k", figures)
    assert (newer.value, newer.at) == (3, NOW + timedelta(seconds=61))


async def test_a_missing_or_too_old_snapshot_is_waited_for_once_by_everyone() -> None:
    clock = ManualClock(NOW)
    cache = Snapshots(clock, fresh=timedelta(minutes=1), keep=timedelta(minutes=30))
    figures = Figures()
    figures.gate = asyncio.Event()
    waiting = [asyncio.create_task(cache.get("k", figures)) for _ in range(5)]
    await turns()
    assert figures.runs == 1 and not any(t.done() for t in waiting)
    waiting[0].cancel()  # one reader gives up: the others still get the figures
    figures.gate.set()
    assert [s.value for s in await asyncio.gather(*waiting[1:])] == [1] * 4
    clock.advance(timedelta(minutes=31))  # older than keep: too old to show, read again and waited for
    assert (await cache.get("k", figures)).value == 2 and figures.runs == 2


async def test_a_failed_refresh_keeps_the_last_figures_and_a_failed_read_says_so(caplog: Any) -> None:
    clock = ManualClock(NOW)
    cache = Snapshots(clock, fresh=timedelta(minutes=1), keep=timedelta(minutes=30))
    figures = Figures()
    assert (await cache.get("k", figures)).value == 1
    clock.advance(120)
    figures.fail = True
    with caplog.at_level(logging.WARNING, logger="scrm.snapshots"):
        assert (await cache.get("k", figures)).value == 1
        await turns()
    assert "store unreachable" in caplog.text
    assert (await cache.get("k", figures)).value == 1  # still the last figures, a new refresh tried
    with pytest.raises(RuntimeError, match="store unreachable"):
        await cache.get("new", figures)
    figures.fail = False
    assert (await cache.get("new", figures)).value == figures.runs


async def test_snapshots_looked_at_lately_are_kept_warm() -> None:
    clock = ManualClock(NOW)
    cache = Snapshots(clock, fresh=timedelta(minutes=1), keep=timedelta(minutes=30), warm=timedelta(hours=2))
    seen, unseen, once = Figures(), Figures(), Figures()
    await cache.get("seen", seen)
    await cache.get("unseen", unseen)
    await cache.get("once", once, warm=False)
    clock.advance(30)
    assert cache.keep_warm() == 0  # all fresh
    clock.advance(timedelta(minutes=50))
    await cache.get("seen", seen)  # stale: served, and refreshed
    await turns()
    assert seen.runs == 2
    clock.advance(timedelta(minutes=5))
    assert cache.keep_warm() == 2  # asked for within two hours and older than a minute: read again
    await turns()
    assert (seen.runs, unseen.runs, once.runs) == (3, 2, 1)  # "once" is read again only when asked
    clock.advance(timedelta(minutes=70))  # "unseen" was last asked for 2h05 ago: left to age
    assert cache.keep_warm() == 1
    await turns()
    assert (seen.runs, unseen.runs) == (4, 2)
    assert (await cache.get("seen", seen)).at == clock.now() and seen.runs == 4  # the view finds it ready
    clock.advance(timedelta(minutes=31))
    assert (await asyncio.wait_for(cache.get("unseen", unseen), 10)).value == 3  # too old: read while waiting


async def test_snapshots_are_bounded_and_closing_stops_running_reads() -> None:
    cache = Snapshots(ManualClock(NOW), size=3)
    figures = Figures()
    for key in "abcd":
        await cache.get(key, figures)
    await cache.get("b", figures)  # a and then c are the least recently asked
    await cache.get("e", figures)
    runs = figures.runs
    assert (await cache.get("b", figures)).value == 2 and figures.runs == runs  # kept
    assert (await cache.get("a", figures)).value == runs + 1  # dropped, read again
    figures.gate = asyncio.Event()
    reader = asyncio.create_task(cache.get("slow", figures))
    await turns()
    await cache.close()
    with pytest.raises(asyncio.CancelledError):
        await reader


MATCHING = [3, 4, 5, 11, 12, 19, 20, 21, 22, 23, 37, 40]


async def _customers(sessions: Any) -> None:
    async with sessions() as session, session.begin():
        await session.execute(insert(Customer), [
            {"id": i, "display_name": f"needle {i}" if i in MATCHING else f"hay {i}", "first_seen_at": NOW,
             "last_seen_at": NOW} for i in range(1, 43)])


async def _walk(session: Any, size: int, upward: bool, window: int, budget: float) -> list[list[int]]:
    """Every page of the search "needle", following the pages' cursors as the page's links do."""
    where = Customer.display_name.contains("needle")
    pages: list[list[int]] = []
    before = after = None
    if upward:
        after = 0
    while True:
        page = await result_page(session, where, size, before, after, "Asia/Shanghai", window=window, budget=budget)
        ids = [r.id for r in page.rows]
        assert len(ids) <= size and ids == sorted(ids, reverse=True)  # newest first on every page
        pages.append(ids)
        if page.stopped_at is not None:
            before, after = (None, page.stopped_at) if upward else (page.stopped_at, None)
        elif page.more:
            before, after = (None, ids[0]) if upward else (ids[-1], None)
        else:
            return pages
        assert len(pages) < 100


async def test_following_a_searchs_pages_finds_every_match_once(store: dict[str, Any]) -> None:
    engine = make_engine(store["url"], store.get("schema_name"))
    await upgrade(engine)
    sessions = make_sessionmaker(engine)
    await _customers(sessions)
    try:
        async with sessions() as session:
            whole = await _walk(session, 5, False, 100_000, 10.0)  # one window: full pages, as before
            assert whole == [[40, 37, 23, 22, 21], [20, 19, 12, 11, 5], [4, 3]]
            stopped = await _walk(session, 5, False, 4, 0.0)  # every window over the budget: a page each
            assert [i for p in stopped for i in p] == sorted(MATCHING, reverse=True)
            assert len(stopped) > len(whole) and [] in stopped  # windows with no match are pages too
            upward = await _walk(session, 5, True, 4, 0.0)
            assert sorted(i for p in upward for i in p) == MATCHING and len({*sum(upward, [])}) == len(MATCHING)
            assert [i for p in reversed(upward) for i in p] == sorted(MATCHING, reverse=True)
            one = await result_page(session, Customer.id == 37, 5, None, None, "Asia/Shanghai", scan=False, budget=0.0)
            assert ([r.id for r in one.rows], one.more, one.stopped_at) == ([37], False, None)
    finally:
        await engine.dispose()


async def test_the_customers_page_says_where_a_search_stopped(aiohttp_client: Any, make_config: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(customer_search, "SCAN_WINDOW", 10)
    monkeypatch.setattr(customer_search, "SCAN_BUDGET", 0.0)
    client = await aiohttp_client(create_app(make_config(), ManualClock(NOW)))
    service = client.app[SERVICE]
    await _customers(service.sessions)
    async with writing(service.sessions) as session:
        await accounts.add_account(session, "mia", "manager", "correct horse battery", NOW)
    form = await client.get("/console/login")
    pre = (await form.text()).split('name="pre" value="')[1].split('"')[0]
    signed = await client.post("/console/login", data={"name": "mia", "password": "correct horse battery",
                                                       "pre": pre}, allow_redirects=False)
    assert signed.status == 303
    page = await (await client.get("/console/customers", params={"q": "needle"})).text()
    assert 'data-stopped-at="33"' in page and "down to #33" in page  # ids 33..42 read: 37 and 40 found
    assert 'data-customer="40"' in page and 'data-customer="37"' in page and 'data-customer="23"' not in page
    assert 'href="/console/customers?q=needle&amp;before=33"' in page
    page = await (await client.get("/console/customers", params={"q": "needle", "before": "33"})).text()
    assert 'data-stopped-at="23"' in page and 'data-customer="23"' in page  # ids 23..32 read: 23 found
    page = await (await client.get("/console/customers", params={"q": "#40"})).text()
    assert 'data-customer="40"' in page and "data-stopped-at" not in page  # a reference: no scan


async def test_a_tally_hands_the_loop_back_between_rows_and_adds_up_the_same(world: Any,  # noqa: F811
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    service, _, _ = world
    spans = [(WORLD_NOW - timedelta(days=40), WORLD_NOW)]
    turns = 0

    async def turn(delay: float) -> None:  # rollups' asyncio.sleep, counted
        nonlocal turns
        turns += 1
        await asyncio.sleep(delay)

    monkeypatch.setattr(rollups, "asyncio", SimpleNamespace(sleep=turn))

    async def tally() -> tuple[rollups.Tally, int]:
        nonlocal turns
        turns = 0
        async with service.sessions() as session:
            return await rollups.live(session, spans), turns

    whole, turns_whole = await tally()
    monkeypatch.setattr(rollups, "ROWS_PER_TURN", 2)
    pieces, turns_pieces = await tally()
    assert whole.messages_in and whole.active_customers > 20 and whole.stage_moves
    assert pieces == whole
    # a turn of the loop after every two rows (a row per writer and day at least) instead of one a pass
    assert turns_whole == 6 and turns_pieces >= whole.active_customers // 2 > turns_whole


NAMES = ["Amy 艾米", "AMY-2", "amy_3", "x%y", "ÉCOLE école", "Zoë", "客户12", "o'brien", "back\\slash", None]


async def test_a_name_search_finds_the_names_lowering_them_would(store: dict[str, Any]) -> None:
    engine = make_engine(store["url"], store.get("schema_name"))
    await upgrade(engine)
    sessions = make_sessionmaker(engine)
    async with sessions() as session, session.begin():
        await session.execute(insert(Customer), [
            {"id": i, "display_name": name, "first_seen_at": NOW, "last_seen_at": NOW}
            for i, name in enumerate(NAMES, start=1)])
    svc = SimpleNamespace(config=SimpleNamespace(channels={}, segments={}))
    try:
        async with sessions() as session:
            async def found(text: str) -> list[str | None]:
                where = (await search(session, svc, text, NOW)).where  # type: ignore[arg-type]
                return list((await session.scalars(select(Customer.display_name).where(where)
                                                   .order_by(Customer.id))).all())

            assert await found("amy") == ["Amy 艾米", "AMY-2", "amy_3"] == await found("name:AMY")
            assert await found("艾") == ["Amy 艾米"] and await found("客户1") == ["客户12"]
            assert await found("%") == ["x%y"] and await found("_") == ["amy_3"]  # wildcards are text
            assert await found("o'b") == ["o'brien"] and await found("\\") == ["back\\slash"]
            for text in ("amy", "MY-", "école", "ÉCOLE", "Zoë", "ZOË", "x%", "客户", "O'B"):  # É folds as before
                lowered = list((await session.scalars(select(Customer.display_name).where(
                    Customer.display_name.icontains(text, autoescape=True)).order_by(Customer.id))).all())
                assert await found(text) == lowered, text
    finally:
        await engine.dispose()
