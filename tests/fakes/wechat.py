"""A loopback stand-in for api.weixin.qq.com plus builders of signed callbacks, as WeChat sends them.

The fake speaks WeChat's real shapes: HTTP 200 with ``{"errcode": ..., "errmsg": "... rid: ..."}`` for
errors, access tokens that expire, 45015 outside the 48-hour window, 43004 for unfollowed users.
Signatures here are computed independently of ``handlers.wechat``; encryption uses wechatpy's
WeChatCrypto, the same scheme WeChat's servers use.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

import xmltodict
from aiohttp import web
from wechatpy.crypto import WeChatCrypto

ERRMSG = {
    -1: "system error",
    40001: "invalid credential, access_token is invalid or not latest",
    40003: "invalid openid",
    40008: "invalid message type",
    40013: "invalid appid",
    40016: "invalid button size",
    40017: "invalid button type",
    40018: "invalid button name size",
    40019: "invalid button key size",
    40020: "invalid button url size",
    40023: "invalid sub button size",
    40024: "invalid sub button type",
    40025: "invalid sub button name size",
    40026: "invalid sub button key size",
    40027: "invalid sub button url size",
    40033: "invalid charset. please check your request, if include \\uxxxx will create fail!",
    40054: "invalid sub button url domain",
    40055: "invalid button url domain",
    46003: "menu no exist",
    40037: "invalid template_id",
    40004: "invalid media type",
    40005: "invalid file type",
    40125: "invalid appsecret",
    41001: "access_token missing",
    42001: "access_token expired",
    43004: "require subscribe",
    44002: "empty post data",
    45009: "reach max api daily quota limit",
    45015: "response out of time limit or subscription is canceled",
    40009: "invalid image size",
    40097: "invalid args",
    45029: "qrcode count out of limit",
    45047: "out of response count limit",
}


def error(errcode: int) -> dict[str, Any]:
    rid = f"{secrets.token_hex(4)}-{secrets.token_hex(4)}-{secrets.token_hex(4)}"
    return {"errcode": errcode, "errmsg": f"{ERRMSG.get(errcode, 'error')} rid: {rid}"}


@dataclass
class Call:
    endpoint: str  # "token", "message/custom/send", ...
    query: dict[str, str]
    body: Any
    answer: dict[str, Any]


@dataclass
class Hold:
    """One held answer: ``arrived`` is set when the call came in, the answer waits for ``released``."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class FakeWeChat:
    app_id: str = "wx0123456789abcdef"
    app_secret: str = "fake-app-secret"
    token_ttl: int = 7200
    #: Template ids the account has added (others answer 40037).
    templates: set[str] = field(default_factory=lambda: {"TPL_NOTICE"})
    #: OpenIDs that unfollowed (43004 for everything) and those whose 48-hour window closed (45015).
    unsubscribed: set[str] = field(default_factory=set)
    window_closed: set[str] = field(default_factory=set)
    calls: list[Call] = field(default_factory=list)
    #: Messages WeChat accepted, in order.
    custom_messages: list[dict[str, Any]] = field(default_factory=list)
    template_messages: list[dict[str, Any]] = field(default_factory=list)
    media: dict[str, bytes] = field(default_factory=dict)
    #: Parametric QR codes made (ticket -> scene) and the permanent ones' scenes (at most ``permanent_limit``).
    qr_tickets: dict[str, str] = field(default_factory=dict)
    permanent_scenes: set[str] = field(default_factory=set)
    permanent_limit: int = 100_000
    #: The custom menu as menu/get gives it (``{"button": [...]}``), None without one.
    menu: dict[str, Any] | None = None
    #: Domains the account's view buttons may open (40055 / 40054 for others); None: any.
    menu_domains: set[str] | None = None
    _tokens: dict[str, float] = field(default_factory=dict)
    _expired: set[str] = field(default_factory=set)
    _queued: dict[str, deque[int]] = field(default_factory=lambda: defaultdict(deque))
    _stalls: dict[str, deque[float]] = field(default_factory=lambda: defaultdict(deque))
    _holds: dict[str, deque[Hold]] = field(default_factory=lambda: defaultdict(deque))

    # -- test controls -----------------------------------------------------------------------------

    def fail_next(self, endpoint: str, errcode: int, times: int = 1) -> None:
        """The next ``times`` calls to ``endpoint`` (e.g. "message/custom/send") answer ``errcode``."""
        self._queued[endpoint].extend([errcode] * times)

    def stall_next(self, endpoint: str, seconds: float) -> None:
        """The next answer from ``endpoint`` comes this late, after WeChat acted on the call (a message
        is delivered, a token issued): the client's timeout then leaves it not knowing the outcome."""
        self._stalls[endpoint].append(seconds)

    def hold_next(self, endpoint: str) -> Hold:
        """The next call to ``endpoint`` is acted on (recorded) and then answered only once the test
        releases it: a test waits for ``arrived`` instead of betting on how long the client takes."""
        hold = Hold()
        self._holds[endpoint].append(hold)
        return hold

    def expire_tokens(self) -> None:
        """Every token issued so far now answers 42001, as after WeChat's 2-hour expiry."""
        self._expired |= set(self._tokens)
        self._tokens.clear()

    def count(self, endpoint: str) -> int:
        return sum(1 for c in self.calls if c.endpoint == endpoint)

    # -- server ------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/cgi-bin/token", self._token)
        app.router.add_post("/cgi-bin/message/custom/send", self._custom_send)
        app.router.add_post("/cgi-bin/message/template/send", self._template_send)
        app.router.add_post("/cgi-bin/media/upload", self._media_upload)
        app.router.add_post("/cgi-bin/qrcode/create", self._qrcode_create)
        app.router.add_post("/cgi-bin/menu/create", self._menu_create)
        app.router.add_get("/cgi-bin/menu/get", self._menu_get)
        app.router.add_get("/cgi-bin/menu/delete", self._menu_delete)
        return app

    async def _answer(self, endpoint: str, query: dict[str, str], body: Any, answer: dict[str, Any]) -> web.Response:
        self.calls.append(Call(endpoint, query, body, answer))
        if stalls := self._stalls[endpoint]:
            await asyncio.sleep(stalls.popleft())
        if holds := self._holds[endpoint]:
            hold = holds.popleft()
            hold.arrived.set()
            await hold.released.wait()
        return web.Response(text=json.dumps(answer, ensure_ascii=False), content_type="application/json",
                            charset="utf-8")

    async def _token(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        if q.get("grant_type") != "client_credential":
            return await self._answer("token", q, None, {"errcode": 40002, "errmsg": "invalid grant_type"})
        if q.get("appid") != self.app_id:
            return await self._answer("token", q, None, error(40013))
        if q.get("secret") != self.app_secret:
            return await self._answer("token", q, None, error(40125))
        if queued := self._queued["token"]:
            return await self._answer("token", q, None, error(queued.popleft()))
        token = secrets.token_urlsafe(48)
        self._tokens[token] = time.monotonic() + self.token_ttl
        return await self._answer("token", q, None, {"access_token": token, "expires_in": self.token_ttl})

    def _check_token(self, query: dict[str, str]) -> int:
        token = query.get("access_token")
        if not token:
            return 41001
        if token in self._expired:
            return 42001
        expiry = self._tokens.get(token)
        if expiry is None:
            return 40001
        if expiry < time.monotonic():
            return 42001
        return 0

    async def _guard(self, endpoint: str, query: dict[str, str], openid: object) -> int:
        """Errcode shared by every API: queued failures, token, then the user's state."""
        if code := self._check_token(query):
            return code
        if queued := self._queued[endpoint]:
            return queued.popleft()
        if openid is not None and (not isinstance(openid, str) or not openid):
            return 40003
        if openid in self.unsubscribed:
            return 43004
        return 0

    async def _json(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None

    async def _custom_send(self, request: web.Request) -> web.Response:
        endpoint, q = "message/custom/send", dict(request.query)
        body = await self._json(request)
        if not isinstance(body, dict):
            return await self._answer(endpoint, q, body, error(44002))
        if code := await self._guard(endpoint, q, body.get("touser")):
            return await self._answer(endpoint, q, body, error(code))
        if body["touser"] in self.window_closed:
            return await self._answer(endpoint, q, body, error(45015))
        msgtype = body.get("msgtype")
        content = body.get(msgtype) if isinstance(msgtype, str) else None
        if msgtype == "text" and not (isinstance(content, dict) and content.get("content")):
            return await self._answer(endpoint, q, body, error(44002))
        if msgtype == "image" and not (isinstance(content, dict) and content.get("media_id") in self.media):
            return await self._answer(endpoint, q, body, {"errcode": 40007, "errmsg": "invalid media_id"})
        if msgtype == "news" and not (isinstance(content, dict) and isinstance(content.get("articles"), list)
                                      and 1 <= len(content["articles"]) <= 8
                                      and all(a.get("title") and a.get("url") for a in content["articles"])):
            return await self._answer(endpoint, q, body, error(44002))
        if msgtype not in ("text", "image", "news"):
            return await self._answer(endpoint, q, body, error(40008))
        self.custom_messages.append(body)
        return await self._answer(endpoint, q, body, {"errcode": 0, "errmsg": "ok"})

    async def _template_send(self, request: web.Request) -> web.Response:
        endpoint, q = "message/template/send", dict(request.query)
        body = await self._json(request)
        if not isinstance(body, dict):
            return await self._answer(endpoint, q, body, error(44002))
        if code := await self._guard(endpoint, q, body.get("touser")):
            return await self._answer(endpoint, q, body, error(code))
        if body.get("template_id") not in self.templates:
            return await self._answer(endpoint, q, body, error(40037))
        data = body.get("data")
        if not isinstance(data, dict) or not all(isinstance(v, dict) and "value" in v for v in data.values()):
            return await self._answer(endpoint, q, body, {"errcode": 47001, "errmsg": "data format error"})
        self.template_messages.append(body)
        msgid = 200_000_000 + len(self.template_messages)
        return await self._answer(endpoint, q, body, {"errcode": 0, "errmsg": "ok", "msgid": msgid})

    async def _qrcode_create(self, request: web.Request) -> web.Response:
        """Parametric QR codes as WeChat makes them: QR_STR_SCENE (temporary, expire_seconds up to 30
        days, 30 s if absent) and QR_LIMIT_STR_SCENE (permanent, ``permanent_limit`` of them: 45029 beyond);
        scene_str 1-64 characters. Each gets a ticket and the URL its QR image encodes."""
        endpoint, q = "qrcode/create", dict(request.query)
        body = await self._json(request)
        if code := await self._guard(endpoint, q, None):
            return await self._answer(endpoint, q, body, error(code))
        action = body.get("action_name") if isinstance(body, dict) else None
        scene = ((body.get("action_info") or {}).get("scene") or {}).get("scene_str") if isinstance(body, dict) else None
        if action not in ("QR_STR_SCENE", "QR_LIMIT_STR_SCENE") or not isinstance(scene, str) or not 1 <= len(scene) <= 64:
            return await self._answer(endpoint, q, body, error(40097))
        expire = body.get("expire_seconds", 30)
        if action == "QR_STR_SCENE" and (not isinstance(expire, int) or not 60 <= expire <= 2_592_000):
            return await self._answer(endpoint, q, body, error(40097))
        if action == "QR_LIMIT_STR_SCENE":
            if len(self.permanent_scenes) >= self.permanent_limit:
                return await self._answer(endpoint, q, body, error(45029))
            self.permanent_scenes.add(scene)
        ticket = f"gQ{secrets.token_urlsafe(24)}"
        self.qr_tickets[ticket] = scene
        answer: dict[str, Any] = {"ticket": ticket, "url": f"http://weixin.qq.com/q/{secrets.token_urlsafe(16)}"}
        if action == "QR_STR_SCENE":
            answer["expire_seconds"] = expire
        return await self._answer(endpoint, q, body, answer)

    async def _media_upload(self, request: web.Request) -> web.Response:
        endpoint, q = "media/upload", dict(request.query)
        if code := await self._guard(endpoint, q, None):
            return await self._answer(endpoint, q, None, error(code))
        if q.get("type") not in ("image", "voice", "video", "thumb"):
            return await self._answer(endpoint, q, None, error(40004))
        reader = await request.multipart()
        part = await reader.next()
        if part is None or getattr(part, "name", None) != "media" or not getattr(part, "filename", None):
            return await self._answer(endpoint, q, None, error(40005))
        data = await part.read()  # type: ignore[union-attr]
        if not data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")):
            return await self._answer(endpoint, q, {"filename": part.filename, "size": len(data)}, error(40005))
        media_id = uuid.uuid4().hex
        self.media[media_id] = data
        return await self._answer(endpoint, q, {"filename": part.filename, "size": len(data)},
                            {"type": q["type"], "media_id": media_id, "created_at": int(time.time())})


    async def _menu_create(self, request: web.Request) -> web.Response:
        endpoint, q = "menu/create", dict(request.query)
        raw = await request.read()
        body = await self._json(request)
        if code := await self._guard(endpoint, q, None):
            return await self._answer(endpoint, q, body, error(code))
        if b"\\u" in raw:  # WeChat wants UTF-8 text, not JSON's \u escapes
            return await self._answer(endpoint, q, body, error(40033))
        if not isinstance(body, dict):
            return await self._answer(endpoint, q, body, error(44002))
        if code := self._menu_errcode(body.get("button")):
            return await self._answer(endpoint, q, body, error(code))
        self.menu = {"button": [{**b, "sub_button": [{**s, "sub_button": []} for s in b.get("sub_button") or []]}
                                for b in body["button"]]}
        return await self._answer(endpoint, q, body, {"errcode": 0, "errmsg": "ok"})

    def _menu_errcode(self, buttons: Any) -> int:
        """WeChat's checks of a menu: 1-3 buttons, 1-5 sub-buttons, names of at most 16 (60 in a submenu)
        UTF-8 bytes, keys of 128, URLs of 1024 on the account's domains; each its own errcode."""
        if not isinstance(buttons, list) or not 1 <= len(buttons) <= 3:
            return 40016
        for button in buttons:
            subs = button.get("sub_button") if isinstance(button, dict) else None
            if not isinstance(button, dict) or not 0 < len(str(button.get("name", "")).encode()) <= 16:
                return 40018
            if subs:
                if not isinstance(subs, list) or len(subs) > 5:
                    return 40023
                for sub in subs:
                    if code := self._leaf_errcode(sub, 60, sub=True):
                        return code
            elif code := self._leaf_errcode(button, 16, sub=False):
                return code
        return 0

    def _leaf_errcode(self, button: Any, name_bytes: int, *, sub: bool) -> int:
        codes = (40024, 40025, 40026, 40027, 40054) if sub else (40017, 40018, 40019, 40020, 40055)
        if not isinstance(button, dict) or button.get("type") not in ("click", "view", "miniprogram"):
            return codes[0]
        if not 0 < len(str(button.get("name", "")).encode()) <= name_bytes:
            return codes[1]
        if button["type"] == "click" and not 0 < len(str(button.get("key", "")).encode()) <= 128:
            return codes[2]
        if button["type"] != "click":
            url = str(button.get("url", ""))
            if not url.startswith(("http://", "https://")) or len(url.encode()) > 1024:
                return codes[3]
            if self.menu_domains is not None and url.split("/")[2].split(":")[0] not in self.menu_domains:
                return codes[4]
        return 0

    async def _menu_get(self, request: web.Request) -> web.Response:
        endpoint, q = "menu/get", dict(request.query)
        if code := await self._guard(endpoint, q, None):
            return await self._answer(endpoint, q, None, error(code))
        if self.menu is None:
            return await self._answer(endpoint, q, None, error(46003))
        return await self._answer(endpoint, q, None, {"menu": self.menu})

    async def _menu_delete(self, request: web.Request) -> web.Response:
        endpoint, q = "menu/delete", dict(request.query)
        if code := await self._guard(endpoint, q, None):
            return await self._answer(endpoint, q, None, error(code))
        self.menu = None
        return await self._answer(endpoint, q, None, {"errcode": 0, "errmsg": "ok"})

# -- inbound callbacks, built as WeChat builds them ----------------------------------------------------


def signature(*parts: str) -> str:
    """WeChat's callback signature: SHA-1 of the lexicographically sorted parts, concatenated."""
    return hashlib.sha1("".join(sorted(parts)).encode("utf-8")).hexdigest()


def message_xml(openid: str, msg_type: str, fields: dict[str, Any], *, msg_id: int | None = None,
                create_time: int | None = None, to: str = "gh_0123456789ab") -> str:
    """A callback body: ``msg_type`` "text", "image"... or "event" (with ``Event`` in fields)."""
    nodes = {"ToUserName": to, "FromUserName": openid, "CreateTime": create_time or int(time.time()),
             "MsgType": msg_type, **fields}
    if msg_id is not None:
        nodes["MsgId"] = msg_id
    inner = "".join(
        f"<{k}>{v}</{k}>" if isinstance(v, int | float) else f"<{k}><![CDATA[{v}]]></{k}>" for k, v in nodes.items()
    )
    return f"<xml>{inner}</xml>"


def text_xml(openid: str, content: str, msg_id: int, **kw: Any) -> str:
    return message_xml(openid, "text", {"Content": content}, msg_id=msg_id, **kw)


def event_xml(openid: str, event: str, event_key: str | None = None, **kw: Any) -> str:
    fields: dict[str, Any] = {"Event": event}
    if event_key is not None:
        fields["EventKey"] = event_key
    fields.update(kw.pop("extra", {}))
    return message_xml(openid, "event", fields, **kw)


@dataclass(frozen=True)
class Callback:
    query: dict[str, str]
    body: bytes


def plaintext(token: str, xml: str, openid: str = "") -> Callback:
    ts, nonce = str(int(time.time())), secrets.token_hex(5)
    query = {"signature": signature(token, ts, nonce), "timestamp": ts, "nonce": nonce}
    if openid:
        query["openid"] = openid
    return Callback(query, xml.encode("utf-8"))


def safe_mode(token: str, aes_key: str, app_id: str, xml: str, openid: str = "",
              to: str = "gh_0123456789ab") -> Callback:
    """Safe mode: ``<Encrypt>`` carries the AES-encrypted message; ``msg_signature`` signs it."""
    ts, nonce = str(int(time.time())), secrets.token_hex(5)
    crypto = WeChatCrypto(token, aes_key, app_id)
    encrypted = xmltodict.parse(crypto.encrypt_message(xml, nonce, ts))["xml"]["Encrypt"]
    body = f"<xml><ToUserName><![CDATA[{escape(to)}]]></ToUserName><Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>"
    query = {"signature": signature(token, ts, nonce), "timestamp": ts, "nonce": nonce, "encrypt_type": "aes",
             "msg_signature": signature(token, ts, nonce, encrypted)}
    if openid:
        query["openid"] = openid
    return Callback(query, body.encode("utf-8"))


def open_reply(token: str, aes_key: str, app_id: str, reply: str) -> dict[str, Any]:
    """Check a safe-mode passive reply's signature independently, decrypt it and parse it."""
    outer = xmltodict.parse(reply)["xml"]
    expected = signature(token, outer["TimeStamp"], outer["Nonce"], outer["Encrypt"])
    assert outer["MsgSignature"] == expected, "reply MsgSignature does not verify"
    crypto = WeChatCrypto(token, aes_key, app_id)
    plain = crypto.decrypt_message(reply, outer["MsgSignature"], outer["TimeStamp"], outer["Nonce"])
    return dict(xmltodict.parse(plain)["xml"])
