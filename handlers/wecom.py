"""WeCom (企业微信) customer contact: contact/group callbacks in, welcome messages and mass-send tasks out.

Inbound: ``/wecom/<corp>`` takes WeCom's encrypted callbacks (wechatpy's ``WeChatCrypto`` verifies and
decrypts, ``parse_message`` parses). Contact changes become :class:`InboundEvent`\\ s; customer-group
lifecycle events are recorded without a customer (a group is not a person). When a new contact carries a
``WelcomeCode``, the welcome rule chosen by the contact-me ``State`` is sent after the event is applied,
in a background task bounded by the code's 20-second validity. Contact changes are answered once
durable in the journal (scrm.ingest); group member changes wait until applied, as telling who left a
group reads the members the store has applied so far.

Outbound: WeCom cannot message a customer directly outside the welcome window. :meth:`WeComChannel.send`
creates a mass-send task (``add_msg_template``) that the staff member confirms in their client; a periodic
job fetches per-recipient results later and records them as ``mass_send_result`` touchpoints.

REST calls use aiohttp directly (wechatpy's client is synchronous and would block the loop).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any
from xml.parsers.expat import ExpatError

import aiohttp
import xmltodict
from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from sqlalchemy import delete, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession
from wechatpy.enterprise import parse_message
from wechatpy.enterprise.crypto import WeChatCrypto
from wechatpy.exceptions import InvalidSignatureException

from scrm import coupons, groups
from scrm.campaigns import templates
from scrm.campaigns.planner import Trigger, plan_events
from scrm.channels import Channel, CodeError, CodeRequest, IssuedCode, register
from scrm.customers import find_customer, touchpoint
from scrm.group_commit import StoreUnavailable
from scrm.messages import InboundEvent, OutboundMessage, Reaction, SendResult
from scrm.store.dialect import insert_ignore
from scrm.store.models import Coupon, CouponCode, Customer, Identity, Touchpoint
from scrm.tagging import add_tag

log = logging.getLogger(__name__)

#: A WelcomeCode is usable once, within 20 seconds of the callback; keep a margin for the network.
WELCOME_CODE_TTL = 20.0
WELCOME_MARGIN = 1.0
#: Access token invalid / expired: fetch a new one and try once more.
TOKEN_ERRORS = frozenset({40014, 42001})
#: System busy, API rate limit, API concurrency limit: worth trying again later.
RETRY_ERRORS = frozenset({-1, 45009, 45033})
#: get_groupmsg_send_result per-recipient status.
RESULT_STATUS = {0: "unsent", 1: "sent", 2: "not_a_friend", 3: "over_receive_limit"}
_DTD = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_MSG_ID_MAX = 128


class WelcomeRule(BaseModel):
    """What a new contact from one contact-me / channel QR code (its ``State``) receives."""

    model_config = ConfigDict(extra="forbid")
    #: Jinja template with ``customer`` (and ``coupon`` when a pool is set).
    text: str = Field(min_length=1)
    #: A pool under [coupons]; only checkable against the service config at run time.
    coupon_pool: str | None = None
    tags: list[str] = []

    @model_validator(mode="after")
    def _template(self) -> WelcomeRule:
        available = {"customer", "coupon"} if self.coupon_pool else {"customer"}
        if problem := templates.check(self.text, available):
            raise ValueError(f"text: {problem}")
        return self


class WeComSettings(BaseModel):
    """One corp's customer-contact settings: ``[channels.wecom.<corp>]``."""

    model_config = ConfigDict(extra="forbid")
    corp_id: str = Field(min_length=1)
    #: The customer-contact (客户联系) secret.
    secret: str = Field(min_length=1)
    token: str = Field(min_length=1)
    encoding_aes_key: str = Field(pattern=r"^[A-Za-z0-9+/]{43}$")
    api_base_url: str = "https://qyapi.weixin.qq.com/"
    #: Staff userid whose mass-send tasks carry campaign messages.
    sender: str = Field(min_length=1)
    #: Contact-me ``State`` (up to 30 chars) -> rule; ``default`` for contacts without (or an unknown) state.
    welcome: dict[Annotated[str, StringConstraints(min_length=1, max_length=30)], WelcomeRule] = {}
    result_poll_seconds: float = Field(300.0, gt=0)
    #: Mass-send tasks older than this are no longer polled for results.
    result_window_days: int = Field(7, gt=0)
    retry_after_seconds: float = Field(5.0, gt=0)
    timeout_seconds: float = Field(10.0, gt=0)

    @field_validator("api_base_url")
    @classmethod
    def _slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value if value.endswith("/") else value + "/"


#: WeCom's errcodes a channel code can meet, in words for the operator.
CODE_ERRORS = {
    60111: "a staff member is not in the corp (left, or a wrong user id)",
    40098: "a staff member has not verified their identity in WeCom",
    45009: "WeCom's API quota for today is used up",
    45033: "WeCom's API concurrency limit was hit",
}


def _code_refusal(exc: WeComError) -> str:
    if exc.errcode is None:
        return f"WeCom's API is unreachable ({exc.errmsg})"
    return f"WeCom refused it ({exc.errcode}: {CODE_ERRORS.get(exc.errcode, exc.errmsg)})"


