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
from datetime import timedelta
from typing import TYPE_CHECKING, ClassVar

import click
from aiohttp import web
from pydantic import BaseModel

from scrm.messages import OutboundMessage, SendResult

if TYPE_CHECKING:
    from scrm.runtime import Runtime


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
