"""Who answers a conversation, and telling them: the job that assigns each newly opened conversation
(to the customer's owner, else the next agent in turn) and alerts the assignee in staff chat.

The alert is marked before it is sent (at most once, also across instances), and it is recorded with
the platform's id of the alert message, so that a staff member on Telegram can answer the customer by
replying to it (:func:`conversation_of_alert`).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.conversations import threads
from scrm.customers import staff_actor
from scrm.store.dialect import rowcount
from scrm.store.models import Conversation, Customer, Touchpoint

if TYPE_CHECKING:
    from scrm.runtime import Runtime

ALERT_KIND = "conversation_alert"
BATCH = 100


async def alert_new(service: Runtime) -> int:
    """Assign and announce the conversations opened since the last run; returns the alerts sent."""
    if not service.config.conversations.enabled:
        return 0
    sent = 0
    async with service.sessions() as session, session.begin():
        ids = (await session.scalars(select(Conversation.id).where(
            Conversation.state == "open", Conversation.alerted_at.is_(None)).order_by(Conversation.id)
            .limit(BATCH))).all()
        for conversation_id in ids:
            sent += await _alert(service, session, conversation_id, service.clock.now())
    return sent


async def _alert(service: Runtime, session: AsyncSession, conversation_id: int, now: datetime) -> bool:
    from scrm.loyalty.followups import owner_of, send_to_staff

    claimed = await session.execute(update(Conversation).where(
        Conversation.id == conversation_id, Conversation.alerted_at.is_(None)).values(alerted_at=now))
    if not rowcount(claimed):
        return False  # another instance took it
    conv = await session.get(Conversation, conversation_id)
    customer = await session.get(Customer, conv.customer_id) if conv else None
    if conv is None or customer is None:
        return False
    if conv.assignee is None:
        # On duty: the fallback reply's working hours, the one statement of when staff answer.
        hours = service.replies.fallback.hours if service.replies.fallback else None
        assignee = (await owner_of(service, session, customer.id)
                    or await threads.next_agent(service.config, session, now, hours))
        if assignee is None:
            return False  # no staff configured: the inbox (console, API) still lists it
        await threads.assign(session, conv, assignee, "system", now)
        conv.alerted_at = now
    last = await session.scalar(select(Touchpoint.text).where(
        Touchpoint.customer_id == customer.id, Touchpoint.channel == conv.channel, Touchpoint.direction == "in")
        .order_by(Touchpoint.id.desc()).limit(1))
    who = f"#{customer.id} {customer.display_name or ''}".strip()
    asked = "请求人工 asked for a person" if conv.handled else "等待回复 waiting for a reply"
    text = (f"会话 Conversation {who} ({conv.channel}) {asked}:\n{(last or '(非文字 not text)')[:300]}\n"
            f"回复 Reply: /reply #{customer.id} <text> · /resolve #{customer.id}"
            + (" · or reply to this message" if conv.assignee and conv.assignee.startswith("telegram:") else ""))
    assert conv.assignee is not None
    return await send_to_staff(service, session, conv.assignee, text, now, kind=ALERT_KIND,
                               conversation=conv.id, customer=customer.id)


async def conversation_of_alert(session: AsyncSession, channel: str, external_id: str,
                                alert_msg_id: str) -> int | None:
    """The customer an alert message (by its platform id) was about, if it was sent to this staff member."""
    rows = await session.scalars(select(Touchpoint.payload).where(
        Touchpoint.actor == staff_actor(channel, external_id), Touchpoint.kind == ALERT_KIND,
        Touchpoint.direction == "out").order_by(Touchpoint.id.desc()).limit(500))
    for payload in rows:
        if payload.get("platform_msg_id") == alert_msg_id and isinstance(payload.get("customer"), int):
            return int(payload["customer"])
    return None
