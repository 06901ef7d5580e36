"""The platform-free data crossing the border between the core and the channels.

A channel turns platform input into an :class:`InboundEvent`; the core answers with a :class:`Reaction`
once the event is committed, and sends an :class:`OutboundMessage`, whose outcome comes back as a
:class:`SendResult`. Plain data: every module may read it, and it imports nothing of the project.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import Any, Literal

#: Inbound kinds that are the person writing to us.
MESSAGE_KINDS = frozenset({"text", "image", "voice", "video", "location", "link", "command"})
#: Everything the person actively did: updates ``last_inbound_at``, which opens reply windows
#: (WeChat counts a follow, a QR scan or a menu click as an interaction too).
INTERACTION_KINDS = MESSAGE_KINDS | {"subscribe", "scan", "menu_click", "menu_view", "contact_shared"}

#: Other inbound kinds the core reacts to; any other kind is recorded as a touchpoint and nothing more.
#:  subscribe         followed the account / added the staff member / started the bot (captures; clears opt-out)
#:  unsubscribe       unfollowed; ``blocked``: blocked the bot — both opt the customer out of pushes
#:  contact_removed   deleted the brand's staff member as a contact: stage becomes ``lost``
#:  contact_shared    shared their own phone number (``payload["phone"]``): saved with consent
#:  group_joined / group_left   joined or left a customer group (``payload["group_id"]``)
#:  menu_click        tapped a menu button (``payload["key"]``): what the account's menu says for it (scrm.acquisition.menus)
#:  menu_view, scan, contact_updated, group_created, group_updated, group_dismissed: recorded
CORE_EVENT_KINDS = frozenset({"subscribe", "unsubscribe", "blocked", "contact_removed", "contact_shared",
                              "group_joined", "group_left", "menu_click"})


@dataclass(frozen=True)
class InboundEvent:
    """One thing a person did on a channel: a message, a subscription, a group join..."""

    channel: str
    account: str
    external_id: str
    kind: str  # one of MESSAGE_KINDS or the event kinds listed above
    text: str = ""
    #: Platform id used to drop retries (MsgId, update_id, FromUserName+CreateTime).
    platform_msg_id: str | None = None
    display_name: str | None = None
    #: Acquisition source (QR scene, deep-link payload, contact-me state).
    source: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    #: The channel code's scene this arrival came through (QR scene string, contact-me state, deep-link
    #: payload): scrm.acquisition.arrivals looks the code up by it.
    scene: str | None = None


def storable(value: Any) -> Any:
    """Strings the store can hold: without NUL (PostgreSQL text refuses it) and without lone
    surrogates (not encodable as UTF-8); applied to everything an event carries."""
    if isinstance(value, str):
        return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value


def cleaned(event: InboundEvent) -> InboundEvent:
    values = {f.name: getattr(event, f.name) for f in _EVENT_FIELDS}
    fixed = {name: storable(value) for name, value in values.items()}
    # Names and sources are the person's to choose: keep what fits the store rather than refuse them.
    fixed["display_name"] = fixed["display_name"][:255] if fixed["display_name"] else fixed["display_name"]
    fixed["source"] = fixed["source"][:128] if fixed["source"] else fixed["source"]
    return event if fixed == values else replace(event, **fixed)


_EVENT_FIELDS = fields(InboundEvent)


@dataclass(frozen=True)
class Chart:
    """A picture (a report chart) drawn when a channel sends it, not when the core decides on it.

    Drawing takes 0.1 s warm and over half a second cold (matplotlib's import and fonts); what a chart
    shows is read inside a transaction (a staff command's, a digest's), which must not last that long,
    so the drawing waits until the channel sends, after the commit.
    """

    draw: Callable[[], bytes]

    async def png(self) -> bytes:
        """The PNG, drawn in a worker thread: never on the event loop."""
        return await asyncio.to_thread(self.draw)


@dataclass(frozen=True)
class Original:
    """A duplicate's first delivery: when it was received and the replies recorded for it."""

    received_at: datetime
    replies: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reaction:
    """What the core decided about an inbound event, returned once it is committed."""

    duplicate: bool = False
    replies: tuple[str, ...] = ()
    customer_id: int | None = None
    #: Report charts to send after the replies, where the channel can show images.
    images: tuple[Chart, ...] = ()
    #: For a duplicate: its original. A platform that retries because an answer was lost (WeChat's
    #: passive replies) can be answered the same way again; nothing is run twice.
    original: Original | None = None
    #: Link buttons under the last reply, as (label, url) (Telegram inline keyboard; a keyword auto-reply's).
    buttons: tuple[tuple[str, str], ...] = ()
    #: A link card answering instead of the replies where the channel has them (WeChat's passive news reply);
    #: other channels send the replies.
    article: Article | None = None


@dataclass(frozen=True)
class NoticeTemplate:
    """A platform notice template (WeChat template message) for use outside the reply window."""

    template_id: str
    fields: dict[str, str]
    url: str | None = None


@dataclass(frozen=True)
class Article:
    """A link card (WeChat news message); channels without cards send ``text`` with the link."""

    title: str
    description: str
    url: str
    picurl: str | None = None


@dataclass(frozen=True)
class OutboundMessage:
    channel: str
    account: str
    external_id: str
    text: str
    delivery_id: int | None = None
    campaign: str | None = None
    #: When the person last wrote to us: channels with a reply window (WeChat's 48 h) decide with it.
    last_inbound_at: datetime | None = None
    #: The campaign's notice template, rendered, for channels that need one outside the window.
    template: NoticeTemplate | None = None
    #: A chart to send with ``text`` as its caption; channels without images send the text.
    image: Chart | None = None
    #: ``external_id`` names a chat group (group campaigns), not a person.
    to_group: bool = False
    #: Link buttons under the text, as (label, url) (Telegram inline keyboard).
    buttons: tuple[tuple[str, str], ...] = ()
    #: A link card instead of plain text where the channel has them (WeChat news).
    article: Article | None = None
    #: Answers the person can tap (survey scores); a tap comes back as a text message with that answer.
    quick_replies: tuple[str, ...] = ()


#: ``unknown``: the platform may or may not have delivered (a lost answer); never resent, counted.
SendStatus = Literal["sent", "skipped", "failed", "retry", "unknown"]


@dataclass(frozen=True)
class SendResult:
    status: SendStatus
    reason: str | None = None
    platform_msg_id: str | None = None
    #: For ``retry``: seconds to wait before the next try (platform throttling).
    retry_after: float = 0.0
    #: For ``retry``: the request never reached the platform (connection refused, DNS failure, connect
    #: timeout), so nothing can have been delivered: the outbox keeps trying, backing off, for up to
    #: ``delivery.unreachable_retry_hours`` and reports the account degraded meanwhile. Never set after
    #: the request went out: a lost answer may hide a delivered message.
    unreachable: bool = False
