"""What happens to a batch of inbound events inside the ingest transaction.

Set-based where the traffic is: one query finds the platform's retries, one finds the customers
behind the batch's identities (one insert creates the new ones), and touchpoints, last-seen times,
keyword tags and campaign triggers are written a few statements per batch; keyword auto-replies read
their cooldowns in one query per batch (scrm.conversations.autoreply). Events that need the
customer row (follows, phone sharing, opt-out and coupon or loyalty commands, staff commands) load
it and run one by one, after what the batch queued so far is written, so order is kept. Everything
shares the transaction: an event acknowledged to the platform has had all its effects committed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, case, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import commands, coupons, groups, metrics, staff
from scrm.acquisition.arrivals import arrive
from scrm.campaigns.definitions import TriggerEvent
from scrm.campaigns.planner import Trigger, plan_events, triggered
from scrm.config import Role
from scrm.consent import OPT_IN_REPLY, is_opt_in
from scrm.consent import record as record_consent
from scrm.conversations import threads
from scrm.conversations.autoreply import AUTO_REPLY, AutoReplies, AutoReply
from scrm.customers import staff_actor
from scrm.identity import merge_by_verified_phone
from scrm.loyalty import commands as loyalty_commands
from scrm.acquisition.menus import MENU_CLICK, TAG_SOURCE, MenuClick
from scrm.messages import INTERACTION_KINDS, MESSAGE_KINDS, InboundEvent, Original, Reaction
from scrm.personal import capture_phone, scrub_payload
from scrm.store.models import Customer, Identity, Touchpoint
from scrm.store.sqlite_driver import statements_in_thread
from scrm.tagging import TagHit, add_tag, apply_hits, tokenize
from scrm.webhooks import events as webhook_events

if TYPE_CHECKING:
    from scrm.runtime import Runtime
    from scrm.staff import StaffReply

log = logging.getLogger(__name__)
_Key = tuple[str, str, str]  # channel, account, external id
_MsgKey = tuple[str, str, str | None]  # channel, account, platform message id

# The batch's statements, built once: building one costs more than running it on a batch.
_TP, _ID, _CU = Touchpoint.__table__, Identity.__table__, Customer.__table__
_STORED = select(_TP.c.platform_msg_id, _TP.c.created_at).where(
    _TP.c.channel == bindparam("channel"), _TP.c.account == bindparam("account"),
    _TP.c.platform_msg_id.in_(bindparam("ids", expanding=True)))
#: The replies recorded for stored messages (ix_touchpoints_reply_to), in the order they were given.
_REPLIES = select(_TP.c.reply_to, _TP.c.text).where(
    _TP.c.channel == bindparam("channel"), _TP.c.account == bindparam("account"), _TP.c.reply_to.is_not(None),
    _TP.c.reply_to.in_(bindparam("ids", expanding=True))).order_by(_TP.c.id)
_IDENTIFIED = select(_ID.c.external_id, _ID.c.customer_id).where(
    _ID.c.channel == bindparam("channel"), _ID.c.account == bindparam("account"),
    _ID.c.external_id.in_(bindparam("ids", expanding=True)))
_INSERT_CUSTOMERS = insert(_CU).returning(_CU.c.id, _CU.c.display_name, _CU.c.acquisition_source)
_INSERT_IDENTITIES = insert(_ID)
_INSERT_TOUCHPOINTS = insert(_TP)
#: Every interaction is also a sighting: one statement for both times.
_NOW = bindparam("now", type_=_CU.c.last_seen_at.type)
_SEEN = update(_CU).where(_CU.c.id.in_(bindparam("seen", expanding=True))).values(
    last_seen_at=_NOW,
    last_inbound_at=case((_CU.c.id.in_(bindparam("interacted", expanding=True)), _NOW),
                         else_=_CU.c.last_inbound_at))
_NAMED = update(_CU).where(_CU.c.id == bindparam("row_id"), _CU.c.display_name.is_(None)).values(
    display_name=bindparam("name"))


@dataclass
class BatchOutcome:
    reactions: list[Reaction]
    #: Deliveries newly planned (the outbox is woken when there are any).
    planned: int
    #: Customers with new events (queued for the incremental profile refresh).
    customers: set[int]


def _row(customer_id: int | None, channel: str, account: str, direction: str, kind: str, now: datetime, *,
         text: str | None = None, payload: dict[str, Any] | None = None, platform_msg_id: str | None = None,
         actor: str | None = None, reply_to: str | None = None) -> dict[str, Any]:
    """One touchpoint of a batch, as a row of its multi-row insert."""
    return {"customer_id": customer_id, "actor": actor, "channel": channel, "account": account,
            "direction": direction, "kind": kind, "text": text, "payload": payload or {},
            "platform_msg_id": platform_msg_id, "campaign": None, "delivery_id": None, "created_at": now,
            "reply_to": reply_to}


@dataclass
class _Batch:
    """What the batch's events queued, written together by :meth:`flush`."""

    service: Runtime
    session: AsyncSession
    now: datetime
    touchpoints: list[dict[str, Any]] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    interacted: set[int] = field(default_factory=set)
    names: dict[int, str] = field(default_factory=dict)
    hits: list[tuple[int, TagHit, InboundEvent]] = field(default_factory=list)
    triggers: list[Trigger] = field(default_factory=list)
    planned: int = 0
    #: The batch's keyword auto-replies (set once the batch's customers are known).
    replies: AutoReplies = field(init=False)
    #: Customer messages on staffed channels, for their conversations (scrm.conversations.threads).
    noted: list[threads.Noted] = field(default_factory=list)
    #: The batch's customers a person is talking to: auto-replies leave them alone.
    handled: set[int] = field(default_factory=set)
    #: Customers who asked a price (scrm.loyalty.commands.note_intents).
    intents: set[int] = field(default_factory=set)

    def note(self, customer_id: int, event: InboundEvent, *, person: bool = False, answered: bool = False) -> None:
        if threads.enabled_for(self.service.config, event.channel):
            self.noted.append(threads.Noted(customer_id, event.channel, event.account, person, answered))

    def touchpoint(self, event: InboundEvent, customer_id: int | None, direction: str, kind: str, *,
                   text: str | None = None, payload: dict[str, Any] | None = None,
                   platform_msg_id: str | None = None, actor: str | None = None, reply_to: str | None = None) -> None:
        self.touchpoints.append(_row(customer_id, event.channel, event.account, direction, kind, self.now,
                                     text=text, payload=payload, platform_msg_id=platform_msg_id, actor=actor,
                                     reply_to=reply_to))

    def reply(self, event: InboundEvent, customer_id: int | None, text: str, actor: str | None = None) -> None:
        """A reply to the event, found again by the event's platform id when the platform retries it."""
        self.touchpoint(event, customer_id, "out", "reply", text=text, actor=actor, reply_to=event.platform_msg_id)

    def auto_reply(self, event: InboundEvent, customer_id: int, auto: AutoReply) -> None:
        """An auto-reply's touchpoint (its rule in the payload: cooldowns and reports read it), found again by
        the event's platform id like any reply; and the coupon granted for it."""
        if auto.granted is not None:
            self.touchpoint(event, customer_id, "internal", "coupon_granted", payload=auto.granted)
        self.touchpoint(event, customer_id, "out", AUTO_REPLY, text=auto.text, payload=auto.payload,
                        reply_to=event.platform_msg_id)

    def trigger(self, name: TriggerEvent, customer_id: int, event: InboundEvent, *, tag: str | None = None,
                words: frozenset[str] | None = None, campaign: str | None = None) -> None:
        self.triggers.append(Trigger(name, customer_id, event.channel, event.account, event.external_id, tag, words,
                                     campaign))

    async def customer(self, customer_id: int) -> Customer:
        """The customer's row, for the events that change more than the batch columns."""
        await self.flush()
        customer = await self.session.get(Customer, customer_id)
        assert customer is not None
        return customer

    async def flush(self) -> None:
        session, now = self.session, self.now
        if self.hits:
            hits, self.hits = self.hits, []
            events = {id(hit): event for _, hit, event in hits}
            for customer_id, hit in await apply_hits(session, [(c, h) for c, h, _ in hits], now):
                event = events[id(hit)]
                self.touchpoint(event, customer_id, "internal", "tag_added",
                                payload={"tag": hit.tag, "keyword": hit.keyword, "score": hit.score})
                self.trigger("tag_added", customer_id, event, tag=hit.tag)
        if self.seen:
            await session.execute(_SEEN, {"seen": list(self.seen), "interacted": list(self.interacted), "now": now})
            self.seen.clear()
            self.interacted.clear()
        if self.names:
            await session.execute(_NAMED, [{"row_id": i, "name": n} for i, n in self.names.items()])
            self.names.clear()
        if self.noted:
            noted, self.noted = self.noted, []
            for c in await threads.note_messages(session, noted, now):
                self.touchpoints.append(_row(c.customer_id, c.channel, c.account, "internal", "conversation_opened",
                                             now, payload={"conversation": c.conversation_id, "person": c.person}))
        if self.touchpoints:
            rows, self.touchpoints = self.touchpoints, []
            await session.execute(_INSERT_TOUCHPOINTS, rows)
            metrics.bulk_touchpoints(session, rows)
            await webhook_events.emit_touchpoints(session, rows)
        if self.intents:
            intents, self.intents = self.intents, set()
            await loyalty_commands.note_intents(self.service, session, intents, now)
        if self.triggers:
            triggers, self.triggers = self.triggers, []
            self.planned += await plan_events(session, list(self.service.campaigns.values()), self.service.paused,
                                              triggers, now)


