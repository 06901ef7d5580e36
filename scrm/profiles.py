"""Keeping profiles current: behaviour tags, the activity-drop signal, tag expiry and lifecycle stages.

One set-based pass serves both the periodic job (every customer) and the incremental one (the
customers just touched by events): conditions are segment expressions compiled to SQL, and only the
ids of customers whose profile changes come back to Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    ScalarSelect,
    Select,
    and_,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import segments
from scrm.campaigns.planner import plan_triggered
from scrm.config import BehaviourRule, Config, Transition
from scrm.store.models import Customer, CustomerTag, Tag, Touchpoint
from scrm.tagging import tag_id
from scrm.webhooks import events

if TYPE_CHECKING:
    from scrm.runtime import Runtime

CHUNK = 500
#: Customers by id range per transaction of the full refresh.
RANGE = 2000
SYSTEM = {"channel": "system", "account": "-", "direction": "internal"}


@dataclass
class RefreshResult:
    tags_added: dict[str, int] = field(default_factory=dict)
    tags_removed: dict[str, int] = field(default_factory=dict)
    tags_expired: int = 0
    stage_moves: dict[str, int] = field(default_factory=dict)
    planned: int = 0

    def add(self, other: RefreshResult) -> None:
        for mine, theirs in ((self.tags_added, other.tags_added), (self.tags_removed, other.tags_removed),
                             (self.stage_moves, other.stage_moves)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n
        self.tags_expired += other.tags_expired
        self.planned += other.planned


def behaviour_rules(config: Config) -> list[BehaviourRule]:
    rules = list(config.tagging.behaviour)
    if (drop := config.tagging.activity_drop) is not None:
        n, keep = drop.days, 100 - drop.drop_percent
        # Recent activity at most (100 - X)% of the customer's own previous window, which had some.
        rules.append(BehaviourRule(tag=drop.tag, when=f"msgs({n}) * 100 <= msgs({n}, {2 * n}) * {keep:g} "
                                                       f"and msgs({n}, {2 * n}) > 0"))
    return rules


def _chunks(ids: Sequence[int]) -> list[Sequence[int]]:
    return [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK)]


async def _ids(session: AsyncSession, query: Any) -> list[int]:
    return list((await session.scalars(query)).all())


async def _record(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    """Insert touchpoint rows, with the webhook events they tell of."""
    await session.execute(insert(Touchpoint), rows)
    await events.emit_touchpoints(session, rows)


async def _touch(session: AsyncSession, ids: Sequence[int], kind: str, now: datetime, payload: dict[str, Any]) -> None:
    if ids:
        await _record(session, [
            {**SYSTEM, "customer_id": cid, "kind": kind, "payload": payload, "created_at": now} for cid in ids])


async def pending(service: Runtime, session: AsyncSession, now: datetime, scope: ColumnElement[bool]) -> bool:
    """Whether :func:`refresh` would change anything in scope, in one read-only statement: most
    chunks of just-touched customers change nothing, and need not queue for SQLite's one writer."""
    config = service.config
    changes: list[Select[*tuple[Any, ...]]] = [_expired(scope, now)]
    for rule in behaviour_rules(config):
        tid = select(Tag.id).where(Tag.name == rule.tag).scalar_subquery()  # NULL until the tag exists
        changes.append(_gaining(config, rule, tid, scope, now))
        if not rule.sticky:
            changes.append(_losing(config, rule, tid, scope, now))
    changes += [_moving(config, transition, scope, now) for transition in config.lifecycle.transitions]
    return bool(await session.scalar(select(or_(*(change.exists() for change in changes)))))


# What changes for the customers in scope: refresh() reads these, pending() asks whether any has a row.
def _expired(scope: ColumnElement[bool], now: datetime) -> Select[*tuple[Any, ...]]:
    return (select(CustomerTag.id, CustomerTag.customer_id, Tag.name).join(Tag)
            .join(Customer, Customer.id == CustomerTag.customer_id)
            .where(scope, CustomerTag.expires_at.is_not(None), CustomerTag.expires_at <= now))


def _gaining(config: Config, rule: BehaviourRule, tid: int | ScalarSelect[int], scope: ColumnElement[bool],
             now: datetime) -> Select[Any]:
    condition = segments.condition(rule.when, now, config.segments)
    has_tag = (select(CustomerTag.id).where(CustomerTag.customer_id == Customer.id, CustomerTag.tag_id == tid)
               .exists())
    return select(Customer.id).where(scope, condition, ~has_tag)


