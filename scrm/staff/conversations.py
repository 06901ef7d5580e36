"""Staff answer customers from chat: ``/inbox``, ``/reply #12 text``, ``/resolve #12``; on Telegram also
by replying to a conversation alert. The same functions as the console's inbox and the API
(scrm.conversations.threads)."""

from __future__ import annotations

from datetime import datetime

from scrm.conversations import routing, threads
from scrm.staff import StaffContext, StaffReply, command, customer_arg

REPLY_USAGE = "/reply <customer> <text>   (customer: #id, channel:id; answers their conversation)"
RESOLVE_USAGE = "/resolve <customer>"
INBOX_USAGE = "/inbox   (open conversations, longest waiting first)"


@command("inbox", {"operator", "admin"}, INBOX_USAGE, reads_only=True)
async def inbox(ctx: StaffContext, args: str) -> str:
    rows = await threads.inbox(ctx.session, limit=20)
    if not rows:
        return "没有待处理的会话 No open conversations."
    me = ctx.actor.removeprefix("staff:")
    lines = [f"会话 Conversations ({len(rows)}):"]
    for r in rows:
        waited = f"等待 {_ago(r.waiting_since, ctx.now)}" if r.waiting_since else "pending"
        mine = " ←" if r.assignee == me else ""
        lines.append(f"#{r.customer_id} {r.name or ''} [{r.channel}] {waited} {r.assignee or '-'}{mine}: "
                     f"{(r.last_text or '')[:60]}")
    return "\n".join(lines)


def _ago(since: datetime, now: datetime) -> str:
    minutes = int((now - since).total_seconds() // 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h"


@command("reply", {"operator", "admin"}, REPLY_USAGE)
async def reply(ctx: StaffContext, args: str) -> StaffReply:
    ref, _, text = args.partition(" ")
    if not ref or not text.strip():
        return StaffReply(f"用法 Usage: {REPLY_USAGE}")
    return await _reply(ctx, await customer_arg(ctx, ref), text)


async def _reply(ctx: StaffContext, customer: object, text: str) -> StaffReply:
    from scrm.store.models import Customer

    assert isinstance(customer, Customer)
    try:
        done = await threads.reply(ctx.service, ctx.session, customer, text, ctx.actor, ctx.now)
    except threads.ConversationError as exc:
        return StaffReply(f"未发送 Not sent: {exc}")
    return StaffReply(f"已排队发送给 #{customer.id} ({done.channel}) Queued for #{customer.id}.", planned=1)


@command("resolve", {"operator", "admin"}, RESOLVE_USAGE)
async def resolve(ctx: StaffContext, args: str) -> str:
    if not args.strip():
        return f"用法 Usage: {RESOLVE_USAGE}"
    customer = await customer_arg(ctx, args.strip())
    try:
        conv = await threads.resolve(ctx.session, customer, ctx.actor, ctx.now)
    except threads.ConversationError as exc:
        return f"未完成 Not done: {exc}"
    return f"会话已解决 Conversation #{conv.id} with #{customer.id} resolved."


async def answer_alert(ctx: StaffContext) -> StaffReply | None:
    """A staff member's plain message that replies to a conversation alert (Telegram's reply) goes to
    that customer; None when the message replies to no alert of theirs."""
    from scrm.store.models import Customer

    alert = ctx.event.payload.get("reply_to")
    if not isinstance(alert, str) or not ctx.event.text.strip() or ctx.role not in ("operator", "admin"):
        return None
    customer_id = await routing.conversation_of_alert(ctx.session, ctx.event.channel, ctx.event.external_id, alert)
    customer = await ctx.session.get(Customer, customer_id) if customer_id is not None else None
    if customer is None:
        return None
    return await _reply(ctx, customer, ctx.event.text)
