"""Daily report rollups (scrm.rollups) against the raw computation, on SQLite and PostgreSQL.

Built days give the same reports as the raw tables (and as the truth computed in tests/test_reports.py),
reports really read them, a day is built only once it has settled, later changes to closed days
(a merge, retention redaction, an erasure, an import stamped with its start time or giving a
customer their first identity, orders imported with past dates) leave no stale day behind, and a
build that read the store before an invalidation committed is dropped.
"""

from __future__ import annotations

import asyncio
import csv
import json
import zlib
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import event, select

from scrm import personal, reports, rollups
from scrm.clock import ManualClock
from scrm.commands import OPT_OUT_REPLY
from scrm.identity import merge_customers
from scrm.importer import Importer
from scrm.loyalty.history import ImportResult, import_batch
from scrm.scheduler import ROLLUPS_JOB
from scrm.service import Service
from scrm.store.models import Customer, ReportDay, Touchpoint
from tests.test_reports import NOW, TZ, comparable, generate, load, scrm_cli, truth

PERIODS = [reports.last_days(NOW, 30), reports.last_days(NOW, 7),
           reports.date_range(date(2026, 11, 16), date(2026, 11, 22), TZ),
           reports.last_days(NOW - timedelta(days=2, hours=5, minutes=7), 12)]


@pytest.fixture
async def world(make_config):
    """tests/test_reports.py's data set, whose true figures that file computes."""
    service = Service(make_config(), ManualClock(NOW))
    await service.start(scheduler=False)
    w = generate()
    yield service, w, await load(service, w)
    await service.stop()


async def figures(session: Any) -> list[Any]:
    """Every period's summary (with the one before) and daily trend, in two time zones."""
    out: list[Any] = []
    for period in PERIODS:
        out.append((await reports.summary(session, period)).as_dict())
        out.append(await reports.daily_trend(session, period, TZ))
        out.append(await reports.daily_trend(session, period, "America/New_York"))
    return out


async def report(service: Any) -> list[Any]:
    async with service.sessions() as s:
        return await figures(s)


async def raw_report(service: Any) -> list[Any]:
    """The same from the raw tables alone: every built day forgotten in a transaction rolled back after."""
    async with service.sessions() as s:
        await s.begin()
        await rollups.forget_all(s)
        out = await figures(s)
        await s.rollback()
    return out


async def built(service: Any) -> list[date]:
    async with service.sessions() as s:
        return list((await s.scalars(select(ReportDay.day).order_by(ReportDay.day))).all())


def local_day(moment: datetime) -> date:
    return moment.replace(tzinfo=UTC).astimezone(ZoneInfo(TZ)).date()


async def test_built_days_give_the_raw_figures(world):
    service, w, _ = world
    before = await report(service)
    assert service.scheduler.get_job(ROLLUPS_JOB) is not None
    stored = await rollups.job(service)()  # what the scheduler runs, as of the service clock
    first = local_day(min(c["first"] for c in w.customers))
    last = local_day(NOW - rollups.SETTLE) - timedelta(days=1)
    assert stored == (last - first).days + 1 and await built(service) == [
        first + timedelta(days=i) for i in range(stored)]
    async with service.sessions() as s:
        assert len(await rollups.built_days(s, NOW - timedelta(days=30), NOW)) == 29
    after = await report(service)
    assert after == before
    for period, summary in zip(PERIODS, after[::3], strict=True):
        assert comparable(summary) == truth(w, period.since, period.until)
        assert comparable(summary["previous"]) == truth(w, period.previous().since, period.since)
    assert await rollups.job(service)() == 0  # nothing new to build


