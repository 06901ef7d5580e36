"""Answering a customer's message with a reply rule or the fallback, inside the ingest transaction.

The answer is rendered there, so the channel gives it passively (inside WeChat's 5 seconds) once the
batch commits. :class:`AutoReplies` serves one ingest batch and keeps it set-based: the rule book as
the batch began (a reload swaps the service's book, never a batch's), the batch's customers' recent
auto-replies (the cooldowns) read in one query when the first message needs them, and what the
templates show of the customers read once too, and only as far as the templates read it.

One message, one answer: a command, loyalty or a person's request answers before any rule is tried;
the highest-priority matching rule answers; a rule in its cooldown holds the message silently (no
lower rule, no fallback); a campaign keyword trigger counts only for messages no rule matched (see
scrm.pipeline); the fallback answers the rest, one-to-one chats only (never a group's chatter).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from jinja2 import TemplateError
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import coupons
from scrm.acquisition import links
from scrm.campaigns import templates
from scrm.campaigns.outbox import customer_extras
from scrm.conversations.replies import FALLBACK, LoadedRule, in_working_hours
from scrm.messages import Article, InboundEvent
from scrm.store.models import Customer, Touchpoint

if TYPE_CHECKING:
    from scrm.runtime import Runtime

log = logging.getLogger(__name__)

#: The touchpoint kind of an auto-reply (direction ``out``, ``reply_to`` the message, payload ``rule``).
AUTO_REPLY = "auto_reply"
#: Why a matching rule (or the fallback) said nothing: within its cooldown for this customer, a person
#: is handling the customer's conversation, its template rendered nothing, or rendering failed (logged).
Held = Literal["cooldown", "person", "empty", "error"]

_TP, _CU = Touchpoint.__table__.c, Customer.__table__.c
_ANSWERED = select(_TP.customer_id, _TP.payload, _TP.created_at).where(
    _TP.customer_id.in_(bindparam("customers", expanding=True)), _TP.created_at >= bindparam("since"),
    _TP.kind == AUTO_REPLY)
_NAMES = select(_CU.id, _CU.display_name, _CU.stage).where(_CU.id.in_(bindparam("customers", expanding=True)))


@dataclass(frozen=True)
class AutoReply:
    """What a rule (or the fallback) made of one message."""

    #: The rule's name, or :data:`~scrm.conversations.replies.FALLBACK`.
    rule: str
    #: The answer; None when ``held``.
    text: str | None
    held: Held | None = None
    buttons: tuple[tuple[str, str], ...] = ()
    article: Article | None = None
    #: What the auto-reply touchpoint records: ``rule``, and for the fallback ``hours`` (in / out), with
    #: a coupon its ``coupon`` code.
    payload: dict[str, Any] | None = None
    #: The ``coupon_granted`` touchpoint's payload when a fresh code was granted for the answer.
    granted: dict[str, str] | None = None

    @property
    def fallback(self) -> bool:
        """No rule matched the message: it got (or was held from) the fallback."""
        return self.rule == FALLBACK

    @property
    def answered(self) -> bool:
        """A rule took care of the message: it answered now, or within its cooldown (the customer asked the
        same a moment ago). The fallback, a person's conversation, an empty or failed answer do not."""
        return not self.fallback and (self.text is not None or self.held == "cooldown")


