"""The ``/api/v1`` endpoints: orders, coupon redemption at the till, the 360° view, tags, campaigns,
staff replies and the conversations inbox."""

from __future__ import annotations

from typing import Any, get_args

from sqlalchemy import distinct, func, literal_column, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import coupons, orders
from scrm.api import models as m
from scrm.acquisition import links
from scrm.api.framework import ApiError, Call, Endpoint
from scrm.audit import audit
from scrm.campaigns.definitions import TriggerEvent
from scrm.campaigns.planner import plan_many
from scrm.conversations import threads
from scrm.customers import (
    BadCustomerRef,
    CustomerRefError,
    customer_of,
    find_by_ref,
    identity_ref,
    parse_ref,
    phone_ref,
    touchpoint,
)
from scrm.messages import storable
from scrm.profile import customer_view
from scrm.store.models import (
    STAFF_REPLY,
    Campaign,
    Conversion,
    CouponCode,
    Customer,
    CustomerTag,
    Delivery,
    Tag,
    Touchpoint,
)
from scrm.tagging import change_tags

_REF_PARAM = {"ref": "The store id (``42`` or ``#42``) or a channel identity (``wechat:oAbC123``, or "
                        "``wechat:brand:oAbC123`` naming the account), URL-encoded."}


async def _resolve(call: Call, session: AsyncSession, ref: m.CustomerRef, field: str = "customer") -> Customer:
    """The customer a body's ``customer`` names, looked up like every other customer reference."""
    channels = call.service.config.channels
    try:
        if ref.id is not None:
            wanted = parse_ref(str(ref.id), channels)
        elif ref.phone is not None:
            wanted = phone_ref(ref.phone)
        else:
            assert ref.channel is not None and ref.external_id is not None
            wanted = identity_ref(ref.channel, ref.external_id, ref.account, channels)
    except BadCustomerRef as exc:
        where = f"body.{field}" + (".phone" if ref.phone is not None else "")
        raise ApiError(422, "validation_error", f"{where}: {exc}", [{"field": where, "problem": str(exc)}]) from None
    try:
        return await customer_of(session, wanted, call.service.keyring)
    except CustomerRefError as exc:
        raise ApiError(404, "customer_not_found", f"body.{field}: {exc}") from None


async def _by_path(call: Call, session: AsyncSession) -> Customer:
    try:
        return await find_by_ref(session, call.params["ref"], call.service.config.channels)
    except CustomerRefError as exc:
        raise ApiError(404, "customer_not_found", str(exc)) from None


async def record_order(call: Call) -> tuple[int, m.OrderOut]:
    body: m.OrderIn = call.body
    svc = call.service
    order = orders.Order(body.order_id, body.amount, body.currency, body.coupon_code,
                         tuple(i.model_dump() for i in body.items))
    for attempt in range(2):
        try:
            async with svc.sessions() as session, session.begin():
                if (first := await orders.existing_result(session, body.order_id)) is not None:
                    return 200, m.OrderOut.model_validate(first)
                customer = await _resolve(call, session, body.customer)
                result = await orders.record_order(session, customer, order, svc.clock.now(), "api", call.key_name)
            svc.touch({customer.id})
            return 201, m.OrderOut.model_validate(result)
        except IntegrityError:
            # The same order id posted concurrently: the other request won; answer with its result.
            if attempt:
                raise
    raise AssertionError("unreachable")


_REDEEM_ERRORS = {"unknown": (404, "coupon_not_found"), "expired": (409, "coupon_expired"),
                  "used": (409, "coupon_used"), "not_yours": (409, "coupon_not_yours")}


