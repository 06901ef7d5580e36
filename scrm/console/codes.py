"""Channel codes (渠道活码): every code with what it does and its figures for a period, the chart of new
customers per code, a code's page (figures per day, its URL, the QR image inline and to download), a new
code, changing what one does, and withdrawing one after a confirmation. Managers read; operators and
admins create, change and disable.

Every check and figure is the core's, as ``scrm codes`` calls it: :func:`scrm.acquisition.codes.create`
(which checks the spec first; a :class:`~scrm.acquisition.codes.CodeProblem` names the form's field, and
a platform's refusal is its 502), :func:`~scrm.acquisition.codes.change` (as ``scrm codes update`` and
``PATCH /api/v1/codes/{name}``: a disabled code is its 409), :func:`~scrm.acquisition.codes.listing`,
:func:`~scrm.acquisition.codes.disable`, :func:`scrm.acquisition.figures.code_figures` and
:func:`~scrm.acquisition.figures.chart_png`, :func:`scrm.acquisition.render.image`.

The figures join scans with every conversion of the period (last touch), so like the dashboard's they
are a snapshot (:mod:`scrm.snapshots`) per period, shown with the time they were read; the codes
themselves (state, what they do) are read on every view, so a code made a moment ago is listed at once.
The form sits on the list page and posts to it: a code may be named anything a scene may hold (``new``
included), so no path under ``/codes/`` is free for a form of its own. Likewise a code's edit form sits on
its page and posts to it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from scrm import charts
from scrm.acquisition import codes, figures, render
from scrm.acquisition.codes import CLEARABLE, CodeChange, CodeProblem, CodeSpec, CodeView
from scrm.acquisition.figures import CodeFigures
from scrm.channels import Channel
from scrm.console.app import Pages, error_page, service, snapshots, staff
from scrm.console.dashboard import KEPT_WARM, PERIOD_HINT, chosen_period, period_now
from scrm.service import Service
from scrm.snapshots import Snapshot
from scrm.store.engine import reading

pages = Pages()
#: What the form's comma-separated boxes split on (a Chinese keyboard's commas too).
LIST_SEPARATORS = re.compile(r"[,，、]")
#: A code's images by their path under its page: (format, poster size, the downloaded file's suffix).
IMAGES: dict[str, tuple[render.Format, bool, str]] = {
    "qr.png": ("png", False, ".png"), "qr.svg": ("svg", False, ".svg"), "poster.png": ("png", True, "-poster.png")}
#: The form's boxes, as the page sends them back when something was wrong.
FIELDS = ("name", "channel", "permanent", "expires", "staff", "groups", "tags", "welcome", "campaign", "coupon", "cost")
#: A code's edit form: what :class:`~scrm.acquisition.codes.CodeChange` may change (staff or groups: a WeCom
#: contact-me or group join way's only).
CHANGE_FIELDS = ("staff", "groups", "tags", "welcome", "campaign", "coupon", "cost")
#: Which of the members boxes a code's kind has on its edit form.
MEMBERS = {"contact_way": "staff", "join_way": "groups"}


def _figures(svc: Service, arg: str) -> Callable[[], Awaitable[dict[str, CodeFigures]]]:
    async def read() -> dict[str, CodeFigures]:
        period, now = period_now(svc, arg), svc.clock.now()
        async with reading(svc.sessions) as session:
            found = await figures.code_figures(session, period.since, period.until, svc.config.service.timezone, now)
        return {f.name: f for f in found}

    return read


async def _period_figures(request: web.Request) -> tuple[str, str | None, Snapshot[dict[str, CodeFigures]]]:
    """The asked period, what was wrong with it, and every code's figures for it (a snapshot)."""
    svc = service(request)
    arg, _period, error = chosen_period(request)
    snapshot = await snapshots(request).get(("codes", arg), _figures(svc, arg), warm=arg in KEPT_WARM)
    return arg, error, snapshot


def _days(svc: Service, arg: str) -> int:
    """The period's length in whole days, for the chart's title."""
    return max(1, round(period_now(svc, arg).length / timedelta(days=1)))


def _channels(svc: Service) -> list[str]:
    """The configured ``type:account`` pairs whose channel makes codes (the console's own does not)."""
    return [f"{kind}:{account}" for (kind, account), channel in sorted(svc.channels.items())
            if type(channel).create_code is not Channel.create_code]


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in LIST_SEPARATORS.split(value) if part.strip())


def _spec(form: dict[str, str]) -> CodeSpec:
    """The form as a code's spec; a lifetime or a cost that is not one is a problem at its field."""
    try:
        cost = float(form["cost"]) if form["cost"] else None
    except ValueError:
        raise CodeProblem("cost", "an amount, e.g. 500 or 99.5") from None
    permanent = form["permanent"] == "on"
    return CodeSpec(
        form["name"], form["channel"], permanent,
        codes.parse_lifetime(form["expires"]) if form["expires"] else None,
        _split(form["staff"]), _split(form["groups"]), _split(form["tags"]),
        form["welcome"] or None, form["campaign"] or None, form["coupon"] or None, cost)


