"""A fake WeCom API (loopback aiohttp) and builders of callbacks encrypted and signed as WeCom does.

The fake keeps WeCom's rules that the channel must live with: access tokens expire (42001) and are
checked on every call, a WelcomeCode works once and for 20 seconds, request bodies must be UTF-8 JSON
without ``\\uXXXX`` escapes (40033), mass-send tasks wait for the staff member to confirm them, and
every error comes back as ``{"errcode", "errmsg"}`` with HTTP 200.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from wechatpy.enterprise.crypto import PrpCrypto

#: errcodes used by the fake, with WeCom's messages.
INVALID_TOKEN = (40014, "invalid access_token")
EXPIRED_TOKEN = (42001, "access_token expired")
INVALID_SECRET = (40001, "invalid credential")
BAD_CHARS = (40033, "invalid charset. please check your request, if include \\uxxxx will create fail!")
#: send_welcome_msg with a code that is unknown, used or older than 20 s. The real errcode could not be
#: confirmed from public docs available here; 41051 follows the brief ("41051-style").
INVALID_WELCOME_CODE = (41051, "invalid welcome_code, expired or already used")
INVALID_CHAT = (40050, "chatid not found")
INVALID_MSGID = (41035, "invalid msgid")
SYSTEM_BUSY = (-1, "system busy")
WELCOME_TTL = 20.0
_ESCAPE = re.compile(rb"(?<!\\)\\u[0-9a-fA-F]{4}")


def signature(token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    """msg_signature: SHA1 of the sorted strings, computed here independently of the channel's library."""
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, encrypt])).encode()).hexdigest()


@dataclass
class CallbackSigner:
    """Builds what WeCom POSTs (or GETs, for URL verification) to a corp's callback URL."""

    corp_id: str
    token: str
    encoding_aes_key: str

    def encrypt(self, plain: str) -> str:
        import base64

        key = base64.b64decode(self.encoding_aes_key + "=")
        return PrpCrypto(key).encrypt(plain, self.corp_id).decode()

    def decrypt(self, encrypted: str) -> str:
        import base64

        key = base64.b64decode(self.encoding_aes_key + "=")
        return PrpCrypto(key).decrypt(encrypted, self.corp_id)

    def post(self, plain_xml: str, *, timestamp: str | None = None, nonce: str | None = None,
             token: str | None = None) -> tuple[dict[str, str], bytes]:
        """Query parameters and body of one encrypted callback; ``token`` forges a wrong signature."""
        timestamp = timestamp or str(int(time.time()))
        nonce = nonce or secrets.token_hex(5)
        encrypt = self.encrypt(plain_xml)
        body = (f"<xml><ToUserName><![CDATA[{self.corp_id}]]></ToUserName>"
                f"<Encrypt><![CDATA[{encrypt}]]></Encrypt><AgentID><![CDATA[]]></AgentID></xml>")
        params = {"msg_signature": signature(token or self.token, timestamp, nonce, encrypt),
                  "timestamp": timestamp, "nonce": nonce}
        return params, body.encode()

    def verify(self, echo: str, *, token: str | None = None) -> dict[str, str]:
        timestamp, nonce = str(int(time.time())), secrets.token_hex(5)
        echostr = self.encrypt(echo)
        return {"msg_signature": signature(token or self.token, timestamp, nonce, echostr),
                "timestamp": timestamp, "nonce": nonce, "echostr": echostr}


def _cdata(name: str, value: str) -> str:
    return f"<{name}><![CDATA[{value}]]></{name}>"


def contact_event(corp_id: str, change: str, external_id: str, *, user_id: str = "zhangsan",
                  state: str | None = None, welcome_code: str | None = None, create_time: int | None = None,
                  fail_reason: str | None = None) -> str:
    """A change_external_contact event as WeCom sends it (before encryption)."""
    parts = [_cdata("ToUserName", corp_id), _cdata("FromUserName", "sys"),
             f"<CreateTime>{create_time or int(time.time())}</CreateTime>", _cdata("MsgType", "event"),
             _cdata("Event", "change_external_contact"), _cdata("ChangeType", change), _cdata("UserID", user_id),
             _cdata("ExternalUserID", external_id)]
    if state is not None:
        parts.append(_cdata("State", state))
    if welcome_code is not None:
        parts.append(_cdata("WelcomeCode", welcome_code))
    if fail_reason is not None:
        parts.append(_cdata("FailReason", fail_reason))
    return "<xml>" + "".join(parts) + "</xml>"


