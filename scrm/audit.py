"""The audit log: who read or changed whose personal data, when, how and what.

Append-only by construction: this module has no update or delete path, and the store refuses
UPDATE/DELETE on ``audit_log`` with a trigger (migration 0005), so even a bug or a hand-typed SQL
statement cannot rewrite history.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.customers import customer_of, parse_ref
from scrm.store.models import AuditEntry

if TYPE_CHECKING:
    from scrm.keyring import Keyring

#: What staff did: ``view`` (360° card / ``/customer``), ``reveal`` (decrypted values), ``export``, ``erase``;
#: ``campaign_edit``: a campaign file changed or added from the console (no customer; the detail holds the diff).
#: ``code_edit``: a channel code made, changed or disabled (scrm.acquisition.codes; no customer).
ACTIONS = frozenset({"view", "reveal", "export", "erase", "consent", "merge", "import", "campaign_edit",
                     "code_edit"})


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
                  limit: int | None = None, *, actor: str | None = None, until: datetime | None = None,
                  before: int | None = None) -> list[AuditEntry]:
    """Entries oldest first, filtered by customer, ``actor``, time (``since`` <= at < ``until``) and
    id (below ``before``, the cursor of a page); with ``limit``, the newest ``limit`` of them.

    ``actor`` matches the whole actor or its last parts: ``olive`` finds ``console:olive`` and
    ``staff:console:olive``, ``console:olive`` the latter too (what the CLI's ``--actor`` and the
    console's staff filter mean)."""
    query = select(AuditEntry).order_by(AuditEntry.id)
    if customer_id is not None:
        query = query.where(AuditEntry.customer_id == customer_id)
    if actor is not None:
        query = query.where(or_(AuditEntry.actor == actor, AuditEntry.actor.endswith(f":{actor}", autoescape=True)))
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    if until is not None:
        query = query.where(AuditEntry.at < until)
    if before is not None:
        query = query.where(AuditEntry.id < before)
    if limit is not None:
        query = query.order_by(None).order_by(AuditEntry.id.desc()).limit(limit)
        return list(reversed((await session.scalars(query)).all()))
    return list((await session.scalars(query)).all())


async def actors(session: AsyncSession) -> list[str]:
    """Everyone the log names, for a filter's suggestions."""
    return list((await session.scalars(select(AuditEntry.actor).distinct().order_by(AuditEntry.actor))).all())


async def customer_filter(session: AsyncSession, text: str, channels: Mapping[str, Mapping[str, Any]],
                          keyring: Keyring | None = None) -> int:
    """The customer id an audit query filters by: ``#id`` as given, as an erased or merged-away
    customer's entries stay in the log; otherwise the customer the reference names (raises
    :class:`~scrm.customers.CustomerRefError`)."""
    wanted = parse_ref(text, channels)
    return wanted.id if wanted.id is not None else (await customer_of(session, wanted, keyring)).id
