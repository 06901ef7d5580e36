"""Staff follow-ups (跟进提醒): owners, tasks by rule and by staff, alerts, daily digests, rates.

A customer's owner is the WeCom staff member who added them (the subscribe event's
``payload["owner"]``), else one set with ``/assign``, else ``followups.default_owner``. Owners are
staff identities ``<channel>:<id>`` like the keys of ``[staff]``; messages to them go out through
that channel's first configured account. Alerts and digests are marked before they are sent, so a
crash can lose one but never send one twice.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from scrm import segments
from scrm.conversations.replies import FALLBACK
from scrm.conversations.replies import staff_zone as zone_of
from scrm.customers import staff_last_inbound, staff_message_touchpoint, touchpoint
from scrm.loyalty.points import base_tier, ensure_account, loyalty
from scrm.messages import MESSAGE_KINDS, OutboundMessage
from scrm.store.dialect import insert_ignore, rowcount
from scrm.store.models import (
    Conversation,
    Conversion,
    Customer,
    FollowupDigest,
    FollowupTask,
    LoyaltyAccount,
    Touchpoint,
)

if TYPE_CHECKING:
    from scrm.runtime import Runtime

log = logging.getLogger(__name__)


async def owner_of(service: Runtime, session: AsyncSession, customer_id: int) -> str | None:
    return (await owners_of(service, session, [customer_id]))[customer_id]


async def owners_of(service: Runtime, session: AsyncSession, customer_ids: Collection[int]) -> dict[int, str | None]:
    """Each customer's owner (their loyalty account's, else the follow-ups' default owner): one query."""
    default = loyalty(service).followups.default_owner if service.config.loyalty else None
    if not customer_ids:
        return {}
    owners = dict((await session.execute(select(LoyaltyAccount.customer_id, LoyaltyAccount.owner).where(
        LoyaltyAccount.customer_id.in_(set(customer_ids))))).all())
    return {customer_id: owners.get(customer_id) or default for customer_id in customer_ids}


async def assign(service: Runtime, session: AsyncSession, customer_id: int, owner: str, now: datetime,
                 by: str | None = None) -> None:
    await ensure_account(session, customer_id, now, base_tier(loyalty(service)))
    await session.execute(update(LoyaltyAccount).where(LoyaltyAccount.customer_id == customer_id)
                          .values(owner=owner, updated_at=now))
    # Open tasks follow the customer to the new owner.
    await session.execute(update(FollowupTask).where(FollowupTask.customer_id == customer_id,
                                                     FollowupTask.done_at.is_(None)).values(owner=owner))
    touchpoint(session, customer_id=customer_id, channel="system", account="-", direction="internal",
               kind="owner_assigned", now=now, actor=by, payload={"owner": owner})


async def capture_owners(service: Runtime, session: AsyncSession, now: datetime, since: datetime) -> int:
    """Owners from WeCom "added as contact" events (payload owner = the staff member's UserID)."""
    owner = Touchpoint.payload["owner"].as_string()
    rows = (await session.execute(
        select(Touchpoint.customer_id, owner).outerjoin(LoyaltyAccount, LoyaltyAccount.customer_id == Touchpoint.customer_id)
        .where(Touchpoint.kind == "subscribe", Touchpoint.channel == "wecom", Touchpoint.created_at >= since,
               Touchpoint.customer_id.is_not(None), LoyaltyAccount.owner.is_(None), owner.is_not(None))
        .order_by(Touchpoint.id))).all()
    done: set[int] = set()
    for customer_id, user in rows:
        if customer_id not in done and user:
            await ensure_account(session, customer_id, now, base_tier(loyalty(service)))
            await session.execute(update(LoyaltyAccount).where(LoyaltyAccount.customer_id == customer_id,
                                                               LoyaltyAccount.owner.is_(None))
                                  .values(owner=f"wecom:{user}"))
            done.add(customer_id)
    return len(done)


async def create_task(service: Runtime, session: AsyncSession, customer_id: int, kind: str, note: str,
                      due_at: datetime, now: datetime, rule_key: str | None = None,
                      created_by: str | None = None, author: str | None = None) -> int | None:
    """A task for the customer's owner; rule tasks (with ``rule_key``) are made once. Returns its id.
    A customer without an owner: the task is its ``author``'s (a staff identity ``<channel>:<id>``,
    given by staff who write one by hand), who then sees it in ``/tasks`` and the digest."""
    owner = await owner_of(service, session, customer_id) or author
    inserted = await insert_ignore(session, FollowupTask.__table__, {
        "customer_id": customer_id, "owner": owner, "kind": kind, "note": note, "rule_key": rule_key,
        "due_at": due_at, "created_at": now, "created_by": created_by})
    if not inserted:
        return None
    task_id = await session.scalar(select(func.max(FollowupTask.id)).where(
        FollowupTask.customer_id == customer_id, FollowupTask.kind == kind))
    touchpoint(session, customer_id=customer_id, channel="system", account="-", direction="internal",
               kind="task_created", now=now, actor=created_by,
               payload={"task": task_id, "kind": kind, "owner": owner, "note": note})
    return task_id