async def handle_batch(service: Runtime, session: AsyncSession, items: list[tuple[InboundEvent, StaffReply | None]],
                       now: datetime) -> BatchOutcome:
    """``items``: each event with the answer already read for a staff report (or None)."""
    batch = _Batch(service, session, now)
    events = [event for event, _ in items]
    originals = await _stored(session, events)
    fresh = _fresh(events, originals)
    roles = [staff.role_of(service, e) for e in events]
    customers = await _customers(session, [e for e, new, r in zip(events, fresh, roles) if new and r is None], now)
    batch.replies = AutoReplies(service, session, now, {customer_id for customer_id, _ in customers.values()})
    staffed = {customers[(e.channel, e.account, e.external_id)][0] for e, new, r in zip(events, fresh, roles)
               if new and r is None and e.kind in MESSAGE_KINDS and threads.enabled_for(service.config, e.channel)}
    batch.handled = await threads.handled_customers(service.config, session, staffed, now)
    reactions: list[Reaction] = []
    for (event, answer), new, role in zip(items, fresh, roles):
        key = (event.channel, event.account, event.platform_msg_id)
        if not new:  # a retry, of a stored event or of one earlier in this batch
            reactions.append(Reaction(duplicate=True, original=originals[key]))
            continue
        if role is not None:
            await batch.flush()
            reaction = await _handle_staff(batch, event, role, answer)
        else:
            customer_id, created = customers[(event.channel, event.account, event.external_id)]
            reaction = await _handle_customer(batch, event, customer_id, created)
            # later events of this identity: not a first contact, and the merged customer if it merged
            customers[(event.channel, event.account, event.external_id)] = (reaction.customer_id or customer_id, False)
        reactions.append(reaction)
        if event.platform_msg_id is not None:
            originals[key] = Original(now, reaction.replies)
    await batch.flush()
    return BatchOutcome(reactions, batch.planned, {r.customer_id for r in reactions if r.customer_id is not None})


