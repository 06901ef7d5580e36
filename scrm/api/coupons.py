"""``/coupons``: each pool's counts, a supplier's codes imported into a pool, a code granted to a customer,
and redeeming a code at the till; through :mod:`scrm.coupons` as ``scrm coupons`` and the console."""

from __future__ import annotations

from sqlalchemy import select

from scrm import coupons
from scrm.api import models as m
from scrm.api.framework import ApiError, Call, Endpoint
from scrm.api.refs import iso, resolve
from scrm.config import CouponPool
from scrm.customers import touchpoint
from scrm.store.engine import reading, writing
from scrm.store.models import (
    CouponCode,
    Delivery,
)

_REDEEM_ERRORS = {"unknown": (404, "coupon_not_found"), "expired": (409, "coupon_expired"),
                  "used": (409, "coupon_used"), "not_yours": (409, "coupon_not_yours")}


_POOL = {"pool": "The pool's name in [coupons]"}


def _pool(call: Call) -> tuple[str, CouponPool]:
    name = call.params["pool"]
    pool = call.service.config.coupons.get(name)
    if pool is None:
        raise ApiError(404, "pool_not_found", f"no coupon pool {name[:64]!r} in the config")
    return name, pool


async def list_pools(call: Call) -> m.PoolList:
    svc = call.service
    async with reading(svc.sessions) as session:
        counted = await coupons.pool_counts(session, svc.config.coupons, svc.clock.now())
    return m.PoolList(pools=[m.PoolOut(name=p.name, value=p.value, issued=p.issued, redeemed=p.redeemed,
                                       expired=p.expired, free=p.free, configured=p.configured, generate=p.generate)
                             for p in counted])


async def import_codes(call: Call) -> tuple[int, m.ImportOut]:
    body: m.ImportIn = call.body
    svc = call.service
    name, pool = _pool(call)
    try:  # the checks of a supplier's file, code by code
        codes = coupons.parse_codes("\n".join(body.codes))
    except coupons.CodeFileError as exc:
        raise ApiError(422, "validation_error", f"body.codes: {exc}",
                       [{"field": "body.codes", "problem": str(exc)}]) from None
    expires_at = None
    if body.expires is not None:
        expires_at = coupons.expiry_of(body.expires, svc.config.service.timezone)
        if expires_at <= svc.clock.now():
            raise ApiError(422, "validation_error", f"body.expires: {body.expires} has passed",
                           [{"field": "body.expires", "problem": "has passed: the codes would be expired already"}])
    async with writing(svc.sessions) as session:
        result = await coupons.import_codes(session, name, pool, codes, expires_at)
    return 201, m.ImportOut(pool=result.pool, imported=result.imported, duplicates=result.duplicates)


async def grant_coupon(call: Call) -> tuple[int, m.GrantOut]:
    body: m.GrantIn = call.body
    svc = call.service
    name, pool = _pool(call)
    now = svc.clock.now()
    async with writing(svc.sessions) as session:
        customer = await resolve(call, session, body.customer)
        granted = await coupons.grant(session, name, pool, customer.id, now)
        if granted is None:
            raise ApiError(409, "coupon_limit", f"customer #{customer.id} holds the pool's limit of "
                                                f"{pool.per_customer} code(s), or the pool has no free code")
        touchpoint(session, customer_id=customer.id, actor=call.actor, channel="api", account=call.key_name,
                   direction="internal", kind="coupon_granted", now=now, payload={"code": granted.code, "pool": name})
    svc.touch({customer.id})
    return 201, m.GrantOut(pool=name, code=granted.code, customer_id=customer.id, value=pool.value,
                           expires_at=iso(granted.expires_at))


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
    Endpoint("GET", "/coupons", list_pools, "coupons:read",
             "Each pool's codes: issued, redeemed, expired and free", m.PoolList),
    Endpoint("POST", "/coupons/{pool}/codes", import_codes, "coupons:write", "Import a supplier's codes into a pool",
             m.ImportOut, body=m.ImportIn, status=201, params=_POOL, errors=(404,),
             description="Codes the store knows already are skipped (counted as duplicates); grants hand imported "
                         "codes out first, oldest first. A code that is not one (letters, digits and -, up to 32) "
                         "refuses the whole request, 422 naming body.codes."),
    Endpoint("POST", "/coupons/{pool}/grant", grant_coupon, "coupons:write", "Give a customer a code from a pool",
             m.GrantOut, body=m.GrantIn, status=201, params=_POOL, errors=(404, 409),
             description="Recorded as a coupon_granted touchpoint with the key's actor. 409 coupon_limit when the "
                         "customer holds the pool's per_customer limit (or an import-only pool is empty)."),
]