class AutoReplies:
    """One ingest batch's auto-replies; ``customers``: the batch's customers known before it (their
    recent auto-replies and names are read for all of them at once, when first needed)."""

    def __init__(self, service: Runtime, session: AsyncSession, now: datetime, customers: Collection[int]) -> None:
        self.config = service.config
        self.book = service.replies
        self.session, self.now = session, now
        self._customers = set(customers)
        #: (customer, rule) -> its last auto-reply within the book's horizon, for the customers in _read.
        self._answered: dict[tuple[int, str], datetime] = {}
        self._answers_read: set[int] = set()
        self._names: dict[int, tuple[str | None, str]] = {}
        self._extras: dict[int, tuple[list[str], list[Any]]] = {}
        self._in_hours: bool | None = None

    def match(self, text: str, tokens: list[str], channel: str) -> LoadedRule | None:
        return self.book.match(text, tokens, channel)

    async def answer(self, customer_id: int, event: InboundEvent, rule: LoadedRule | None, *,
                     handled_by_person: bool = False) -> AutoReply | None:
        """The answer of ``rule`` (what :meth:`match` found), or for None the fallback's; None when there is
        no fallback for the message (none configured, another channel, a group). ``handled_by_person``:
        a person is handling the customer's conversation, so nothing is said (``held="person"``)."""
        if rule is None:
            fallback = self.book.fallback
            if (fallback is None or event.payload.get("group_id") is not None
                    or (fallback.channels and event.channel not in fallback.channels)):
                return None
            name, cooldown = FALLBACK, self.book.fallback_cooldown
        else:
            name, cooldown = rule.rule.name, rule.cooldown
        if handled_by_person:
            return AutoReply(name, None, "person")
        if await self._cooling(customer_id, name, cooldown):
            return AutoReply(name, None, "cooldown")
        try:
            reply = await (self._rule(customer_id, event, rule) if rule else self._fallback(customer_id, event))
        except TemplateError:
            log.exception("auto-reply %s: its template failed for customer %s; nothing said", name, customer_id)
            return AutoReply(name, None, "error")
        if reply.text is not None:
            self._answered[(customer_id, name)] = self.now
        return reply

    async def _rule(self, customer_id: int, event: InboundEvent, loaded: LoadedRule) -> AutoReply:
        rule = loaded.rule
        context: dict[str, Any] = {"customer": await self._customer(customer_id, event, loaded.reads)}
        payload: dict[str, Any] = {"rule": rule.name}
        source, granted = rule.text, None
        if rule.coupon is not None:
            pool = self.config.coupons[rule.coupon]
            code, fresh = await coupons.code_for(self.session, rule.coupon, pool, customer_id, self.now)
            if code is None:
                source = rule.coupon_gone
            else:
                context["coupon"] = coupons.template_data(code, pool)
                payload["coupon"] = code.code
                if fresh:
                    granted = {"code": code.code, "pool": rule.coupon, "rule": rule.name}
        tracked = links.for_reply(self.config, rule.name, customer_id, self.now)
        context[links.CONTEXT_KEY] = tracked
        text = templates.render(source, context).strip()
        if not text:
            return AutoReply(rule.name, None, "empty")
        article = None
        if (card := rule.article) is not None and source == rule.text:
            article = Article(templates.render(card.title, context), templates.render(card.description, context),
                              card.url, card.picurl)
        await tracked.save(self.session)
        return AutoReply(rule.name, text, buttons=tuple((b.text, b.url) for b in rule.buttons), article=article,
                         payload=payload, granted=granted)

    async def _fallback(self, customer_id: int, event: InboundEvent) -> AutoReply:
        fallback = self.book.fallback
        assert fallback is not None  # answer() found one
        if self._in_hours is None:
            self._in_hours = in_working_hours(self.config, fallback.hours, self.now)
        source = fallback.text if self._in_hours else fallback.out_of_hours or fallback.text
        tracked = links.for_reply(self.config, FALLBACK, customer_id, self.now)
        context = {"customer": await self._customer(customer_id, event, self.book.fallback_reads),
                   links.CONTEXT_KEY: tracked}
        text = templates.render(source, context).strip()
        if not text:
            return AutoReply(FALLBACK, None, "empty")
        await tracked.save(self.session)
        return AutoReply(FALLBACK, text, payload={"rule": FALLBACK, "hours": "in" if self._in_hours else "out"})

    async def _cooling(self, customer_id: int, name: str, cooldown: timedelta) -> bool:
        """Whether the rule answered the customer less than ``cooldown`` ago (in an earlier batch or this one)."""
        if not cooldown:
            return False
        if customer_id not in self._answers_read:
            # the batch's customers at once; one found later (merged by a shared phone number) alone
            ids = (self._customers | {customer_id}) - self._answers_read
            since = self.now - self.book.horizon
            rows = await self.session.execute(_ANSWERED, {"customers": list(ids), "since": since})
            for cid, payload, at in rows:
                key = (cid, str((payload or {}).get("rule")))
                self._answered[key] = max(at, self._answered.get(key, at))
            self._answers_read |= ids
        at = self._answered.get((customer_id, name))
        return at is not None and self.now - at < cooldown

    async def _customer(self, customer_id: int, event: InboundEvent, reads: frozenset[str] | None) -> dict[str, Any]:
        """What the templates show of the customer (never phone numbers or birthdays), read only as far as
        ``reads`` (the attributes the templates read; None: any)."""
        customer: dict[str, Any] = {"id": customer_id, "channel": event.channel}
        if reads is None or reads & {"name", "stage"}:
            if customer_id not in self._names:
                ids = (self._customers | {customer_id}) - self._names.keys()
                self._names |= {cid: (name, stage) for cid, name, stage in
                                await self.session.execute(_NAMES, {"customers": list(ids)})}
            name, stage = self._names[customer_id]
            customer |= {"name": event.display_name or name or "朋友", "stage": stage}
        if reads is None or reads & {"tags", "recommendations"}:
            if customer_id not in self._extras:
                wanted = (self._customers | {customer_id}) - self._extras.keys()
                self._extras |= await customer_extras(self.session, wanted)
            tags, recommendations = self._extras[customer_id]
            customer |= {"tags": tags, "recommendations": recommendations}
        return customer
