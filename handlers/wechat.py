"""WeChat Official Account (公众号): passive callbacks in, customer-service and template messages out.

Inbound: ``GET /wechat/<account>`` answers WeChat's URL check; ``POST /wechat/<account>`` takes messages
and events in plaintext or safe mode (AES), hands them to the core and answers within WeChat's 5-second
limit — with a passive text reply when the core has one (a news card for a keyword auto-reply that has
one), else ``success``.

When it answers: a passive reply can only ride on the answer to the callback, so a callback whose
application may give one (scrm.ingest.replying: commands, a matching keyword reply rule, ``subscribe``
and ``scan`` for a channel code's welcome, menu clicks) waits until the core has applied the event, at
most ``reply_timeout_seconds`` (a reply found later goes out as a customer-service message). Every other
callback (text no reply rule matches, location reports, pictures, unfollows...) is acknowledged as soon
as it is durable in the journal (scrm.ingest); its effects follow, and an answer it gets then (the
fallback reply, say) goes out as a customer-service message. An event that cannot be made durable is
not acknowledged (503: WeChat tries again).

Outbound: customer-service text messages inside the 48-hour window after the person's last interaction,
the campaign's template message outside it (or a ``skipped`` result). Images (report charts, digest
trends) are uploaded as temporary media and follow the text as customer-service image messages; after
a callback that happens in the background, since uploads would not fit WeChat's 5-second wait.
Throttling, system-busy answers and connection failures are retried later; a send whose answer was lost
is reported, never resent (WeChat has no idempotency key). wechatpy checks, decrypts and parses the
callbacks and renders the passive replies; its API client is synchronous (``requests``), so the few
API calls the channel makes go out over aiohttp here, in the shapes wechatpy's client sends.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Coroutine, Mapping
from datetime import timedelta
from functools import partial
from typing import Any, ClassVar, Literal

import aiohttp
import click
import xmltodict
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from wechatpy import events as wx_events
from wechatpy import messages as wx_messages
from wechatpy import parse_message
from wechatpy.crypto import WeChatCrypto
from wechatpy.exceptions import InvalidAppIdException, InvalidSignatureException
from wechatpy.fields import FloatField
from wechatpy.replies import ArticlesReply, TextReply

from scrm.channels import Channel, CodeError, CodeRequest, IssuedCode, register
from handlers.wechat_menu import Menu, menu_cli
from scrm.acquisition.menus import MenuClick
from scrm.messages import Chart, InboundEvent, OutboundMessage, Reaction, SendResult

log = logging.getLogger(__name__)

#: Customer-service messages are allowed this long after the person's last interaction.
REPLY_WINDOW = timedelta(hours=48)
#: Inbound event kinds that open the window besides messages (WeChat: follow, QR scan, click menu).
#: WeChat shows text replies up to about this many bytes.
MAX_REPLY_BYTES = 2048
OUTSIDE_WINDOW = "outside_48h_window"
TOKEN_ERRCODES = frozenset({40001, 40014, 42001})
QUOTA_ERRCODES = frozenset({45009, 45047})
MAX_BACKOFF_SECONDS = 300.0
_DECLARATION = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
#: WeChat waits this long for a callback's answer, and makes this many tries in all (PLATFORMS.md).
ANSWER_WAIT = timedelta(seconds=5)
#: A temporary QR code lives at most 30 days (qrcode/create's expire_seconds).
QR_MAX_SECONDS = 2_592_000
TRIES = 3
#: A message that comes again within this long of its first try is WeChat retrying it (the answer was
#: lost or late) and gets the passive reply recorded the first time; after it, the same MsgId is no
#: retry WeChat makes and is only acknowledged. WeChat's last try comes about 10 s after the first.
RETRY_WINDOW = ANSWER_WAIT * TRIES
#: Message kinds that carry a MsgId (events are told apart by sender and CreateTime).
_MESSAGE_TYPES = frozenset({"text", "image", "voice", "video", "shortvideo", "location", "link"})
#: WeChat's MsgId is a 64-bit number; CreateTime a count of seconds. Plain digits only: int() would also
#: take signs, spaces and underscores, and give one message two ids.
_DIGITS = re.compile(r"[0-9]{1,20}")
_UINT64_MAX = 2**64 - 1


class WeChatSettings(BaseModel):
    """One Official Account, as set up under 设置与开发 > 基本配置 on mp.weixin.qq.com."""

    model_config = ConfigDict(extra="forbid")

    app_id: str = Field(min_length=1, max_length=64)
    app_secret: SecretStr
    #: The callback Token (3-32 letters or digits) WeChat signs every callback with.
    token: str = Field(pattern=r"^[A-Za-z0-9]{3,32}$")
    #: EncodingAESKey (43 characters): set it to accept safe mode (encrypt_type=aes) callbacks.
    encoding_aes_key: str | None = Field(None, pattern=r"^[A-Za-z0-9]{43}$")
    api_base_url: str = "https://api.weixin.qq.com/"
    #: WeChat gives up on an answer after 5 s; answer ``success`` before that, the event still commits.
    reply_timeout_seconds: float = Field(4.5, gt=0, lt=5)
    request_timeout_seconds: float = Field(10.0, gt=0)
    #: Wait after a quota errcode (45009 daily API quota, 45047 customer-message quota).
    quota_retry_seconds: float = Field(60.0, gt=0)
    #: First wait after a system-busy errcode (-1) or a network error; doubles on each retry.
    retry_backoff_seconds: float = Field(2.0, gt=0)
    #: At most this many API calls in flight at once (connections to the API).
    max_concurrent_requests: int = Field(8, ge=1, le=64)
    #: The custom menu and what its click keys do (handlers.wechat_menu); pushed by `scrm wechat menu push`.
    menu: Menu | None = None

    @field_validator("api_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http(s) URL such as https://api.weixin.qq.com/")
        return value if value.endswith("/") else value + "/"


class WeChatApiError(Exception):
    """A WeChat API call that did not succeed; ``reason`` reads like SendResult reasons."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _ApiError(Exception):
    """WeChat refused a call: its errcode, or None for an HTTP error status from the API gateway."""

    def __init__(self, errcode: int | None, errmsg: str, status: int = 200) -> None:
        super().__init__(f"{errcode}: {errmsg}" if errcode is not None else errmsg)
        self.errcode = errcode
        self.status = status