async def redeem_coupon(call: Call) -> m.RedeemOut:
    body: m.RedeemIn = call.body
    svc = call.service
    async with svc.sessions() as session, session.begin():
        owner = await _resolve(call, session, body.customer) if body.customer else None
        now = svc.clock.now()
        outcome = await coupons.redeem_at_till(session, body.code, now, via="api", account=call.key_name,
                                               actor=call.actor, customer_id=owner.id if owner else None)
        if outcome.status != "redeemed":
            status, code = _REDEEM_ERRORS[outcome.status]
            raise ApiError(status, code, f"coupon {outcome.code}: {outcome.status.replace('_', ' ')}")
        assert outcome.customer_id is not None
        campaign = await session.scalar(select(Delivery.campaign).join(CouponCode, CouponCode.delivery_id == Delivery.id)
                                        .where(CouponCode.code == outcome.code))
    svc.touch({outcome.customer_id})
    return m.RedeemOut(status="redeemed", code=outcome.code, customer_id=outcome.customer_id, value=outcome.value,
                       campaign=campaign)


async def get_customer(call: Call) -> m.CustomerView:
    async with call.service.sessions() as session, session.begin():
        return await _audited_view(call, session, await _by_path(call, session))


async def lookup_customer(call: Call) -> m.CustomerView:
    async with call.service.sessions() as session, session.begin():
        return await _audited_view(call, session, await _resolve(call, session, call.body))


async def _audited_view(call: Call, session: AsyncSession, customer: Customer) -> m.CustomerView:
    """Every API read of a customer's 360° view is in the audit log, with the key that read it."""
    await audit(session, call.actor, None, customer.id, "view", "api 360° view", via=call.actor,
                at=call.service.clock.now())
    return m.CustomerView.model_validate(await customer_view(session, customer))


async def change_customer_tags(call: Call) -> m.TagsOut:
    body: m.TagsIn = call.body
    svc = call.service
    changes = [(True, t) for t in body.add] + [(False, t) for t in body.remove]
    async with svc.sessions() as session, session.begin():
        customer = await _by_path(call, session)
        done = await change_tags(svc, session, customer, changes, call.actor, svc.clock.now())
        tags = (await session.scalars(select(Tag.name).join(CustomerTag, CustomerTag.tag_id == Tag.id)
                                      .where(CustomerTag.customer_id == customer.id).order_by(Tag.name))).all()
    if any(c.startswith("+") for c in done):
        svc.wake_outbox()  # a tag_added campaign may have been planned
    return m.TagsOut(customer_id=customer.id, changed=done, tags=list(tags))


def _triggerable(definition: Any) -> bool:
    """Campaigns started by one customer's event (not cron/date runs, not group campaigns)."""
    trigger = definition.trigger
    audience = getattr(definition, "audience", None)
    return trigger.event in get_args(TriggerEvent) and not getattr(audience, "groups", False)


async def trigger_campaign(call: Call) -> tuple[int, m.TriggerOut]:
    body: m.TriggerIn = call.body
    svc = call.service
    name = call.params["name"]
    loaded = svc.campaigns.get(name)
    if loaded is None:
        raise ApiError(404, "campaign_not_found", f"no campaign {name[:64]!r}")
    d = loaded.definition
    if not _triggerable(d):
        raise ApiError(409, "campaign_not_triggerable", f"campaign {name!r} is not started by a customer event")
    async with svc.sessions() as session, session.begin():
        if await session.scalar(select(Campaign.paused).where(Campaign.name == name)):
            raise ApiError(409, "campaign_paused", f"campaign {name!r} is paused")
        customer = await _resolve(call, session, body.customer)
        now = svc.clock.now()
        where = Customer.id == customer.id
        segment = getattr(getattr(d, "audience", None), "segment", None)
        if segment:
            from scrm.segments import condition

            where = where & condition(svc.config.segments[segment], now, svc.config.segments)
        planned = await plan_many(session, name, 0, where, now + d.delay, now,
                                  channels=getattr(d, "channels", None) or None)
        due = await session.scalar(select(Delivery.due_at).where(
            Delivery.campaign == name, Delivery.step == 0, Delivery.target == f"c{customer.id}"))
        if due is None:
            reason = f"not in the campaign's segment {segment!r}" if segment else "has no identity to reach"
            raise ApiError(409, "customer_not_reachable", f"customer #{customer.id} {reason}")
        if planned:
            touchpoint(session, customer_id=customer.id, actor=call.actor, channel="api", account=call.key_name,
                       direction="internal", kind="campaign_triggered", now=now, campaign=name)
    if planned:
        svc.wake_outbox()
    return (201 if planned else 200), m.TriggerOut(campaign=name, customer_id=customer.id, planned=bool(planned),
                                                   due_at=due.isoformat(timespec="seconds"))


