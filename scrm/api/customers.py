"""``/customers``: the 360° view by reference or by a body (phone numbers stay out of URLs), tags."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.api import models as m
from scrm.api.framework import Call, Endpoint
from scrm.api.refs import REF_PARAM, by_path, resolve
from scrm.audit import audit
from scrm.profile import customer_view
from scrm.store.models import (
    Customer,
    CustomerTag,
    Tag,
)
from scrm.tagging import change_tags


async def get_customer(call: Call) -> m.CustomerView:
    async with call.service.sessions() as session, session.begin():
        return await _audited_view(call, session, await by_path(call, session))


async def lookup_customer(call: Call) -> m.CustomerView:
    async with call.service.sessions() as session, session.begin():
        return await _audited_view(call, session, await resolve(call, session, call.body))


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
        customer = await by_path(call, session)
        done = await change_tags(svc, session, customer, changes, call.actor, svc.clock.now())
        tags = (await session.scalars(select(Tag.name).join(CustomerTag, CustomerTag.tag_id == Tag.id)
                                      .where(CustomerTag.customer_id == customer.id).order_by(Tag.name))).all()
    if any(c.startswith("+") for c in done):
        svc.wake_outbox()  # a tag_added campaign may have been planned
    return m.TagsOut(customer_id=customer.id, changed=done, tags=list(tags))


ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", "/customers/{ref}", get_customer, "customers:read", "A customer's 360° view", m.CustomerView,
             params=REF_PARAM, errors=(404,)),
    Endpoint("POST", "/customers/lookup", lookup_customer, "customers:read",
             "Find a customer by identity, phone or id (keeps phone numbers out of URLs and logs)",
             m.CustomerView, body=m.CustomerRef, errors=(404,)),
    Endpoint("POST", "/customers/{ref}/tags", change_customer_tags, "customers:write", "Add and remove tags",
             m.TagsOut, body=m.TagsIn, params=REF_PARAM, errors=(404,)),
]
