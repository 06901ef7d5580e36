"""Who answers a conversation, and telling them: the job that assigns each newly opened conversation
(to the customer's owner, else the next agent in turn) and alerts the assignee in staff chat.

The alert is marked before it is sent (at most once, also across instances), and it is recorded with
the platform's id of the alert message, so that a staff member on Telegram can answer the customer by
replying to it (:func:`conversation_of_alert`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.conversations import threads
from scrm.customers import staff_actor, staff_message_touchpoint
from scrm.messages import OutboundMessage, SendResult
from scrm.store.models import Conversation, Customer, Touchpoint

if TYPE_CHECKING:
    from scrm.runtime import Runtime

log = logging.getLogger(__name__)

ALERT_KIND = "conversation_alert"
BATCH = 100


@dataclass(frozen=True)
class _Alert:
    conversation_id: int
    customer_id: int
    assignee: str
    text: str


async def alert_new(service: Runtime) -> int:
    """Assign and announce the conversations opened since the last run; returns the alerts sent.

    Three steps, so that the store's writer is held for two short set-based transactions and never
    across the sends: claim and assign the batch (committed before anything is sent: at most once),
    send, then record what was sent."""
    from scrm.loyalty.followups import staff_message

    if not service.config.conversations.enabled:
        return 0
    async with service.sessions() as session, session.begin():
        alerts = await _claim(service, session, service.clock.now())
        messages = {a: await staff_message(service, session, a, "") for a in {x.assignee for x in alerts}}
    sent: list[tuple[_Alert, OutboundMessage, SendResult]] = []
    for alert in alerts:
        if (message := messages[alert.assignee]) is None:
            continue
        message = dataclasses.replace(message, text=alert.text)
        try:
            result = await service.channels[(message.channel, message.account)].send(message)
        except Exception as exc:  # noqa: BLE001 - the alerts sent before it are still recorded
            log.exception("conversation alert to %s failed", alert.assignee)
            result = SendResult("failed", f"error:{type(exc).__name__}")
        sent.append((alert, message, result))
    if sent:
        async with service.sessions() as session, session.begin():
            now = service.clock.now()
            for alert, message, result in sent:
                staff_message_touchpoint(session, message, result, ALERT_KIND, now,
                                         conversation=alert.conversation_id, customer=alert.customer_id)
    return sum(result.status == "sent" for _, _, result in sent)


async def _claim(service: Runtime, session: AsyncSession, now: datetime) -> list[_Alert]:
    """Mark the oldest unannounced open conversations alerted, assign those nobody has (the customer's
    owner, else the next agent on duty in turn) and write each alert's text."""
    from scrm.loyalty.followups import owners_of

    ids = (await session.scalars(select(Conversation.id).where(
        Conversation.state == "open", Conversation.alerted_at.is_(None)).order_by(Conversation.id)
        .limit(BATCH))).all()
    if not ids:
        return []
    claimed = set((await session.scalars(update(Conversation).where(
        Conversation.id.in_(ids), Conversation.alerted_at.is_(None)).values(alerted_at=now)
        .returning(Conversation.id))).all())  # another instance may have taken some
    rows = (await session.execute(select(Conversation, Customer).join(Customer, Customer.id == Conversation.customer_id)
                                  .where(Conversation.id.in_(claimed)).order_by(Conversation.id))).all()
    owners = await owners_of(service, session, [conv.customer_id for conv, _ in rows if conv.assignee is None])
    # On duty: the fallback reply's working hours, the one statement of when staff answer.
    hours = service.replies.fallback.hours if service.replies.fallback else None
    rota = await threads.Rota.read(service.config, session, now, hours) if any(
        conv.assignee is None and owners.get(conv.customer_id) is None for conv, _ in rows) else None
    last_texts = await _last_texts(session, {(conv.customer_id, conv.channel) for conv, _ in rows})
    alerts: list[_Alert] = []
    for conv, customer in rows:
        if conv.assignee is None:
            assignee = owners.get(conv.customer_id) or (rota.next() if rota is not None else None)
            if assignee is None:
                continue  # no staff configured: the inbox (console, API) still lists it
            await threads.assign(session, conv, assignee, "system", now)
            conv.alerted_at = now
        assert conv.assignee is not None
        who = f"#{customer.id} {customer.display_name or ''}".strip()
        asked = "请求人工 asked for a person" if conv.handled else "等待回复 waiting for a reply"
        last = last_texts.get((customer.id, conv.channel))
        text = (f"会话 Conversation {who} ({conv.channel}) {asked}:\n{(last or '(非文字 not text)')[:300]}\n"
                f"回复 Reply: /reply #{customer.id} <text> · /resolve #{customer.id}"
                + (" · or reply to this message" if conv.assignee.startswith("telegram:") else ""))
        alerts.append(_Alert(conv.id, customer.id, conv.assignee, text))
    return alerts


async def _last_texts(session: AsyncSession, wanted: set[tuple[int, str]]) -> dict[tuple[int, str], str | None]:
    """The text of each customer's last message on each channel: one statement for the batch."""
    if not wanted:
        return {}
    last_ids = select(func.max(Touchpoint.id)).where(
        Touchpoint.customer_id.in_({customer_id for customer_id, _ in wanted}), Touchpoint.direction == "in"
    ).group_by(Touchpoint.customer_id, Touchpoint.channel)
    rows = await session.execute(select(Touchpoint.customer_id, Touchpoint.channel, Touchpoint.text)
                                 .where(Touchpoint.id.in_(last_ids)))
    return {(customer_id, channel): text for customer_id, channel, text in rows
            if customer_id is not None and (customer_id, channel) in wanted}


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
