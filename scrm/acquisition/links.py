"""Tracked links: ``{{ track('https://…') }}`` in a campaign's or a reply's template becomes a short link
``<base>/l/<token>`` that leads to the target and counts who followed it, for the message it was in.

A token stands for one target in one message. A campaign delivery's tokens are an HMAC of the delivery id
and the target under a key derived from the service's lookup key: rendering the delivery again (a retry, a
deferral) writes the same link, and the rows go into the store in the transaction that renders it, before
it is sent. A reply is rendered once (a platform's retry is answered with the stored text), so its tokens
are random. An Official Account menu's view button opens a link derived from the account and the target,
shared by every follower (WeChat's VIEW event names who tapped it); it names no customer, so it does not
expire: it lasts as long as the menu pushed with it. Either way a token is 144 bits nobody can guess, and
the redirect goes only to the target the store holds for it: nothing in the request can choose where it
leads.

A visit records a ``click`` touchpoint and tags the customer ``clicked:<campaign>``; link-preview fetches
(messengers building a card for the link) are recorded as ``link_preview`` only, so they count no person.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from jinja2 import TemplateRuntimeError, nodes, pass_context
from jinja2.runtime import Context

from scrm.customers import touchpoint
from scrm.store.dialect import insert_ignore
from scrm.store.engine import writing
from scrm.store.models import Delivery, TrackedLink
from scrm.tagging import add_tag

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from scrm.config import Config
    from scrm.keyring import Keyring
    from scrm.runtime import Runtime

#: Touchpoint kinds of a visit: a person's, and a messenger's fetch for a link preview.
CLICK = "click"
PREVIEW = "link_preview"
#: What a click tags the customer with, before the campaign's name (cut to the 64 characters a tag holds).
TAG_PREFIX = "clicked:"
TOKEN_BYTES = 18
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{24}$")
#: Where a message's :class:`Links` sits in its render context: not a name a template can write.
CONTEXT_KEY = "track:links"
#: Link-preview fetchers: Telegram ("TelegramBot (like TwitterBot)"), WhatsApp, Facebook/Messenger/iMessage
#: (facebookexternalhit, Facebot), Twitter, Slack, Discord, LinkedIn, Skype, and crawlers that say so.
_PREVIEW_AGENT = re.compile(r"bot\b|crawler|spider|preview|facebookexternalhit|whatsapp|slack-imgproxy|embedly"
                            r"|vkshare|headlesschrome", re.IGNORECASE)


def target(url: object) -> str:
    """``url`` if a tracked link may lead there (an absolute http(s) URL with a host), else the template
    error saying why: a link must not lead to ``javascript:`` or another scheme."""
    if not isinstance(url, str):
        raise TemplateRuntimeError(f"track() takes a URL string, got {type(url).__name__}")
    try:
        parts = urlsplit(url)
        host = parts.hostname  # raises on a malformed port or IPv6 address
    except ValueError:
        host = None
    if host is None or parts.scheme.lower() not in ("http", "https") or re.search(r"[\s\x00-\x1f]", url):
        raise TemplateRuntimeError(f"track(): {url[:80]!r} is not an http(s) URL")
    return url


@pass_context
def track(context: Context, url: object) -> str:
    """The template function. Rendered outside a message (a check at load, a preview) it gives the target."""
    checked = target(url)
    links = context.get(CONTEXT_KEY)
    return checked if not isinstance(links, Links) else links.track(checked)


def call_problem(parsed: nodes.Template) -> str | None:
    """What is wrong with the template's ``track()`` calls as written: one URL argument, and a URL written
    out must be http(s) (checked here, not left to a render that may never reach it)."""
    for call in parsed.find_all(nodes.Call):
        if not isinstance(call.node, nodes.Name) or call.node.name != "track":
            continue
        if len(call.args) != 1 or call.kwargs or call.dyn_args or call.dyn_kwargs:
            return "track() takes one URL"
        if isinstance(arg := call.args[0], nodes.Const):
            try:
                target(arg.value)
            except TemplateRuntimeError as exc:
                return str(exc)
    return None


def base_url(config: Config) -> str:
    return (config.links.base_url or config.console.base_url
            or f"http://{config.service.host}:{config.service.port}").rstrip("/")


def link_key(keyring: Keyring) -> bytes:
    """The key delivery tokens are derived with: the lookup key's, for this use only."""
    return hmac.new(keyring.lookup, b"scrm tracked links v1", hashlib.sha256).digest()