async def complete(session: AsyncSession, task_id: int, by: str, now: datetime) -> FollowupTask | None:
    """Close an open task (a touchpoint records it); None when unknown or already done."""
    done = await session.execute(update(FollowupTask).where(FollowupTask.id == task_id, FollowupTask.done_at.is_(None))
                                 .values(done_at=now, done_by=by))
    if not rowcount(done):
        return None
    task = await session.get(FollowupTask, task_id, populate_existing=True)
    assert task is not None
    touchpoint(session, customer_id=task.customer_id, channel="system", account="-", direction="internal",
               kind="task_done", now=now, actor=by, payload={"task": task_id, "kind": task.kind})
    return task


async def open_tasks(session: AsyncSession, owner: str | None,
                     limit: int | None = None) -> list[tuple[FollowupTask, str | None]]:
    """Open tasks (``owner``'s, or everyone's for None), soonest due first, with the customer's name."""
    query = (select(FollowupTask, Customer.display_name).join(Customer, Customer.id == FollowupTask.customer_id)
             .where(FollowupTask.done_at.is_(None)).order_by(FollowupTask.due_at, FollowupTask.id).limit(limit))
    if owner is not None:
        query = query.where(FollowupTask.owner == owner)
    return [(t, n) for t, n in (await session.execute(query)).all()]


async def open_task_counts(session: AsyncSession, now: datetime) -> tuple[int, int]:
    """Open tasks, and of those overdue, in one query (the console's dashboard)."""
    row = (await session.execute(select(func.count(), func.count().filter(FollowupTask.due_at < now))
                                 .where(FollowupTask.done_at.is_(None)))).one()
    return int(row[0]), int(row[1])


@dataclass(frozen=True)
class TaskRow:
    """One open task as staff read it: due in their time zone, and whether it is overdue or due today."""

    id: int
    due: str
    flag: str
    customer_id: int
    name: str | None
    kind: str
    note: str | None
    owner: str | None


def task_rows(tasks: list[tuple[FollowupTask, str | None]], now: datetime, zone: str) -> list[TaskRow]:
    tz = ZoneInfo(zone)
    return [TaskRow(task.id, task.due_at.replace(tzinfo=UTC).astimezone(tz).strftime("%m-%d %H:%M"),
                    "逾期 overdue" if task.due_at < now else ("今天 due" if task.due_at < now + timedelta(days=1) else ""),
                    task.customer_id, name, task.kind, task.note, task.owner) for task, name in tasks]


def task_lines(tasks: list[tuple[FollowupTask, str | None]], now: datetime, zone: str) -> list[str]:
    return [f"[{r.id}] {r.due} {r.flag} #{r.customer_id} {r.name or ''} {r.kind}: {r.note or ''}".rstrip()
            for r in task_rows(tasks, now, zone)]


def staff_zone(service: Runtime, staff: str) -> str:
    return zone_of(service.config, staff)


async def send_to_staff(service: Runtime, session: AsyncSession, staff: str, text: str, now: datetime,
                        kind: str = "staff_alert", **payload: object) -> bool:
    """Send a chat message to a staff identity ``<channel>:<id>`` and record it as a touchpoint (with
    ``payload``, e.g. what the alert is about)."""
    message = await staff_message(service, session, staff, text)
    if message is None:
        return False
    result = await service.channels[(message.channel, message.account)].send(message)
    staff_message_touchpoint(session, message, result, kind, now, **payload)
    return result.status == "sent"


async def staff_message(service: Runtime, session: AsyncSession, staff: str, text: str) -> OutboundMessage | None:
    """A message to a staff identity ``<channel>:<id>`` with when they last wrote (WeChat's window), or
    None when no configured channel reaches them."""
    channel_kind, _, external_id = staff.partition(":")
    account = next((acc for (k, acc) in service.channels if k == channel_kind), None)
    if not external_id or account is None:
        log.warning("no configured %s channel to reach staff %s", channel_kind, staff)
        return None
    seen = await staff_last_inbound(session, channel_kind, account, external_id)
    return OutboundMessage(channel_kind, account, external_id, text, last_inbound_at=seen)