class _TokenError(_ApiError):
    """The token endpoint refused (wrong AppSecret, IP not whitelisted, quota...)."""


class _NotSent(Exception):
    """A network error before the message itself went out (fetching the token), safe to retry."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _network_name(exc: Exception) -> str:
    """What a network error is called in delivery reasons (the names operators know from requests)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "ConnectTimeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "ConnectionError"
    if isinstance(exc, TimeoutError):
        return "ReadTimeout"
    return type(exc).__name__


def _never_connected(exc: Exception) -> bool:
    """True when the request cannot have reached WeChat (refused, DNS, connect timeout).

    After a read timeout or a dropped connection WeChat may have delivered the message; custom/send has
    no idempotency key, so resending could deliver it twice.
    """
    return isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)


def _unwritten(exc: Exception) -> bool:
    """True when aiohttp could not write the request (typically a kept-alive connection the server had
    closed, as at the start of an outage): WeChat got no complete request, so it cannot have acted on it."""
    return isinstance(exc, aiohttp.ClientOSError) and str(exc.strerror).startswith("Can not write request body")


_NETWORK_ERRORS = (aiohttp.ClientError, TimeoutError)


class _Api:
    """WeChat's API (``cgi-bin/``) at the configured base URL, with its access token cached.

    An invalid or expired token (40001, 40014, 42001) is fetched again and the call retried once, by
    one caller while the others wait (wechatpy's own refresh recurses for as long as WeChat answers
    40001, and its token fetch ignores the base URL and the timeout). Connecting may take
    ``request_timeout_seconds``, and so may each wait for the answer's next bytes.
    """

    def __init__(self, settings: WeChatSettings) -> None:
        self.settings = settings
        self.base = settings.api_base_url + "cgi-bin/"
        self._http: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._token_expires = 0.0  # time.monotonic()
        self._token_lock = asyncio.Lock()

    async def start(self) -> None:
        if self._http is None:
            timeout = self.settings.request_timeout_seconds
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout),
                connector=aiohttp.TCPConnector(limit=self.settings.max_concurrent_requests))

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def call(self, endpoint: str, body: dict[str, Any] | None = None, *, params: dict[str, str] | None = None,
                   upload: tuple[str, bytes, str] | None = None, method: Literal["GET", "POST"] = "POST") -> Any:
        """POST ``body`` as JSON (or ``upload``: file name, bytes, content type, as the ``media`` part; or
        GET, as the menu's get and delete are); returns WeChat's JSON answer, or None when it is not JSON."""
        try:
            token = await self._access_token()
        except _NETWORK_ERRORS as exc:
            raise _NotSent(exc) from exc
        try:
            return await self._call(endpoint, token, body, params, upload, method)
        except _ApiError as exc:
            if exc.errcode not in TOKEN_ERRCODES:
                raise
            log.info("wechat %s: access token rejected (%s), refreshing", self.settings.app_id, exc.errcode)
        try:
            token = await self._access_token(stale=token)
        except _NETWORK_ERRORS as exc:
            raise _NotSent(exc) from exc
        return await self._call(endpoint, token, body, params, upload, method)

    async def _access_token(self, stale: str | None = None) -> str:
        """The cached token, fetched once (not once per caller) when missing, about to expire, or the
        ``stale`` one WeChat just rejected."""
        async with self._token_lock:
            if self._token is None or self._token == stale or self._token_expires - time.monotonic() < 60:
                result = await self._answer("GET", self.base + "token", params={
                    "grant_type": "client_credential", "appid": self.settings.app_id,
                    "secret": self.settings.app_secret.get_secret_value()}, token_call=True)
                token = result.get("access_token") if isinstance(result, dict) else None
                if not isinstance(token, str) or not token:
                    raise _TokenError(0, "token answer has no access_token")
                self._token = token
                self._token_expires = time.monotonic() + int(result.get("expires_in", 7200))
            return self._token

    async def _call(self, endpoint: str, token: str, body: dict[str, Any] | None, params: dict[str, str] | None,
                    upload: tuple[str, bytes, str] | None, method: str) -> Any:
        data: aiohttp.FormData | bytes | None = None
        if upload is not None:
            data = aiohttp.FormData()
            data.add_field("media", upload[1], filename=upload[0], content_type=upload[2])
        elif body is not None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")  # WeChat wants UTF-8, not \u escapes
        return await self._answer(method, self.base + endpoint, params={**(params or {}), "access_token": token},
                                  data=data)

    async def _answer(self, method: str, url: str, *, params: dict[str, str], data: Any = None,
                      token_call: bool = False) -> Any:
        if self._http is None:
            raise RuntimeError(f"wechat account {self.settings.app_id!r} is not started")
        async with self._http.request(method, url, params=params, data=data) as response:
            if response.status != 200:
                raise (_TokenError if token_call else _ApiError)(None, f"HTTP {response.status}", response.status)
            raw = await response.read()
        try:
            result = json.loads(raw.decode("utf-8", "ignore"), strict=False)
        except ValueError:
            return None
        errcode = int(result.get("errcode") or 0) if isinstance(result, dict) else 0
        if errcode:
            raise (_TokenError if token_call else _ApiError)(errcode, str(result.get("errmsg", "")))
        return result


