"""The one small interface every chat channel implements, and the platform-free data crossing it.

A channel turns platform input into an :class:`InboundEvent` and hands it to the core through
:class:`Inbox`; the core sends an :class:`OutboundMessage` back through :meth:`Channel.send`.
Nothing here (or anywhere in ``scrm``) imports a platform SDK: that lives in ``handlers/``.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import click
from aiohttp import web
from pydantic import BaseModel

if TYPE_CHECKING:
    from scrm.service import Service


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
#:  menu_click, menu_view, scan, contact_updated, group_created, group_updated, group_dismissed: recorded
CORE_EVENT_KINDS = frozenset({"subscribe", "unsubscribe", "blocked", "contact_removed", "contact_shared",
                              "group_joined", "group_left"})


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
class Reaction:
    """What the core decided about an inbound event, returned once it is committed."""

    duplicate: bool = False
    replies: tuple[str, ...] = ()
    customer_id: int | None = None
    #: PNG images (report charts) to send after the replies, where the channel can show images.
    images: tuple[bytes, ...] = ()


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
    #: A PNG to send with ``text`` as its caption (report charts); channels without images send the text.
    image: bytes | None = None
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


#: The core's entry point for inbound events; resolves after the event is committed.
Inbox = Callable[[InboundEvent], Awaitable[Reaction]]


class Channel(ABC):
    """One configured account of one channel type."""

    type_name: ClassVar[str]
    settings_model: ClassVar[type[BaseModel]]

    def __init__(self, account: str, settings: BaseModel, service: Service) -> None:
        self.account = account
        self.settings = settings
        self.service = service

    def routes(self) -> list[web.RouteDef]:
        """Webhook routes this account serves on the service's own aiohttp server."""
        return []

    async def start(self) -> None:
        """Open HTTP sessions or other resources (called from the app's cleanup context)."""

    async def stop(self) -> None:
        """Release what :meth:`start` opened."""

    def jobs(self) -> list[tuple[str, Callable[[], Awaitable[None]], float]]:
        """Periodic work for the scheduler as ``(job id, coroutine function, interval seconds)``,
        e.g. fetching mass-send results that a platform only reports later."""
        return []

    @abstractmethod
    async def send(self, message: OutboundMessage) -> SendResult:
        """Send one message; must not raise for platform errors, but report them."""

    #: Channel-specific CLI commands, mounted as ``scrm <type_name> ...``.
    cli: ClassVar[click.Group | None] = None


_REGISTRY: dict[str, type[Channel]] = {}


def register(cls: type[Channel]) -> type[Channel]:
    """Class decorator used by each module in ``handlers/``."""
    _REGISTRY[cls.type_name] = cls
    return cls


def channel_types() -> dict[str, type[Channel]]:
    """All channel types, importing every module of the ``handlers`` package once."""
    import handlers

    for module in pkgutil.iter_modules(handlers.__path__):
        importlib.import_module(f"handlers.{module.name}")
    return dict(_REGISTRY)