def chat_event(corp_id: str, change: str, chat_id: str, *, detail: str | None = None,
               members: list[str] | None = None, create_time: int | None = None, scene: int = 1) -> str:
    """A change_external_chat event; ``members`` None leaves out MemChangeList (older callbacks)."""
    parts = [_cdata("ToUserName", corp_id), _cdata("FromUserName", "sys"),
             f"<CreateTime>{create_time or int(time.time())}</CreateTime>", _cdata("MsgType", "event"),
             _cdata("Event", "change_external_chat"), _cdata("ChatId", chat_id), _cdata("ChangeType", change)]
    if detail is not None:
        parts.append(_cdata("UpdateDetail", detail))
        if detail == "add_member":
            parts.append(f"<JoinScene>{scene}</JoinScene>")
        if detail == "del_member":
            parts.append(f"<QuitScene>{scene}</QuitScene>")
        if members is not None:
            parts.append(f"<MemChangeCnt>{len(members)}</MemChangeCnt>")
            parts.append("<MemChangeList>" + "".join(_cdata("Item", m) for m in members) + "</MemChangeList>")
    return "<xml>" + "".join(parts) + "</xml>"


@dataclass
class Task:
    """A mass-send task waiting for (or confirmed by) its sender."""

    msgid: str
    body: dict[str, Any]
    sender: str
    #: recipient (external_userid or chat_id) -> status 0 unsent, 1 sent, 2 not a friend, 3 over the limit
    results: dict[str, int] = field(default_factory=dict)
    confirmed: bool = False


