"""What happens to one inbound event inside the ingest transaction.

Customer upsert, the touchpoint, customer commands, keyword tags and campaign triggers all share
the transaction, so an event acknowledged to the platform has had all its effects committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import commands, coupons, groups, staff
from scrm.campaigns.definitions import TriggerEvent
from scrm.campaigns.planner import plan_event
from scrm.channels import INTERACTION_KINDS, MESSAGE_KINDS, InboundEvent, Reaction
from scrm.config import Role
from scrm.consent import OPT_IN_REPLY, is_opt_in
from scrm.consent import record as record_consent
from scrm.customers import find_or_create, touchpoint
from scrm.identity import merge_by_verified_phone
from scrm.loyalty import commands as loyalty_commands
from scrm.personal import capture_phone, scrub_payload
from scrm.store.models import Customer, Touchpoint
from scrm.tagging import apply_hit, tokenize

if TYPE_CHECKING:
    from scrm.service import Service


@dataclass
class Outcome:
    reaction: Reaction
    planned: list[str] = field(default_factory=list)


async def _is_duplicate(session: AsyncSession, event: InboundEvent) -> bool:
    if event.platform_msg_id is None:
        return False
    found = await session.scalar(
        select(Touchpoint.id).where(
            Touchpoint.channel == event.channel,
            Touchpoint.account == event.account,
            Touchpoint.platform_msg_id == event.platform_msg_id,
        )
    )
    return found is not None


async def handle(service: Service, session: AsyncSession, event: InboundEvent, now: datetime) -> Outcome:
    if await _is_duplicate(session, event):
        return Outcome(Reaction(duplicate=True))
    role = service.config.staff.get(f"{event.channel}:{event.external_id}")
    if role is not None:
        return await _handle_staff(service, session, event, role, now)
    return await _handle_customer(service, session, event, now)


def _record(session: AsyncSession, event: InboundEvent, now: datetime, customer_id: int | None,
            actor: str | None = None) -> None:
    touchpoint(session, customer_id=customer_id, actor=actor, channel=event.channel, account=event.account,
               direction="in", kind=event.kind, now=now, text=event.text or None, payload=scrub_payload(event.payload),
               platform_msg_id=event.platform_msg_id)


def _reply(session: AsyncSession, event: InboundEvent, now: datetime, text: str, customer_id: int | None,
           actor: str | None = None) -> None:
    touchpoint(session, customer_id=customer_id, actor=actor, channel=event.channel, account=event.account,
               direction="out", kind="reply", now=now, text=text)


async def _handle_staff(service: Service, session: AsyncSession, event: InboundEvent, role: Role,
                        now: datetime) -> Outcome:
    actor = f"staff:{event.channel}:{event.external_id}"
    _record(session, event, now, None, actor)
    answer = await staff.dispatch(staff.StaffContext(service, session, event, actor, role, now))
    _reply(session, event, now, answer.text, None, actor)
    return Outcome(Reaction(replies=(answer.text,), images=answer.images))


async def _handle_customer(service: Service, session: AsyncSession, event: InboundEvent, now: datetime) -> Outcome:
    customer, created = await find_or_create(
        session, event.channel, event.account, event.external_id, now, event.display_name, event.source
    )
    customer.last_seen_at = now
    if event.kind in INTERACTION_KINDS:
        customer.last_inbound_at = now
    _record(session, event, now, customer.id)
    outcome = Outcome(Reaction(customer_id=customer.id))
    replies: list[str] = []
    text = event.text.strip()

    if event.kind in ("unsubscribe", "blocked"):
        customer.opted_out = True
        record_consent(session, customer.id, event.channel, False, "unsubscribed", now, detail=event.kind)
    elif event.kind == "subscribe":
        customer.opted_out = False
        record_consent(session, customer.id, event.channel, True, "subscribed", now, detail=event.source)
        if event.source and not created:
            customer.attributes = {**customer.attributes, "last_source": event.source}
    elif event.kind == "contact_removed":
        customer.stage, customer.opted_out = "lost", True
    elif event.kind == "contact_shared" and isinstance(event.payload.get("phone"), str):
        if await capture_phone(session, customer, event.payload["phone"], service.keyring, event.channel, now):
            customer = await merge_by_verified_phone(session, customer, f"verified-phone:{event.channel}", now)
    elif event.kind in ("group_joined", "group_left") and isinstance(event.payload.get("group_id"), (str, int)):
        group = await groups.upsert_group(session, event.channel, event.account, str(event.payload["group_id"]), now,
                                          title=event.payload.get("group_title"))
        await groups.set_member(session, group, customer.id, event.kind == "group_joined", now)
    elif event.kind in MESSAGE_KINDS and text:
        replies += await _customer_text(service, session, customer, event, text, now, outcome)

    if created:
        outcome.planned += await _trigger(service, session, customer, event, now, "first_message")
    for reply in replies:
        _reply(session, event, now, reply, customer.id)
    outcome.reaction = Reaction(replies=tuple(replies), customer_id=customer.id)
    return outcome


async def _customer_text(service: Service, session: AsyncSession, customer: Customer, event: InboundEvent,
                         text: str, now: datetime, outcome: Outcome) -> list[str]:
    """Customer commands (opt out, redeem, staff-only refusal) or, for ordinary text, keyword tags."""
    if commands.is_opt_out(text):
        customer.opted_out = True
        record_consent(session, customer.id, event.channel, False, "opt_out", now, detail=text[:32])
        return [commands.OPT_OUT_REPLY]
    if is_opt_in(text):
        customer.opted_out = False
        record_consent(session, customer.id, event.channel, True, "message", now, detail=text[:32])
        return [OPT_IN_REPLY]
    if staff.parse(text):
        return [staff.REFUSAL_REPLY]
    if code := commands.redeem_code(text):
        result = await coupons.redeem(session, code, now, via="chat", customer_id=customer.id)
        if result.status == "redeemed":
            touchpoint(session, customer_id=customer.id, channel=event.channel, account=event.account,
                       direction="internal", kind="coupon_redeemed", now=now, payload={"code": result.code})
        return [result.reply]
    if (answers := await loyalty_commands.dispatch(service, session, customer, event, text, now)) is not None:
        return answers  # 签到, 积分, 积分兑换, /invite, survey answers (scrm.loyalty.commands)
    await _tag_keywords(service, session, customer, event, now, outcome)
    if any(c.definition.trigger.event == "keyword" for c in service.campaigns.values()):
        outcome.planned += await _trigger(service, session, customer, event, now, "keyword", words=set(tokenize(text)))
    return []


async def _tag_keywords(service: Service, session: AsyncSession, customer: Customer, event: InboundEvent,
                        now: datetime, outcome: Outcome) -> None:
    for hit in service.tagger.match(event.text):
        if await apply_hit(session, customer.id, hit, now):
            touchpoint(session, customer_id=customer.id, channel=event.channel, account=event.account,
                       direction="internal", kind="tag_added", now=now,
                       payload={"tag": hit.tag, "keyword": hit.keyword, "score": hit.score})
            outcome.planned += await _trigger(service, session, customer, event, now, "tag_added", hit.tag)


async def _trigger(service: Service, session: AsyncSession, customer: Customer, event: InboundEvent,
                   now: datetime, name: TriggerEvent, tag: str | None = None,
                   words: set[str] | None = None) -> list[str]:
    return await plan_event(
        session, list(service.campaigns.values()), service.paused, name,
        customer_id=customer.id, channel=event.channel, account=event.account,
        external_id=event.external_id, now=now, tag=tag, words=words,
    )
