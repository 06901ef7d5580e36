"""What the core's modules use of the running service.

:class:`scrm.service.Service` builds everything (channels, ingest, outbox, scheduler) and so imports
nearly every module; the modules it hands itself to type it as :class:`Runtime` instead, so that none
of them imports ``scrm.service`` back. Service is the one implementation; tests use the real one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from datetime import timedelta

    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

    from scrm.campaigns.definitions import LoadedCampaign
    from scrm.channels import CodeRequest, IssuedCode
    from scrm.clock import Clock
    from scrm.config import Config
    from scrm.conversations.replies import ReplyBook
    from scrm.ingest import Accepted
    from scrm.keyring import Keyring
    from scrm.acquisition.menus import MenuClick
    from scrm.messages import InboundEvent, OutboundMessage, Reaction, SendResult
    from scrm.tagging import KeywordTagger


class Sender(Protocol):
    """A configured channel account, as the core sends through it."""

    @property
    def reply_window(self) -> timedelta | None:
        """How long after the person's last message the account may still write to them freely
        (WeChat's customer-service messages: 48 hours); None: no such window."""

    async def send(self, message: OutboundMessage) -> SendResult: ...

    async def create_code(self, request: CodeRequest) -> IssuedCode:
        """Make a channel code on the platform (scrm.acquisition.codes)."""

    async def update_code(self, code: IssuedCode, request: CodeRequest) -> None:
        """Give a channel code other staff members or group chats on the platform."""

    async def delete_code(self, code: IssuedCode) -> None:
        """Withdraw a channel code on the platform where it can be."""

    def menu_action(self, key: str) -> MenuClick | None:
        """What a tap on the account's menu button with this key does; None: nothing configured."""


class Runtime(Protocol):
    config: Config
    clock: Clock
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    #: Loaded campaign definitions by name, and the names of those paused.
    campaigns: dict[str, LoadedCampaign]
    paused: set[str]
    tagger: KeywordTagger
    #: The keyword auto-reply rules, compiled (swapped whole when the files change).
    replies: ReplyBook

    @property
    def channels(self) -> Mapping[tuple[str, str], Sender]:
        """Every configured account by (channel type, account)."""

    @property
    def keyring(self) -> Keyring:
        """The privacy keys; opened by start()."""

    @property
    def stopping(self) -> bool:
        """True once stop() has begun: work that loops takes nothing new."""

    @property
    def instance_id(self) -> str:
        """This process among the instances sharing the store (claims are marked with it)."""

    def channel(self, kind: str, account: str) -> Sender | None: ...

    def receive(self, event: InboundEvent) -> asyncio.Future[Reaction]:
        """Resolves once the event and its effects are committed."""

    def accept(self, event: InboundEvent) -> Accepted:
        """The event's ``durable`` (acknowledge on it) and ``applied`` (its reaction) futures."""

    def wake_outbox(self) -> None: ...

    def touch(self, customer_ids: set[int]) -> None:
        """Queue customers for the incremental profile refresh."""

    def job(self, fn: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        """A scheduler job that stop() waits for."""