async def alert_new_tasks(service: Runtime, session: AsyncSession, now: datetime) -> int:
    """Tell owners about tasks they have not heard of yet (detractors, waiting customers...), with the
    customer's 360° card. The task is marked notified before the send: at most once."""
    from scrm.loyalty.view import card_text

    ids = (await session.scalars(select(FollowupTask.id).where(
        FollowupTask.notified_at.is_(None), FollowupTask.done_at.is_(None), FollowupTask.owner.is_not(None),
        FollowupTask.created_by.is_(None)).order_by(FollowupTask.id).limit(200))).all()
    sent = 0
    for task_id in ids:
        claimed = await session.execute(update(FollowupTask).where(FollowupTask.id == task_id,
                                                                   FollowupTask.notified_at.is_(None))
                                        .values(notified_at=now))
        if not rowcount(claimed):
            continue
        task = await session.get(FollowupTask, task_id)
        customer = await session.get(Customer, task.customer_id) if task else None
        if task is None or customer is None or task.owner is None:
            continue
        text = f"跟进提醒 Follow-up [{task.id}] {task.kind}: {task.note or ''}\n" + await card_text(session, customer)
        sent += await send_to_staff(service, session, task.owner, text, now)
    return sent


async def rule_tasks(service: Runtime, session: AsyncSession, now: datetime) -> int:
    """Tasks from rules: intent without a conversion in ``intent_days``; config rules (segment
    expressions, e.g. a VIP gone quiet), one open task per customer and rule."""
    config = loyalty(service).followups
    made = 0
    cutoff = now - timedelta(days=config.intent_days)
    bought = exists().where(Conversion.customer_id == LoyaltyAccount.customer_id,
                            Conversion.created_at >= LoyaltyAccount.intent_at)
    rows = (await session.execute(select(LoyaltyAccount.customer_id, LoyaltyAccount.intent_at, bought)
                                  .where(LoyaltyAccount.intent_at <= cutoff))).all()
    for customer_id, intent_at, converted in rows:
        assert intent_at is not None  # the query's intent_at <= cutoff excludes NULL
        await session.execute(update(LoyaltyAccount).where(LoyaltyAccount.customer_id == customer_id)
                              .values(intent_at=None))
        if not converted:
            made += await create_task(service, session, customer_id, "intent",
                                      f"询价 {config.intent_days} 天未下单 asked about price, no order yet", now, now,
                                      rule_key=intent_at.isoformat(timespec="seconds")) is not None
    for rule in config.rules:
        where = segments.condition(rule.when, now, service.config.segments)
        open_task = exists().where(FollowupTask.customer_id == Customer.id, FollowupTask.kind == rule.kind,
                                   FollowupTask.done_at.is_(None))
        ids = (await session.scalars(select(Customer.id).where(where, ~open_task))).all()
        for customer_id in ids:
            made += await create_task(service, session, customer_id, rule.kind, rule.note or rule.kind, now, now,
                                      rule_key=now.date().isoformat()) is not None
    return made


async def waiting_tasks(service: Runtime, session: AsyncSession, now: datetime) -> int:
    """A customer message on a staffed channel unanswered for ``waiting_minutes``: one task per message."""
    config = loyalty(service).followups
    if not config.staffed_channels:
        return 0
    limit = now - timedelta(minutes=config.waiting_minutes)
    last_in = (select(Touchpoint.customer_id.label("cid"), func.max(Touchpoint.id).label("tid"))
               .where(Touchpoint.direction == "in", Touchpoint.kind.in_(MESSAGE_KINDS),
                      Touchpoint.channel.in_(config.staffed_channels), Touchpoint.customer_id.is_not(None),
                      Touchpoint.created_at >= now - timedelta(days=2))
               .group_by(Touchpoint.customer_id).subquery())
    # Its own alias: a plain Touchpoint here would correlate with the outer query's and have no FROM.
    later = aliased(Touchpoint)
    # The fallback ("a person will answer soon") is no answer; a rule's answer, a campaign's or staff's is.
    answered = exists().where(later.customer_id == last_in.c.cid, later.id > last_in.c.tid, later.direction == "out",
                              or_(later.kind != "auto_reply", later.payload["rule"].as_string() != FALLBACK))
    rows = (await session.execute(
        select(last_in.c.cid, last_in.c.tid).join(Touchpoint, Touchpoint.id == last_in.c.tid)
        .where(Touchpoint.created_at <= limit, ~answered))).all()
    # A customer in a conversation: the task is about it and goes to whoever has it (scrm.conversations).
    assignees = dict((await session.execute(select(Conversation.customer_id, Conversation.assignee).where(
        Conversation.customer_id.in_([cid for cid, _ in rows]), Conversation.state != "resolved"))).all()) if rows else {}
    made = 0
    for customer_id, tid in rows:
        note = f"客户消息等待超过 {config.waiting_minutes} 分钟 waiting for a reply"
        if customer_id in assignees:
            note += f": /reply #{customer_id} <text>"
        made += await create_task(service, session, customer_id, "waiting", note, now, now, rule_key=str(tid),
                                  author=assignees.get(customer_id)) is not None
    return made


