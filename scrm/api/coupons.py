"""``/coupons``: redeeming a code at the till."""

from __future__ import annotations

from sqlalchemy import select

from scrm import coupons
from scrm.api import models as m
from scrm.api.framework import ApiError, Call, Endpoint
from scrm.api.refs import resolve
from scrm.store.models import (
    CouponCode,
    Delivery,
)

_REDEEM_ERRORS = {"unknown": (404, "coupon_not_found"), "expired": (409, "coupon_expired"),
                  "used": (409, "coupon_used"), "not_yours": (409, "coupon_not_yours")}


async def redeem_coupon(call: Call) -> m.RedeemOut:
    body: m.RedeemIn = call.body
    svc = call.service
    async with svc.sessions() as session, session.begin():
        owner = await resolve(call, session, body.customer) if body.customer else None
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


ENDPOINTS: list[Endpoint] = [
    Endpoint("POST", "/coupons/redeem", redeem_coupon, "coupons:redeem", "Redeem a coupon at the till",
             m.RedeemOut, body=m.RedeemIn, errors=(404, 409)),
]