async def _stored(session: AsyncSession, events: list[InboundEvent]) -> dict[_MsgKey, Original]:
    """The events already stored, by platform id (the platform's retries), with when they came and the
    replies recorded for them; the replies are read only when there are retries."""
    wanted: dict[tuple[str, str], set[str]] = defaultdict(set)
    for e in events:
        if e.platform_msg_id is not None:
            wanted[(e.channel, e.account)].add(e.platform_msg_id)
    originals: dict[_MsgKey, Original] = {}
    for (channel, account), msg_ids in wanted.items():
        where = {"channel": channel, "account": account}
        rows = await session.execute(_STORED, {**where, "ids": list(msg_ids)})
        stored: dict[str, datetime] = {m: at for m, at in rows}
        if not stored:
            continue
        replies: dict[str, list[str]] = defaultdict(list)
        for reply_to, text in await session.execute(_REPLIES, {**where, "ids": list(stored)}):
            if text is not None:  # redacted since (erasure, retention): nothing to give again
                replies[reply_to].append(text)
        originals |= {(channel, account, m): Original(at, tuple(replies[m])) for m, at in stored.items()}
    return originals


def _fresh(events: list[InboundEvent], stored: dict[_MsgKey, Original]) -> list[bool]:
    """False for retries of an event already stored or earlier in this batch, by platform id."""
    seen = set(stored)
    fresh = []
    for e in events:
        key = (e.channel, e.account, e.platform_msg_id)
        fresh.append(e.platform_msg_id is None or key not in seen)
        seen.add(key)
    return fresh


