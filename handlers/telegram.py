"""Telegram bots: webhook (or long polling) updates in, ``sendMessage`` / ``sendPhoto`` out.

Inbound: ``POST /telegram/<bot>`` checks ``X-Telegram-Bot-Api-Secret-Token``, parses the body with
python-telegram-bot's :class:`telegram.Update` and hands the events to the core; Telegram gets its 200
only after the events are committed, so every acknowledged update is stored (a retry is deduplicated
by ``update_id``). Replies go out afterwards, off the webhook's critical path. With ``polling = true``
(or ``scrm telegram poll <bot>``) the same conversion is fed from ``getUpdates`` instead, and the
offset only moves past an update once it is committed.

Outbound: PTB's ``ExtBot`` with a rate limiter built on PTB's ``AIORateLimiter`` that spaces sends
evenly (no bursts) under Telegram's limits: ~30 messages/s overall, 1/s per private chat, 20/min per
group. Platform errors become :class:`SendResult` values: 429 -> retry after ``retry_after``, blocked
-> skipped (and the customer opted out), other 400s -> failed; Telegram unreachable (refused, DNS,
connect timeout) -> retry, marked ``unreachable``; an answer lost after the request went out -> failed,
never resent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import re
import signal
import sys
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import click
import httpx
from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
)
from telegram import (
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    Message,
    Update,
    User,
)
from telegram.constants import ChatMemberStatus, ChatType
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Conflict,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
)
from telegram.ext import AIORateLimiter, ExtBot
from telegram.helpers import create_deep_linked_url
from telegram.request import HTTPXRequest
from telegram.warnings import PTBDeprecationWarning

from scrm.campaigns.ratelimit import Pace
from scrm.channels import Channel, CodeError, CodeRequest, IssuedCode, register
from scrm.group_commit import StoreUnavailable
from scrm.messages import Chart, InboundEvent, OutboundMessage, Reaction, SendResult

if TYPE_CHECKING:
    from scrm.config import Config

log = logging.getLogger(__name__)
# httpx logs every request URL at INFO, and Bot API URLs contain the bot token.
logging.getLogger("httpx").setLevel(logging.WARNING)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
#: Update types the service understands; others are not even delivered (setWebhook / getUpdates).
ALLOWED_UPDATES = ("message", "my_chat_member")
#: ``t.me/<bot>?start=<payload>`` deep-link payloads (Bot API: up to 64 of A-Z a-z 0-9 _ -).
START_PAYLOAD = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TEXT = 4096
#: Length of the store's customers.acquisition_source column.
SOURCE_MAX = 64
MAX_CAPTION = 1024
#: Long-polling wait per getUpdates call (seconds).
POLL_TIMEOUT = 30
#: Re-plan after a network error that happened before the request reached Telegram.
NETWORK_RETRY_SECONDS = 5.0
#: httpx errors raised before a request was (completely) sent: retrying cannot send twice.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.WriteTimeout, httpx.WriteError)
#: Of those, the ones that say Telegram cannot be reached at all (refused, DNS failure, connect timeout).
_UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout)
_TOKEN = re.compile(r"\d{1,20}:[A-Za-z0-9_-]{20,}")


class TelegramSettings(BaseModel):
    """One bot, created with @BotFather."""

    model_config = ConfigDict(extra="forbid")

    token: SecretStr
    #: Long polling (getUpdates) instead of the webhook: for a machine Telegram cannot reach.
    polling: bool = False
    #: Sent by Telegram in X-Telegram-Bot-Api-Secret-Token (set with ``scrm telegram set-webhook``).
    webhook_secret: SecretStr | None = Field(None, validate_default=True)
    #: Bot API base; PTB appends the token (``<base><token>/<method>``).
    api_base_url: str = "https://api.telegram.org/bot"
    overall_per_second: float = Field(30, gt=0)
    per_chat_per_second: float = Field(1, gt=0)
    per_group_per_minute: float = Field(20, gt=0)

    @field_validator("token")
    @classmethod
    def _token_shape(cls, value: SecretStr) -> SecretStr:
        if not _TOKEN.fullmatch(value.get_secret_value()):
            raise ValueError("not a bot token (expected <digits>:<key>, as @BotFather gives it)")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _secret_shape(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            if not info.data.get("polling", False):
                raise ValueError("required unless polling = true (Telegram sends it with every webhook call)")
            return None
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", value.get_secret_value()):
            raise ValueError("1-256 characters of A-Z a-z 0-9 _ - (Telegram's secret_token rule)")
        return value

    @field_validator("api_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL, e.g. https://api.telegram.org/bot")
        return value


class _ChatTurn:
    """One private chat's turn: its requests go one at a time, each a period after the previous one left."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.free_at = -math.inf  # event loop time


