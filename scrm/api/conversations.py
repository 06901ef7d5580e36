"""Staff replies into a customer's conversation, resolving it, and the conversations inbox."""

from __future__ import annotations

from scrm.api import models as m
from scrm.api.framework import ApiError, Call, Endpoint
from scrm.api.refs import REF_PARAM, by_path, iso
from scrm.conversations import threads
from scrm.messages import storable


async def send_message(call: Call) -> tuple[int, m.MessageOut]:
    """A staff reply through the conversation core: the same rules as chat's /reply and the console."""
    body: m.MessageIn = call.body
    svc = call.service
    async with svc.sessions() as session, session.begin():
        customer = await by_path(call, session)
        try:
            done = await threads.reply(svc, session, customer, storable(body.text), call.actor, svc.clock.now(),
                                       channel=body.channel, as_notice=body.as_notice)
        except threads.ConversationError as exc:
            raise ApiError(exc.status, exc.code, str(exc)) from None
    svc.wake_outbox()
    return 202, m.MessageOut(conversation=done.conversation_id, delivery=done.delivery_id, channel=done.channel,
                             as_notice=done.as_notice)


async def resolve_conversation(call: Call) -> m.ResolvedOut:
    svc = call.service
    async with svc.sessions() as session, session.begin():
        customer = await by_path(call, session)
        try:
            conv = await threads.resolve(session, customer, call.actor, svc.clock.now())
        except threads.ConversationError as exc:
            raise ApiError(exc.status, exc.code, str(exc)) from None
        out = m.ResolvedOut(conversation=conv.id, customer_id=customer.id, channel=conv.channel, state="resolved")
    svc.wake_outbox()  # marketing deferred while a person had the customer goes out now
    return out


async def list_conversations(call: Call) -> m.ConversationList:
    async with call.service.sessions() as session:
        rows = await threads.inbox(session, limit=100)
        counts = await threads.counts(session)
    return m.ConversationList(open=counts["open"], pending=counts["pending"], conversations=[
        m.ConversationOut(id=r.conversation_id, customer_id=r.customer_id, name=r.name, channel=r.channel,
                          account=r.account, state=r.state, assignee=r.assignee, handled=r.handled,
                          waiting_since=iso(r.waiting_since), last_customer_at=iso(r.last_customer_at),
                          last_text=r.last_text) for r in rows])


ENDPOINTS: list[Endpoint] = [
    Endpoint("POST", "/customers/{ref}/messages", send_message, "messages:write",
             "Reply to the customer in their conversation (as the key's actor)", m.MessageOut, body=m.MessageIn,
             status=202, params=REF_PARAM, errors=(400, 404, 409),
             description="Queued in the outbox and sent in order with other staff replies; recorded as a "
                         "staff_reply touchpoint with actor api:<key>. Refused, writing nothing: an empty reply "
                         "(400 empty_reply), over 2000 characters (413 reply_too_long), no conversation or a "
                         "resolved one (409 no_conversation, conversation_resolved), outside the channel's reply "
                         "window (409 outside_window; send as_notice when [conversations.notice] is configured)."),
    Endpoint("POST", "/customers/{ref}/conversation/resolve", resolve_conversation, "messages:write",
             "Resolve the customer's open conversation", m.ResolvedOut, params=REF_PARAM, errors=(404, 409),
             description="The unresolved conversation the customer wrote in last; auto-replies and paused "
                         "marketing resume at once. 409 when there is none to resolve."),
    Endpoint("GET", "/conversations", list_conversations, "conversations:read",
             "Unresolved conversations, the longest waiting first", m.ConversationList,
             description="At most 100: those waiting for staff by waiting time, then those waiting for the "
                         "customer; with the counts of both."),
]
