"""``/customers``: pages of customers by search and filters, the 360° view by reference or by a body
(phone numbers stay out of URLs), a customer's touchpoints and messages by page, tags.

Customers are found by :mod:`scrm.customer_search`, as the console's list finds them, and a customer's
touchpoints read by :func:`scrm.profile.touchpoint_page`, as the console's thread reads them: pages by
id, never OFFSET. Every read of customers' data is in the audit log with the key that read it (a page
of the list as one entry naming the ids it showed).
"""

from __future__ import annotations

from datetime import UTC

from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import segments
from scrm.api import models as m
from scrm.api.framework import ApiError, Call, Endpoint
from scrm.api.refs import REF_PARAM, by_path, resolve
from scrm.audit import audit
from scrm.customer_search import ONE, result_page, search
from scrm.profile import customer_view, touchpoint_page
from scrm.store.engine import reading, writing
from scrm.store.models import (
    Customer,
    CustomerTag,
    Tag,
)
from scrm.tagging import change_tags


def _filters(call: Call, query: m.CustomerListQuery) -> list[ColumnElement[bool]]:
    """The query's filters as conditions, each through the segment language as the console's box reads them."""
    configured, now = call.service.config.segments, call.service.clock.now()
    out: list[ColumnElement[bool]] = []
    for field, text in (("segment", f"segment({query.segment!r})" if query.segment in configured else query.segment),
                        ("tag", query.tag and f"tag({query.tag!r})"),
                        ("stage", query.stage and f"stage == {query.stage!r}"),
                        ("channel", query.channel and f"channel == {query.channel!r}")):
        if text:
            try:
                out.append(segments.typed(text, now, configured))
            except segments.ExpressionError as exc:
                raise ApiError(422, "validation_error", f"query.{field}: {exc}",
                               [{"field": f"query.{field}", "problem": str(exc)}]) from None
    if query.updated_since is not None:
        since = query.updated_since
        if since.tzinfo is not None:
            since = since.astimezone(UTC).replace(tzinfo=None)
        out.append(Customer.last_seen_at >= since)
    return out


async def list_customers(call: Call) -> m.CustomerPage:
    query: m.CustomerListQuery = call.query
    svc = call.service
    conditions = _filters(call, query)
    async with reading(svc.sessions) as session:
        found = await search(session, svc, query.q or "", svc.clock.now())
        if found.error:
            raise ApiError(422, "validation_error", f"query.q: {found.error}",
                           [{"field": "query.q", "problem": found.error}])
        if found.nobody:  # a reference that names no one: an empty page
            return m.CustomerPage(customers=[], next_cursor=None)
        page = await result_page(session, and_(found.where, *conditions), query.limit,
                                 int(query.cursor) if query.cursor else None, None, "UTC",
                                 scan=found.kind not in ONE)
    rows = page.rows
    if rows:
        async with writing(svc.sessions) as session:
            await audit(session, call.actor, None, None, "view",
                        f"api customers page: {len(rows)} customers, #{rows[0].id}..#{rows[-1].id}",
                        via=call.actor, at=svc.clock.now())
    next_cursor = page.stopped_at if page.stopped_at is not None else rows[-1].id if page.more else None
    return m.CustomerPage(customers=[
        m.CustomerRow(id=r.id, display_name=r.name, stage=r.stage, opted_out=r.opted_out,
                      last_seen_at=r.last_seen_at.isoformat(timespec="seconds"), identities=r.identities, tags=r.tags)
        for r in rows], next_cursor=str(next_cursor) if next_cursor else None, partial=page.stopped_at is not None)


async def _touchpoints(call: Call, messages_only: bool) -> m.TouchpointPage:
    query: m.PageQuery = call.query
    svc = call.service
    async with writing(svc.sessions) as session:
        customer = await by_path(call, session)
        rows, next_before = await touchpoint_page(session, customer.id, query.limit,
                                                  int(query.cursor) if query.cursor else None, messages_only)
        await audit(session, call.actor, None, customer.id, "view",
                    f"api {'messages' if messages_only else 'touchpoints'}, {len(rows)}", via=call.actor,
                    at=svc.clock.now())
    return m.TouchpointPage(customer_id=customer.id, next_cursor=str(next_before) if next_before else None,
                            touchpoints=[m.TouchpointOut(
                                id=t.id, at=t.created_at.isoformat(timespec="seconds"), direction=t.direction,
                                kind=t.kind, channel=t.channel, account=t.account, text=t.text, campaign=t.campaign,
                                actor=t.actor, payload=t.payload or {}) for t in rows])


async def customer_touchpoints(call: Call) -> m.TouchpointPage:
    return await _touchpoints(call, False)


async def customer_messages(call: Call) -> m.TouchpointPage:
    return await _touchpoints(call, True)


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
    Endpoint("GET", "/customers", list_customers, "customers:read", "Customers by search and filters, a page at a time",
             m.CustomerPage, query=m.CustomerListQuery,
             description="The newest first. Filters combine with and; q reads as the console's search box. Pages "
                         "go by next_cursor (ids, never offsets: every page costs the same). A filter few "
                         "customers match may answer a partial page (partial=true) when its time budget ran "
                         "out; next_cursor goes on from there. A reference in q that names no one is an empty "
                         "page; a malformed expression 422 naming query.q or query.segment. Each page is in "
                         "the audit log."),
    Endpoint("GET", "/customers/{ref}/touchpoints", customer_touchpoints, "customers:read",
             "A customer's touchpoints, the newest first, a page at a time", m.TouchpointPage, params=REF_PARAM,
             query=m.PageQuery, errors=(404,)),
    Endpoint("GET", "/customers/{ref}/messages", customer_messages, "customers:read",
             "A customer's messages (what they wrote and what was sent to them), a page at a time",
             m.TouchpointPage, params=REF_PARAM, query=m.PageQuery, errors=(404,)),
    Endpoint("GET", "/customers/{ref}", get_customer, "customers:read", "A customer's 360° view", m.CustomerView,
             params=REF_PARAM, errors=(404,)),
    Endpoint("POST", "/customers/lookup", lookup_customer, "customers:read",
             "Find a customer by identity, phone or id (keeps phone numbers out of URLs and logs)",
             m.CustomerView, body=m.CustomerRef, errors=(404,)),
    Endpoint("POST", "/customers/{ref}/tags", change_customer_tags, "customers:write", "Add and remove tags",
             m.TagsOut, body=m.TagsIn, params=REF_PARAM, errors=(404,)),
]
