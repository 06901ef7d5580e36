"""``/codes``: channel codes (渠道活码) made, listed, withdrawn and drawn, through :mod:`scrm.acquisition` as
``scrm codes`` and the console (their figures over a period: ``/reports/codes``)."""

from __future__ import annotations

from datetime import timedelta

from scrm.acquisition import codes, figures, render
from scrm.api import models as m
from scrm.api.framework import ApiError, Binary, Call, Endpoint
from scrm.api.refs import iso
from scrm.store.engine import reading

_NAME = {"name": "The code's name"}


def _problem(exc: codes.CodeProblem) -> ApiError:
    """A code's problem as the API's error, naming the body's field it concerns."""
    code = {404: "code_not_found", 409: "code_exists", 502: "platform_refused"}.get(exc.status, "invalid_code")
    return ApiError(exc.status, code, f"{exc.field}: {exc.message}",
                    [{"field": f"body.{exc.field}", "problem": exc.message}] if exc.status == 400 else None)


def _out(view: codes.CodeView) -> m.CodeOut:
    return m.CodeOut(name=view.name, channel=view.channel, account=view.account, kind=view.kind, scene=view.scene,
                     url=view.url, state=view.state, staff=view.staff, tags=view.tags, welcome=view.welcome,
                     campaign=view.campaign, coupon=view.coupon, cost=view.cost, expires_at=iso(view.expires_at),
                     disabled_at=iso(view.disabled_at), created_at=view.created_at.isoformat(timespec="seconds"),
                     created_by=view.created_by)


def code_figures(f: figures.CodeFigures) -> m.CodeFigures:
    return m.CodeFigures(
        name=f.name, channel=f.channel, state=f.state, cost=f.cost, scans=f.scans, new_customers=f.new_customers,
        reengaged=f.reengaged, unfollowed_7d=f.unfollowed_7d, first_messages=f.first_messages, converted=f.converted,
        conversions=f.conversions, revenue=round(f.revenue, 2), last_touch_conversions=f.last_touch_conversions,
        last_touch_revenue=round(f.last_touch_revenue, 2), cost_per_new=f.cost_per_new,
        cost_per_converted=f.cost_per_converted,
        days=[m.CodeDay(day=d.day.isoformat(), scans=d.scans, new_customers=d.new_customers) for d in f.days])


async def list_codes(call: Call) -> m.CodeList:
    svc = call.service
    async with reading(svc.sessions) as session:
        return m.CodeList(codes=[_out(v) for v in await codes.listing(session, svc.clock.now())])


async def create_code(call: Call) -> tuple[int, m.CodeOut]:
    body: m.CodeIn = call.body
    try:
        spec = codes.CodeSpec(body.name, body.channel, body.permanent,
                              codes.parse_lifetime(body.expires) if body.expires is not None else None,
                              tuple(body.staff), tuple(body.groups), tuple(body.tags), body.welcome, body.campaign,
                              body.coupon, body.cost)
        view = await codes.create(call.service, spec, call.actor)
    except codes.CodeProblem as exc:
        raise _problem(exc) from None
    return 201, _out(view)


async def get_code(call: Call) -> m.CodeDetail:
    svc = call.service
    now = svc.clock.now()
    async with reading(svc.sessions) as session:
        try:
            view = codes.CodeView.of(await codes.find(session, call.params["name"]), now)
        except codes.CodeProblem as exc:
            raise _problem(exc) from None
        found = await figures.code_figures(session, view.created_at - timedelta(seconds=1), now,
                                           svc.config.service.timezone, now)
    mine = next((f for f in found if f.name == view.name), None)
    return m.CodeDetail(**_out(view).model_dump(), figures=code_figures(mine) if mine else None)


async def change_code(call: Call) -> m.CodeOut:
    body: m.CodeChangeIn = call.body
    given = body.model_fields_set
    cleared = frozenset(f for f in codes.CLEARABLE if f in given and getattr(body, f) is None)
    wanted = codes.CodeChange(
        staff=tuple(body.staff) if body.staff is not None else None,
        groups=tuple(body.groups) if body.groups is not None else None,
        tags=tuple(body.tags) if body.tags is not None else None,
        welcome=body.welcome, campaign=body.campaign, coupon=body.coupon, cost=body.cost, clear=cleared)
    try:
        return _out(await codes.change(call.service, call.params["name"], wanted, call.actor))
    except codes.CodeProblem as exc:
        if exc.status == 409:  # the one conflict a change has
            raise ApiError(409, "code_disabled", f"{exc.field}: {exc.message}") from None
        raise _problem(exc) from None


async def disable_code(call: Call) -> m.CodeOut:
    try:
        return _out(await codes.disable(call.service, call.params["name"], call.actor))
    except codes.CodeProblem as exc:
        raise _problem(exc) from None


async def code_image(call: Call) -> Binary:
    query: m.CodeImageQuery = call.query
    async with reading(call.service.sessions) as session:
        try:
            url = (await codes.find(session, call.params["name"])).url
        except codes.CodeProblem as exc:
            raise _problem(exc) from None
    return Binary(render.image(url, query.format, poster=query.poster), render.CONTENT_TYPES[query.format])


ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", "/codes", list_codes, "codes:read", "Channel codes, the newest first", m.CodeList),
    Endpoint("POST", "/codes", create_code, "codes:write", "Make a channel code on its platform", m.CodeOut,
             body=m.CodeIn, status=201, errors=(400, 409, 502),
             description="A WeChat parametric QR code, a WeCom contact-me or group join way, or a Telegram deep "
                         "link, with what it does for everyone who comes through it. A malformed body is 422; a "
                         "value the configuration does not allow (an unknown account, campaign or coupon pool, a "
                         "WeChat code with staff) 400 invalid_code naming its field (body.<field>); a name in use "
                         "409 code_exists; the platform's refusal (quota, a staff member who left) 502 "
                         "platform_refused. Nothing is kept then."),
    Endpoint("GET", "/codes/{name}", get_code, "codes:read", "A channel code and its figures since it was made",
             m.CodeDetail, params=_NAME, errors=(404,)),
    Endpoint("PATCH", "/codes/{name}", change_code, "codes:write", "Change what a channel code does", m.CodeOut,
             body=m.CodeChangeIn, params=_NAME, errors=(400, 404, 409, 502),
             description="As `scrm codes update`: tags, welcome, campaign, coupon and cost (null clears the last "
                         "four), and a WeCom code's staff members or group chats, changed on the platform first "
                         "(502 platform_refused when it refuses). A disabled code is 409 code_disabled."),
    Endpoint("DELETE", "/codes/{name}", disable_code, "codes:write", "Disable a channel code", m.CodeOut,
             params=_NAME, errors=(404, 502),
             description="Withdrawn on the platform where it can be (WeCom deletes its contact way) and no longer "
                         "honoured; its figures stay. Disabling a disabled code answers it as it is."),
    Endpoint("GET", "/codes/{name}/image", code_image, "codes:read", "A channel code as PNG or SVG", None,
             params=_NAME, query=m.CodeImageQuery, errors=(404,), binary=tuple(render.CONTENT_TYPES.values())),
]
