"""The local console channel: chat with the service from a terminal (``scrm chat``), no account needed.

Inbound: ``POST /console/<account>/messages`` with ``{"user", "text", "id"}`` answers the passive
replies once committed. Outbound: campaign messages wait in a per-user mailbox that
``GET /console/<account>/updates?user=..&wait=..`` long-polls. Loopback only unless configured.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from collections import defaultdict, deque
from datetime import timedelta
from typing import TYPE_CHECKING

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from scrm.campaigns.outbox import pending_for
from scrm.channels import Channel, register
from scrm.customers import find_customer
from scrm.messages import InboundEvent, OutboundMessage, SendResult

if TYPE_CHECKING:
    from scrm.runtime import Runtime

_USER = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_LOOPBACK = {"127.0.0.1", "::1"}
MAX_TEXT = 4096
#: Deliveries due within this horizon count as "pending" for a scripted chat waiting to exit.
PENDING_HORIZON = timedelta(seconds=10)


class ConsoleSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    allow_remote: bool = False


def save_image(png: bytes) -> str:
    """A terminal cannot show a PNG: keep it in a temporary file and hand out the path."""
    with tempfile.NamedTemporaryFile(prefix="scrm-chart-", suffix=".png", delete=False) as file:
        file.write(png)
    return file.name


@register
class ConsoleChannel(Channel):
    type_name = "console"
    settings_model = ConsoleSettings
    settings: ConsoleSettings

    def __init__(self, account: str, settings: BaseModel, service: Runtime) -> None:
        super().__init__(account, settings, service)
        self._mailboxes: dict[str, deque[str]] = defaultdict(deque)
        self._arrived = asyncio.Condition()

    def routes(self) -> list[web.RouteDef]:
        base = f"/console/{self.account}"
        return [web.post(f"{base}/messages", self._post_message), web.get(f"{base}/updates", self._get_updates)]

    async def send(self, message: OutboundMessage) -> SendResult:
        text = message.text
        if message.image is not None:
            text += f"\n[chart: {save_image(await message.image.png())}]"
        async with self._arrived:
            self._mailboxes[message.external_id].append(text)
            self._arrived.notify_all()
        return SendResult("sent")

    def _check_remote(self, request: web.Request) -> None:
        if not self.settings.allow_remote and request.remote not in _LOOPBACK:
            raise web.HTTPForbidden(text="console is loopback only")

    async def _post_message(self, request: web.Request) -> web.Response:
        self._check_remote(request)
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="body must be JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        user, text, msg_id = body.get("user"), body.get("text"), body.get("id")
        if not isinstance(user, str) or not _USER.match(user):
            raise web.HTTPBadRequest(text="user: 1-64 characters of A-Z a-z 0-9 _ . @ -")
        if not isinstance(text, str) or not text.strip():
            raise web.HTTPBadRequest(text="text: a non-empty string")
        if len(text) > MAX_TEXT:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_TEXT, actual_size=len(text))
        if msg_id is not None and (not isinstance(msg_id, str) or len(msg_id) > 64):
            raise web.HTTPBadRequest(text="id: a string of at most 64 characters")
        kind = "command" if text.startswith("/") else "text"
        event = InboundEvent("console", self.account, user, kind, text=text, platform_msg_id=msg_id,
                             display_name=user)
        reaction = await self.service.receive(event)
        return web.json_response({"replies": list(reaction.replies), "duplicate": reaction.duplicate,
                                  "images": [save_image(await chart.png()) for chart in reaction.images]})

    async def _get_updates(self, request: web.Request) -> web.Response:
        self._check_remote(request)
        user = request.query.get("user", "")
        if not _USER.match(user):
            raise web.HTTPBadRequest(text="user: 1-64 characters of A-Z a-z 0-9 _ . @ -")
        try:
            wait = min(max(float(request.query.get("wait", "0")), 0.0), 30.0)
        except ValueError:
            raise web.HTTPBadRequest(text="wait: seconds, a number") from None
        async with self._arrived:
            if not self._mailboxes[user] and wait:
                try:
                    await asyncio.wait_for(self._arrived.wait_for(lambda: bool(self._mailboxes[user])), wait)
                except TimeoutError:
                    pass
            messages = list(self._mailboxes.pop(user, ()))
        return web.json_response({"messages": messages, "pending": await self._pending(user)})

    async def _pending(self, user: str) -> int:
        async with self.service.sessions() as session:
            customer = await find_customer(session, "console", user, self.account)
            if customer is None:
                return 0
            return await pending_for(session, customer.id, self.service.clock.now() + PENDING_HORIZON)