@dataclass
class Links:
    """The tracked links one message's rendering writes, and what they are counted for."""

    base: str
    now: datetime
    customer_id: int | None
    campaign: str | None = None
    step: int | None = None
    variant: str | None = None
    delivery_id: int | None = None
    rule: str | None = None
    #: Derives the tokens with ``seed`` (see the module); None: random tokens.
    key: bytes | None = None
    seed: str | None = None
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)

    def track(self, url: str) -> str:
        token = self._token(url)
        self.rows.setdefault(token, {
            "token": token, "target": url, "campaign": self.campaign, "step": self.step, "variant": self.variant,
            "rule": self.rule, "customer_id": self.customer_id, "delivery_id": self.delivery_id,
            "created_at": self.now})
        return f"{self.base}/l/{token}"

    def _token(self, url: str) -> str:
        if self.key is not None and self.seed is not None:
            digest = hmac.new(self.key, f"{self.seed}\n{url}".encode(), hashlib.sha256).digest()
            return base64.urlsafe_b64encode(digest[:TOKEN_BYTES]).decode()
        # The same target twice in one message is one link.
        return next((t for t, row in self.rows.items() if row["target"] == url), None) or \
            secrets.token_urlsafe(TOKEN_BYTES)

    async def save(self, session: AsyncSession) -> None:
        """Store the links written (again: a delivery rendered twice finds its rows there)."""
        if self.rows:
            await insert_ignore(session, TrackedLink.__table__, list(self.rows.values()))


def for_delivery(config: Config, keyring: Keyring, d: Delivery, now: datetime) -> Links:
    return Links(base_url(config), now, d.customer_id, d.campaign, d.step, d.variant, d.id, key=link_key(keyring),
                 seed=str(d.id))


def for_menu(config: Config, keyring: Keyring, channel: str, account: str, now: datetime) -> Links:
    """The links of a chat menu's buttons: the same for every push of the same target (``menu:`` is no
    delivery id), counted for the rule ``menu:<channel>:<account>``."""
    rule = f"menu:{channel}:{account}"[:64]
    return Links(base_url(config), now, None, rule=rule, key=link_key(keyring), seed=rule)


def for_reply(config: Config, rule: str, customer_id: int, now: datetime) -> Links:
    return Links(base_url(config), now, customer_id, rule=rule)


def is_preview(agent: str) -> bool:
    """Whether a visit is a messenger's link-preview fetch rather than a person: a preview agent, WeChat's
    own fetch (MicroMessenger without the browser it runs in), or no User-Agent at all (browsers send one)."""
    if not agent.strip() or _PREVIEW_AGENT.search(agent):
        return True
    lowered = agent.lower()
    return "micromessenger" in lowered and "mozilla/" not in lowered


async def follow(service: Runtime, token: str, agent: str, preview: bool = False) -> str | None:
    """Record a visit to ``/l/<token>`` and return where it leads; None for a malformed, unknown or expired
    token, which records nothing. ``preview``: known to be no person's visit (a HEAD request)."""
    if not _TOKEN.fullmatch(token):
        return None
    now = service.clock.now()
    async with writing(service.sessions) as session:
        link = await session.get(TrackedLink, token)
        # A link for no one customer (a menu's) lasts as long as what shows it.
        expired = link is not None and link.customer_id is not None and \
            now >= link.created_at + timedelta(days=service.config.links.expiry_days)
        if link is None or expired:
            return None
        preview = preview or is_preview(agent)
        payload: dict[str, Any] = {"target": link.target, "token": token}
        payload |= {k: v for k, v in (("step", link.step), ("variant", link.variant), ("delivery", link.delivery_id),
                                      ("rule", link.rule)) if v is not None}
        touchpoint(session, customer_id=link.customer_id, channel="web", account="-", direction="in",
                   kind=PREVIEW if preview else CLICK, now=now, campaign=link.campaign,
                   delivery_id=link.delivery_id, payload=payload)
        if not preview and link.customer_id is not None and link.campaign is not None:
            await _tag(service, session, link.customer_id, link.campaign, token, now)
    return link.target


async def _tag(service: Runtime, session: AsyncSession, customer_id: int, campaign: str, token: str,
               now: datetime) -> None:
    """Tag the clicker, and start what a campaign triggered by that tag does (a follow-up to clickers)."""
    # Imported here: the planner's campaign definitions check their templates, and templates import this.
    from scrm.campaigns.planner import plan_triggered

    tag = (TAG_PREFIX + campaign)[:64]
    if await add_tag(session, customer_id, tag, "click", token, now):
        touchpoint(session, customer_id=customer_id, channel="web", account="-", direction="internal",
                   kind="tag_added", now=now, campaign=campaign, payload={"tag": tag})
        if await plan_triggered(service, session, "tag_added", [customer_id], now, tag=tag):
            service.wake_outbox()