def _text(openid: str, text: str) -> dict[str, Any]:
    """A customer-service text message."""
    return {"touser": openid, "msgtype": "text", "text": {"content": text}}


def _signature(*parts: str) -> str:
    return hashlib.sha1("".join(sorted(parts)).encode("utf-8")).hexdigest()


def cut_utf8(text: str, limit: int = MAX_REPLY_BYTES) -> str:
    """Shorten to at most ``limit`` UTF-8 bytes without splitting a character, marking the cut."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode("utf-8", "ignore") + "…"


def _cdata(text: str) -> str:
    """Text for a CDATA section of a passive reply (``]]>`` would end it)."""
    return text.replace("]]>", "]]]]><![CDATA[>")


def _reject_declarations(body: bytes) -> None:
    if _DECLARATION.search(body):
        raise web.HTTPBadRequest(text="XML with DOCTYPE or ENTITY declarations is not accepted")


def _parse(body: bytes | str) -> wx_messages.BaseMessage:
    try:
        message = parse_message(body)
        if message is None:
            raise ValueError("empty")
        _check_fields(message)
        if not isinstance(message.source, str) or not 0 < len(message.source) <= 128:
            raise ValueError("no FromUserName")
        return message
    except Exception as exc:  # noqa: BLE001 - expat, a missing <xml> root or field, a non-numeric id: all malformed input
        raise web.HTTPBadRequest(text=f"malformed WeChat XML ({type(exc).__name__})") from None


#: Per wechatpy message class: the XML elements the channel reads, and those it reads as floats.
_FIELDS_READ: dict[object, tuple[frozenset[str], tuple[str, ...]]] = {}


def _fields_read(message_type: Any) -> tuple[frozenset[str], tuple[str, ...]]:
    """The XML elements the channel reads of a message of this class (MsgId where messages carry it),
    and those read as floats; worked out once per class."""
    read = _FIELDS_READ.get(message_type)
    if read is None:
        fields = [f for f in message_type._fields.values()
                  if message_type.type in _MESSAGE_TYPES or f.name != "MsgId"]
        read = _FIELDS_READ[message_type] = (frozenset({"MsgType", "Event", *(f.name for f in fields)}),
                                             tuple(f.name for f in fields if isinstance(f, FloatField)))
    return read


def _check_fields(message: wx_messages.BaseMessage) -> None:
    """Raise ValueError unless every field the channel reads is one value of its kind.

    xmltodict gives a repeated element as a list and one with children or attributes as a dict, and
    wechatpy passes both through unconverted: two MsgIds would become the id "['1', '2']". MsgId is
    a 64-bit number where messages carry it (events have none: sender and CreateTime identify them),
    CreateTime a number of seconds, and floats (an event's coordinates) finite numbers.
    """
    data: Mapping[str, object] = message._data  # the <xml> element's children by name, as parsed
    names, floats = _fields_read(type(message))
    for name in names:
        if not isinstance(data.get(name), str | None):
            raise ValueError(f"{name} repeated or not text")
    created = data.get("CreateTime")
    if not isinstance(created, str) or not _DIGITS.fullmatch(created):
        raise ValueError("CreateTime is not a number")
    msg_id = data.get("MsgId")
    if message.type in _MESSAGE_TYPES and msg_id is not None:  # absent: told apart by sender and time
        if not (isinstance(msg_id, str) and _DIGITS.fullmatch(msg_id) and 0 < int(msg_id) <= _UINT64_MAX):
            raise ValueError("MsgId is not a 64-bit id")
    for name in floats:
        value = data.get(name)
        if isinstance(value, str) and not math.isfinite(float(value)):  # float() refuses what is no number
            raise ValueError(f"{name} is not a finite number")


def _float(value: object) -> float | None:
    try:
        return float(value) if isinstance(value, str | int | float) else None
    except ValueError:
        return None


@click.group()
def wechat_cli() -> None:
    """WeChat Official Accounts: the custom menu."""


wechat_cli.add_command(menu_cli)


@register
class WeChatChannel(Channel):
    type_name = "wechat"
    reply_window: timedelta | None = REPLY_WINDOW
    settings_model = WeChatSettings
    settings: WeChatSettings
    cli: ClassVar[click.Group] = wechat_cli

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        self._crypto = WeChatCrypto(s.token, s.encoding_aes_key, s.app_id) if s.encoding_aes_key else None
        self._api = _Api(s)
        #: Retries so far per delivery for the doubling back-off (bounded: oldest entries drop out).
        self._retries: OrderedDict[int, int] = OrderedDict()
        #: Customer-service sends that follow a callback (late replies, charts); stop() waits for them.
        self._late: set[asyncio.Task[None]] = set()

    def menu_action(self, key: str) -> MenuClick | None:
        menu = self.settings.menu
        return menu.clicks.get(key) if menu is not None else None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._api.start()

    async def stop(self) -> None:
        if self._late:
            # give follow-up sends one request timeout to finish, then cancel the rest before the pool goes
            _, pending = await asyncio.wait(set(self._late), timeout=self.settings.request_timeout_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._api.stop()

    # -- inbound -----------------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        path = f"/wechat/{self.account}"
        return [web.get(path, self._verify_url, allow_head=False), web.post(path, self._callback)]

    def _signed(self, query: Mapping[str, str]) -> bool:
        signature, timestamp, nonce = query.get("signature"), query.get("timestamp"), query.get("nonce")
        if not signature or timestamp is None or nonce is None:
            return False
        expected = _signature(self.settings.token, timestamp, nonce)
        return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))

    async def _verify_url(self, request: web.Request) -> web.Response:
        if not self._signed(request.query):
            raise web.HTTPForbidden(text="bad signature")
        return web.Response(text=request.query.get("echostr", ""))

    async def _callback(self, request: web.Request) -> web.Response:
        query = request.query
        if not self._signed(query):
            raise web.HTTPForbidden(text="bad signature")
        encrypt_type = query.get("encrypt_type", "raw").lower()
        if encrypt_type not in ("raw", "aes"):
            raise web.HTTPBadRequest(text="encrypt_type: raw or aes")
        body = await request.read()
        _reject_declarations(body)
        xml: bytes | str = body
        if encrypt_type == "aes":
            xml = self._decrypt(body, query)
            _reject_declarations(xml.encode("utf-8"))
        message = _parse(xml)
        event = self._to_event(message)
        if event is None:  # kinds the service does not track (card, mass-send reports...): just acknowledge
            return _success()
        reaction = await self._react(event)
        if reaction is None:
            return _success()
        if reaction.images:  # after the passive reply, never delaying it (uploads take seconds)
            self._spawn(self._follow_up(event.external_id, "", reaction.images))
        if not reaction.replies:
            return _success()
        if (card := reaction.article) is not None:  # a keyword auto-reply's news card
            article = {"title": card.title, "description": card.description, "url": card.url,
                       "image": card.picurl or ""}
            reply = ArticlesReply(message=message, articles=[{k: _cdata(v) for k, v in article.items()}]).render()
        else:
            reply = TextReply(message=message, content=_cdata(cut_utf8("\n".join(reaction.replies)))).render()
        if self._crypto is not None and encrypt_type == "aes":
            reply = self._crypto.encrypt_message(reply, query["nonce"], query["timestamp"])
        return web.Response(text=reply, content_type="application/xml")

    def _decrypt(self, body: bytes, query: Mapping[str, str]) -> str:
        if self._crypto is None:
            raise web.HTTPBadRequest(text="safe mode (encrypt_type=aes) needs encoding_aes_key in this account's settings")
        msg_signature = query.get("msg_signature")
        if not msg_signature:
            raise web.HTTPForbidden(text="msg_signature missing")
        try:
            encrypted = xmltodict.parse(body)["xml"]["Encrypt"]
            if not isinstance(encrypted, str):
                raise TypeError("Encrypt is not text")
        except Exception as exc:  # noqa: BLE001 - expat error, missing root or element
            raise web.HTTPBadRequest(text=f"malformed WeChat XML ({type(exc).__name__})") from None
        try:
            return str(self._crypto.decrypt_message({"Encrypt": encrypted}, msg_signature,
                                                    query["timestamp"], query["nonce"]))
        except (InvalidSignatureException, InvalidAppIdException):
            raise web.HTTPForbidden(text="bad msg_signature or AppID") from None
        except Exception as exc:  # noqa: BLE001 - base64, block size, padding or text errors in the ciphertext
            raise web.HTTPBadRequest(text=f"undecryptable Encrypt ({type(exc).__name__})") from None

    def _to_event(self, m: wx_messages.BaseMessage) -> InboundEvent | None:
        kind: str
        text, source = "", None
        payload: dict[str, Any] = {}
        if isinstance(m, wx_messages.TextMessage):
            kind, text = "text", m.content or ""
        elif isinstance(m, wx_messages.ImageMessage):
            kind, payload = "image", {"media_id": m.media_id, "pic_url": m.image}
        elif isinstance(m, wx_messages.VoiceMessage):
            kind, payload = "voice", {"media_id": m.media_id, "format": m.format, "recognition": m.recognition}
        elif isinstance(m, wx_messages.VideoMessage | wx_messages.ShortVideoMessage):
            kind, payload = "video", {"media_id": m.media_id, "thumb_media_id": m.thumb_media_id,
                                      "short": m.type == "shortvideo"}
        elif isinstance(m, wx_messages.LocationMessage):
            kind, payload = "location", {"latitude": _float(m.location_x), "longitude": _float(m.location_y),
                                         "scale": m.scale, "label": m.label}
        elif isinstance(m, wx_messages.LinkMessage):
            kind, payload = "link", {"title": m.title, "description": m.description, "url": m.url}
        elif isinstance(m, wx_events.SubscribeScanEvent):
            # parse_message already stripped the "qrscene_" prefix from EventKey
            kind, payload = "subscribe", {"scene": m.scene_id, "ticket": m.ticket}
            source = f"wechat:qr:{m.scene_id}"[:64] if isinstance(m.scene_id, str) and m.scene_id else None
        elif isinstance(m, wx_events.SubscribeEvent):
            kind = "subscribe"
        elif isinstance(m, wx_events.UnsubscribeEvent):
            kind = "unsubscribe"
        elif isinstance(m, wx_events.ScanEvent):
            kind, payload = "scan", {"scene": m.scene_id, "ticket": m.ticket}
        elif isinstance(m, wx_events.ClickEvent):
            kind, payload = "menu_click", {"key": m.key}
        elif isinstance(m, wx_events.ViewEvent):
            kind, payload = "menu_view", {"url": m.url}
        elif isinstance(m, wx_events.LocationEvent):
            kind, payload = "location_report", {"latitude": m.latitude, "longitude": m.longitude,
                                                "precision": m.precision}
        else:
            log.debug("wechat %s: ignoring %r", self.account, m)
            return None
        # WeChat retries an unanswered callback: messages carry MsgId, events only sender + time.
        msg_id = str(m.id) if m.type in _MESSAGE_TYPES and m.id else None
        scene = payload.get("scene") if kind in ("subscribe", "scan") else None
        return InboundEvent(self.type_name, self.account, m.source, kind, text=text,
                            platform_msg_id=msg_id or f"{m.source}:{m.time}", source=source,
                            payload={k: v for k, v in payload.items() if v is not None},
                            scene=scene if isinstance(scene, str) and scene else None)

    async def _react(self, event: InboundEvent) -> Reaction | None:
        """The core's reaction to answer now, or None to answer ``success``: for a callback that cannot
        have a passive reply, once it is durable (an answer found when it is applied follows as a
        customer-service message); else when applying it takes longer than WeChat waits (likewise). A
        duplicate is WeChat
        retrying: within its window it gets the replies recorded for the first try, whose answer WeChat
        did not get; only the answer is given again, nothing is run twice."""
        accepted = self.service.accept(event)
        if not accepted.answers:
            accepted.applied.add_done_callback(partial(self._late_reaction, event.external_id))
            await asyncio.shield(accepted.durable)  # a store error: 503, and WeChat tries again
            return None
        committed = accepted.applied
        await asyncio.wait((committed,), timeout=self.settings.reply_timeout_seconds)  # never cancels it
        if not committed.done():
            if not accepted.durable.done() or accepted.durable.exception() is not None:
                await asyncio.shield(accepted.durable)  # never acknowledged before it is durable
            log.warning("wechat %s: event %s took over %ss; answered success", self.account,
                        event.platform_msg_id, self.settings.reply_timeout_seconds)
            committed.add_done_callback(partial(self._late_reaction, event.external_id))
            return None
        reaction = committed.result()
        if not reaction.duplicate:
            return reaction
        original = reaction.original
        if original is None or not original.replies or self.service.clock.now() - original.received_at > RETRY_WINDOW:
            return None
        return Reaction(duplicate=True, replies=original.replies)

    def _late_reaction(self, openid: str, committed: asyncio.Future[Reaction]) -> None:
        """Replies and charts the passive answer did not carry go out as customer-service messages (the
        window is open: the person just wrote). An event acknowledged but set aside by the consumer is logged."""
        if committed.cancelled():
            return
        if (exc := committed.exception()) is not None:
            log.error("wechat %s: event from %s acknowledged but not applied: %r", self.account, openid, exc)
            return
        reaction = committed.result()
        if (reaction.replies or reaction.images) and not reaction.duplicate:
            self._spawn(self._follow_up(openid, "\n".join(reaction.replies), reaction.images))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a follow-up send detached from the callback, tracked so stop() can wait for or cancel it."""
        task = asyncio.ensure_future(coro)
        self._late.add(task)
        task.add_done_callback(self._late.discard)

    async def _follow_up(self, openid: str, text: str, images: tuple[Chart, ...]) -> None:
        """Customer-service messages after a callback: the text a late commit missed, then each chart.

        Nobody awaits this, so every failure is logged here; it stops at the first one (charts without
        their text, or after WeChat refused one, would only confuse or burn quota).
        """
        try:
            if text:
                result = await self._request(_text(openid, text), None)
                if result.status != "sent":
                    log.warning("wechat %s: late reply to %s not sent: %s %s", self.account, openid,
                                result.status, result.reason)
                    return
            for chart in images:
                if (await self._send_chart(openid, chart)).status != "sent":
                    return
        except Exception:  # a bug or a stopped channel: logged, never an unretrieved task exception
            log.exception("wechat %s: follow-up messages to %s failed", self.account, openid)

    async def _send_chart(self, openid: str, chart: Chart) -> SendResult:
        """Draw and upload one chart and send it as an image message; WeChat's refusals are logged and
        returned, so callers only decide whether to go on."""
        png = await chart.png()
        try:
            media_id = await self.upload_image(png)
        except WeChatApiError as exc:
            log.warning("wechat %s: chart for %s not uploaded: %s", self.account, openid, exc.reason)
            return SendResult("failed", exc.reason)
        result = await self.send_image(openid, media_id)
        if result.status != "sent":
            log.warning("wechat %s: chart for %s not sent: %s %s", self.account, openid, result.status, result.reason)
        return result

    # -- outbound ----------------------------------------------------------------------------------

    async def send(self, message: OutboundMessage) -> SendResult:
        openid = message.external_id
        if self._in_window(message):
            text, card = message.text, message.article
            if card is not None:
                article = {"title": card.title, "description": card.description, "url": card.url,
                           "picurl": card.picurl}
                news = {"touser": openid, "msgtype": "news", "news": {"articles": [article]}}
                result = await self._request(news, message.delivery_id)
            else:
                result = await self._request(_text(openid, text), message.delivery_id)
            if result.status == "sent" and message.image is not None:
                await self._attach(openid, message.image)
            if result.reason != OUTSIDE_WINDOW:
                return result
        if message.template is None:
            return SendResult("skipped", OUTSIDE_WINDOW)
        t = message.template
        notice = {"touser": openid, "template_id": t.template_id,
                  "data": {name: {"value": value} for name, value in t.fields.items()}}
        if t.url:
            notice["url"] = t.url
        return await self._request(notice, message.delivery_id, "message/template/send")

    async def _attach(self, openid: str, chart: Chart) -> None:
        """The message's image after its text. The text's result stands whatever happens here: a retry
        would send the text twice (custom/send has no idempotency key)."""
        try:
            await self._send_chart(openid, chart)
        except Exception:  # e.g. the channel stopping mid-send: logged, the sent text stays sent
            log.exception("wechat %s: image for %s failed", self.account, openid)

    async def upload_image(self, png: bytes, filename: str = "chart.png") -> str:
        """Upload a temporary image (WeChat keeps it 3 days) for image messages; returns its media_id."""
        try:
            result = await self._api.call("media/upload", params={"type": "image"}, upload=(filename, png, "image/png"))
        except _ApiError as exc:
            raise WeChatApiError(self._error_result(exc, None).reason or "wechat:error") from exc
        except _NotSent as exc:
            raise WeChatApiError(f"network:{_network_name(exc.cause)}") from exc
        except _NETWORK_ERRORS as exc:
            raise WeChatApiError(f"network:{_network_name(exc)}") from exc
        if not isinstance(result, dict) or not result.get("media_id"):
            raise WeChatApiError("wechat:bad_response")
        return str(result["media_id"])

    async def send_image(self, openid: str, media_id: str) -> SendResult:
        """Customer-service image message (e.g. a report chart); the 48-hour window applies."""
        return await self._request({"touser": openid, "msgtype": "image", "image": {"media_id": media_id}}, None)

    async def create_code(self, request: CodeRequest) -> IssuedCode:
        """A parametric QR code with a string scene (qrcode/create): temporary (up to 30 days) or
        permanent. WeChat cannot withdraw one, so disabling a code only stops the service honouring it."""
        body: dict[str, Any] = {"action_info": {"scene": {"scene_str": request.scene}}}
        if request.expires_seconds is None:
            body["action_name"], kind = "QR_LIMIT_STR_SCENE", "qr_permanent"
        else:
            body["action_name"], kind = "QR_STR_SCENE", "qr"
            body["expire_seconds"] = min(request.expires_seconds, QR_MAX_SECONDS)
        try:
            result = await self._api.call("qrcode/create", body)
        except _ApiError as exc:
            raise CodeError(f"WeChat refused the QR code: {exc}") from exc
        except (_NotSent, *_NETWORK_ERRORS) as exc:
            raise CodeError(f"WeChat's API is unreachable: {exc}") from exc
        if not isinstance(result, dict) or not result.get("url") or not result.get("ticket"):
            raise CodeError("WeChat answered qrcode/create without a url and ticket")
        return IssuedCode(kind, str(result["url"]), str(result["ticket"]))

    def _in_window(self, message: OutboundMessage) -> bool:
        """Inside 48 hours of the person's last interaction (the core counts follows, QR scans and
        menu clicks as interactions too, as WeChat does)."""
        last = message.last_inbound_at
        return last is not None and self.service.clock.now() - last < REPLY_WINDOW

    async def _request(self, message: dict[str, Any], delivery_id: int | None,
                       endpoint: str = "message/custom/send") -> SendResult:
        """Send one message and turn WeChat's answer into a SendResult (never raises for WeChat)."""
        try:
            result = await self._api.call(endpoint, message)
        except _ApiError as exc:
            return self._error_result(exc, delivery_id)
        except _NotSent as exc:
            return self._backoff(delivery_id, f"network:{_network_name(exc.cause)}", _never_connected(exc.cause))
        except _NETWORK_ERRORS as exc:
            if _never_connected(exc) or _unwritten(exc):
                return self._backoff(delivery_id, f"network:{_network_name(exc)}", _never_connected(exc))
            log.warning("wechat %s: outcome of delivery %s unknown: %r", self.account, delivery_id, exc)
            return self._finish(delivery_id, SendResult("failed", f"unknown_outcome:{_network_name(exc)}"))
        self._forget_retries(delivery_id)
        if not isinstance(result, dict):
            return SendResult("failed", "wechat:bad_response")
        msgid = result.get("msgid")
        return SendResult("sent", platform_msg_id=str(msgid) if msgid else None)

    def _error_result(self, exc: _ApiError, delivery_id: int | None) -> SendResult:
        code = exc.errcode
        if code is None:  # HTTP error status from the API gateway
            status = exc.status
            if status >= 500 or status == 429:
                return self._backoff(delivery_id, f"http:{status}")
            return self._finish(delivery_id, SendResult("failed", f"http:{status}"))
        prefix = "wechat:token:" if isinstance(exc, _TokenError) else "wechat:"
        if code == 45015:
            return self._finish(delivery_id, SendResult("skipped", OUTSIDE_WINDOW))
        if code == 43004:
            return self._finish(delivery_id, SendResult("skipped", "not_subscribed"))
        if code in QUOTA_ERRCODES:
            return SendResult("retry", f"{prefix}{code}", retry_after=self.settings.quota_retry_seconds)
        if code == -1:
            return self._backoff(delivery_id, f"{prefix}{code}")
        return self._finish(delivery_id, SendResult("failed", f"{prefix}{code}"))

    def _backoff(self, delivery_id: int | None, reason: str, unreachable: bool = False) -> SendResult:
        tries = 1
        if delivery_id is not None:
            tries = self._retries.pop(delivery_id, 0) + 1
            self._retries[delivery_id] = tries
            while len(self._retries) > 10_000:
                self._retries.popitem(last=False)
        wait = min(self.settings.retry_backoff_seconds * 2 ** (tries - 1), MAX_BACKOFF_SECONDS)
        return SendResult("retry", reason, retry_after=wait, unreachable=unreachable)

    def _finish(self, delivery_id: int | None, result: SendResult) -> SendResult:
        self._forget_retries(delivery_id)
        return result

    def _forget_retries(self, delivery_id: int | None) -> None:
        if delivery_id is not None:
            self._retries.pop(delivery_id, None)


def _success() -> web.Response:
    """Stops WeChat's retries and shows the person nothing."""
    return web.Response(text="success")