async def _list_page(request: web.Request, status: int = 200, **context: Any) -> web.Response:
    svc = service(request)
    arg, error, snapshot = await _period_figures(request)
    async with reading(svc.sessions) as session:
        views = await codes.listing(session, svc.clock.now())
    found = snapshot.value
    values: dict[str, Any] = {
        "rows": [(v, found.get(v.name)) for v in views], "period": arg, "period_error": error,
        "period_hint": PERIOD_HINT, "at": snapshot.at, "chart": any(f.new_customers for f in found.values()),
        "channels": _channels(svc), "campaigns": sorted(svc.campaigns), "pools": sorted(svc.config.coupons),
        "form": {}, "errors": {}, "refused": None, "open": False,
        "notice": request.query.get("notice"), "may_write": staff(request).may("operator"), **context}
    return aiohttp_jinja2.render_template("codes.html", request, values, status=status)


@pages.get("/codes", "manager")
async def code_list(request: web.Request) -> web.StreamResponse:
    return await _list_page(request)


@pages.post("/codes", "operator")
async def create(request: web.Request) -> web.StreamResponse:
    """Make the code on its platform and keep it; a problem shows at its field, the form as it was sent."""
    posted = await request.post()
    form = {key: str(posted.get(key, "")).strip() for key in FIELDS}
    form["welcome"] = str(posted.get("welcome", "")).replace("\r\n", "\n")  # a textarea's lines end in CRLF
    try:
        view = await codes.create(service(request), _spec(form), staff(request).actor)
    except CodeProblem as problem:
        if problem.status == 502:  # the platform refused: not the form's fault, said apart from the fields
            return await _list_page(request, 502, form=form, refused=problem.message, open=True)
        return await _list_page(request, problem.status, form=form, errors={problem.field: problem.message},
                                open=True)
    raise web.HTTPSeeOther(f"/console/codes/{view.name}?notice=created")


@pages.get("/charts/codes.png", "manager")
async def chart(request: web.Request) -> web.StreamResponse:
    """New customers per day and code (:func:`scrm.acquisition.figures.chart_png`), drawn in a worker
    thread once for each snapshot of the figures."""
    svc, kept = service(request), snapshots(request)
    arg, _period, error = chosen_period(request)
    if error:
        raise web.HTTPBadRequest(text=error)

    async def draw() -> bytes | None:
        found = (await kept.get(("codes", arg), _figures(svc, arg), warm=arg in KEPT_WARM)).value
        if not any(f.new_customers for f in found.values()):
            return None
        return await charts.chart(figures.chart_png, list(found.values()), _days(svc, arg)).png()

    png = (await kept.get(("codes.png", arg), draw, warm=arg in KEPT_WARM)).value
    if png is None:
        raise web.HTTPNotFound(text="no code brought a new customer in this period")
    return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "private, max-age=60"})


async def _view(request: web.Request) -> CodeView:
    svc = service(request)
    async with reading(svc.sessions) as session:
        return CodeView.of(await codes.find(session, request.match_info["name"]), svc.clock.now())


async def _no_code(request: web.Request) -> web.Response:
    return await error_page(request, 404, f"No code named {request.match_info['name'][:64]!r}.")


def _amount(value: float | None) -> str:
    """A cost as the edit form's box shows it: 600, 99.5 (never 6e+02)."""
    return "" if value is None else f"{value:.2f}".rstrip("0").rstrip(".")


def _as_form(view: CodeView) -> dict[str, str]:
    """A code's edit form filled with what it does now."""
    members = ", ".join(view.staff)
    return {"staff": members if view.kind == "contact_way" else "",
            "groups": members if view.kind == "join_way" else "", "tags": ", ".join(view.tags),
            "welcome": view.welcome or "", "campaign": view.campaign or "", "coupon": view.coupon or "",
            "cost": _amount(view.cost)}


def _change(form: dict[str, str | None]) -> CodeChange:
    """The edit form as a change: a box left out changes nothing, an empty one clears its value (no tags,
    no welcome, campaign, coupon or cost); a cost that is not one is a problem at its field."""
    try:
        cost = float(form["cost"]) if form["cost"] else None
    except ValueError:
        raise CodeProblem("cost", "an amount, e.g. 500 or 99.5") from None

    def listed(key: str) -> tuple[str, ...] | None:
        value = form[key]
        return None if value is None else _split(value)

    return CodeChange(
        staff=listed("staff"), groups=listed("groups"), tags=listed("tags"), welcome=form["welcome"] or None,
        campaign=form["campaign"] or None, coupon=form["coupon"] or None, cost=cost,
        clear=frozenset(key for key in CLEARABLE if form[key] == ""))


