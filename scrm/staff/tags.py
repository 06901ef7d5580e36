"""Operators tag customers by hand from chat: ``/tag console:alice +vip -old``."""

from __future__ import annotations

from scrm.staff import StaffContext, command, customer_arg
from scrm.tagging import change_tags, tag_changes

USAGE = "/tag <customer> +tag -tag   (customer: #id, channel:id or channel:account:id)"


@command("tag", {"operator", "admin"}, USAGE)
async def tag(ctx: StaffContext, args: str) -> str:
    parsed = tag_changes(args)
    if parsed is None:
        return f"用法 Usage: {USAGE}"
    ref, changes = parsed
    customer = await customer_arg(ctx, ref)
    done = await change_tags(ctx.service, ctx.session, customer, changes, ctx.actor, ctx.now)
    return f"{ref}: {' '.join(done) if done else '没有变化 no change'}"