async def test_reports_read_the_built_days(world):
    service, w, _ = world
    await rollups.build(service.sessions, TZ, NOW)
    period = PERIODS[1]
    async with service.sessions() as s, s.begin():
        day = (await rollups.built_days(s, period.since, period.until))[2]
        day.messages_in += 1000
        bitmap = int.from_bytes(zlib.decompress(day.active), "little") | 1 << 5000  # no such customer
        day.active = zlib.compress(bitmap.to_bytes((bitmap.bit_length() + 7) // 8, "little"))
        moment, name = day.starts_at, f"{day.day:%m-%d}"
    expected = truth(w, period.since, period.until)
    async with service.sessions() as s:
        tampered = (await reports.summary(s, period)).current
        trend = await reports.daily_trend(s, period, TZ)
    assert tampered.messages_in == expected["messages_in"] + 1000
    assert tampered.active_customers == expected["active_customers"] + 1
    assert trend["messages_in"][name] >= 1000
    async with service.sessions() as s, s.begin():
        await rollups.invalidate(s, [moment])
    async with service.sessions() as s:
        assert comparable((await reports.summary(s, period)).as_dict()) == expected
    assert await rollups.build(service.sessions, TZ, NOW) == 1
    async with service.sessions() as s:
        assert comparable((await reports.summary(s, period)).as_dict()) == expected


async def test_a_day_is_built_once_it_has_settled(world):
    service, _, _ = world
    midnight = datetime(2026, 11, 26, 16, 0)  # 2026-11-27 00:00 in Asia/Shanghai, the day NOW is in
    await rollups.build(service.sessions, TZ, midnight + rollups.SETTLE - timedelta(seconds=1))
    assert (await built(service))[-1] == date(2026, 11, 25)
    assert await rollups.build(service.sessions, TZ, midnight + rollups.SETTLE) == 1
    assert (await built(service))[-1] == date(2026, 11, 26)
    # another time zone: its days replace the old ones
    await rollups.build(service.sessions, "America/New_York", NOW)
    async with service.sessions() as s:
        assert set((await s.scalars(select(ReportDay.timezone))).all()) == {"America/New_York"}
    assert await report(service) == await raw_report(service)


def csv_file(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([["name", "phone", "identity"], *rows])
    return path


async def merge_two_writers(service: Any, w: Any, ids: dict[int, int]) -> None:
    """Two customers who both wrote on closed days of the last month become one."""
    wrote = {t["c"] for t in w.touchpoints if t["direction"] == "in" and t["kind"] == "text"
             and NOW - timedelta(days=29) < t["at"] < NOW - timedelta(days=2)}
    keep, dup = sorted(wrote, key=lambda i: w.customers[i]["first"], reverse=True)[:2]
    async with service.sessions() as s, s.begin():
        await merge_customers(s, await s.get(Customer, ids[keep]), await s.get(Customer, ids[dup]), "operator:t", NOW)


async def redact_old_texts(service: Any, w: Any, ids: dict[int, int]) -> None:
    async with service.sessions() as s, s.begin():
        assert await personal.redact_messages(s, NOW - timedelta(days=3))


async def erase_an_opted_out_customer(service: Any, w: Any, ids: dict[int, int]) -> None:
    async with service.sessions() as s, s.begin():
        customer_id = await s.scalar(select(Touchpoint.customer_id).where(
            Touchpoint.text == OPT_OUT_REPLY, Touchpoint.created_at < NOW - timedelta(days=2)).limit(1))
        await personal.erase(s, await s.get(Customer, customer_id), NOW)


async def import_customers_late(service: Any, w: Any, ids: dict[int, int]) -> None:
    """An import that began three days ago: its customers are stamped then, a closed day."""
    path = csv_file(service.config.resolve("late.csv"), [["p", "13800138000", ""], ["q", "", "telegram:q1"]])
    await Importer(service.sessions, service.config, service.keyring, NOW - timedelta(days=3)).run(path)


async def give_a_customer_a_first_identity(service: Any, w: Any, ids: dict[int, int]) -> None:
    """A phone-only customer of a closed (and built) day gets an identity: their first channel changes."""
    await import_customers_late(service, w, ids)
    await rollups.build(service.sessions, TZ, NOW)
    path = csv_file(service.config.resolve("late.csv"), [["p", "13800138000", "wechat:p1"]])
    await Importer(service.sessions, service.config, service.keyring, NOW).run(path)


async def import_past_orders(service: Any, w: Any, ids: dict[int, int]) -> None:
    orders = [(1, {"order_id": "late-1", "customer": f"#{ids[0]}", "date": (NOW - timedelta(days=4)).isoformat(),
                   "amount": 88.5})]
    async with service.sessions() as s, s.begin():
        result = ImportResult()
        await import_batch(s, orders, NOW, result)
        assert result.orders == 1


@pytest.mark.parametrize("change", [merge_two_writers, redact_old_texts, erase_an_opted_out_customer,
                                    import_customers_late, give_a_customer_a_first_identity, import_past_orders])
async def test_late_changes_to_closed_days_leave_no_stale_day(world, change):
    service, w, ids = world
    await rollups.build(service.sessions, TZ, NOW)
    before = await report(service)
    days = len(await built(service))
    await change(service, w, ids)
    after = await raw_report(service)
    assert after != before, "the change alters closed days' figures"
    assert await report(service) == after  # invalidated days are counted live meanwhile
    assert len(await built(service)) < days or change is import_past_orders  # orders are never rolled up
    await rollups.build(service.sessions, TZ, NOW)
    assert len(await built(service)) == days
    assert await report(service) == after


async def test_a_build_that_read_before_an_invalidation_committed_is_dropped(world):
    service, _, _ = world
    day = date(2026, 11, 20)
    async with service.sessions() as s:
        await s.begin()
        await rollups.invalidate(s, [datetime(2026, 11, 20, 3, 0)])  # holds the counter until committed
        checking = asyncio.Event()
        loop = asyncio.get_running_loop()

        def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            if statement.lstrip().upper().startswith("UPDATE REPORT_ROLLUP_STATE"):
                loop.call_soon_threadsafe(checking.set)  # the build has read; it now waits for the counter

        event.listen(service.engine.sync_engine, "before_cursor_execute", before)
        try:
            build = asyncio.create_task(rollups.build_days(service.sessions, [day], TZ, NOW))
            await asyncio.wait_for(checking.wait(), 60)
            await s.commit()
        finally:
            event.remove(service.engine.sync_engine, "before_cursor_execute", before)
    assert await build == 0 and await built(service) == []
    assert await rollups.build_days(service.sessions, [day], TZ, NOW) == 1
    assert await built(service) == [day]


async def test_cli_builds_and_rebuilds_the_days(world, tmp_path, store):
    service, w, _ = world
    assert scrm_cli(tmp_path, store, "init").returncode == 0
    result = scrm_cli(tmp_path, store, "report", "rollups")
    assert result.returncode == 0, result.stderr
    days = int(result.stdout.split()[1])  # "built N days (Asia/Shanghai)", as of the real clock
    assert days > 40 and "(Asia/Shanghai)" in result.stdout and len(await built(service)) == days
    assert scrm_cli(tmp_path, store, "report", "rollups").stdout.split()[1] == "0"
    assert scrm_cli(tmp_path, store, "report", "rollups", "--rebuild").stdout.split()[1] == str(days)
    report_json = scrm_cli(tmp_path, store, "report", "--range", "2026-11-16..2026-11-22", "--json")
    start = datetime(2026, 11, 15, 16, 0) - timedelta(microseconds=1)
    assert comparable(json.loads(report_json.stdout)) == truth(w, start, start + timedelta(days=7))