async def _customers(session: AsyncSession, events: list[InboundEvent], now: datetime) -> dict[_Key, tuple[int, bool]]:
    """The customer behind each event's identity, and whether it was created now (first contact)."""
    wanted: dict[tuple[str, str], set[str]] = defaultdict(set)
    for e in events:
        wanted[(e.channel, e.account)].add(e.external_id)
    found: dict[_Key, tuple[int, bool]] = {}
    for (channel, account), external_ids in wanted.items():
        rows = await session.execute(_IDENTIFIED, {"channel": channel, "account": account, "ids": list(external_ids)})
        found |= {(channel, account, external_id): (customer_id, False) for external_id, customer_id in rows}
    first: dict[_Key, InboundEvent] = {}
    for e in events:
        first.setdefault((e.channel, e.account, e.external_id), e)
    new = [(key, e) for key, e in first.items() if key not in found]
    if new:
        # New customers differ only in name and source, so equal rows are interchangeable and
        # RETURNING's unspecified order needs no sentinel column (which would mean a row per insert).
        new_rows: list[dict[str, Any]] = [
            {"display_name": e.display_name, "acquisition_source": e.source or f"{e.channel}:{e.account}",
             "first_seen_at": now, "last_seen_at": now, "attributes": {}} for _, e in new]
        returned: dict[tuple[str | None, str], list[int]] = defaultdict(list)
        for cid, name, source in await session.execute(_INSERT_CUSTOMERS, new_rows):
            returned[(name, source)].append(cid)
        created = {key: returned[(row["display_name"], row["acquisition_source"])].pop()
                   for (key, _), row in zip(new, new_rows)}
        await session.execute(_INSERT_IDENTITIES, [
            {"customer_id": cid, "channel": key[0], "account": key[1], "external_id": key[2], "created_at": now}
            for key, cid in created.items()])
        found |= {key: (cid, True) for key, cid in created.items()}
        await webhook_events.emit_many(session, [("customer.created", cid, {
            "channel": key[0], "account": key[1], "external_id": key[2], "display_name": first[key].display_name,
            "source": first[key].source or f"{key[0]}:{key[1]}"}) for key, cid in created.items()], now)
    return found


async def _handle_staff(batch: _Batch, event: InboundEvent, role: Role, answer: staff.StaffReply | None) -> Reaction:
    actor = staff_actor(event.channel, event.external_id)
    batch.touchpoint(event, None, "in", event.kind, text=event.text or None, payload=scrub_payload(event.payload),
                     platform_msg_id=event.platform_msg_id, actor=actor)
    if answer is None:  # a command that writes (the reports were answered before this transaction)
        await batch.flush()
        await statements_in_thread(batch.session)  # its reads may still take a while: not on the event loop
        answer = await staff.dispatch(staff.StaffContext(batch.service, batch.session, event, actor, role, batch.now))
        batch.planned += answer.planned
    batch.reply(event, None, answer.text, actor=actor)
    return Reaction(replies=(answer.text,), images=answer.images)