def _boxes(view: CodeView) -> set[str]:
    """The boxes of the code's edit form (a problem with anything else is said above them)."""
    return {"tags", "welcome", "campaign", "coupon", "cost"} | ({MEMBERS[view.kind]} if view.kind in MEMBERS else set())


async def _code_page(request: web.Request, view: CodeView, status: int = 200, **context: Any) -> web.Response:
    svc = service(request)
    arg, error, snapshot = await _period_figures(request)
    values: dict[str, Any] = {
        "code": view, "f": snapshot.value.get(view.name), "period": arg, "period_error": error,
        "period_hint": PERIOD_HINT, "at": snapshot.at, "timezone": svc.config.service.timezone,
        "notice": request.query.get("notice"), "campaigns": sorted(svc.campaigns), "pools": sorted(svc.config.coupons),
        "members": MEMBERS.get(view.kind), "form": _as_form(view),
        "errors": {}, "problem": None, "refused": None, "open": False, **context}
    return aiohttp_jinja2.render_template("code.html", request, values, status=status)


@pages.get("/codes/{name}", "manager")
async def code_page(request: web.Request) -> web.StreamResponse:
    try:
        view = await _view(request)
    except CodeProblem:
        return await _no_code(request)
    return await _code_page(request, view)


@pages.post("/codes/{name}", "operator")
async def change(request: web.Request) -> web.StreamResponse:
    """Change what the code does (:func:`scrm.acquisition.codes.change`, new staff members or group chats on
    the platform first); a problem shows at its field with the form as it was sent, and nothing is kept."""
    posted = await request.post()
    form: dict[str, str | None] = {
        key: str(posted[key]).strip() if key in posted else None for key in CHANGE_FIELDS}
    if "welcome" in posted:  # a textarea's lines end in CRLF; its text is kept as typed
        form["welcome"] = str(posted["welcome"]).replace("\r\n", "\n")
    try:
        view = await codes.change(service(request), request.match_info["name"], _change(form), staff(request).actor)
    except CodeProblem as problem:
        try:
            current = await _view(request)
        except CodeProblem:
            return await _no_code(request)
        sent = {**_as_form(current), **{key: value for key, value in form.items() if value is not None}}
        if problem.status == 409:  # disabled (meanwhile, or a post from an old page): said apart from the fields
            return await _code_page(request, current, 409, problem="This code is disabled 已停用: it can no longer be "
                                                                   "changed. Make a new code instead.")
        if problem.status == 502:  # the platform refused the new staff members or group chats
            return await _code_page(request, current, 502, form=sent, refused=problem.message, open=True)
        if problem.field in _boxes(current):
            return await _code_page(request, current, problem.status, form=sent,
                                    errors={problem.field: problem.message}, open=True)
        return await _code_page(request, current, problem.status, form=sent, problem=problem.message, open=True)
    raise web.HTTPSeeOther(f"/console/codes/{view.name}?notice=changed")


@pages.get(r"/codes/{name}/{image:qr\.png|qr\.svg|poster\.png}", "manager")
async def image(request: web.Request) -> web.StreamResponse:
    """The code drawn by segno (a poster-size one takes a while: drawn in a worker thread);
    ``?download`` saves it as a file named after the code."""
    try:
        view = await _view(request)
    except CodeProblem:
        return await _no_code(request)
    fmt, poster, file_suffix = IMAGES[request.match_info["image"]]
    body = await asyncio.to_thread(render.image, view.url, fmt, poster=poster)
    headers = {"Cache-Control": "private, max-age=300"}
    if "download" in request.query:
        headers["Content-Disposition"] = f'attachment; filename="{view.name}{file_suffix}"'
    return web.Response(body=body, content_type=render.CONTENT_TYPES[fmt], headers=headers)


@pages.get("/codes/{name}/disable", "operator")
async def disable_confirm(request: web.Request) -> web.StreamResponse:
    try:
        view = await _view(request)
    except CodeProblem:
        return await _no_code(request)
    return aiohttp_jinja2.render_template("code_disable.html", request, {"code": view, "refused": None})


@pages.post("/codes/{name}/disable", "operator")
async def disable(request: web.Request) -> web.StreamResponse:
    """Withdraw the code on its platform where it can be and stop honouring it; its figures stay."""
    try:
        view = await codes.disable(service(request), request.match_info["name"], staff(request).actor)
    except CodeProblem as problem:
        if problem.status == 404:
            return await _no_code(request)
        return aiohttp_jinja2.render_template("code_disable.html", request, {
            "code": await _view(request), "refused": problem.message}, status=problem.status)
    raise web.HTTPSeeOther(f"/console/codes/{view.name}?notice=disabled")
