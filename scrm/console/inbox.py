"""Inbox: customers' conversations with staff (:mod:`scrm.conversations.threads`), those waiting
longest first, and one conversation's thread with a reply box, assignment and resolve.

The list is :func:`scrm.conversations.threads.inbox` ("mine": assigned to the signed-in staff member or
to nobody; "all"), refreshed every few seconds by htmx when JavaScript runs, and a plain page when it
does not. "Me" is the staff identity linked to the console account (``<channel>:<id>``, as in
``[staff]``, where conversation alerts go), else the account's actor ``console:<name>``; a reply from
here to an unassigned conversation assigns it to that.

A conversation's page shows the customer's touchpoints on that channel account (in, out and internal:
``staff_reply`` with the staff member who wrote it), a page at a time by touchpoint id, and replies still
in the outbox. Replies, assignments and resolves go through :func:`~scrm.conversations.threads.reply`,
:func:`~scrm.conversations.threads.assign` and :func:`~scrm.conversations.threads.resolve`, as in staff
chat and the API; their refusals (:class:`~scrm.conversations.threads.ConversationError`: empty, too
long, resolved, outside the channel's reply window...) are shown at the form's field, and nothing is
written. Outside the window, when ``[conversations.notice]`` is configured, the reply box offers to
send the reply as that notice template instead. Operators and admins answer; managers read, and the
routes that write refuse them.

Reading a conversation's page is an audit entry (``view``, via ``console``), committed before the page
is sent, as the customer page's thread is. The list is not audited: it shows display names and the
latest message of each conversation, what the assignee's chat alert and ``/inbox`` show, and an entry
for every customer on every refresh would bury the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import aiohttp_jinja2
from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.audit import audit
from scrm.console.app import Pages, error_page, service, staff
from scrm.console.customer import touchpoint_detail
from scrm.console.customers import cursor
from scrm.conversations import threads
from scrm.customers import MAX_ID
from scrm.messages import MESSAGE_KINDS
from scrm.store.engine import reading, writing
from scrm.store.models import STAFF_REPLY, Conversation, Customer, Delivery, StaffAccount, Touchpoint

pages = Pages()
CONVERSATION = "/inbox/{id:[0-9]{1,10}}"
View = Literal["mine", "all"]
#: Seconds between the list's refreshes (htmx polling).
REFRESH_SECONDS = 10
NOTICES = {
    "replied": "Reply queued: it goes out in a moment. 回复已排队发送。",
    "assigned": "Assigned. 已分配。",
    "resolved": "Conversation resolved. 会话已解决。",
}
STATE_LABELS = {"open": "open 待回复", "pending": "pending 待客户", "resolved": "resolved 已解决"}
#: Outbox statuses of a reply not sent yet.
_QUEUED = ("planned", "claimed", "sending")


def _view(request: web.Request) -> View:
    return "mine" if request.query.get("view") == "mine" else "all"


async def _me(session: AsyncSession, request: web.Request) -> str:
    """Who "mine" means: the account's linked staff identity, else its console actor."""
    who = staff(request)
    identity = await session.scalar(select(StaffAccount.identity).where(StaffAccount.id == who.account_id))
    return identity or who.actor


