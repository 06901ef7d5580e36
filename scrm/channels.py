"""The one small interface every chat channel implements, and the registry of channel types.

A channel turns platform input into an :class:`~scrm.messages.InboundEvent` and hands it to the core
(``service.receive``); the core sends an :class:`~scrm.messages.OutboundMessage` back through
:meth:`Channel.send`. Nothing here (or anywhere in ``scrm``) imports a platform SDK: that lives in
``handlers/``, one module per channel type.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, ClassVar

import click
from aiohttp import web
from pydantic import BaseModel

from scrm.messages import OutboundMessage, SendResult

if TYPE_CHECKING:
    from scrm.acquisition.menus import MenuClick
    from scrm.runtime import Runtime


@dataclass(frozen=True)
class CodeRequest:
    """A channel code to make on the platform (scrm.acquisition.codes): ``scene`` comes back with each
    arrival through it; ``expires_seconds`` None for a permanent code."""

    scene: str
    expires_seconds: int | None
    staff: tuple[str, ...] = ()
    #: WeCom: a group join way for these group chats instead of a contact-me way.
    groups: tuple[str, ...] = ()
    remark: str = ""


@dataclass(frozen=True)
class IssuedCode:
    """What the platform made: ``url`` is what the printed code encodes; ``ref`` is the platform's handle
    to update or delete it (WeCom's config_id, WeChat's ticket)."""

    kind: str
    url: str
    ref: str | None = None


class CodeError(Exception):
    """The platform refused a code (expired, staff member unknown, quota): ``reason`` says why in words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Channel(ABC):
    """One configured account of one channel type."""

    type_name: ClassVar[str]
    settings_model: ClassVar[type[BaseModel]]
    #: How long after the person's last message the account may write to them freely; None: always.
    reply_window: timedelta | None = None

    def __init__(self, account: str, settings: BaseModel, service: Runtime) -> None:
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

    def menu_action(self, key: str) -> MenuClick | None:
        """What a tap on the account's menu button with this key does (scrm.acquisition.menus); None: nothing
        configured (the tap is only recorded)."""
        return None

    def jobs(self) -> list[tuple[str, Callable[[], Awaitable[None]], float]]:
        """Periodic work for the scheduler as ``(job id, coroutine function, interval seconds)``,
        e.g. fetching mass-send results that a platform only reports later."""
        return []

    @abstractmethod
    async def send(self, message: OutboundMessage) -> SendResult:
        """Send one message; must not raise for platform errors, but report them."""

    async def create_code(self, request: CodeRequest) -> IssuedCode:
        """Make a channel code (QR code, contact-me way, deep link) on the platform."""
        raise CodeError(f"{self.type_name} accounts have no channel codes")

    async def update_code(self, code: IssuedCode, request: CodeRequest) -> None:
        """Give a code made earlier other staff members or group chats (WeCom's ways)."""
        raise CodeError(f"{self.type_name} codes have no staff members to change")

    async def delete_code(self, code: IssuedCode) -> None:
        """Withdraw a code on the platform where it can be (else arrivals through it are ignored)."""

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