class PacedRateLimiter(AIORateLimiter):
    """PTB's AIORateLimiter (it keeps the per-group limit) with a steady overall pace and a
    per-private-chat limit.

    AIORateLimiter's overall bucket allows a full burst (30 at once) and then keeps leaking, so a sliding
    second can see up to twice the limit; a bucket of capacity one instead loses every slot its waiter
    wakes late for. The overall limit here is a :class:`Pace` (evenly spaced slots that a late waiter
    does not lose), taken right before the HTTP call so that the spacing Telegram sees is the one
    enforced. Telegram also limits one private chat to about a message a second, which AIORateLimiter
    does not cover: a request waits for its chat's turn first, and the chat's next turn counts from when
    this one gets its overall slot, so neither wait spoils the other.
    """

    def __init__(self, overall_per_second: float, per_chat_per_second: float, per_group_per_minute: float) -> None:
        super().__init__(overall_max_rate=0, group_max_rate=1, group_time_period=60 / per_group_per_minute,
                         max_retries=0)
        self._overall = Pace(overall_per_second)
        self._chat_period = 1 / per_chat_per_second
        self._chats: dict[int, _ChatTurn] = {}

    def _chat(self, chat_id: int) -> _ChatTurn:
        if len(self._chats) > 1024:  # forget idle chats
            now = asyncio.get_running_loop().time()
            for key, turn in list(self._chats.items()):
                if turn.free_at <= now and not turn.lock.locked():
                    del self._chats[key]
        return self._chats.setdefault(chat_id, _ChatTurn())

    async def _slot(self, chat: _ChatTurn | None) -> None:
        if chat is None:
            await self._overall.acquire()
            return
        async with chat.lock:
            loop = asyncio.get_running_loop()
            if (wait := chat.free_at - loop.time()) > 0:
                await asyncio.sleep(wait)
            await self._overall.acquire()
            chat.free_at = loop.time() + self._chat_period

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, bool | dict[str, Any] | list[dict[str, Any]]]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: int | None,
    ) -> bool | dict[str, Any] | list[dict[str, Any]]:
        chat_id = data.get("chat_id")
        if chat_id is not None:  # like AIORateLimiter: the overall limit counts what is sent to a chat
            try:
                chat = self._chat(int(chat_id)) if int(chat_id) > 0 else None
            except (TypeError, ValueError):
                chat = None
            inner = callback

            async def paced(*a: Any, **kw: Any) -> bool | dict[str, Any] | list[dict[str, Any]]:
                await self._slot(chat)
                return await inner(*a, **kw)

            callback = paced
        return await super().process_request(callback, args, kwargs, endpoint, data, rate_limit_args)


def make_bot(settings: TelegramSettings) -> ExtBot[int]:
    """A bot client for one account; no I/O until ``initialize``."""
    return ExtBot(
        settings.token.get_secret_value(),
        base_url=settings.api_base_url,
        request=HTTPXRequest(connection_pool_size=32, pool_timeout=10.0),
        get_updates_request=HTTPXRequest(connection_pool_size=1, read_timeout=10.0),
        rate_limiter=PacedRateLimiter(settings.overall_per_second, settings.per_chat_per_second,
                                      settings.per_group_per_minute),
    )


# -- updates -> events ---------------------------------------------------------------------------


def _name(user: User) -> str | None:
    return user.full_name.strip() or None


#: Prefix of the callback data of quick-reply buttons.
QUICK_REPLY = "qr:"


