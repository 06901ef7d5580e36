"""The audit log: who read or changed whose personal data, when, how and what.

Append-only by construction: this module has no update or delete path, and the store refuses
UPDATE/DELETE on ``audit_log`` with a trigger (migration 0005), so even a bug or a hand-typed SQL
statement cannot rewrite history.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.store.models import AuditEntry

#: What staff did: ``view`` (360° card / ``/customer``), ``reveal`` (decrypted values), ``export``, ``erase``.
ACTIONS = frozenset({"view", "reveal", "export", "erase", "consent", "merge", "import"})


async def audit(session: AsyncSession, actor: str, role: str | None, customer_id: int | None, action: str,
                detail: str | None = None, *, via: str | None = None, at: datetime | None = None) -> AuditEntry:
    """Record one access; flushed at once so the entry exists in the same transaction as the read.

    ``actor`` is who (``staff:<channel>:<id>``, ``cli:<user>``, ``api:<key name>``); ``via`` how they
    came (a channel, ``cli``, ``api:<key>``; default: the actor's prefix).
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r} (known: {', '.join(sorted(ACTIONS))})")
    if not actor:
        raise ValueError("an audit entry needs an actor")
    if via is None:
        parts = actor.split(":")
        via = parts[1] if parts[0] == "staff" and len(parts) > 2 else parts[0]
    if at is None:
        from scrm.clock import SystemClock

        at = SystemClock().now()
    entry = AuditEntry(at=at, actor=actor[:160], role=role, via=via[:64], customer_id=customer_id, action=action,
                       detail=detail)
    session.add(entry)
    await session.flush()
    return entry


async def entries(session: AsyncSession, customer_id: int | None = None, since: datetime | None = None,
                  limit: int | None = None) -> list[AuditEntry]:
    query = select(AuditEntry).order_by(AuditEntry.id)
    if customer_id is not None:
        query = query.where(AuditEntry.customer_id == customer_id)
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    if limit is not None:
        query = query.order_by(None).order_by(AuditEntry.id.desc()).limit(limit)
        return list(reversed((await session.scalars(query)).all()))
    return list((await session.scalars(query)).all())