async def _handle_customer(batch: _Batch, event: InboundEvent, customer_id: int, created: bool) -> Reaction:
    session, now = batch.session, batch.now
    batch.seen.add(customer_id)
    if event.kind in INTERACTION_KINDS:
        batch.interacted.add(customer_id)
    if event.display_name and not created:
        batch.names[customer_id] = event.display_name
    batch.touchpoint(event, customer_id, "in", event.kind, text=event.text or None,
                     payload=scrub_payload(event.payload), platform_msg_id=event.platform_msg_id)
    replies: list[str] = []
    auto: AutoReply | None = None
    text = event.text.strip()

    if event.kind in ("unsubscribe", "blocked"):
        customer = await batch.customer(customer_id)
        customer.opted_out = True
        record_consent(session, customer.id, event.channel, False, "unsubscribed", now, detail=event.kind)
    elif event.kind == "subscribe":
        customer = await batch.customer(customer_id)
        customer.opted_out = False
        record_consent(session, customer.id, event.channel, True, "subscribed", now, detail=event.source)
        if event.source and not created:
            customer.attributes = {**customer.attributes, "last_source": event.source}
    elif event.kind == "contact_removed":
        customer = await batch.customer(customer_id)
        customer.stage, customer.opted_out = "lost", True
    elif event.kind == "contact_shared" and isinstance(event.payload.get("phone"), str):
        customer = await batch.customer(customer_id)
        if await capture_phone(session, customer, event.payload["phone"], batch.service.keyring, event.channel, now):
            customer_id = (await merge_by_verified_phone(session, customer, f"verified-phone:{event.channel}", now)).id
            batch.seen.add(customer_id)
            batch.interacted.add(customer_id)
    elif event.kind in ("group_joined", "group_left") and isinstance(event.payload.get("group_id"), (str, int)):
        await batch.flush()
        group = await groups.upsert_group(session, event.channel, event.account, str(event.payload["group_id"]), now,
                                          title=event.payload.get("group_title"))
        await groups.set_member(session, group, customer_id, event.kind == "group_joined", now)
    elif event.kind == MENU_CLICK and (click := _menu_action(batch, event)) is not None:
        answer = await _menu_click(batch, customer_id, event, click)
        if isinstance(answer, AutoReply):
            auto = answer
        else:
            replies += answer
    elif event.kind in MESSAGE_KINDS and text:
        answer = await _customer_text(batch, customer_id, event, text)
        if isinstance(answer, AutoReply):
            auto = answer
        else:
            replies += answer
    elif event.kind in MESSAGE_KINDS:  # a picture, a voice message...: for a person to look at
        batch.note(customer_id, event)

    if event.scene is not None:
        replies += await _arrival(batch, event, customer_id, created)
    if created:
        batch.trigger("first_message", customer_id, event)
    for reply in replies:
        batch.reply(event, customer_id, reply)
    if auto is None or auto.text is None:
        return Reaction(replies=tuple(replies), customer_id=customer_id)
    batch.auto_reply(event, customer_id, auto)
    return Reaction(replies=(auto.text,), customer_id=customer_id, buttons=auto.buttons, article=auto.article)


async def _arrival(batch: _Batch, event: InboundEvent, customer_id: int, created: bool) -> list[str]:
    """A follow, scan or ``/start`` through a channel code: its effects, recorded; its welcome, if any."""
    await batch.flush()
    arrival = await arrive(batch.service, batch.session, event, customer_id, created, batch.now)
    if arrival is None:
        return []
    batch.touchpoint(event, customer_id, "internal", "code_scan", payload=arrival.payload)
    for tag in arrival.tags:
        batch.touchpoint(event, customer_id, "internal", "tag_added", payload={"tag": tag, "code": arrival.code})
        batch.trigger("tag_added", customer_id, event, tag=tag)
    if arrival.granted is not None:
        batch.touchpoint(event, customer_id, "internal", "coupon_granted", payload=arrival.granted)
    batch.planned += arrival.planned
    return [arrival.welcome] if arrival.welcome else []