def update_events(update: Update, channel: str, account: str) -> list[InboundEvent]:
    """The events one update stands for (none for updates the service does not track)."""
    uid = str(update.update_id)

    def event(user: User, kind: str, msg_id: str = uid, **extra: Any) -> InboundEvent:
        return InboundEvent(channel, account, str(user.id), kind, platform_msg_id=msg_id,
                            display_name=_name(user), **extra)

    if (change := update.my_chat_member) is not None:
        # The bot's own membership changed; in a private chat "kicked" means the person blocked it.
        if change.chat.type == ChatType.PRIVATE and change.new_chat_member.status == ChatMemberStatus.BANNED:
            return [event(change.from_user, "blocked")]
        return []
    if (tap := update.callback_query) is not None:
        # A tapped quick reply is the person answering with that text.
        data = tap.data or ""
        return [event(tap.from_user, "text", text=data[len(QUICK_REPLY):])] if data.startswith(QUICK_REPLY) else []
    message = update.message
    if message is None or message.from_user is None:
        return []
    sender, chat = message.from_user, message.chat
    group = {"group_id": chat.id, "group_title": chat.title}
    if message.new_chat_members:
        # One update can add several people: one event each, each with its own dedupe id.
        return [event(m, "group_joined", f"{uid}:{m.id}", payload=group)
                for m in message.new_chat_members if not m.is_bot]
    if (left := message.left_chat_member) is not None:
        return [] if left.is_bot else [event(left, "group_left", f"{uid}:{left.id}", payload=group)]
    if sender.is_bot:
        return []
    if (contact := message.contact) is not None:
        if contact.user_id == sender.id:
            return [event(sender, "contact_shared", payload={"phone": contact.phone_number})]
        # Someone else's card: recorded as an action, but a third party's number is not ours to keep.
        return [event(sender, "contact", payload={"own": False})]
    if message.text:
        # A reply to one of the bot's messages (staff answering a conversation alert) names it; a message
        # in a group names the group (the core gives group chatter no fallback auto-reply).
        replied = message.reply_to_message
        answering = {"reply_to": str(replied.message_id)} if replied is not None else {}
        where = group if chat.type != ChatType.PRIVATE else {}
        return [_text_event(event, sender, message.text, answering | where)]
    caption = message.caption or ""
    if message.photo:
        return [event(sender, "image", text=caption)]
    if message.voice is not None:
        return [event(sender, "voice", text=caption)]
    if message.video is not None:
        return [event(sender, "video", text=caption)]
    if (loc := message.location) is not None:
        return [event(sender, "location", payload={"latitude": loc.latitude, "longitude": loc.longitude})]
    return []


def _text_event(event: Callable[..., InboundEvent], sender: User, text: str,
                answering: dict[str, Any]) -> InboundEvent:
    if not text.startswith("/"):
        return event(sender, "text", text=text, payload=answering)
    head, *rest = text.split(maxsplit=1)
    command = head[1:].split("@", 1)[0].lower()  # /start@shop_bot in groups
    if command != "start":
        return event(sender, "command", text=text)
    # /start is the person starting the bot; a deep-link payload names where they came from.
    payload = rest[0].strip() if rest else ""
    if not START_PAYLOAD.fullmatch(payload):
        return event(sender, "subscribe", text=text)
    # The store keeps 64 characters of acquisition source; the touchpoint keeps the whole payload.
    return event(sender, "subscribe", text=text, source=f"telegram:start:{payload}"[:SOURCE_MAX],
                 payload={"start": payload}, scene=payload)


def _reply_chat(update: Update) -> int | None:
    return update.message.chat.id if update.message is not None else None


def parse_update(body: bytes, bot: ExtBot[int]) -> Update:
    """The Update in a webhook body; raises ``HTTPBadRequest`` for anything else."""
    try:
        data = json.loads(body)
    except ValueError:  # includes UnicodeDecodeError
        raise web.HTTPBadRequest(text="body must be JSON") from None
    if not isinstance(data, dict) or type(data.get("update_id")) is not int:
        raise web.HTTPBadRequest(text="not a Telegram Update: an object with an integer update_id")
    try:
        return Update.de_json(data, bot)
    except Exception as exc:  # noqa: BLE001 - PTB's parser fails in many ways (TypeError, KeyError, ValueError...) on bad input
        log.debug("rejected update: %r", exc)
        raise web.HTTPBadRequest(text="not a valid Telegram Update") from None


# -- errors -> send results ----------------------------------------------------------------------