class WeComError(Exception):
    """A WeCom API error (``errcode``), or no usable answer at all (``errcode`` None).

    Without an answer, ``unreachable`` says the request never reached WeCom (refused, DNS failure,
    connect timeout: nothing happened there) and ``lost`` that it went out and its answer did not come
    back (WeCom may have acted on it: a mass-send task may exist)."""

    def __init__(self, errcode: int | None, errmsg: str, *, unreachable: bool = False, lost: bool = False) -> None:
        super().__init__(f"{errcode}: {errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg
        self.unreachable = unreachable
        self.lost = lost

    @property
    def reason(self) -> str:
        return f"wecom:{'unreachable' if self.errcode is None else self.errcode}"


@dataclass(frozen=True)
class _WelcomeJob:
    customer_id: int
    external_id: str
    owner: str
    state: str | None
    code: str | None
    deadline: float  # event-loop time
    #: A channel code's welcome, rendered by the core (scrm.acquisition.arrivals): it replaces the state's rule.
    text: str | None = None


@dataclass
class _Prepared:
    rule: str
    text: str | None = None
    coupon: str | None = None
    fresh_coupon: bool = False
    problem: str | None = None


def _msg_id(*parts: object) -> str:
    """A platform message id that fits the store's column even for long WeCom ids."""
    text = ":".join(str(p) for p in parts)
    return text if len(text) <= _MSG_ID_MAX else text[:80] + ":" + hashlib.sha1(text.encode()).hexdigest()


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    return value.strip() if isinstance(value, str) else ""


def _items(node: Any) -> list[str]:
    """``<MemChangeList><Item>a</Item><Item>b</Item></MemChangeList>`` as parsed by xmltodict."""
    if not isinstance(node, dict):
        return []
    items = node.get("Item")
    items = items if isinstance(items, list) else [items]
    return [i.strip() for i in items if isinstance(i, str) and i.strip()]


@register
class WeComChannel(Channel):
    type_name = "wecom"
    settings_model = WeComSettings
    settings: WeComSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        self.crypto = WeChatCrypto(s.token, s.encoding_aes_key, s.corp_id)
        self._http: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = asyncio.Lock()
        #: In-flight welcome per external id, so a welcome campaign can wait for it instead of racing it.
        # Welcomes under way per contact: a retried callback spawns a second one (its event turns out a
        # duplicate only once applied), and a campaign message must wait for all of them.
        self._welcomes: dict[str, set[asyncio.Task[None]]] = {}
        self._background: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    def routes(self) -> list[web.RouteDef]:
        path = f"/wecom/{self.account}"
        return [web.get(path, self._verify_url), web.post(path, self._callback)]

    def jobs(self) -> list[tuple[str, Callable[[], Awaitable[None]], float]]:
        return [("mass_send_results", self._poll_job, self.settings.result_poll_seconds)]

    async def start(self) -> None:
        # Connecting has its own (shorter) limit, so that a connect timeout is told apart from a lost answer.
        timeout = self.settings.timeout_seconds
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=timeout / 2))
        for state, rule in self.settings.welcome.items():
            if rule.coupon_pool and rule.coupon_pool not in self.service.config.coupons:
                log.error("channels.wecom.%s.welcome.%s.coupon_pool: no pool %r under [coupons]; "
                          "welcomes for this state will fail", self.account, state, rule.coupon_pool)

    async def stop(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=WELCOME_CODE_TTL + 5)
            for task in self._background:
                task.cancel()
        if self._http is not None:
            await self._http.close()
            self._http = None

    # ------------------------------------------------------------------ callbacks

    async def _verify_url(self, request: web.Request) -> web.Response:
        """URL verification when the callback is configured: decrypt ``echostr`` and echo it."""
        q = request.query
        if not q.get("msg_signature"):
            raise web.HTTPForbidden(text="missing msg_signature")
        if not all(q.get(k) for k in ("timestamp", "nonce", "echostr")):
            raise web.HTTPBadRequest(text="timestamp, nonce and echostr are required")
        try:
            echo = self.crypto.check_signature(q["msg_signature"], q["timestamp"], q["nonce"], q["echostr"])
        except InvalidSignatureException:
            raise web.HTTPForbidden(text="bad signature") from None
        except Exception:  # noqa: BLE001 - wechatpy raises assorted errors (base64, padding, corp id) on bad ciphertext
            raise web.HTTPBadRequest(text="echostr cannot be decrypted") from None
        return web.Response(text=echo)

    async def _callback(self, request: web.Request) -> web.Response:
        q = request.query
        body = await request.read()  # 413 beyond the app's client_max_size
        if not q.get("msg_signature"):
            raise web.HTTPForbidden(text="missing msg_signature")
        if not q.get("timestamp") or not q.get("nonce"):
            raise web.HTTPBadRequest(text="timestamp and nonce are required")
        encrypt = self._outer_encrypt(body)
        try:
            plain = self.crypto.decrypt_message({"Encrypt": encrypt}, q["msg_signature"], q["timestamp"], q["nonce"])
        except InvalidSignatureException:
            raise web.HTTPForbidden(text="bad signature") from None
        except Exception:  # noqa: BLE001 - bad base64 / padding / corp id: a correctly signed but broken body
            raise web.HTTPBadRequest(text="Encrypt cannot be decrypted") from None
        data = self._inner_message(plain)
        if _text(data, "MsgType").lower() == "event":
            event = _text(data, "Event").lower()
            if event == "change_external_contact":
                await self._contact_event(data, asyncio.get_running_loop().time())
            elif event == "change_external_chat":
                await self._chat_event(data)
            else:
                log.info("wecom %s: ignoring event %r", self.account, event)
        return web.Response(text="success")

    @staticmethod
    def _outer_encrypt(body: bytes) -> str:
        if _DTD.search(body):
            raise web.HTTPBadRequest(text="DOCTYPE / ENTITY declarations are not accepted")
        try:
            outer = xmltodict.parse(body)
        except (ExpatError, ValueError):
            raise web.HTTPBadRequest(text="body is not well-formed XML") from None
        xml = outer.get("xml") if isinstance(outer, dict) else None
        encrypt = xml.get("Encrypt") if isinstance(xml, dict) else None
        if not isinstance(encrypt, str) or not encrypt.strip():
            raise web.HTTPBadRequest(text="<xml><Encrypt> is required")
        return encrypt.strip()

    @staticmethod
    def _inner_message(plain: str) -> dict[str, Any]:
        if _DTD.search(plain.encode("utf-8")):
            raise web.HTTPBadRequest(text="DOCTYPE / ENTITY declarations are not accepted")
        try:
            message = parse_message(plain)
        except (ExpatError, ValueError, KeyError, TypeError, AttributeError):
            raise web.HTTPBadRequest(text="decrypted message is not a WeCom message") from None
        # wechatpy has no classes for customer-contact events: they parse as UnknownMessage, fields in _data.
        data = getattr(message, "_data", None)
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="decrypted message is not a WeCom message")
        return data

    async def _contact_event(self, data: dict[str, Any], received_at: float) -> None:
        change = _text(data, "ChangeType")
        external, owner, created = _text(data, "ExternalUserID"), _text(data, "UserID"), _text(data, "CreateTime")
        if not external:
            raise web.HTTPBadRequest(text="ExternalUserID is required")
        state = _text(data, "State")[:30] or None
        payload: dict[str, Any] = {"owner": owner}
        source = None
        if change in ("add_external_contact", "add_half_external_contact"):
            kind = "subscribe"
            payload["state"] = state
            source = (f"wecom:state:{state}" if state else f"wecom:staff:{owner}")[:64]
        elif change == "edit_external_contact":
            kind = "contact_updated"
        elif change == "del_follow_user":
            kind, payload["by"] = "contact_removed", "customer"
        elif change == "del_external_contact":
            kind, payload["by"] = "contact_removed", "staff"
        elif change == "transfer_fail":
            kind, payload["fail_reason"] = "transfer_failed", _text(data, "FailReason")
        else:
            log.info("wecom %s: ignoring change_external_contact %r", self.account, change)
            return
        event = InboundEvent("wecom", self.account, external, kind, source=source, payload=payload,
                             platform_msg_id=_msg_id("change_external_contact", change, external, created),
                             scene=state if kind == "subscribe" else None)
        accepted = self.service.accept(event)
        await asyncio.shield(accepted.durable)  # WeCom is answered once it is durable (scrm.ingest)
        if kind == "subscribe":
            self._spawn(self._welcome_once_applied(accepted.applied, external, owner, state,
                                                   _text(data, "WelcomeCode") or None, received_at), external)

    async def _welcome_once_applied(self, applied: asyncio.Future[Reaction], external: str, owner: str,
                                    state: str | None, code: str | None, received_at: float) -> None:
        """A new contact's welcome, once the core has applied the contact (its customer, a channel code's
        welcome text), inside the welcome code's window."""
        try:
            reaction = await asyncio.wait_for(asyncio.shield(applied),
                                              max(received_at + WELCOME_CODE_TTL - WELCOME_MARGIN
                                                  - asyncio.get_running_loop().time(), 0.1))
        except TimeoutError:
            log.warning("wecom %s: contact %s not applied inside the welcome code's window", self.account, external)
            return
        except Exception as exc:  # noqa: BLE001 - set aside by the consumer: logged, nothing to welcome
            log.error("wecom %s: contact %s acknowledged but not applied: %r", self.account, external, exc)
            return
        if reaction.duplicate or reaction.customer_id is None:
            return
        await self._welcome(_WelcomeJob(reaction.customer_id, external, owner, state, code,
                                        received_at + WELCOME_CODE_TTL - WELCOME_MARGIN,
                                        reaction.replies[0] if reaction.replies else None))

    async def _chat_event(self, data: dict[str, Any]) -> None:
        chat_id, change, created = _text(data, "ChatId"), _text(data, "ChangeType"), _text(data, "CreateTime")
        if not chat_id:
            raise web.HTTPBadRequest(text="ChatId is required")
        detail = _text(data, "UpdateDetail")
        payload: dict[str, Any] = {"change": change}
        if change == "create":
            kind = "group_created"
            payload.update(await self._member_events(chat_id, "add_member", [], created, data))
        elif change == "update":
            kind = "group_updated"
            payload["detail"] = detail
            if detail in ("add_member", "del_member"):
                payload.update(await self._member_events(chat_id, detail, _items(data.get("MemChangeList")),
                                                         created, data))
        elif change == "dismiss":
            kind = "group_dismissed"
        else:
            log.info("wecom %s: ignoring change_external_chat %r", self.account, change)
            return
        await self._record_group(kind, chat_id, _msg_id("change_external_chat", change, detail, chat_id, created),
                                 payload)

    async def _member_events(self, chat_id: str, detail: str, listed: list[str], created: str,
                             data: dict[str, Any]) -> dict[str, Any]:
        """One group_joined / group_left per customer; WeCom may omit who, then groupchat/get tells."""
        joining = detail == "add_member"
        current: dict[str, int] | None = None
        if joining or not listed:
            try:
                current = await self._group_members(chat_id)
            except WeComError as exc:
                log.warning("wecom %s: groupchat/get %s failed: %s", self.account, chat_id, exc)
                return {"members_unresolved": exc.reason}
        if joining:
            assert current is not None
            externals = {m for m, kind in current.items() if kind == 2}
            members = [m for m in listed if m in externals] if listed else sorted(
                externals - await self._known_members(chat_id))
        else:
            candidates = listed or sorted(await self._known_members(chat_id) - set(current or {}))
            members = sorted(await self._known_identities(candidates))
        kind = "group_joined" if joining else "group_left"
        scene = _text(data, "JoinScene" if joining else "QuitScene")
        for member in members:
            payload: dict[str, Any] = {"group_id": chat_id}
            if scene:
                payload["scene"] = scene
            await self.service.receive(InboundEvent("wecom", self.account, member, kind, payload=payload,
                                                    platform_msg_id=_msg_id(detail, chat_id, member, created)))
        return {"members": members}

    # ------------------------------------------------------------------ store helpers

    @asynccontextmanager
    async def _store(self) -> AsyncIterator[AsyncSession]:
        """A transaction whose failure the callback answers with 503, so WeCom retries."""
        try:
            async with self.service.sessions() as session, session.begin():
                yield session
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"wecom store error: {type(exc).__name__}") from exc

    def _tp(self, kind: str, now: datetime, *, direction: str, platform_msg_id: str | None, payload: dict[str, Any],
            customer_id: int | None = None, actor: str | None = None, text: str | None = None,
            campaign: str | None = None, delivery_id: int | None = None) -> dict[str, Any]:
        return {"customer_id": customer_id, "actor": actor, "channel": "wecom", "account": self.account,
                "direction": direction, "kind": kind, "platform_msg_id": platform_msg_id, "text": text,
                "payload": payload, "campaign": campaign, "delivery_id": delivery_id, "created_at": now}

    async def _record_group(self, kind: str, chat_id: str, platform_msg_id: str, payload: dict[str, Any]) -> None:
        """Group lifecycle is recorded against the group (``actor``), not as a customer; the group
        itself is kept in the store so group campaigns can reach it."""
        now = self.service.clock.now()
        async with self._store() as session:
            recorded = await insert_ignore(session, Touchpoint.__table__, self._tp(
                kind, now, direction="in", platform_msg_id=platform_msg_id, payload=payload,
                actor=f"wecom-group:{chat_id}"))
            if recorded:
                await groups.upsert_group(session, "wecom", self.account, chat_id, now,
                                          active=kind != "group_dismissed")

    async def _known_members(self, chat_id: str) -> set[str]:
        """Customers the store believes are in the group: their last join/leave touchpoint was a join."""
        async with self._store() as session:
            rows = (await session.execute(
                select(Identity.external_id, Touchpoint.kind, Touchpoint.payload)
                .join(Identity, Identity.customer_id == Touchpoint.customer_id)
                .where(Touchpoint.channel == "wecom", Touchpoint.account == self.account,
                       Touchpoint.kind.in_(("group_joined", "group_left")),
                       Identity.channel == "wecom", Identity.account == self.account)
                .order_by(Touchpoint.id)
            )).all()
        members: set[str] = set()
        for external_id, kind, payload in rows:
            if isinstance(payload, dict) and payload.get("group_id") == chat_id:
                (members.add if kind == "group_joined" else members.discard)(external_id)
        return members

    async def _known_identities(self, external_ids: list[str]) -> set[str]:
        if not external_ids:
            return set()
        async with self._store() as session:
            rows = await session.scalars(select(Identity.external_id).where(
                Identity.channel == "wecom", Identity.account == self.account, Identity.external_id.in_(external_ids)))
            return set(rows.all())

    # ------------------------------------------------------------------ WeCom API

    async def _request(self, path: str, params: dict[str, Any], body: dict[str, Any] | None) -> dict[str, Any]:
        if self._http is None:
            raise WeComError(None, "channel not started")
        url = f"{self.settings.api_base_url}cgi-bin/{path}"
        try:
            if body is None:
                response = await self._http.get(url, params=params)
            else:
                # WeCom rejects \uXXXX escapes (errcode 40033): send UTF-8 as is.
                response = await self._http.post(url, params=params, headers={"Content-Type": "application/json"},
                                                 data=json.dumps(body, ensure_ascii=False).encode("utf-8"))
            async with response:
                if response.status != 200:
                    raise WeComError(None, f"HTTP {response.status}")
                data = await response.json(content_type=None)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise WeComError(None, f"{type(exc).__name__}: {exc}", unreachable=True) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            # A request that could not be written (a kept-alive connection the server had closed) never
            # arrived whole; any other failure may have come after WeCom acted on it.
            unwritten = isinstance(exc, aiohttp.ClientOSError) and str(exc.strerror).startswith(
                "Can not write request body")
            raise WeComError(None, f"{type(exc).__name__}: {exc}", lost=not unwritten) from exc
        except ValueError as exc:
            raise WeComError(None, f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(data, dict):
            raise WeComError(None, "answer is not a JSON object")
        errcode = data.get("errcode", 0)
        if errcode:
            raise WeComError(int(errcode), str(data.get("errmsg", "")))
        return data

    async def _access_token(self) -> str:
        async with self._token_lock:
            loop = asyncio.get_running_loop()
            if self._token is None or loop.time() >= self._token_expires:
                data = await self._request("gettoken", {"corpid": self.settings.corp_id,
                                                        "corpsecret": self.settings.secret}, None)
                token = data.get("access_token")
                if not isinstance(token, str) or not token:
                    raise WeComError(None, "gettoken answered no access_token")
                self._token = token
                self._token_expires = loop.time() + max(int(data.get("expires_in", 7200)) - 300, 60)
            return self._token

    async def create_code(self, request: CodeRequest) -> IssuedCode:
        """A contact-me way (externalcontact/add_contact_way, QR scene, ``state`` = the scene) for one or
        several staff members, or a group join way (groupchat/add_join_way, then get_join_way for its
        QR code) for up to 5 group chats. WeCom's own code image is at ``qr_code``; the service encodes
        that link in the codes it renders."""
        try:
            if request.groups:
                made = await self._api("externalcontact/groupchat/add_join_way", {
                    "scene": 2, "remark": request.remark[:30], "auto_create_room": 0,
                    "chat_id_list": list(request.groups), "state": request.scene})
                config_id = str(made.get("config_id") or "")
                way = (await self._api("externalcontact/groupchat/get_join_way", {"config_id": config_id}))
                qr = (way.get("join_way") or {}).get("qr_code") if isinstance(way.get("join_way"), dict) else None
                kind = "join_way"
            else:
                made = await self._api("externalcontact/add_contact_way", {
                    "type": 1 if len(request.staff) == 1 else 2, "scene": 2, "remark": request.remark[:30],
                    "skip_verify": True, "state": request.scene, "user": list(request.staff)})
                config_id, qr, kind = str(made.get("config_id") or ""), made.get("qr_code"), "contact_way"
        except WeComError as exc:
            raise CodeError(_code_refusal(exc)) from exc
        if not config_id or not isinstance(qr, str) or not qr:
            raise CodeError("WeCom answered without a config_id and qr_code")
        return IssuedCode(kind, qr, config_id)

    async def update_code(self, code: IssuedCode, request: CodeRequest) -> None:
        """externalcontact/update_contact_way or groupchat/update_join_way: the same config_id (and so the
        same printed code) with other staff members or group chats; ``state`` stays the code's scene."""
        if not code.ref:
            raise CodeError("WeCom gave this code no config_id to update")
        if code.kind == "join_way":
            path, body = "externalcontact/groupchat/update_join_way", {
                "config_id": code.ref, "scene": 2, "remark": request.remark[:30], "auto_create_room": 0,
                "chat_id_list": list(request.groups), "state": request.scene}
        else:
            path, body = "externalcontact/update_contact_way", {
                "config_id": code.ref, "remark": request.remark[:30], "skip_verify": True, "state": request.scene,
                "user": list(request.staff)}
        try:
            await self._api(path, body)
        except WeComError as exc:
            raise CodeError(_code_refusal(exc)) from exc

    async def delete_code(self, code: IssuedCode) -> None:
        if not code.ref:
            return
        path = "externalcontact/groupchat/del_join_way" if code.kind == "join_way" else "externalcontact/del_contact_way"
        try:
            await self._api(path, {"config_id": code.ref})
        except WeComError as exc:
            if exc.errcode is None:
                raise CodeError(_code_refusal(exc)) from exc
            # WeCom answered: the way is gone already (deleted in its admin console) or cannot be deleted;
            # either way the service stops honouring it
            log.warning("wecom %s: deleting contact way %s: %s", self.account, code.ref, _code_refusal(exc))

    async def _api(self, path: str, body: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
        """Call an API with the cached access token, refreshing it once when WeCom says it is stale."""
        for attempt in range(2):
            try:
                token = await self._access_token()
            except WeComError as exc:
                if not exc.lost:
                    raise
                # A lost token answer: the call itself never went out, so it is safe to make again.
                raise WeComError(exc.errcode, exc.errmsg) from exc
            try:
                return await self._request(path, {**params, "access_token": token}, body)
            except WeComError as exc:
                if exc.errcode not in TOKEN_ERRORS or attempt:
                    raise
                async with self._token_lock:
                    if self._token == token:
                        self._token = None
        raise AssertionError("unreachable")

    async def _group_members(self, chat_id: str) -> dict[str, int]:
        """Member userid -> type (1 staff, 2 external contact)."""
        data = await self._api("externalcontact/groupchat/get", {"chat_id": chat_id, "need_name": 0})
        chat = data.get("group_chat") or {}
        return {m["userid"]: int(m.get("type", 0)) for m in chat.get("member_list", [])
                if isinstance(m, dict) and isinstance(m.get("userid"), str)}

    async def _group_owner(self, chat_id: str) -> str:
        data = await self._api("externalcontact/groupchat/get", {"chat_id": chat_id, "need_name": 0})
        owner = (data.get("group_chat") or {}).get("owner")
        if not isinstance(owner, str) or not owner:
            raise WeComError(None, "groupchat/get answered no owner")
        return owner

    # ------------------------------------------------------------------ welcome message

    def _spawn(self, coro: Awaitable[None], external_id: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        self._welcomes.setdefault(external_id, set()).add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._background.discard(t)
            under_way = self._welcomes.get(external_id, set())
            under_way.discard(t)
            if not under_way:
                self._welcomes.pop(external_id, None)

        task.add_done_callback(done)

    def _rule(self, state: str | None) -> tuple[str, WelcomeRule] | None:
        if state and state in self.settings.welcome:
            return state, self.settings.welcome[state]
        if "default" in self.settings.welcome:
            return "default", self.settings.welcome["default"]
        return None

    async def _welcome(self, job: _WelcomeJob) -> None:
        """Name and tags from the state's rule, then (with a WelcomeCode) the personal welcome, within the window."""
        found = self._rule(job.state)
        key, rule = found if found is not None else ("", None)
        loop = asyncio.get_running_loop()
        try:
            name = None
            try:  # leave the welcome call most of the window
                name = await asyncio.wait_for(self._contact_name(job.external_id),
                                              max(job.deadline - loop.time() - 5.0, 0.5))
            except (WeComError, TimeoutError) as exc:
                log.info("wecom %s: no name for %s (%s)", self.account, job.external_id, exc)
            prepared = await self._prepare_welcome(job, key, None if job.text else rule, name)
            if job.text:
                prepared = _Prepared(rule=f"code:{job.state}", text=job.text)
            elif rule is None:
                return
            if not job.code:
                return
            errcode: int | str | None = None
            errmsg = prepared.problem or ""
            if prepared.problem is None:
                remaining = job.deadline - loop.time()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    await asyncio.wait_for(self._api("externalcontact/send_welcome_msg", {
                        "welcome_code": job.code, "text": {"content": prepared.text}}), remaining)
                except WeComError as exc:
                    errcode, errmsg = exc.errcode if exc.errcode is not None else "unreachable", exc.errmsg
                except TimeoutError:
                    errcode, errmsg = "deadline", "welcome code window passed"
            else:
                errcode = "config" if prepared.problem.startswith("unknown_coupon_pool") else "not_sent"
            await self._record_welcome(job, prepared, errcode, errmsg)
        except Exception:  # a background task has nobody to raise to
            log.exception("wecom %s: welcome for %s failed", self.account, job.external_id)

    async def _contact_name(self, external_id: str) -> str | None:
        data = await self._api("externalcontact/get", external_userid=external_id)
        name = (data.get("external_contact") or {}).get("name")
        return name if isinstance(name, str) and name else None

    async def _prepare_welcome(self, job: _WelcomeJob, key: str, rule: WelcomeRule | None,
                               name: str | None) -> _Prepared:
        svc = self.service
        prepared = _Prepared(rule=key)
        planned = 0
        detail = f"wecom:welcome:{key}"
        async with svc.sessions() as session, session.begin():
            now = svc.clock.now()
            customer = await session.get(Customer, job.customer_id)
            if customer is None:
                prepared.problem = "customer_missing"
                return prepared
            if name and not customer.display_name:
                customer.display_name = name[:255]
            if rule is None:
                return prepared
            for tag in rule.tags:
                if await add_tag(session, customer.id, tag, "behaviour", detail, now):
                    touchpoint(session, customer_id=customer.id, channel="wecom", account=self.account,
                               direction="internal", kind="tag_added", now=now, payload={"tag": tag, "rule": detail})
                    planned += await plan_events(session, list(svc.campaigns.values()), svc.paused, [
                        Trigger("tag_added", customer.id, "wecom", self.account, job.external_id, tag=tag)], now)
            if not job.code:
                return prepared
            context: dict[str, Any] = {"customer": {"id": customer.id, "name": customer.display_name or "朋友",
                                                    "stage": customer.stage, "tags": sorted(rule.tags),
                                                    "channel": "wecom"}}
            if rule.coupon_pool:
                pool = svc.config.coupons.get(rule.coupon_pool)
                if pool is None:
                    prepared.problem = f"unknown_coupon_pool:{rule.coupon_pool}"
                    return prepared
                code = await coupons.grant(session, rule.coupon_pool, pool, customer.id, now)
                prepared.fresh_coupon = code is not None
                # The welcome campaign may have granted the pool's only code first: welcome with that one.
                if code is None and (code := await self._held_code(session, rule.coupon_pool, customer.id, now)):
                    # The code now travels with this welcome: the campaign message that granted it will be
                    # skipped, and the outbox takes back codes of skipped messages.
                    code.delivery_id = None
                if code is None:
                    prepared.problem = "coupon_limit_reached"
                    return prepared
                prepared.coupon = code.code
                context["coupon"] = {"code": code.code, "value": f"{pool.value:g}",
                                     "expires": code.expires_at.date().isoformat() if code.expires_at else ""}
            try:
                prepared.text = templates.render(rule.text, context)
            except Exception as exc:  # noqa: BLE001 - the sandbox raises SecurityError, TypeError... from odd data
                prepared.problem = f"template_error:{type(exc).__name__}"
                if prepared.fresh_coupon:
                    await session.execute(delete(CouponCode).where(CouponCode.code == prepared.coupon))
                prepared.coupon, prepared.fresh_coupon = None, False
        if planned:
            svc.wake_outbox()
        return prepared

    @staticmethod
    async def _held_code(session: AsyncSession, pool: str, customer_id: int, now: datetime) -> CouponCode | None:
        return await session.scalar(
            select(CouponCode).join(Coupon).where(
                Coupon.name == pool, CouponCode.customer_id == customer_id, CouponCode.redeemed_at.is_(None),
                or_(CouponCode.expires_at.is_(None), CouponCode.expires_at > now),
            ).order_by(CouponCode.id).limit(1)
        )

    async def _record_welcome(self, job: _WelcomeJob, prepared: _Prepared, errcode: int | str | None,
                              errmsg: str) -> None:
        payload: dict[str, Any] = {"state": job.state, "rule": prepared.rule, "owner": job.owner}
        async with self.service.sessions() as session, session.begin():
            now = self.service.clock.now()
            if errcode is None:
                if prepared.coupon:
                    payload["coupon"] = prepared.coupon
                    if prepared.fresh_coupon:
                        touchpoint(session, customer_id=job.customer_id, channel="wecom", account=self.account,
                                   direction="internal", kind="coupon_granted", now=now,
                                   payload={"code": prepared.coupon, "pool": self.settings.welcome[prepared.rule]
                                            .coupon_pool, "via": "welcome_message"})
                touchpoint(session, customer_id=job.customer_id, channel="wecom", account=self.account,
                           direction="out", kind="welcome_message", now=now, text=prepared.text, payload=payload)
                return
            payload.update(errcode=errcode, errmsg=errmsg[:200])
            if prepared.coupon and prepared.fresh_coupon:
                # Never seen by the customer: give the code back so a later campaign can grant one.
                await session.execute(delete(CouponCode).where(
                    CouponCode.code == prepared.coupon, CouponCode.redeemed_at.is_(None)))
                payload["coupon_released"] = prepared.coupon
            touchpoint(session, customer_id=job.customer_id, channel="wecom", account=self.account,
                       direction="out", kind="welcome_failed", now=now, payload=payload)

    async def _welcomed(self, message: OutboundMessage) -> bool:
        """Whether a first-message campaign would welcome someone WeCom's welcome message already greeted."""
        loaded = self.service.campaigns.get(message.campaign or "")
        if loaded is None or loaded.definition.trigger.event != "first_message":
            return False
        if under_way := self._welcomes.get(message.external_id):
            await asyncio.wait(set(under_way), timeout=WELCOME_CODE_TTL + 5)
        async with self.service.sessions() as session:
            customer = await find_customer(session, "wecom", message.external_id, self.account)
            if customer is None:
                return False
            found = await session.scalar(select(Touchpoint.id).where(
                Touchpoint.customer_id == customer.id, Touchpoint.channel == "wecom",
                Touchpoint.account == self.account, Touchpoint.kind == "welcome_message").limit(1))
            return found is not None

    # ------------------------------------------------------------------ mass sending

    def _failure(self, exc: WeComError) -> SendResult:
        """Retry what WeCom refused for now or never received; a task whose answer was lost may exist:
        creating it again could reach the customer twice, so it is reported, not retried."""
        if exc.lost:
            return SendResult("failed", f"unknown_outcome:{exc.errmsg.split(':', 1)[0]}")
        if exc.errcode is None or exc.errcode in RETRY_ERRORS:
            return SendResult("retry", exc.reason, retry_after=self.settings.retry_after_seconds,
                              unreachable=exc.unreachable)
        return SendResult("failed", exc.reason)

    async def send(self, message: OutboundMessage) -> SendResult:
        """Creates a mass-send task for one customer (or a customer group, for group campaigns):
        delivered only once the sender confirms it."""
        if message.to_group:
            return await self.send_group(message.external_id, message.text)
        try:
            if await self._welcomed(message):
                return SendResult("skipped", "wecom:welcomed_on_add")
        except SQLAlchemyError as exc:
            return SendResult("retry", f"store:{type(exc).__name__}", retry_after=self.settings.retry_after_seconds)
        body = {"chat_type": "single", "external_userid": [message.external_id], "sender": self.settings.sender,
                "text": {"content": message.text}}
        try:
            data = await self._api("externalcontact/add_msg_template", body)
        except WeComError as exc:
            return self._failure(exc)
        if message.external_id in (data.get("fail_list") or []):
            return SendResult("failed", "wecom:not_sendable")
        msgid = data.get("msgid")
        if not isinstance(msgid, str) or not msgid:
            return SendResult("failed", "wecom:no_msgid")
        await self._record_task(msgid, {"external_userid": message.external_id}, message.campaign,
                                message.delivery_id)
        return SendResult("sent", platform_msg_id=msgid)

    async def send_group(self, chat_id: str, text: str, sender: str | None = None) -> SendResult:
        """A mass-send task to one customer group, sent by the group's owner (looked up when not given)."""
        try:
            owner = sender or await self._group_owner(chat_id)
        except WeComError as exc:  # only a lookup: nothing was sent, so a lost answer is retried too
            return self._failure(WeComError(exc.errcode, exc.errmsg, unreachable=exc.unreachable))
        try:
            data = await self._api("externalcontact/add_msg_template", {
                "chat_type": "group", "sender": owner, "chat_id_list": [chat_id], "text": {"content": text}})
        except WeComError as exc:
            return self._failure(exc)
        msgid = data.get("msgid")
        if not isinstance(msgid, str) or not msgid:
            return SendResult("failed", "wecom:no_msgid")
        await self._record_task(msgid, {"chat_id": chat_id, "sender": owner}, None, None)
        return SendResult("sent", platform_msg_id=msgid)

    async def _record_task(self, msgid: str, target: dict[str, str], campaign: str | None,
                           delivery_id: int | None) -> None:
        """The outstanding task, kept in the store so results are fetched even after a restart."""
        try:
            async with self.service.sessions() as session, session.begin():
                customer_id = None
                if external_id := target.get("external_userid"):
                    customer = await find_customer(session, "wecom", external_id, self.account)
                    customer_id = customer.id if customer else None
                await insert_ignore(session, Touchpoint.__table__, self._tp(
                    "mass_send_task", self.service.clock.now(), direction="out", platform_msg_id=_msg_id("task", msgid),
                    payload={"msgid": msgid, **target}, customer_id=customer_id, campaign=campaign,
                    delivery_id=delivery_id, actor=f"wecom-group:{target['chat_id']}" if "chat_id" in target else None))
        except SQLAlchemyError:
            log.exception("wecom %s: mass-send task %s created but not recorded; its results will not be fetched",
                          self.account, msgid)

    async def _poll_job(self) -> None:
        await self.poll_results()

    async def poll_results(self) -> int:
        """Fetch per-recipient results of outstanding mass-send tasks; returns how many were recorded."""
        now = self.service.clock.now()
        since = now - timedelta(days=self.settings.result_window_days)
        async with self.service.sessions() as session:
            rows = (await session.execute(
                select(Touchpoint.kind, Touchpoint.payload, Touchpoint.customer_id, Touchpoint.campaign,
                       Touchpoint.delivery_id)
                .where(Touchpoint.channel == "wecom", Touchpoint.account == self.account, Touchpoint.created_at >= since,
                       Touchpoint.kind.in_(("mass_send_task", "mass_send_result")))
                .order_by(Touchpoint.id)
            )).all()
        tasks: dict[str, tuple[str, int | None, str | None, int | None]] = {}
        done: set[tuple[str, str]] = set()
        for kind, payload, customer_id, campaign, delivery_id in rows:
            if not isinstance(payload, dict) or not isinstance(payload.get("msgid"), str):
                continue
            target = payload.get("external_userid") or payload.get("chat_id") or ""
            if kind == "mass_send_task":
                tasks[payload["msgid"]] = (target, customer_id, campaign, delivery_id)
            else:
                done.add((payload["msgid"], target))
        recorded = 0
        for msgid, (target, customer_id, campaign, delivery_id) in tasks.items():
            if (msgid, target) in done:
                continue
            try:
                results = await self._task_results(msgid)
            except WeComError as exc:
                log.warning("wecom %s: results of %s: %s", self.account, msgid, exc)
                continue
            recorded += await self._record_results(msgid, results, done, campaign, delivery_id)
        return recorded

    async def _task_results(self, msgid: str) -> list[dict[str, Any]]:
        senders: list[str] = []
        cursor = ""
        while True:
            data = await self._api("externalcontact/get_groupmsg_task", {"msgid": msgid, "limit": 1000, "cursor": cursor})
            senders += [t["userid"] for t in data.get("task_list") or []
                        if isinstance(t, dict) and t.get("status") and isinstance(t.get("userid"), str)]
            if not (cursor := data.get("next_cursor") or ""):
                break
        results: list[dict[str, Any]] = []
        for userid in senders:
            cursor = ""
            while True:
                data = await self._api("externalcontact/get_groupmsg_send_result",
                                       {"msgid": msgid, "userid": userid, "limit": 1000, "cursor": cursor})
                results += [r for r in data.get("send_list") or [] if isinstance(r, dict)]
                if not (cursor := data.get("next_cursor") or ""):
                    break
        return results

    async def _record_results(self, msgid: str, results: list[dict[str, Any]], done: set[tuple[str, str]],
                              campaign: str | None, delivery_id: int | None) -> int:
        recorded = 0
        async with self.service.sessions() as session, session.begin():
            now = self.service.clock.now()
            for r in results:
                status = int(r.get("status") or 0)
                external_id, chat_id = r.get("external_userid"), r.get("chat_id")
                target = external_id or chat_id
                if status == 0 or not isinstance(target, str) or (msgid, target) in done:
                    continue  # 0: the sender has not sent it to this recipient (yet)
                customer_id = None
                if external_id:
                    customer = await find_customer(session, "wecom", external_id, self.account)
                    customer_id = customer.id if customer else None
                payload = {"msgid": msgid, "status": status, "reason": RESULT_STATUS.get(status, f"status_{status}"),
                           "sender": r.get("userid"), "send_time": r.get("send_time")}
                payload.update({"external_userid": external_id} if external_id else {"chat_id": chat_id})
                recorded += await insert_ignore(session, Touchpoint.__table__, self._tp(
                    "mass_send_result", now, direction="out", platform_msg_id=_msg_id("result", msgid, target),
                    payload=payload, customer_id=customer_id, campaign=campaign, delivery_id=delivery_id,
                    actor=None if external_id else f"wecom-group:{chat_id}"))
                done.add((msgid, target))
        return recorded