def waited(since: datetime | None, now: datetime) -> str:
    """How long a customer has waited, in the largest two units (``<1 min``, ``3 min``, ``2 h 5 min``, ``1 d 4 h``)."""
    if since is None:
        return ""
    minutes = max(0, int((now - since).total_seconds() // 60))
    if minutes < 1:
        return "<1 min"
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _local(zone: str) -> Any:
    tz = ZoneInfo(zone)

    def local(at: datetime | None) -> str:
        return at.replace(tzinfo=UTC).astimezone(tz).strftime("%Y-%m-%d %H:%M") if at else ""

    return local


async def _rows_context(request: web.Request) -> dict[str, Any]:
    svc = service(request)
    view = _view(request)
    async with reading(svc.sessions) as session:
        me = await _me(session, request)
        rows = await threads.inbox(session, assignee=me if view == "mine" else None,
                                   limit=svc.config.console.page_size)
        counts = await threads.counts(session)
    return {"rows": rows, "view": view, "me": me, "counts": counts, "now": svc.clock.now(), "waited": waited,
            "local": _local(svc.config.service.timezone), "states": STATE_LABELS, "timezone": svc.config.service.timezone,
            "refresh": REFRESH_SECONDS, "limit": svc.config.console.page_size}


@pages.get("/inbox", "manager")
async def inbox_page(request: web.Request) -> web.StreamResponse:
    return aiohttp_jinja2.render_template("inbox.html", request, await _rows_context(request))


@pages.get("/inbox/rows", "manager")
async def inbox_rows(request: web.Request) -> web.StreamResponse:
    """The list's rows alone, for the page's polling (htmx swaps them in)."""
    return aiohttp_jinja2.render_template("inbox_rows.html", request, await _rows_context(request))


# -- one conversation

@dataclass(frozen=True)
class Entry:
    """One touchpoint of the thread, as the page shows it."""

    id: int
    at: str
    direction: str
    kind: str
    actor: str | None
    text: str | None
    detail: str
    message: bool


async def thread_page(session: AsyncSession, conv: Conversation, size: int, before: int | None,
                      zone: str) -> tuple[list[Entry], int | None]:
    """The conversation's touchpoints (its customer on its channel account) below id ``before``: the
    newest ``size`` of them, oldest first as a chat reads, and the cursor of the page before (None on
    the first)."""
    query = select(Touchpoint).where(Touchpoint.customer_id == conv.customer_id, Touchpoint.channel == conv.channel,
                                     Touchpoint.account == conv.account)
    if before is not None:
        query = query.where(Touchpoint.id < before)
    rows = list((await session.scalars(query.order_by(Touchpoint.id.desc()).limit(size + 1))).all())
    tz = ZoneInfo(zone)
    entries = [Entry(t.id, t.created_at.replace(tzinfo=UTC).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S"),
                     t.direction, t.kind, t.actor, t.text, touchpoint_detail(t),
                     t.kind in MESSAGE_KINDS or t.text is not None) for t in rows[:size]]
    older = entries[-1].id if len(rows) > size else None
    return entries[::-1], older


async def _queued(session: AsyncSession, conv: Conversation) -> list[Delivery]:
    """Replies to the conversation still in the outbox, in the order they go out."""
    return list((await session.scalars(select(Delivery).where(
        Delivery.campaign == STAFF_REPLY, Delivery.customer_id == conv.customer_id, Delivery.channel == conv.channel,
        Delivery.account == conv.account, Delivery.status.in_(_QUEUED)).order_by(Delivery.id))).all())


@dataclass
class Problems:
    """What a refused form said, to show at its field; empty on a plain read."""

    text: str = ""
    as_notice: bool = False
    reply: threads.ConversationError | None = None
    assign: str | None = None
    resolve: threads.ConversationError | None = None
    status: int = 200


async def _conversation(request: web.Request, conversation_id: int, problems: Problems | None = None) -> web.StreamResponse:
    svc = service(request)
    problems = problems or Problems()
    zone = svc.config.service.timezone
    before = cursor(request, "before") if request.method == "GET" else None
    async with reading(svc.sessions) as session:
        conv = await session.get(Conversation, conversation_id) if conversation_id <= MAX_ID else None
        customer = await session.get(Customer, conv.customer_id) if conv is not None else None
        if conv is None or customer is None:
            return await error_page(request, 404, f"no conversation {conversation_id}")
        thread, older = await thread_page(session, conv, svc.config.console.page_size, before, zone)
        queued = await _queued(session, conv) if before is None else []
        me = await _me(session, request)
    who = staff(request)
    async with writing(svc.sessions) as session:
        await audit(session, who.actor, who.role, conv.customer_id, "view", f"console conversation {conv.id}",
                    via="console", at=svc.clock.now())
    agents = threads.agents(svc.config)
    notice_configured = svc.config.conversations.notice is not None
    offer = notice_configured and (problems.as_notice or (problems.reply is not None and problems.reply.code
                                                          == "outside_window"))
    return aiohttp_jinja2.render_template("inbox_conversation.html", request, {
        "conv": conv, "customer": customer, "thread": thread, "older": older, "paged": before is not None,
        "queued": queued, "me": me, "agents": agents if me in agents else [*agents, me], "p": problems,
        "offer_notice": offer, "notice": NOTICES.get(request.query.get("done", "")) if request.method == "GET" else None,
        "states": STATE_LABELS, "waited": waited, "now": svc.clock.now(), "local": _local(zone), "timezone": zone,
        "max_chars": threads.MAX_REPLY_CHARS}, status=problems.status)


@pages.get(CONVERSATION, "manager")
async def conversation_page(request: web.Request) -> web.StreamResponse:
    return await _conversation(request, int(request.match_info["id"]))


def _back(conversation_id: int, done: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"/console/inbox/{conversation_id}?{urlencode({'done': done})}")


async def _load(session: AsyncSession, conversation_id: int) -> tuple[Conversation, Customer] | None:
    conv = await session.get(Conversation, conversation_id) if conversation_id <= MAX_ID else None
    customer = await session.get(Customer, conv.customer_id) if conv is not None else None
    return None if conv is None or customer is None else (conv, customer)


async def _answering(session: AsyncSession, conv: Conversation) -> None:
    """Replies and resolves act on the customer's current conversation on the channel
    (:func:`~scrm.conversations.threads.current`); refuse when that is another account's."""
    now_current = await threads.current(session, conv.customer_id, conv.channel)
    if now_current is not None and now_current.id != conv.id:
        raise threads.ConversationError(
            "other_conversation", f"#{conv.customer_id} is talking on {now_current.channel}:{now_current.account} "
                                  f"now: answer conversation {now_current.id} instead")


@pages.post(CONVERSATION + "/reply", "operator")
async def reply(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    conversation_id = int(request.match_info["id"])
    form = await request.post()
    text, as_notice = str(form.get("text", "")), form.get("as_notice") == "1"
    who = staff(request)
    now = svc.clock.now()
    try:
        async with writing(svc.sessions) as session:
            found = await _load(session, conversation_id)
            if found is None:
                return await error_page(request, 404, f"no conversation {conversation_id}")
            conv, customer = found
            await _answering(session, conv)
            unassigned = conv.assignee is None
            await threads.reply(svc, session, customer, text, who.actor, now, channel=conv.channel,
                                as_notice=as_notice)
            me = await _me(session, request)
            if unassigned and conv.assignee != me:  # reply() assigned the console actor; the linked identity gets alerts
                await threads.assign(session, conv, me, who.actor, now)
    except threads.ConversationError as exc:
        return await _conversation(request, conversation_id,
                                   Problems(text=text, as_notice=as_notice, reply=exc, status=exc.status))
    svc.wake_outbox()
    raise _back(conversation_id, "replied")


@pages.post(CONVERSATION + "/assign", "operator")
async def assign(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    conversation_id = int(request.match_info["id"])
    assignee = str((await request.post()).get("assignee", "")).strip()
    async with writing(svc.sessions) as session:
        found = await _load(session, conversation_id)
        if found is None:
            return await error_page(request, 404, f"no conversation {conversation_id}")
        conv, _customer = found
        allowed = threads.agents(svc.config) + [await _me(session, request)]
        if assignee not in allowed:
            problem = f"Choose one of the agents: {', '.join(allowed)}. 请选择客服。"
        elif conv.state == "resolved":
            problem = "The conversation is resolved; it reopens when the customer writes. 会话已解决。"
        else:
            problem = None
            await threads.assign(session, conv, assignee, staff(request).actor, svc.clock.now())
    if problem is not None:
        return await _conversation(request, conversation_id, Problems(assign=problem, status=400))
    raise _back(conversation_id, "assigned")


@pages.post(CONVERSATION + "/resolve", "operator")
async def resolve(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    conversation_id = int(request.match_info["id"])
    try:
        async with writing(svc.sessions) as session:
            found = await _load(session, conversation_id)
            if found is None:
                return await error_page(request, 404, f"no conversation {conversation_id}")
            conv, customer = found
            await _answering(session, conv)
            await threads.resolve(session, customer, staff(request).actor, svc.clock.now(), channel=conv.channel)
    except threads.ConversationError as exc:
        return await _conversation(request, conversation_id, Problems(resolve=exc, status=exc.status))
    svc.wake_outbox()  # marketing deferred while a person had the customer is due now
    raise _back(conversation_id, "resolved")
