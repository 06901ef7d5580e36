"""A fake Telegram Bot API server (loopback aiohttp) and builders of real Update payloads.

It speaks the Bot API's shapes — ``{"ok": true, "result": ...}`` and ``{"ok": false, "error_code",
"description", "parameters"}`` — accepts parameters the ways Telegram does (query string, form,
multipart, JSON), and ENFORCES the flood limits from the Bot FAQ on message sends: at most
``overall_per_second`` messages in any sliding second, one message per second per private chat and
``per_group_per_minute`` per group in any sliding minute; beyond them it answers 429 with
``retry_after`` and does not deliver. ``slack`` shortens the windows a little (network jitter between
a client's pacing and our arrival times). Every delivered message is recorded with its arrival time.
``send_delay`` holds each successful send's answer back that long after the message is recorded (a slow
platform: the message is out, the client does not know yet); ``hold_answers`` holds them back until
``release_answers`` (the sends a client has in flight at once become countable). ``serve`` listens on
a port of its own instead of a test server fixture's, so that ``go_down`` can make it refuse every
connection (an outage) and ``come_back`` serve again on the same port.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from itertools import count
from typing import Any

from aiohttp import web
from aiohttp.web_request import FileField

from tests.fakes.loopback import LoopbackServer

_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")
_GETUPDATES_CONFLICT = "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first"


@dataclass(frozen=True)
class Sent:
    """One message the fake delivered."""

    method: str
    chat_id: int
    message_id: int
    at: float  # event-loop time of arrival
    text: str | None = None
    caption: str | None = None
    photo: bytes | None = None
    reply_markup: Any = None


@dataclass(frozen=True)
class Throttled:
    chat_id: int
    retry_after: int
    at: float
    limit: str  # overall, chat, group or injected


def _error(code: int, description: str, **parameters: Any) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if parameters:
        body["parameters"] = parameters
    return web.json_response(body, status=code)


def _ok(result: Any, description: str | None = None) -> web.Response:
    body: dict[str, Any] = {"ok": True, "result": result}
    if description:
        body["description"] = description
    return web.json_response(body)


class FakeTelegram:
    def __init__(self, token: str, *, username: str = "scrm_shop_bot", overall_per_second: int = 30,
                 per_chat_per_second: float = 1, per_group_per_minute: int = 20, slack: float = 0.05,
                 max_poll_wait: float = 0.3, send_delay: float = 0.0) -> None:
        self.token = token
        #: The api_base_url clients use (``http://127.0.0.1:<port>/bot``), set once the server listens.
        self.base_url = ""
        self.bot_user = {"id": int(token.split(":")[0]), "is_bot": True, "first_name": "SCRM Shop",
                         "username": username}
        self.overall_per_second = overall_per_second
        self.chat_interval = 1 / per_chat_per_second
        self.per_group_per_minute = per_group_per_minute
        self.slack = slack
        self.max_poll_wait = max_poll_wait
        self.send_delay = send_delay
        self.sent: list[Sent] = []
        self.throttled: list[Throttled] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.blocked: set[int] = set()
        self.webhook: dict[str, Any] | None = None
        self.pending_updates: list[dict[str, Any]] = []
        self._injected: deque[int] = deque()
        self._recent: deque[float] = deque()
        self._last_in_chat: dict[int, float] = {}
        self._group_recent: dict[int, deque[float]] = defaultdict(deque)
        self._message_ids = count(1)
        self._update_arrived = asyncio.Event()
        self._answering = asyncio.Event()
        self._answering.set()
        self._server = LoopbackServer(self.app)

    # controls for tests

    def app(self) -> web.Application:
        app = web.Application(client_max_size=60 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._dispatch)
        return app

    async def serve(self) -> None:
        """Listen on a loopback port of its own and set ``base_url``."""
        await self._server.start()
        self.base_url = self._server.url("/bot")

    async def go_down(self) -> None:
        """Telegram unreachable: the port stops listening and open connections close, so every request
        is refused before it is sent, until :meth:`come_back`."""
        await self._server.stop()
        assert await self._server.refuses()

    async def come_back(self) -> None:
        await self._server.start()

    async def close(self) -> None:
        await self._server.stop()

    def inject_flood(self, retry_after: int = 1, times: int = 1) -> None:
        """The next ``times`` sends get 429 whatever the pace (Telegram's limits are not only ours)."""
        self._injected.extend([retry_after] * times)

    def hold_answers(self) -> None:
        """Messages sent from now on are delivered, but answered only after ``release_answers``."""
        self._answering.clear()

    def release_answers(self) -> None:
        self._answering.set()

    def push_update(self, update: dict[str, Any]) -> None:
        """An update waiting for getUpdates (Telegram keeps them while no webhook is set)."""
        self.pending_updates.append(update)
        self._update_arrived.set()

    def texts_to(self, chat_id: int) -> list[str]:
        return [s.text for s in self.sent if s.chat_id == chat_id and s.text is not None]

    def method_calls(self, method: str) -> list[dict[str, Any]]:
        return [params for name, params in self.calls if name == method]

    # the API

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        method = request.match_info["method"].lower()
        handler = {
            "getme": self._get_me, "sendmessage": self._send_message, "sendphoto": self._send_photo,
            "setwebhook": self._set_webhook, "deletewebhook": self._delete_webhook,
            "getwebhookinfo": self._get_webhook_info, "getupdates": self._get_updates,
            "answercallbackquery": self._answer_callback_query,
        }.get(method)
        if handler is None:
            return _error(404, "Not Found")
        params = await self._params(request)
        self.calls.append((request.match_info["method"], params))
        return await handler(params)

    @staticmethod
    async def _params(request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            params.update(await request.json())
        elif request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            params.update((await request.post()).items())
        return params

    async def _answer_callback_query(self, params: dict[str, Any]) -> web.Response:
        if not params.get("callback_query_id"):
            return _error(400, "Bad Request: query is too old and response timeout expired or query ID is invalid")
        return _ok(True)

    async def _get_me(self, params: dict[str, Any]) -> web.Response:
        return _ok({**self.bot_user, "can_join_groups": True, "can_read_all_group_messages": False,
                    "supports_inline_queries": False})

    @staticmethod
    def _chat_id(params: dict[str, Any]) -> int | None:
        try:
            return int(params.get("chat_id", ""))
        except (TypeError, ValueError):
            return None

    def _chat(self, chat_id: int) -> dict[str, Any]:
        if chat_id > 0:
            return {"id": chat_id, "type": "private", "first_name": "Customer"}
        return {"id": chat_id, "type": "supergroup", "title": "Customer group"}

    def _admit(self, chat_id: int) -> web.Response | None:
        """Flood control: None when the message may go out now, else the 429 Telegram answers."""
        now = asyncio.get_running_loop().time()
        limit, retry_after = self._over_limit(chat_id, now)
        if limit is None:
            self._recent.append(now)
            self._last_in_chat[chat_id] = now
            if chat_id < 0:
                self._group_recent[chat_id].append(now)
            return None
        self.throttled.append(Throttled(chat_id, retry_after, now, limit))
        return _error(429, f"Too Many Requests: retry after {retry_after}", retry_after=retry_after)

    def _over_limit(self, chat_id: int, now: float) -> tuple[str | None, int]:
        if self._injected:
            return "injected", self._injected.popleft()
        window = 1.0 - self.slack
        while self._recent and now - self._recent[0] >= window:
            self._recent.popleft()
        if len(self._recent) >= self.overall_per_second:
            return "overall", 1
        last = self._last_in_chat.get(chat_id)
        if chat_id > 0 and last is not None and now - last < self.chat_interval - self.slack:
            return "chat", max(1, math.ceil(self.chat_interval - (now - last)))
        if chat_id < 0:
            recent, minute = self._group_recent[chat_id], 60.0 - self.slack
            while recent and now - recent[0] >= minute:
                recent.popleft()
            if len(recent) >= self.per_group_per_minute:
                return "group", max(1, math.ceil(minute - (now - recent[0])))
        return None, 0

    def _deliver(self, method: str, chat_id: int, **content: Any) -> dict[str, Any]:
        message_id = next(self._message_ids)
        photo = content.pop("photo_bytes", None)
        self.sent.append(Sent(method, chat_id, message_id, asyncio.get_running_loop().time(),
                              content.get("text"), content.get("caption"), photo, content.get("reply_markup")))
        return {"message_id": message_id, "from": self.bot_user, "chat": self._chat(chat_id),
                "date": int(time.time()), **content}

    async def _send_message(self, params: dict[str, Any]) -> web.Response:
        chat_id, text = self._chat_id(params), params.get("text")
        if chat_id is None:
            return _error(400, "Bad Request: chat not found")
        if not isinstance(text, str) or not text.strip():
            return _error(400, "Bad Request: message text is empty")
        if len(text) > 4096:
            return _error(400, "Bad Request: message is too long")
        if chat_id in self.blocked:
            return _error(403, "Forbidden: bot was blocked by the user")
        if (throttled := self._admit(chat_id)) is not None:
            return throttled
        markup = params.get("reply_markup")
        if isinstance(markup, str):
            try:
                markup = json.loads(markup)
            except ValueError:
                return _error(400, "Bad Request: can't parse reply keyboard markup JSON object")
        extra = {"reply_markup": markup} if markup else {}
        result = self._deliver("sendMessage", chat_id, text=text, **extra)
        if self.send_delay:
            await asyncio.sleep(self.send_delay)
        await self._answering.wait()
        return _ok(result)

    async def _send_photo(self, params: dict[str, Any]) -> web.Response:
        chat_id, photo, caption = self._chat_id(params), params.get("photo"), params.get("caption")
        if chat_id is None:
            return _error(400, "Bad Request: chat not found")
        if not isinstance(photo, FileField):
            return _error(400, "Bad Request: there is no photo in the request")
        data = photo.file.read()
        if not data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")):
            return _error(400, "Bad Request: IMAGE_PROCESS_FAILED")
        if isinstance(caption, str) and len(caption) > 1024:
            return _error(400, "Bad Request: message caption is too long")
        if chat_id in self.blocked:
            return _error(403, "Forbidden: bot was blocked by the user")
        if (throttled := self._admit(chat_id)) is not None:
            return throttled
        width, height = (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) \
            if data.startswith(b"\x89PNG") else (0, 0)
        size = {"file_id": f"AgACAgIAAxkBAAI{len(self.sent)}", "file_unique_id": f"AQAD{len(self.sent)}",
                "file_size": len(data), "width": width, "height": height}
        content: dict[str, Any] = {"photo": [size], "photo_bytes": data}
        if caption:
            content["caption"] = caption
        return _ok(self._deliver("sendPhoto", chat_id, **content))

    async def _set_webhook(self, params: dict[str, Any]) -> web.Response:
        url, secret = params.get("url", ""), params.get("secret_token")
        if not isinstance(url, str) or not url.startswith("https://"):
            return _error(400, "Bad Request: bad webhook: An HTTPS URL must be provided for webhook")
        if secret is not None and not _SECRET.fullmatch(str(secret)):
            return _error(400, "Bad Request: secret token contains unallowed characters")
        allowed = params.get("allowed_updates")
        self.webhook = {"url": url, "secret_token": secret,
                        "allowed_updates": json.loads(allowed) if isinstance(allowed, str) else allowed}
        if str(params.get("drop_pending_updates", "")).lower() == "true":
            self.pending_updates.clear()
        return _ok(True, "Webhook was set")

    async def _delete_webhook(self, params: dict[str, Any]) -> web.Response:
        existed, self.webhook = self.webhook is not None, None
        if str(params.get("drop_pending_updates", "")).lower() == "true":
            self.pending_updates.clear()
        return _ok(True, "Webhook was deleted" if existed else "Webhook is already deleted")

    async def _get_webhook_info(self, params: dict[str, Any]) -> web.Response:
        return _ok({"url": (self.webhook or {}).get("url", ""), "has_custom_certificate": False,
                    "pending_update_count": len(self.pending_updates)})

    async def _get_updates(self, params: dict[str, Any]) -> web.Response:
        if self.webhook is not None:
            return _error(409, _GETUPDATES_CONFLICT)
        offset, limit = int(params.get("offset") or 0), int(params.get("limit") or 100)
        timeout = float(params.get("timeout") or 0)
        # An offset confirms every update before it: Telegram forgets them.
        self.pending_updates = [u for u in self.pending_updates if u["update_id"] >= offset]
        if not self.pending_updates and timeout > 0:
            self._update_arrived.clear()
            try:  # a real long poll waits `timeout`; a shorter wait keeps test shutdown quick
                await asyncio.wait_for(self._update_arrived.wait(), min(timeout, self.max_poll_wait))
            except TimeoutError:
                pass
        allowed = params.get("allowed_updates")
        kinds = set(json.loads(allowed)) if isinstance(allowed, str) and allowed else None
        batch = [u for u in self.pending_updates if kinds is None or kinds & (u.keys() - {"update_id"})]
        return _ok(batch[:limit])


# -- Update payloads ---------------------------------------------------------------------------------


def user(user_id: int, first_name: str, last_name: str | None = None, username: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": first_name, "language_code": "zh-hans"}
    if last_name:
        data["last_name"] = last_name
    if username:
        data["username"] = username
    return data


def private_chat(person: dict[str, Any]) -> dict[str, Any]:
    chat = {"id": person["id"], "type": "private", "first_name": person["first_name"]}
    if "last_name" in person:
        chat["last_name"] = person["last_name"]
    return chat


def group_chat(chat_id: int, title: str = "VIP 妈妈群") -> dict[str, Any]:
    return {"id": chat_id, "type": "supergroup", "title": title}


class Updates:
    """Builds Update JSON as Telegram sends it, with increasing update_id and message_id."""

    def __init__(self, bot_user: dict[str, Any], first_update_id: int = 731_000_000) -> None:
        self.bot_user = bot_user
        self._update_ids = count(first_update_id)
        self._message_ids = count(1)

    def _message(self, sender: dict[str, Any], chat: dict[str, Any] | None = None, **content: Any) -> dict[str, Any]:
        message = {"message_id": next(self._message_ids), "from": sender, "chat": chat or private_chat(sender),
                   "date": int(time.time()), **content}
        return {"update_id": next(self._update_ids), "message": message}

    def text(self, sender: dict[str, Any], text: str, chat: dict[str, Any] | None = None) -> dict[str, Any]:
        content: dict[str, Any] = {"text": text}
        if text.startswith("/"):
            content["entities"] = [{"offset": 0, "length": len(text.split(" ", 1)[0]), "type": "bot_command"}]
        return self._message(sender, chat, **content)

    def tap(self, sender: dict[str, Any], data: str) -> dict[str, Any]:
        """The person tapped an inline button whose callback data is ``data``."""
        return {"update_id": next(self._update_ids),
                "callback_query": {"id": str(next(self._message_ids)), "from": sender, "chat_instance": "1",
                                   "data": data, "message": {"message_id": 1, "date": int(time.time()),
                                                             "chat": private_chat(sender), "text": "?"}}}

    def contact(self, sender: dict[str, Any], phone: str, owner: dict[str, Any] | None = None) -> dict[str, Any]:
        """A shared contact card; ``owner`` is whose number it is (default: the sender's own)."""
        owner = owner or sender
        card = {"phone_number": phone, "first_name": owner["first_name"], "user_id": owner["id"]}
        return self._message(sender, contact=card)

    def members_joined(self, chat: dict[str, Any], members: list[dict[str, Any]],
                       added_by: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._message(added_by or members[0], chat, new_chat_participant=members[0],
                             new_chat_member=members[0], new_chat_members=members)

    def member_left(self, chat: dict[str, Any], member: dict[str, Any]) -> dict[str, Any]:
        return self._message(member, chat, left_chat_participant=member, left_chat_member=member)

    def bot_blocked(self, person: dict[str, Any]) -> dict[str, Any]:
        """What Telegram sends when a person blocks the bot (my_chat_member, status kicked)."""
        return {"update_id": next(self._update_ids), "my_chat_member": {
            "chat": private_chat(person), "from": person, "date": int(time.time()),
            "old_chat_member": {"user": self.bot_user, "status": "member"},
            "new_chat_member": {"user": self.bot_user, "status": "kicked", "until_date": 0},
        }}


def png(width: int = 2, height: int = 2) -> bytes:
    """A small valid PNG (for sendPhoto)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
