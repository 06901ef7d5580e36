"""Coupons: each pool's issued, redeemed, expired and free codes; a supplier's file of codes uploaded
into a pool; a code redeemed at the till. Managers read; the two forms are the operators'.

The same core functions as ``scrm coupons list|import|redeem`` and the API's redemption: the file is
read by :func:`scrm.coupons.parse_codes` (one code per line or the first CSV column, refused whole
when a line is not a code), and the till's answer is :attr:`scrm.coupons.RedeemOutcome.reply`, the
words ``scrm coupons redeem`` prints. An upload is bounded by ``service.max_body_bytes`` (1 MiB, some
80,000 codes); larger files go through ``scrm coupons import``.
"""

from __future__ import annotations

from datetime import date
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from scrm import coupons
from scrm.console.app import Pages, service, staff
from scrm.store.engine import reading, writing

pages = Pages()
#: The longest text the till's box sends to the store (``coupon_codes.code``).
MAX_CODE = 64


async def _page(request: web.Request, status: int = 200, **context: Any) -> web.Response:
    svc = service(request)
    async with reading(svc.sessions) as session:
        pools = await coupons.pool_counts(session, svc.config.coupons, svc.clock.now())
    values: dict[str, Any] = {"pools": pools, "errors": {}, "imported": None, "redeemed": None, "form": {},
                              "configured": sorted(svc.config.coupons), "max_bytes": svc.config.service.max_body_bytes,
                              "may_write": staff(request).may("operator"), **context}
    return aiohttp_jinja2.render_template("coupons.html", request, values, status=status)


@pages.get("/coupons", "manager")
async def coupons_page(request: web.Request) -> web.StreamResponse:
    return await _page(request)


@pages.post("/coupons/import", "operator")
async def import_codes(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    form = await request.post()
    pool, expires, upload = str(form.get("pool", "")), str(form.get("expires", "")).strip(), form.get("file")
    shown = {"pool": pool, "expires": expires}
    errors: dict[str, str] = {}
    if pool not in svc.config.coupons:
        errors["pool"] = f"No coupon pool {pool[:64]!r} in the config (known: {', '.join(sorted(svc.config.coupons))})"
    expires_at = None
    if expires:
        try:
            day = date.fromisoformat(expires)
        except ValueError:
            errors["expires"] = f"Not a date: {expires[:40]!r} (YYYY-MM-DD)"
        else:
            expires_at = coupons.expiry_of(day, svc.config.service.timezone)
            if expires_at <= svc.clock.now():
                errors["expires"] = f"{day} has passed: the codes would be expired already"
    codes: list[str] = []
    if not isinstance(upload, web.FileField) or not upload.filename:
        errors["file"] = "Choose a file of codes (one per line, or a CSV whose first column is the code)."
    else:
        try:
            codes = coupons.parse_codes(upload.file.read())
        except coupons.CodeFileError as exc:
            errors["file"] = f"{upload.filename}: {exc}"
    if errors:
        return await _page(request, 400, errors=errors, form=shown)
    async with writing(svc.sessions) as session:
        result = await coupons.import_codes(session, pool, svc.config.coupons[pool], codes, expires_at)
    return await _page(request, imported=result, form={"pool": pool})


@pages.post("/coupons/redeem", "operator")
async def redeem(request: web.Request) -> web.StreamResponse:
    """Redeem a code at the till: any customer's valid code, recorded as the signed-in staff member's."""
    svc = service(request)
    form = await request.post()
    code = str(form.get("code", "")).strip()
    if not code:
        return await _page(request, 400, errors={"code": "Enter the code the customer shows."})
    if len(code) > MAX_CODE:
        return await _page(request, 400, errors={"code": f"A code has at most {MAX_CODE} characters."},
                           form={"code": code[:MAX_CODE]})
    async with writing(svc.sessions) as session:
        outcome = await coupons.redeem_at_till(session, code, svc.clock.now(), via="console",
                                               actor=staff(request).actor)
    if outcome.status != "redeemed":
        return await _page(request, 409, errors={"code": outcome.reply}, form={"code": code})
    assert outcome.customer_id is not None
    svc.touch({outcome.customer_id})
    return await _page(request, redeemed=outcome)
