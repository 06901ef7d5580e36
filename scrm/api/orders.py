"""``/orders``: an order from the shop or the till, recorded as a conversion and attributed."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError

from scrm import orders
from scrm.api import models as m
from scrm.api.framework import Call, Endpoint
from scrm.api.refs import resolve


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
                customer = await resolve(call, session, body.customer)
                result = await orders.record_order(session, customer, order, svc.clock.now(), "api", call.key_name)
            svc.touch({customer.id})
            return 201, m.OrderOut.model_validate(result)
        except IntegrityError:
            # The same order id posted concurrently: the other request won; answer with its result.
            if attempt:
                raise
    raise AssertionError("unreachable")


ENDPOINTS: list[Endpoint] = [
    Endpoint("POST", "/orders", record_order, "conversions:write", "Record an order (a conversion)", m.OrderOut,
             body=m.OrderIn, status=201, errors=(404,),
             description="Idempotent by order_id: a repeated id answers 200 with the first result and writes "
                         "nothing. A coupon code on the order is redeemed with it and credits its campaign."),
]
