"""Daily report rollups: the additive part of ``/report``, summed once per closed local day.

Why: a 30-day report re-read a month of touchpoints for every figure (70 s on SQLite at 10 million
touchpoints). Each closed local day of the service time zone is summed once into ``report_days``;
a report reads the built days inside its period and computes only the rest (the open day, the part
of a day the period starts in, days not built yet or invalidated) from the raw tables, with the
same queries the build uses.

A day holds new customers (by first channel and by source), inbound and outbound messages, opt-outs,
stage moves, and the customers who wrote that day as a bitmap of their ids: distinct counts do not
add up across days, but sets union exactly. Conversions, deliveries and coupons are small tables and
orders do arrive late (imports): reports read them live.

Staying exact:

* writers stamp rows with the time they run, so a day is built only once it has been over for
  :data:`SETTLE`, when every transaction that stamped a time in it has committed;
* a change that alters a closed day afterwards (a merge, an erasure, redaction, a customer import
  that stamps its start time or adds identities) calls :func:`invalidate` in its own transaction,
  which deletes the built days it touches; reports compute those live until they are built again;
* :func:`invalidate` bumps a counter that a build checks before storing its day, so a build that
  read the tables before an invalidation committed is dropped, not stored.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlalchemy import and_, case, delete, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from scrm.clock import local_midnight
from scrm.commands import OPT_OUT_REPLY
from scrm.messages import MESSAGE_KINDS
from scrm.store.dialect import rowcount
from scrm.store.models import (
    Customer,
    Identity,
    ReportDay,
    ReportRollupState,
    Touchpoint,
)

if TYPE_CHECKING:
    from scrm.runtime import Runtime

log = logging.getLogger(__name__)

#: A day is built this long after it ends: longer than any transaction stamping rows with its start time.
SETTLE = timedelta(hours=1)
TICK = timedelta(microseconds=1)
OPT_OUT_KINDS = frozenset({"unsubscribe", "blocked", "contact_removed"})
MESSAGES_OUT = frozenset({"reply", "auto_reply", "campaign_message"})
#: A customer's inbound message: what "messages in" and "active customers" count.
INBOUND = and_(Touchpoint.customer_id.is_not(None), Touchpoint.direction == "in", Touchpoint.kind.in_(MESSAGE_KINDS))
#: The opt-out confirmation reply: opt-outs count it by its text, so redacting that text changes its day.
OPT_OUT_REPLY_ROW = (Touchpoint.kind == "reply") & (Touchpoint.text == OPT_OUT_REPLY)

#: Days read in one pass over the touchpoints (pages hold rows of many days), bounding the rows it returns.
BATCH = 7
#: Rows of a pass handled between two turns of the event loop (~5 ms of work).
ROWS_PER_TURN = 5_000

#: ``(since, until]``, naive UTC, as a report period.
Span = tuple[datetime, datetime]


def within(column: Any, spans: list[Span]) -> ColumnElement[bool]:
    return or_(*(and_(column > since, column <= until) for since, until in spans))


@dataclass
class Tally:
    """The additive report figures over some stretch of time."""

    new_customers: int = 0
    new_by_channel: Counter[str] = field(default_factory=Counter)
    new_by_source: Counter[str] = field(default_factory=Counter)
    messages_in: int = 0
    messages_out: int = 0
    opt_outs: int = 0
    stage_moves: Counter[str] = field(default_factory=Counter)
    #: Customers with an inbound message: bit n set for customer id n.
    active: int = 0

    @property
    def active_customers(self) -> int:
        return self.active.bit_count()

    def add(self, other: Tally) -> None:
        self.new_customers += other.new_customers
        self.new_by_channel.update(other.new_by_channel)
        self.new_by_source.update(other.new_by_source)
        self.messages_in += other.messages_in
        self.messages_out += other.messages_out
        self.opt_outs += other.opt_outs
        self.stage_moves.update(other.stage_moves)
        self.active |= other.active

    @classmethod
    def of(cls, day: ReportDay) -> Tally:
        return cls(day.new_customers, Counter(day.new_by_channel), Counter(day.new_by_source), day.messages_in,
                   day.messages_out, day.opt_outs, Counter(day.stage_moves),
                   int.from_bytes(zlib.decompress(day.active), "little"))


def _pieces(spans: list[Span]) -> list[Span]:
    """``spans`` cut into pieces of at most a day."""
    pieces = []
    for since, until in spans:
        while since < until:
            pieces.append((since, min(until, since + timedelta(days=1))))
            since = pieces[-1][1]
    return pieces


def _piece(column: Any, pieces: list[Span]) -> Any:
    """The index of the piece a timestamp falls in (comparisons only, portable)."""
    return case(*((and_(column > since, column <= until), i) for i, (since, until) in enumerate(pieces)))


async def _tallies(session: AsyncSession, pieces: list[Span]) -> list[Tally]:
    """The figures of each piece (at most a day) from the raw tables, in one pass over each table;
    the touchpoint pass also names the customers who wrote (it groups by them)."""
    tallies = [Tally() for _ in pieces]
    writers = [bytearray() for _ in pieces]
    move = case((Touchpoint.kind == "stage_changed",
                 Touchpoint.payload["from"].as_string() + literal(">") + Touchpoint.payload["to"].as_string()))
    # The writer first: the grouping sort (PostgreSQL) then mostly compares integers.
    groups = (case((INBOUND, Touchpoint.customer_id)), _piece(Touchpoint.created_at, pieces), Touchpoint.direction,
              Touchpoint.kind, OPT_OUT_REPLY_ROW, move)
    connection = await session.connection()  # Core: a row per writer, without the ORM's per-row work
    rows = await connection.execute(select(*groups, func.count()).where(
        Touchpoint.customer_id.is_not(None), within(Touchpoint.created_at, pieces)).group_by(*groups))
    for part in rows.partitions(ROWS_PER_TURN):
        for writer, i, direction, kind, opt_out_reply, moved, n in part:
            tally, bits = tallies[i], writers[i]
            if writer is not None:
                tally.messages_in += n
                if (byte := writer >> 3) >= len(bits):
                    bits.extend(bytes(byte + 1 - len(bits)))
                bits[byte] |= 1 << (writer & 7)
            tally.messages_out += n if direction == "out" and kind in MESSAGES_OUT else 0
            tally.opt_outs += n if kind in OPT_OUT_KINDS or opt_out_reply else 0
            if kind == "stage_changed":
                tally.stage_moves[str(moved)] += n
        await asyncio.sleep(0)  # a day's writers are tens of thousands of rows: let other requests in between
    for tally, bits in zip(tallies, writers, strict=True):
        tally.active = int.from_bytes(bits, "little")

    first_channel = (select(Identity.channel).where(Identity.customer_id == Customer.id)
                     .order_by(Identity.id).limit(1).scalar_subquery())
    new = (select(_piece(Customer.first_seen_at, pieces).label("piece"), first_channel.label("channel"),
                  Customer.acquisition_source.label("source"))
           .where(within(Customer.first_seen_at, pieces)).subquery())
    for i, channel, source, n in await session.execute(
            select(new.c.piece, new.c.channel, new.c.source, func.count())
            .group_by(new.c.piece, new.c.channel, new.c.source)):
        tallies[i].new_customers += n
        tallies[i].new_by_channel["-" if channel is None else channel] += n
        tallies[i].new_by_source["-" if source is None else source] += n
    return tallies


async def live(session: AsyncSession, spans: list[Span]) -> Tally:
    """The figures over ``spans`` from the raw tables, :data:`BATCH` days per pass: memory stays at
    a few days' writers however long the spans are."""
    total, pieces = Tally(), _pieces(spans)
    for start in range(0, len(pieces), BATCH):
        for tally in await _tallies(session, pieces[start:start + BATCH]):
            total.add(tally)
    return total