async def funnels(session: AsyncSession) -> dict[str, m.Funnel]:
    """Per campaign: deliveries by status, customers who clicked its links, coupons granted/redeemed through
    them, attributed conversions.

    Plain aggregate SQL over the outbox, the clicks (their own index) and conversions (four grouped queries,
    whatever the base size).
    """
    out: dict[str, dict[str, Any]] = {}
    for campaign, status, n in (await session.execute(
            select(Delivery.campaign, Delivery.status, func.count()).where(Delivery.campaign != STAFF_REPLY)
            .group_by(Delivery.campaign, Delivery.status))):
        if status in m.Funnel.model_fields:
            out.setdefault(campaign, {})[status] = n
    for campaign, granted, redeemed in (await session.execute(
            select(Delivery.campaign, func.count(CouponCode.id), func.count(CouponCode.redeemed_at))
            .join(CouponCode, CouponCode.delivery_id == Delivery.id).group_by(Delivery.campaign))):
        out.setdefault(campaign, {}).update(coupons_granted=granted, coupons_redeemed=redeemed)
    for clicked, people in (await session.execute(
            select(Touchpoint.campaign, func.count(distinct(Touchpoint.customer_id)))
            # The kind written out, not bound: the partial index on clicks applies only to the literal.
            .where(Touchpoint.kind == literal_column(f"'{links.CLICK}'"), Touchpoint.campaign.is_not(None))
            .group_by(Touchpoint.campaign))):
        assert clicked is not None  # the query excludes clicks without a campaign
        out.setdefault(clicked, {})["clicked_customers"] = people
    for credited, n, people, revenue in (await session.execute(
            select(Conversion.campaign, func.count(), func.count(distinct(Conversion.customer_id)),
                   func.coalesce(func.sum(Conversion.amount), 0))
            .where(Conversion.campaign.is_not(None)).group_by(Conversion.campaign))):
        assert credited is not None  # the query excludes conversions without a campaign
        out.setdefault(credited, {}).update(conversions=n, converted_customers=people, revenue=float(revenue))
    return {name: m.Funnel(**values) for name, values in out.items()}


async def list_campaigns(call: Call) -> m.CampaignList:
    svc = call.service
    async with svc.sessions() as session:
        paused = set((await session.scalars(select(Campaign.name).where(Campaign.paused))).all())
        numbers = await funnels(session)
    items = []
    for name, loaded in sorted(svc.campaigns.items()):
        d, t = loaded.definition, loaded.definition.trigger
        items.append(m.CampaignOut(
            name=name, title=d.title, kind=d.kind, paused=name in paused, triggerable=_triggerable(d),
            trigger=m.TriggerInfo(event=t.event, tag=t.tag, stage=t.stage, cron=getattr(t, "cron", None),
                                  delay=t.delay),
            funnel=numbers.get(name, m.Funnel())))
    return m.CampaignList(campaigns=items)