async def _customer_text(batch: _Batch, customer_id: int, event: InboundEvent, text: str) -> list[str] | AutoReply:
    """Customer commands (opt out, redeem, staff-only refusal) or, for ordinary text, keyword tags and
    one answer: a reply rule's, else a keyword campaign's (planned), else the fallback's
    (scrm.conversations.autoreply)."""
    service, session, now = batch.service, batch.session, batch.now
    if commands.is_opt_out(text):
        (await batch.customer(customer_id)).opted_out = True
        record_consent(session, customer_id, event.channel, False, "opt_out", now, detail=text[:32])
        return [commands.OPT_OUT_REPLY]
    if is_opt_in(text):
        (await batch.customer(customer_id)).opted_out = False
        record_consent(session, customer_id, event.channel, True, "message", now, detail=text[:32])
        return [OPT_IN_REPLY]
    if staff.parse(text):
        return [staff.REFUSAL_REPLY]
    if code := commands.redeem_code(text):
        await batch.flush()
        result = await coupons.redeem(session, code, now, via="chat", customer_id=customer_id)
        if result.status == "redeemed":
            batch.touchpoint(event, customer_id, "internal", "coupon_redeemed", payload={"code": result.code})
        return [result.reply]
    loyalty = service.config.loyalty
    if loyalty is not None and loyalty_commands.is_command(text):  # 签到, 积分, 积分兑换, /invite, survey answers
        answers = await loyalty_commands.dispatch(service, session, await batch.customer(customer_id), event, text, now)
        if answers is not None:
            return answers
    if loyalty is not None and loyalty_commands.shows_intent(loyalty, text):
        batch.intents.add(customer_id)  # set-based in flush: no customer row read, no flush here
    if threads.enabled_for(service.config, event.channel) and threads.wants_person(service.config, text):
        batch.note(customer_id, event, person=True)
        return [service.config.conversations.person_reply]
    words = tokenize(text)
    batch.hits += [(customer_id, hit, event) for hit in service.tagger.match(event.text, words)]
    rule = batch.replies.match(text, words, event.channel)
    if rule is None and _keyword_campaign(service, event.channel, words):
        batch.trigger("keyword", customer_id, event, words=frozenset(words))  # the campaign answers: no fallback
        batch.note(customer_id, event, answered=True)
        return []
    reply = await batch.replies.answer(customer_id, event, rule, handled_by_person=customer_id in batch.handled)
    batch.note(customer_id, event, answered=reply is not None and reply.answered)
    return reply or []


def _keyword_campaign(service: Runtime, channel: str, words: list[str]) -> bool:
    """Whether an active keyword campaign that reaches ``channel`` has one of the message's words."""
    return any(not c.definition.channels or channel in c.definition.channels
               for c in triggered(list(service.campaigns.values()), service.paused, "keyword", words=set(words)))


def _menu_action(batch: _Batch, event: InboundEvent) -> MenuClick | None:
    """What the account's menu configures for the tapped button's key (scrm.acquisition.menus), if anything."""
    channel = batch.service.channel(event.channel, event.account)
    key = event.payload.get("key")
    return channel.menu_action(key) if channel is not None and isinstance(key, str) else None


async def _menu_click(batch: _Batch, customer_id: int, event: InboundEvent, click: MenuClick) -> list[str] | AutoReply:
    """A menu button's actions: its tags (source ``menu``, the key as detail), its campaign planned as an
    event trigger plans one, and one answer: the named reply rule's, as a message matching it gets it
    (cooldown, coupon and card included), or the plain text."""
    key = str(event.payload["key"])
    if click.tags:
        await batch.flush()  # the batch's earlier tag hits first: one order of events
        for tag in click.tags:
            if await add_tag(batch.session, customer_id, tag, TAG_SOURCE, key, batch.now):
                batch.touchpoint(event, customer_id, "internal", "tag_added", payload={"tag": tag, "menu": key})
                batch.trigger("tag_added", customer_id, event, tag=tag)
    if click.campaign is not None:
        if click.campaign not in batch.service.campaigns:
            log.warning("menu key %r of %s:%s names no campaign %r", key, event.channel, event.account, click.campaign)
        batch.trigger(MENU_CLICK, customer_id, event, campaign=click.campaign)
    if click.text is not None:
        return [click.text]
    if click.reply is None:
        return []
    rule = batch.replies.book.named(click.reply)
    if rule is None:
        log.warning("menu key %r of %s:%s names no reply rule %r", key, event.channel, event.account, click.reply)
        return []
    return await batch.replies.answer(customer_id, event, rule) or []
