"""Operators tag customers by hand from chat: ``/tag console:alice +vip -old``."""

from __future__ import annotations

import re
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession

from scrm.campaigns.planner import plan_triggered
from scrm.customers import touchpoint
from scrm.staff import StaffContext, command, customer_arg
from scrm.store.models import Customer
from scrm.tagging import add_tag, remove_tag

if TYPE_CHECKING:
    from scrm.runtime import Runtime

_TAG_CHANGE = re.compile(r"^([+-])(\S{1,64})$")
USAGE = "/tag <customer> +tag -tag   (customer: #id, channel:id or channel:account:id)"


def tag_changes(args: str) -> tuple[str, list[tuple[bool, str]]] | None:
    """``console:alice +vip -old`` -> ("console:alice", [(True, "vip"), (False, "old")])."""
    parts = args.split()
    if len(parts) < 2:
        return None
    changes = []
    for part in parts[1:]:
        match = _TAG_CHANGE.match(part)
        if not match:
            return None
        changes.append((match.group(1) == "+", match.group(2)))
    return parts[0], changes


async def change_tags(service: Runtime, session: AsyncSession, customer: Customer, changes: list[tuple[bool, str]],
                      actor: str, now: datetime) -> list[str]:
    """Operator tag edits (chat or CLI), each recorded as a touchpoint; returns what changed."""
    done = []
    for add, name in changes:
        changed = (await add_tag(session, customer.id, name, "operator", actor, now) if add
                   else await remove_tag(session, customer.id, name))
        if changed:
            touchpoint(session, customer_id=customer.id, actor=actor, channel="system", account="-",
                       direction="internal", kind="tag_added" if add else "tag_removed", now=now,
                       payload={"tag": name, "by": actor})
            done.append(("+" if add else "-") + name)
            if add:
                await plan_triggered(service, session, "tag_added", [customer.id], now, tag=name)
    return done


@command("tag", {"operator", "admin"}, USAGE)
async def tag(ctx: StaffContext, args: str) -> str:
    parsed = tag_changes(args)
    if parsed is None:
        return f"用法 Usage: {USAGE}"
    ref, changes = parsed
    customer = await customer_arg(ctx, ref)
    done = await change_tags(ctx.service, ctx.session, customer, changes, ctx.actor, ctx.now)
    return f"{ref}: {' '.join(done) if done else '没有变化 no change'}"