def _seconds(exc: RetryAfter) -> float:
    with warnings.catch_warnings():  # PTB 22 warns that retry_after becomes a timedelta
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def result_for(exc: TelegramError) -> SendResult:
    """How the outbox should treat a Bot API error."""
    if isinstance(exc, RetryAfter):
        return SendResult("retry", "rate_limited", retry_after=_seconds(exc))
    if isinstance(exc, Forbidden):
        blocked = "blocked" in exc.message.lower()
        return SendResult("skipped", "blocked" if blocked else f"forbidden: {exc.message}")
    if isinstance(exc, ChatMigrated):
        return SendResult("failed", f"chat_migrated: {exc.new_chat_id}")
    if isinstance(exc, BadRequest):
        return SendResult("failed", exc.message)
    if isinstance(exc, InvalidToken):
        return SendResult("failed", "invalid_token")
    if isinstance(exc, NetworkError):  # includes TimedOut
        cause = exc.__cause__
        if cause is None or isinstance(cause, _NOT_SENT):
            # Telegram answered with a server error, or the request never left: safe to send again.
            return SendResult("retry", f"network: {exc.message}", retry_after=NETWORK_RETRY_SECONDS,
                              unreachable=isinstance(cause, _UNREACHABLE))
        # The request went out and the answer was lost: it may have been delivered; never send twice.
        return SendResult("failed", f"unknown_outcome: {exc.message}")
    return SendResult("failed", f"telegram: {exc.message}")


async def _call(request: Callable[[], Awaitable[Message]]) -> SendResult:
    try:
        sent = await request()
    except TelegramError as exc:
        return result_for(exc)
    return SendResult("sent", platform_msg_id=str(sent.message_id))


