"""Signing in and out: the password form (throttled), single-use links from chat, logout.

The sign-in form has no session yet to carry a CSRF token, so it gets a double-submit token: a
random value in a SameSite=Lax cookie and in the form, which a forged cross-site post cannot match.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from scrm import metrics
from scrm.console import accounts, sessions
from scrm.console.app import Pages, address, error_page, service, staff
from scrm.store.engine import writing

pages = Pages()
PRE = "scrm_console_pre"


def _next(request: web.Request) -> str:
    """Where to go after signing in: a console path only (no open redirect)."""
    target = request.query.get("next", "")
    return target if target.startswith("/console/") and not target.startswith("//") else "/console/"


def _login_form(request: web.Request, error: str | None = None, name: str = "", status: int = 200) -> web.Response:
    token = secrets.token_urlsafe(24)
    context: dict[str, Any] = {"error": error, "name": name, "pre": token, "next": _next(request)}
    response = aiohttp_jinja2.render_template("login.html", request, context, status=status)
    response.set_cookie(PRE, token, path="/console", httponly=True, samesite="Lax",
                        secure=sessions.secure(request, service(request).config.console))
    return response


@pages.get("/login", "public")
async def login_page(request: web.Request) -> web.StreamResponse:
    return _login_form(request)


@pages.post("/login", "public")
async def login(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    form = await request.post()
    name, password, pre = (str(form.get(k, "")) for k in ("name", "password", "pre"))
    cookie = request.cookies.get(PRE, "")
    if not pre or not cookie or not hmac.compare_digest(pre, cookie):
        return await error_page(request, 403, "The sign-in form's security token is missing or stale: reload the page.")
    if not name or not password:
        return _login_form(request, "Enter your name and password.", name, 400)
    now = svc.clock.now()
    async with writing(svc.sessions) as session:
        result = await accounts.sign_in(session, name, password, address(request), now, svc.config.console)
        token = await sessions.open_session(session, result.account, address(request), now) \
            if result.outcome == "ok" and result.account is not None else None
    metrics.CONSOLE_SIGN_INS.labels(result.outcome).inc()
    if result.outcome == "throttled":
        assert result.retry_at is not None
        minutes = max(1, int((result.retry_at - now).total_seconds() // 60) + 1)
        return _login_form(request, f"Too many failed sign-ins: try again in {minutes} minutes.", name, 429)
    if token is None:
        return _login_form(request, "Wrong name or password.", name, 401)
    response = web.HTTPSeeOther(_next(request))
    sessions.set_cookie(response, request, token, svc.config.console)
    response.del_cookie(PRE, path="/console")
    raise response


@pages.post("/logout", "manager")
async def logout(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    async with writing(svc.sessions) as session:
        await sessions.end(session, staff(request), svc.clock.now())
    response = web.HTTPSeeOther("/console/login")
    sessions.clear_cookie(response)
    raise response


@pages.get("/link/{token}", "public")
async def link_page(request: web.Request) -> web.StreamResponse:
    """A button, not a sign-in: chat apps fetch links to preview them, which must not use the link up."""
    return aiohttp_jinja2.render_template("link.html", request, {"token": request.match_info["token"]})


@pages.post("/link/{token}", "public")
async def use_link(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    now = svc.clock.now()
    async with writing(svc.sessions) as session:
        account = await accounts.use_link(session, request.match_info["token"], now)
        token = await sessions.open_session(session, account, address(request), now) if account else None
    metrics.CONSOLE_SIGN_INS.labels("link" if token else "link_invalid").inc()
    if token is None:
        return await error_page(request, 403, "This sign-in link was used already or has expired: send /console again.")
    response = web.HTTPSeeOther("/console/")
    sessions.set_cookie(response, request, token, svc.config.console)
    raise response