def _iso(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


async def send_message(call: Call) -> tuple[int, m.MessageOut]:
    """A staff reply through the conversation core: the same rules as chat's /reply and the console."""
    body: m.MessageIn = call.body
    svc = call.service
    async with svc.sessions() as session, session.begin():
        customer = await _by_path(call, session)
        try:
            done = await threads.reply(svc, session, customer, storable(body.text), call.actor, svc.clock.now(),
                                       channel=body.channel, as_notice=body.as_notice)
        except threads.ConversationError as exc:
            raise ApiError(exc.status, exc.code, str(exc)) from None
    svc.wake_outbox()
    return 202, m.MessageOut(conversation=done.conversation_id, delivery=done.delivery_id, channel=done.channel,
                             as_notice=done.as_notice)


async def resolve_conversation(call: Call) -> m.ResolvedOut:
    svc = call.service
    async with svc.sessions() as session, session.begin():
        customer = await _by_path(call, session)
        try:
            conv = await threads.resolve(session, customer, call.actor, svc.clock.now())
        except threads.ConversationError as exc:
            raise ApiError(exc.status, exc.code, str(exc)) from None
        out = m.ResolvedOut(conversation=conv.id, customer_id=customer.id, channel=conv.channel, state="resolved")
    svc.wake_outbox()  # marketing deferred while a person had the customer goes out now
    return out


async def list_conversations(call: Call) -> m.ConversationList:
    async with call.service.sessions() as session:
        rows = await threads.inbox(session, limit=100)
        counts = await threads.counts(session)
    return m.ConversationList(open=counts["open"], pending=counts["pending"], conversations=[
        m.ConversationOut(id=r.conversation_id, customer_id=r.customer_id, name=r.name, channel=r.channel,
                          account=r.account, state=r.state, assignee=r.assignee, handled=r.handled,
                          waiting_since=_iso(r.waiting_since), last_customer_at=_iso(r.last_customer_at),
                          last_text=r.last_text) for r in rows])


ENDPOINTS: list[Endpoint] = [
    Endpoint("POST", "/orders", record_order, "conversions:write", "Record an order (a conversion)", m.OrderOut,
             body=m.OrderIn, status=201, errors=(404,),
             description="Idempotent by order_id: a repeated id answers 200 with the first result and writes "
                         "nothing. A coupon code on the order is redeemed with it and credits its campaign."),
    Endpoint("POST", "/coupons/redeem", redeem_coupon, "coupons:redeem", "Redeem a coupon at the till",
             m.RedeemOut, body=m.RedeemIn, errors=(404, 409)),
    Endpoint("GET", "/customers/{ref}", get_customer, "customers:read", "A customer's 360° view", m.CustomerView,
             params=_REF_PARAM, errors=(404,)),
    Endpoint("POST", "/customers/lookup", lookup_customer, "customers:read",
             "Find a customer by identity, phone or id (keeps phone numbers out of URLs and logs)",
             m.CustomerView, body=m.CustomerRef, errors=(404,)),
    Endpoint("POST", "/customers/{ref}/tags", change_customer_tags, "customers:write", "Add and remove tags",
             m.TagsOut, body=m.TagsIn, params=_REF_PARAM, errors=(404,)),
    Endpoint("GET", "/campaigns", list_campaigns, "campaigns:read", "Campaigns with their funnel numbers",
             m.CampaignList),
    Endpoint("POST", "/campaigns/{name}/trigger", trigger_campaign, "campaigns:trigger",
             "Start an event-triggered campaign for one customer", m.TriggerOut, body=m.TriggerIn, status=201,
             params={"name": "The campaign's name (its file's name = \"...\")"}, errors=(404, 409),
             description="Plans the campaign's first step like its own trigger would; 200 with planned=false "
                         "when the customer already had it (each campaign reaches a customer once)."),
    Endpoint("POST", "/customers/{ref}/messages", send_message, "messages:write",
             "Reply to the customer in their conversation (as the key's actor)", m.MessageOut, body=m.MessageIn,
             status=202, params=_REF_PARAM, errors=(400, 404, 409),
             description="Queued in the outbox and sent in order with other staff replies; recorded as a "
                         "staff_reply touchpoint with actor api:<key>. Refused, writing nothing: an empty reply "
                         "(400 empty_reply), over 2000 characters (413 reply_too_long), no conversation or a "
                         "resolved one (409 no_conversation, conversation_resolved), outside the channel's reply "
                         "window (409 outside_window; send as_notice when [conversations.notice] is configured)."),
    Endpoint("POST", "/customers/{ref}/conversation/resolve", resolve_conversation, "messages:write",
             "Resolve the customer's open conversation", m.ResolvedOut, params=_REF_PARAM, errors=(404, 409),
             description="The unresolved conversation the customer wrote in last; auto-replies and paused "
                         "marketing resume at once. 409 when there is none to resolve."),
    Endpoint("GET", "/conversations", list_conversations, "conversations:read",
             "Unresolved conversations, the longest waiting first", m.ConversationList,
             description="At most 100: those waiting for staff by waiting time, then those waiting for the "
                         "customer; with the counts of both."),
]