async def built_days(session: AsyncSession, since: datetime, until: datetime,
                     timezone: str | None = None) -> list[ReportDay]:
    """The built days lying wholly in ``(since, until]`` (of ``timezone`` when given), in order."""
    query = select(ReportDay).where(ReportDay.starts_at > since, ReportDay.ends_at <= until + TICK)
    if timezone is not None:
        query = query.where(ReportDay.timezone == timezone)
    days: list[ReportDay] = []
    for day in (await session.scalars(query.order_by(ReportDay.starts_at))).all():
        if not days or day.starts_at >= days[-1].ends_at:  # two zones' days overlap if one changes mid-build
            days.append(day)
    return days


def gaps(since: datetime, until: datetime, days: list[ReportDay]) -> list[Span]:
    """The parts of ``(since, until]`` that ``days`` (from :func:`built_days`) leave uncovered."""
    spans, cursor = [], since
    for day in days:
        if day.starts_at - TICK > cursor:
            spans.append((cursor, day.starts_at - TICK))
        cursor = day.ends_at - TICK
    if until > cursor:
        spans.append((cursor, until))
    return spans


async def tally(session: AsyncSession, since: datetime, until: datetime) -> Tally:
    """The figures for ``(since, until]``: built days from the rollup, the rest live."""
    days = await built_days(session, since, until)
    total = Tally()
    for day in days:
        total.add(Tally.of(day))
    if spans := gaps(since, until, days):
        total.add(await live(session, spans))
    return total


# --- building ----------------------------------------------------------------------------------

def _local_date(moment: datetime, zone: ZoneInfo) -> date:
    return moment.replace(tzinfo=ZoneInfo("UTC")).astimezone(zone).date()