async def send_digests(service: Runtime, session: AsyncSession, now: datetime) -> int:
    """Each owner's open tasks once a day, at ``digest_at`` in their own time zone."""
    config = loyalty(service).followups
    owners = (await session.scalars(select(FollowupTask.owner).where(FollowupTask.done_at.is_(None),
                                                                     FollowupTask.owner.is_not(None))
                                    .group_by(FollowupTask.owner))).all()
    at = time.fromisoformat(config.digest_at)
    sent = 0
    for owner in owners:
        assert owner is not None  # the query excludes NULL owners
        zone = staff_zone(service, owner)
        local = now.replace(tzinfo=UTC).astimezone(ZoneInfo(zone))
        if local.time() < at:
            continue
        today = local.date().isoformat()
        await insert_ignore(session, FollowupDigest.__table__, {"staff": owner, "last_date": ""})
        claimed = await session.execute(update(FollowupDigest).where(FollowupDigest.staff == owner,
                                                                     FollowupDigest.last_date < today)
                                        .values(last_date=today))
        if not rowcount(claimed):
            continue
        tasks = await open_tasks(session, owner)
        overdue = sum(1 for t, _ in tasks if t.due_at < now)
        text = (f"今日跟进 Today's follow-ups: {len(tasks)} 项, 逾期 overdue {overdue}\n"
                + "\n".join(task_lines(tasks[:20], now, zone)) + "\n回复 /done <id> 完成")
        sent += await send_to_staff(service, session, owner, text, now, kind="task_digest")
    return sent


async def completion_rates(session: AsyncSession, since: datetime, until: datetime) -> list[dict[str, Any]]:
    """Per owner and kind, for tasks due in [since, until): created, done, done on time (by the end of
    the day after due), rate. For scrm.reports. Tasks are few next to messages, so rows are counted
    here rather than with date arithmetic that SQLite and PostgreSQL spell differently."""
    rows = (await session.execute(
        select(FollowupTask.owner, FollowupTask.kind, FollowupTask.due_at, FollowupTask.done_at)
        .where(FollowupTask.due_at >= since, FollowupTask.due_at < until))).all()
    counts: dict[tuple[str, str], list[int]] = {}
    for owner, kind, due, done in rows:
        c = counts.setdefault((owner or "", kind), [0, 0, 0])
        c[0] += 1
        c[1] += done is not None
        c[2] += done is not None and done <= due + timedelta(days=1)
    return [{"owner": owner or None, "kind": kind, "tasks": n, "done": done, "on_time": ok,
             "rate": round(done / n, 3) if n else 0.0} for (owner, kind), (n, done, ok) in sorted(counts.items())]


def parse_when(text: str, now: datetime, zone: str) -> datetime | None:
    """``2h`` / ``3d`` / ``明天`` / ``tomorrow`` / ``2026-12-01`` / ``2026-12-01 15:00`` (staff zone) -> naive UTC."""
    from scrm.campaigns.definitions import parse_duration

    text = text.strip()
    tz = ZoneInfo(zone)
    local = now.replace(tzinfo=UTC).astimezone(tz)
    try:
        return now + parse_duration(text)
    except ValueError:
        pass
    if text in ("明天", "tomorrow"):
        target = datetime.combine(local.date() + timedelta(days=1), time(9, 0), tz)
        return target.astimezone(UTC).replace(tzinfo=None)
    if text in ("今天", "today"):
        return now
    for fmt in ("%Y-%m-%d %H:%M", "%Y-%m-%d", "%Y-%m-%dT%H:%M"):
        try:
            parsed = datetime.strptime(text, fmt)
        except ValueError:
            continue
        if fmt == "%Y-%m-%d":
            parsed = parsed.replace(hour=9)
        return parsed.replace(tzinfo=tz).astimezone(UTC).replace(tzinfo=None)
    return None