def _fit(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- CLI -----------------------------------------------------------------------------------------


@click.group()
def telegram_cli() -> None:
    """Telegram bots: register the webhook, or long-poll for local use."""


def _account(ctx: click.Context, bot: str) -> tuple[Config, TelegramSettings]:
    from scrm.cli.base import EXIT_USAGE, load

    config = load(ctx)
    accounts = config.channels.get("telegram", {})
    if bot not in accounts:
        click.echo(f"no telegram bot {bot!r} in the config (configured: {', '.join(sorted(accounts)) or 'none'})",
                   err=True)
        sys.exit(EXIT_USAGE)
    return config, TelegramSettings.model_validate(accounts[bot])


@telegram_cli.command("set-webhook")
@click.argument("bot")
@click.argument("public_url")
@click.option("--drop-pending-updates", is_flag=True, help="Discard updates Telegram is still holding.")
@click.pass_context
def set_webhook(ctx: click.Context, bot: str, public_url: str, drop_pending_updates: bool) -> None:
    """Point Telegram at PUBLIC_URL/telegram/BOT with the configured secret token."""
    _, settings = _account(ctx, bot)
    if settings.webhook_secret is None:
        click.echo(f"channels.telegram.{bot}.webhook_secret is not set", err=True)
        sys.exit(2)
    url = f"{public_url.rstrip('/')}/telegram/{bot}"
    secret = settings.webhook_secret.get_secret_value()

    async def go() -> None:
        async with make_bot(settings) as client:
            await client.set_webhook(url, secret_token=secret, allowed_updates=list(ALLOWED_UPDATES),
                                     drop_pending_updates=drop_pending_updates)

    try:
        asyncio.run(go())
    except TelegramError as exc:
        reason = "the bot token was rejected" if isinstance(exc, InvalidToken) else exc.message
        click.echo(f"setWebhook failed: {reason}", err=True)
        sys.exit(1)
    click.echo(f"webhook set: {url}")


@telegram_cli.command("poll")
@click.argument("bot")
@click.pass_context
def poll(ctx: click.Context, bot: str) -> None:
    """Run the service with BOT on long polling (deletes its webhook): no public URL needed."""
    from scrm.cli.base import (
        guard,  # campaign file problems print cleanly, no traceback
    )

    config, _ = _account(ctx, bot)
    guard(asyncio.run)(_poll_until_signal(config, bot))


async def _poll_until_signal(config: Config, bot: str) -> None:
    from scrm.service import Service

    service = Service(config)
    channel = service.channel("telegram", bot)
    assert isinstance(channel, TelegramChannel)
    channel.settings = channel.settings.model_copy(update={"polling": True})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    click.echo(f"polling telegram bot {bot}; Ctrl-C to stop")
    try:
        await stop.wait()
    finally:
        await service.stop()


# -- the channel ---------------------------------------------------------------------------------


@register
class TelegramChannel(Channel):
    type_name = "telegram"
    settings_model = TelegramSettings
    settings: TelegramSettings
    cli: ClassVar[click.Group] = telegram_cli

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bot = make_bot(self.settings)
        self._poller: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    def routes(self) -> list[web.RouteDef]:
        return [] if self.settings.polling else [web.post(f"/telegram/{self.account}", self._webhook)]

    async def start(self) -> None:
        if self._poller is not None:
            return
        try:
            await self.bot.initialize()  # getMe: checks the token, learns the bot's username
        except InvalidToken:
            raise RuntimeError(f"telegram bot {self.account}: Telegram rejected the token") from None
        except NetworkError as exc:  # Telegram unreachable now; sends retry later, webhooks still commit
            log.warning("telegram bot %s: getMe failed (%s); continuing", self.account, exc.message)
        if self.settings.polling:
            self._poller = asyncio.create_task(self._poll(), name=f"telegram-poll-{self.account}")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        if self._background:
            _, pending = await asyncio.wait(self._background, timeout=10)
            for task in pending:
                task.cancel()
        await self.bot.shutdown()

    async def create_code(self, request: CodeRequest) -> IssuedCode:
        """A deep link, ``t.me/<bot>?start=<scene>``: Telegram keeps nothing, so it never expires on
        Telegram's side (the service stops honouring it when it expires or is disabled)."""
        if not START_PAYLOAD.fullmatch(request.scene):
            raise CodeError("a Telegram start payload is 1-64 letters, digits, _ or -")
        try:
            username = self.bot.username  # learnt by getMe in start()
        except RuntimeError:
            username = None
        if not username:
            try:
                username = (await self.bot.get_me()).username
            except TelegramError as exc:
                raise CodeError(f"Telegram did not tell the bot's username: {exc.message}") from exc
        if not username:
            raise CodeError("Telegram did not tell the bot's username")
        return IssuedCode("deep_link", create_deep_linked_url(username, request.scene))

    # inbound

    async def _webhook(self, request: web.Request) -> web.Response:
        expected = self.settings.webhook_secret
        given = request.headers.get(SECRET_HEADER, "")
        if expected is None or not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
            raise web.HTTPForbidden(text="wrong or missing secret token")
        update = parse_update(await request.read(), self.bot)  # read() answers 413 over client_max_size
        try:
            events = update_events(update, self.type_name, self.account)
        except (AttributeError, TypeError, ValueError):  # e.g. a message without its chat (found by fuzzing)
            raise web.HTTPBadRequest(text="not a valid Telegram Update: required fields missing") from None
        await self._ingest(update, events)
        return web.Response(text="ok")

    async def _ingest(self, update: Update, events: list[InboundEvent] | None = None) -> None:
        """Make the update's events durable (what Telegram is answered on, or the poll's offset moves
        past), then, in the background, send the core's replies once they are applied (scrm.ingest)."""
        if events is None:
            events = update_events(update, self.type_name, self.account)
        if not events:
            return
        accepted = [self.service.accept(e) for e in events]
        # shielded: a caller that goes away stops neither the append nor the application
        await asyncio.gather(*(asyncio.shield(a.durable) for a in accepted))
        if (tap := update.callback_query) is not None:
            self._spawn(self._answer_tap(tap.id))
        self._spawn(self._answer(_reply_chat(update), [a.applied for a in accepted]))

    async def _answer(self, chat_id: int | None, applied: list[asyncio.Future[Reaction]]) -> None:
        """The replies of an update's events, sent once every one of them is applied."""
        outcomes = await asyncio.gather(*applied, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                log.error("telegram bot %s: an update acknowledged but not applied: %r", self.account, outcome)
        fresh = [r for r in outcomes if isinstance(r, Reaction) and not r.duplicate]
        # a reaction's buttons (a keyword auto-reply's) go under its last reply
        replies = [(text, r.buttons if i == len(r.replies) - 1 else ())
                   for r in fresh for i, text in enumerate(r.replies)]
        images = [image for r in fresh for image in r.images]
        if (replies or images) and chat_id is not None:
            await self._send_replies(chat_id, replies, images)

    async def _send_replies(self, chat_id: int, replies: list[tuple[str, tuple[tuple[str, str], ...]]],
                            images: list[Chart]) -> None:
        """The core's replies (with their buttons), then its images (report charts), in order; one retry
        after a flood wait."""
        sends: list[Callable[[], Awaitable[SendResult]]] = [partial(self._send_text, chat_id, text, buttons)
                                                            for text, buttons in replies]
        sends += [partial(self._send_chart, chat_id, chart) for chart in images]
        for send in sends:
            result = await send()
            if result.status == "retry":
                await asyncio.sleep(min(result.retry_after, 30.0))
                result = await send()
            if result.status != "sent":
                log.warning("telegram bot %s: reply to chat %s not sent: %s %s", self.account, chat_id,
                            result.status, result.reason)
                return

    async def _answer_tap(self, query_id: str) -> None:
        """Stop the spinner on the tapped button (Telegram shows it until the bot answers); best effort.

        Not through :func:`_call`: the answer is True, not a Message with an id to record."""
        with contextlib.suppress(TelegramError):
            await self.bot.answer_callback_query(query_id)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _poll(self) -> None:
        """getUpdates loop; the offset confirms an update only after it is committed."""
        offset: int | None = None
        webhook_deleted = False
        backoff = 1.0
        while True:
            try:
                if not webhook_deleted:  # a bot uses either a webhook or getUpdates
                    webhook_deleted = await self.bot.delete_webhook()
                updates = await self.bot.get_updates(offset=offset, timeout=POLL_TIMEOUT,
                                                     allowed_updates=list(ALLOWED_UPDATES))
                for update in updates:
                    await self._ingest(update)
                    offset = update.update_id + 1
                backoff = 1.0
                continue
            except RetryAfter as exc:
                wait = _seconds(exc)
            except InvalidToken:
                log.error("telegram bot %s: token rejected; polling stopped", self.account)
                return
            except (Conflict, NetworkError, StoreUnavailable) as exc:
                log.warning("telegram bot %s: polling paused (%s)", self.account, exc)
                wait, backoff = backoff, min(backoff * 2, 30.0)
            except TelegramError as exc:
                log.error("telegram bot %s: getUpdates failed: %s", self.account, exc.message)
                wait, backoff = backoff, min(backoff * 2, 30.0)
            await asyncio.sleep(wait)

    # outbound

    async def _send_text(self, chat_id: int | str, text: str, buttons: tuple[tuple[str, str], ...] = (),
                         quick_replies: tuple[str, ...] = ()) -> SendResult:
        rows = [[InlineKeyboardButton(label, url=url)] for label, url in buttons]
        taps = [InlineKeyboardButton(reply, callback_data=QUICK_REPLY + reply) for reply in quick_replies]
        rows += [taps[i:i + 6] for i in range(0, len(taps), 6)]
        markup = InlineKeyboardMarkup(rows) if rows else None
        return await _call(lambda: self.bot.send_message(chat_id=chat_id, text=_fit(text, MAX_TEXT),
                                                         reply_markup=markup))

    async def send(self, message: OutboundMessage) -> SendResult:
        if not message.external_id.lstrip("-").isdecimal():
            return SendResult("failed", f"not a telegram chat id: {message.external_id!r}")
        chat_id = int(message.external_id)
        if message.image is None:
            result = await self._send_text(chat_id, message.text, message.buttons, message.quick_replies)
        else:
            result = await self._send_image(chat_id, message.image, message.text)
        if result.reason == "blocked":
            await self._record_blocked(message.external_id)
        return result

    async def _send_image(self, chat_id: int, image: Chart, text: str) -> SendResult:
        """The picture with the text as its caption, or (text over 1024 characters) followed by it."""
        png = await image.png()
        if len(text) <= MAX_CAPTION:
            return await self.send_photo(chat_id, png, text)
        photo = await self.send_photo(chat_id, png)
        if photo.status != "sent":
            return photo
        rest = await self._send_text(chat_id, text)
        if rest.status != "sent":  # the photo is out: sending it all again would duplicate it
            return SendResult("failed", f"photo sent, text not: {rest.reason}", photo.platform_msg_id)
        return rest

    async def _send_chart(self, chat_id: int, chart: Chart) -> SendResult:
        return await self.send_photo(chat_id, await chart.png())

    async def send_photo(self, chat_id: int | str, png_bytes: bytes, caption: str = "") -> SendResult:
        """A picture (report charts) with an optional caption, uploaded as multipart."""
        photo = InputFile(png_bytes, filename="chart.png")
        return await _call(lambda: self.bot.send_photo(chat_id=chat_id, photo=photo,
                                                       caption=_fit(caption, MAX_CAPTION) or None))

    async def _record_blocked(self, external_id: str) -> None:
        """A send found the bot blocked: tell the core, as if Telegram had sent the my_chat_member update."""
        try:
            await self.service.receive(InboundEvent(self.type_name, self.account, external_id, "blocked",
                                                    payload={"detected_by": "send"}))
        except StoreUnavailable:
            log.warning("telegram bot %s: could not record that %s blocked the bot", self.account, external_id)