async def build_days(sessions: async_sessionmaker[AsyncSession], days: list[date], timezone: str,
                     now: datetime) -> int:
    """Sum local days and store them; none when an invalidation committed while they were read."""
    zone = ZoneInfo(timezone)
    bounds = [(local_midnight(day, zone), local_midnight(day + timedelta(days=1), zone)) for day in days]
    async with sessions() as session, session.begin():
        generation = await session.scalar(select(ReportRollupState.generation))
        tallies = await _tallies(session, [(start - TICK, end - TICK) for start, end in bounds])
        # Takes the row (PostgreSQL) or the store (SQLite) lock: an invalidation either committed
        # before (the counter moved: drop the days) or waits and then deletes the days stored here.
        unchanged = await session.execute(update(ReportRollupState).where(ReportRollupState.generation == generation)
                                          .values(generation=ReportRollupState.generation))
        if not rowcount(unchanged):
            return 0
        await session.execute(delete(ReportDay).where(ReportDay.day.in_(days)))
        session.add_all(ReportDay(
            day=day, timezone=timezone, starts_at=start, ends_at=end, new_customers=t.new_customers,
            new_by_channel=dict(t.new_by_channel), new_by_source=dict(t.new_by_source), messages_in=t.messages_in,
            messages_out=t.messages_out, opt_outs=t.opt_outs, stage_moves=dict(t.stage_moves),
            active=zlib.compress(t.active.to_bytes((t.active.bit_length() + 7) // 8, "little")), built_at=now)
            for day, (start, end), t in zip(days, bounds, tallies, strict=True))
    return len(days)


async def build(sessions: async_sessionmaker[AsyncSession], timezone: str, now: datetime) -> int:
    """Build every closed day since the first customer or touchpoint that is not built, newest first
    (recent days are what reports ask for), :data:`BATCH` days at a time; returns the days stored."""
    zone = ZoneInfo(timezone)
    async with sessions() as session, session.begin():
        await session.execute(delete(ReportDay).where(ReportDay.timezone != timezone))  # the time zone changed
        firsts = [await session.scalar(select(func.min(Customer.first_seen_at))),
                  await session.scalar(select(func.min(Touchpoint.created_at)))]
        built = set((await session.scalars(select(ReportDay.day))).all())
    first = min((f for f in firsts if f is not None), default=None)
    if first is None:
        return 0
    last = _local_date(now - SETTLE, zone) - timedelta(days=1)
    missing = [last - timedelta(days=i) for i in range((last - _local_date(first, zone)).days + 1)
               if last - timedelta(days=i) not in built]
    stored = 0
    for i in range(0, len(missing), BATCH):
        stored += await build_days(sessions, missing[i:i + BATCH], timezone, now)
    return stored


def job(service: Runtime) -> Callable[[], Awaitable[int]]:
    """The scheduler job: build the days that closed (or were invalidated) since the last run."""

    async def build_rollups() -> int:
        stored = await build(service.sessions, service.config.service.timezone, service.clock.now())
        if stored:
            log.info("report rollups: built %d days", stored)
        return stored

    return build_rollups


# --- invalidation --------------------------------------------------------------------------------

async def _bump(session: AsyncSession) -> None:
    # First in the caller's transaction: a build either committed before (its day is then visible
    # to the deletes that follow) or waits for this commit and drops its day.
    await session.execute(update(ReportRollupState).values(generation=ReportRollupState.generation + 1))


async def invalidate(session: AsyncSession, moments: Iterable[datetime]) -> None:
    """Forget the built days holding any of ``moments`` (naive UTC): call it in the transaction
    that changes, after the fact, rows stamped with those times."""
    times = sorted(set(moments))
    if not times:
        return
    await _bump(session)
    days = (await session.execute(select(ReportDay.day, ReportDay.starts_at, ReportDay.ends_at))).all()
    stale = [day for day, start, end in days if (i := bisect_left(times, start)) < len(times) and times[i] < end]
    if stale:
        await session.execute(delete(ReportDay).where(ReportDay.day.in_(stale)))


async def forget_all(session: AsyncSession) -> None:
    """Forget every built day (``scrm report rollups --rebuild``)."""
    await _bump(session)
    await session.execute(delete(ReportDay))


async def before_merge(session: AsyncSession, keep: Customer, dup: Customer) -> None:
    """A merge moves ``dup``'s history to ``keep`` and may move ``keep``'s first day: both first
    days (new customers by channel) and the days ``dup`` wrote on (active customers) change."""
    wrote = await session.scalars(select(Touchpoint.created_at).where(INBOUND, Touchpoint.customer_id == dup.id))
    await invalidate(session, [keep.first_seen_at, dup.first_seen_at, *wrote])


async def before_redaction(session: AsyncSession, *where: ColumnElement[bool]) -> None:
    """Blanking texts (``where`` selects the touchpoints) changes the opt-outs of the days holding
    opt-out replies, which are counted by their text."""
    await invalidate(session, await session.scalars(select(Touchpoint.created_at).where(
        OPT_OUT_REPLY_ROW, *where)))