def _losing(config: Config, rule: BehaviourRule, tid: int | ScalarSelect[int], scope: ColumnElement[bool],
            now: datetime) -> Select[Any]:
    condition = segments.condition(rule.when, now, config.segments)
    return (select(Customer.id).join(CustomerTag, and_(
        CustomerTag.customer_id == Customer.id, CustomerTag.tag_id == tid, CustomerTag.source == "behaviour"))
        .where(scope, or_(~condition, condition.is_(None))))


def _moving(config: Config, transition: Transition, scope: ColumnElement[bool], now: datetime) -> Select[Any]:
    condition = segments.condition(transition.when, now, config.segments)
    return select(Customer.id).where(scope, Customer.stage.in_(transition.from_), Customer.stage != transition.to,
                                     condition)


async def refresh(service: Runtime, session: AsyncSession, now: datetime, scope: ColumnElement[bool]) -> RefreshResult:
    """Bring behaviour tags, expiries and stages up to date for the customers in scope (a condition on
    ``customers``; the service passes chunks, one transaction each)."""
    config = service.config
    result = RefreshResult()
    await _expire_tags(session, scope, now, result)
    for rule in behaviour_rules(config):
        await _behaviour_tag(service, session, rule, scope, now, result)
    for transition in config.lifecycle.transitions:
        moved = await _ids(session, _moving(config, transition, scope, now))
        for chunk in _chunks(moved):
            rows = (await session.execute(select(Customer.id, Customer.stage).where(Customer.id.in_(chunk)))).all()
            await _record(session, [
                {**SYSTEM, "customer_id": cid, "kind": "stage_changed", "payload": {"from": stage, "to": transition.to},
                 "created_at": now} for cid, stage in rows])
            await session.execute(update(Customer).where(Customer.id.in_(chunk)).values(stage=transition.to))
            result.planned += await plan_triggered(service, session, "stage_changed", chunk, now,
                                                   stage=transition.to)
        if moved:
            key = f"{'|'.join(transition.from_)}->{transition.to}"
            result.stage_moves[key] = result.stage_moves.get(key, 0) + len(moved)
    return result


async def _expire_tags(session: AsyncSession, scope: ColumnElement[bool], now: datetime, result: RefreshResult) -> None:
    expired = (await session.execute(_expired(scope, now))).all()
    if expired:
        await _record(session, [
            {**SYSTEM, "customer_id": cid, "kind": "tag_expired", "payload": {"tag": name}, "created_at": now}
            for _, cid, name in expired])
    for chunk in _chunks([row.id for row in expired]):
        await session.execute(delete(CustomerTag).where(CustomerTag.id.in_(chunk)))
    result.tags_expired += len(expired)


async def _behaviour_tag(service: Runtime, session: AsyncSession, rule: BehaviourRule, scope: ColumnElement[bool],
                         now: datetime, result: RefreshResult) -> None:
    tid = await tag_id(session, rule.tag)
    added = await _ids(session, _gaining(service.config, rule, tid, scope, now))
    for chunk in _chunks(added):
        await session.execute(insert(CustomerTag), [
            {"customer_id": cid, "tag_id": tid, "source": "behaviour", "source_detail": rule.when, "score": 1.0,
             "added_at": now} for cid in chunk])
        await _touch(session, chunk, "tag_added", now, {"tag": rule.tag, "rule": rule.when})
        result.planned += await plan_triggered(service, session, "tag_added", chunk, now, tag=rule.tag)
    if added:
        result.tags_added[rule.tag] = result.tags_added.get(rule.tag, 0) + len(added)
    if rule.sticky:
        return
    gone = await _ids(session, _losing(service.config, rule, tid, scope, now))
    for chunk in _chunks(gone):
        await session.execute(delete(CustomerTag).where(CustomerTag.tag_id == tid, CustomerTag.customer_id.in_(chunk)))
        await _touch(session, chunk, "tag_removed", now, {"tag": rule.tag, "rule": rule.when})
    if gone:
        result.tags_removed[rule.tag] = result.tags_removed.get(rule.tag, 0) + len(gone)