class FakeWeCom:
    """State and handlers of the fake API; ``app`` is served with pytest-aiohttp's ``aiohttp_server``."""

    def __init__(self, corp_id: str, secret: str) -> None:
        self.corp_id, self.secret = corp_id, secret
        self.tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self.welcome_codes: dict[str, float] = {}  # code -> issued at (monotonic)
        self.used_codes: set[str] = set()
        self.contacts: dict[str, dict[str, Any]] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.tasks: dict[str, Task] = {}
        #: Staff user ids in the corp (a contact-me way for anyone else answers 60111) and the ways made.
        self.staff: set[str] = {"zhangsan", "lisi"}
        self.ways: dict[str, dict[str, Any]] = {}
        #: Every call: (api path, query, JSON body or None).
        self.calls: list[tuple[str, dict[str, str], dict[str, Any] | None]] = []
        #: Accepted welcome messages: (code, age in seconds when used, body).
        self.welcomes: list[tuple[str, float, dict[str, Any]]] = []
        #: Queued forced errors per API path, answered before normal handling.
        self.fail_next: dict[str, list[tuple[int, str]]] = {}
        #: API paths whose next call finds every token issued so far expired.
        self.expire_on: set[str] = set()
        self.app = web.Application()
        self.app.router.add_route("*", "/cgi-bin/{path:.+}", self._dispatch)

    # -------------------------------------------------------------- test controls

    def issue_welcome_code(self, age: float = 0.0) -> str:
        code = "WC_" + secrets.token_urlsafe(16)
        self.welcome_codes[code] = time.monotonic() - age
        return code

    def expire_tokens(self) -> None:
        for token in self.tokens:
            self.tokens[token] = 0.0

    def add_contact(self, external_id: str, name: str) -> None:
        self.contacts[external_id] = {"external_userid": external_id, "name": name, "type": 1}

    def add_group(self, chat_id: str, owner: str, members: dict[str, int]) -> None:
        """``members``: userid -> type (1 staff, 2 external contact)."""
        self.groups[chat_id] = {"chat_id": chat_id, "name": "客户群", "owner": owner, "create_time": int(time.time()),
                                "members": dict(members)}

    def confirm(self, msgid: str, statuses: dict[str, int]) -> None:
        """The sender confirms the task in their WeCom client; each recipient gets a status."""
        task = self.tasks[msgid]
        task.confirmed = True
        task.results.update(statuses)

    def calls_to(self, path: str) -> list[dict[str, Any] | None]:
        return [body for p, _, body in self.calls if p == path]

    # -------------------------------------------------------------- dispatch

    async def _dispatch(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        raw = await request.read()
        body: dict[str, Any] | None = None
        if request.method == "POST":
            if _ESCAPE.search(raw):
                return _error(*BAD_CHARS)
            try:
                parsed = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                return _error(47001, "data format error")
            if not isinstance(parsed, dict):
                return _error(47001, "data format error")
            body = parsed
        query = dict(request.query)
        self.calls.append((path, query, body))
        if path == "gettoken":
            return self._gettoken(query)
        if path in self.expire_on:
            self.expire_on.discard(path)
            self.expire_tokens()
        expiry = self.tokens.get(query.get("access_token", ""))
        if expiry is None:
            return _error(*INVALID_TOKEN)
        if time.monotonic() >= expiry:
            return _error(*EXPIRED_TOKEN)
        if queued := self.fail_next.get(path):
            return _error(*queued.pop(0))
        handler = {
            "externalcontact/get": self._contact_get,
            "externalcontact/send_welcome_msg": self._send_welcome,
            "externalcontact/add_msg_template": self._add_msg_template,
            "externalcontact/get_groupmsg_task": self._get_task,
            "externalcontact/get_groupmsg_send_result": self._get_send_result,
            "externalcontact/groupchat/get": self._groupchat_get,
            "externalcontact/add_contact_way": self._add_contact_way,
            "externalcontact/update_contact_way": self._update_contact_way,
            "externalcontact/del_contact_way": self._del_way,
            "externalcontact/groupchat/add_join_way": self._add_join_way,
            "externalcontact/groupchat/update_join_way": self._update_join_way,
            "externalcontact/groupchat/get_join_way": self._get_join_way,
            "externalcontact/groupchat/del_join_way": self._del_way,
        }.get(path)
        if handler is None:
            return _error(404, f"unknown api {path}")
        return handler(query, body or {})

    def _add_contact_way(self, query: dict[str, str], body: dict[str, Any]) -> web.Response:
        """Contact-me ways: type 1 (one user) or 2, scene 2 (QR code), users in the corp (60111 for one who
        left), state up to 30 characters; answers config_id and the QR image link."""
        users, state = body.get("user") or [], body.get("state") or ""
        if body.get("type") not in (1, 2) or body.get("scene") not in (1, 2):
            return _error(41037, "missing contact way type")
        if not isinstance(users, list) or not users or (body["type"] == 1 and len(users) != 1):
            return _error(40058, "invalid user list")
        if missing := [u for u in users if u not in self.staff]:
            return _error(60111, f"invalid userid: {missing[0]}")
        if not isinstance(state, str) or len(state) > 30:
            return _error(40058, "state exceeds 30 characters")
        config_id = secrets.token_hex(16)
        self.ways[config_id] = {"config_id": config_id, "type": body["type"], "state": state, "user": users,
                                "qr_code": f"https://wework.qpic.cn/wwpic/{secrets.token_hex(8)}/0"}
        return _ok(config_id=config_id, qr_code=self.ways[config_id]["qr_code"])

    def _add_join_way(self, query: dict[str, str], body: dict[str, Any]) -> web.Response:
        chats = body.get("chat_id_list") or []
        if not isinstance(chats, list) or not 1 <= len(chats) <= 5:
            return _error(40058, "chat_id_list takes 1 to 5 group chats")
        if missing := [c for c in chats if c not in self.groups]:
            return _error(90500, f"invalid chat id: {missing[0]}")
        config_id = secrets.token_hex(16)
        self.ways[config_id] = {"config_id": config_id, "state": body.get("state") or "", "chat_id_list": chats,
                                "qr_code": f"https://wework.qpic.cn/wwpic/{secrets.token_hex(8)}/0"}
        return _ok(config_id=config_id)

    def _update_contact_way(self, query: dict[str, str], body: dict[str, Any]) -> web.Response:
        """The way keeps its config_id, type and QR code; a type 1 (one user) way takes one user only."""
        way = self.ways.get(str(body.get("config_id")))
        if way is None or "user" not in way:
            return _error(41044, "invalid config_id")
        users = body.get("user", way["user"])
        if not isinstance(users, list) or not users or (way["type"] == 1 and len(users) != 1):
            return _error(40058, "invalid user list")
        if missing := [u for u in users if u not in self.staff]:
            return _error(60111, f"invalid userid: {missing[0]}")
        way.update(user=users, state=body.get("state", way["state"]))
        return _ok()

    def _update_join_way(self, query: dict[str, str], body: dict[str, Any]) -> web.Response:
        way = self.ways.get(str(body.get("config_id")))
        if way is None or "chat_id_list" not in way:
            return _error(41044, "invalid config_id")
        chats = body.get("chat_id_list") or []
        if not isinstance(chats, list) or not 1 <= len(chats) <= 5:
            return _error(40058, "chat_id_list takes 1 to 5 group chats")
        if missing := [c for c in chats if c not in self.groups]:
            return _error(90500, f"invalid chat id: {missing[0]}")
        way.update(chat_id_list=chats, state=body.get("state", way["state"]))
        return _ok()

    def _get_join_way(self, query: dict[str, str], body: dict[str, Any]) -> web.Response:
        way = self.ways.get(str(body.get("config_id")))
        if way is None:
            return _error(41044, "invalid config_id")
        return _ok(join_way=way)

    def _del_way(self, query: dict[str, str], body: dict[str, Any]) -> web.Response:
        if self.ways.pop(str(body.get("config_id")), None) is None:
            return _error(41044, "invalid config_id")
        return _ok()

    def _gettoken(self, query: dict[str, str]) -> web.Response:
        if query.get("corpid") != self.corp_id or query.get("corpsecret") != self.secret:
            return _error(*INVALID_SECRET)
        token = secrets.token_urlsafe(24)
        self.tokens[token] = time.monotonic() + 7200
        return web.json_response({"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": 7200})

    def _contact_get(self, query: dict[str, str], body: dict[str, Any]) -> web.Response:
        contact = self.contacts.get(query.get("external_userid", ""))
        if contact is None:
            return _error(84061, "not external contact")
        return _ok(external_contact=contact, follow_user=[])

    def _send_welcome(self, query: dict[str, str], body: dict[str, Any]) -> web.Response:
        code = body.get("welcome_code")
        issued = self.welcome_codes.get(code) if isinstance(code, str) else None
        if issued is None or code in self.used_codes or time.monotonic() - issued > WELCOME_TTL:
            return _error(*INVALID_WELCOME_CODE)
        if not (body.get("text") or {}).get("content"):
            return _error(44004, "empty content")
        self.used_codes.add(code)
        self.welcomes.append((code, time.monotonic() - issued, body))
        return _ok()

    def _add_msg_template(self, query: dict[str, str], body: dict[str, Any]) -> web.Response:
        chat_type = body.get("chat_type", "single")
        sender = body.get("sender")
        if not (body.get("text") or {}).get("content"):
            return _error(44004, "empty content")
        if chat_type == "group":
            chats = body.get("chat_id_list") or []
            if not isinstance(sender, str) or any(self.groups.get(c, {}).get("owner") != sender for c in chats):
                return _error(*INVALID_CHAT)
            recipients, fail_list = list(chats), []
        else:
            externals = body.get("external_userid") or []
            if not externals and not sender:
                return _error(41009, "missing userid")
            recipients = [e for e in externals if e in self.contacts]
            fail_list = [e for e in externals if e not in self.contacts]
        msgid = "msg" + secrets.token_urlsafe(12)
        self.tasks[msgid] = Task(msgid, body, str(sender), {r: 0 for r in recipients})
        return _ok(fail_list=fail_list, msgid=msgid)

    def _get_task(self, query: dict[str, str], body: dict[str, Any]) -> web.Response:
        task = self.tasks.get(body.get("msgid", ""))
        if task is None:
            return _error(*INVALID_MSGID)
        # get_groupmsg_task: 0 not sent, 2 sent
        entry = {"userid": task.sender, "status": 2 if task.confirmed else 0}
        if task.confirmed:
            entry["send_time"] = int(time.time())
        return _ok(next_cursor="", task_list=[entry])

    def _get_send_result(self, query: dict[str, str], body: dict[str, Any]) -> web.Response:
        task = self.tasks.get(body.get("msgid", ""))
        if task is None:
            return _error(*INVALID_MSGID)
        if body.get("userid") != task.sender:
            return _ok(next_cursor="", send_list=[])
        key = "chat_id" if task.body.get("chat_type") == "group" else "external_userid"
        send_list = []
        for recipient, status in task.results.items():
            entry: dict[str, Any] = {key: recipient, "userid": task.sender, "status": status}
            if status == 1:
                entry["send_time"] = int(time.time())
            send_list.append(entry)
        return _ok(next_cursor="", send_list=send_list)

    def _groupchat_get(self, query: dict[str, str], body: dict[str, Any]) -> web.Response:
        group = self.groups.get(body.get("chat_id", ""))
        if group is None:
            return _error(*INVALID_CHAT)
        members = [{"userid": u, "type": t, "join_time": group["create_time"], "join_scene": 1,
                    "invitor": {"userid": group["owner"]}} for u, t in group["members"].items()]
        return _ok(group_chat={"chat_id": group["chat_id"], "name": group["name"], "owner": group["owner"],
                               "create_time": group["create_time"], "member_list": members,
                               "admin_list": [], "member_version": hashlib.md5(
                                   ",".join(sorted(group["members"])).encode()).hexdigest()})


def _ok(**fields: Any) -> web.Response:
    return web.json_response({"errcode": 0, "errmsg": "ok", **fields})


def _error(errcode: int, errmsg: str) -> web.Response:
    return web.json_response({"errcode": errcode, "errmsg": f"{errmsg}, hint: [{secrets.token_hex(6)}]"})
