"""The console's aiohttp sub-application: page routes with the least role each needs, sign-in and
CSRF checks in one middleware, Jinja2 templates with autoescape, and the vendored static files.

Every handler is registered through :class:`Pages` with a role, and the middleware refuses a route
that has none: a page cannot be added without deciding who may use it. Pages are server-rendered
and work without JavaScript; htmx (vendored, ``static/``) only refreshes parts of them.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote
from zoneinfo import ZoneInfo

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp.typedefs import Handler

from scrm.config import Role
from scrm.console import sessions
from scrm.console.sessions import Staff
from scrm.service import Service
from scrm.snapshots import Snapshots
from scrm.store.engine import writing

HERE = Path(__file__).parent
SERVICE = web.AppKey("console_service", Service)
#: Slow figures (dashboard, funnels, segment counts) kept a short while, shown "as of" their time.
SNAPSHOTS = web.AppKey("console_snapshots", Snapshots)
#: How often the figures someone looked at lately are read again in the background (seconds): a few
#: seconds of queries over a million customers every few minutes, instead of a viewer waiting for them.
KEEP_WARM_SECONDS = 240.0
STAFF = "console_staff"  # request key: the signed-in Staff
Access = Role | Literal["public"]
PageHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class _Route:
    method: str
    path: str
    handler: PageHandler
    access: Access


class Pages:
    """One page module's routes; each names the least role that may use it (or ``public``)."""

    def __init__(self) -> None:
        self.routes: list[_Route] = []

    def _add(self, method: str, path: str, access: Access) -> Callable[[PageHandler], PageHandler]:
        def register(handler: PageHandler) -> PageHandler:
            self.routes.append(_Route(method, path, handler, access))
            return handler

        return register

    def get(self, path: str, access: Access) -> Callable[[PageHandler], PageHandler]:
        return self._add("GET", path, access)

    def post(self, path: str, access: Access) -> Callable[[PageHandler], PageHandler]:
        return self._add("POST", path, access)


_ACCESS = web.AppKey("console_access", dict)


def staff(request: web.Request) -> Staff:
    """The signed-in staff member (the middleware let only signed-in requests reach a non-public page)."""
    found: Staff = request[STAFF]
    return found


def service(request: web.Request) -> Service:
    return request.app[SERVICE]


def snapshots(request: web.Request) -> Snapshots:
    return request.app[SNAPSHOTS]


def address(request: web.Request) -> str:
    return request.remote or "unknown"


async def error_page(request: web.Request, status: int, message: str) -> web.Response:
    """An error as a page, also from the middleware (before the template context processors ran)."""
    context = {**await _context(request), "status": status, "message": message}
    return aiohttp_jinja2.render_template("error.html", request, context, status=status)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Sign-in, role and CSRF checks for every console request (static files excepted)."""
    route = request.match_info.route
    if route.resource is not None and route.resource.canonical.startswith("/console/static"):
        return await handler(request)
    access = request.app[_ACCESS].get(getattr(route, "handler", None))
    if access is None:  # an unregistered handler (404, 405) or one without a declared role
        if request.match_info.http_exception is not None:
            return await handler(request)
        return await error_page(request, 403, "This page declares no role.")
    if access == "public":
        return await handler(request)
    svc = service(request)
    token = request.cookies.get(sessions.COOKIE)
    now = svc.clock.now()
    found = None
    if token:
        async with svc.sessions() as session:
            found = await sessions.current(session, token, now, svc.config.console)
    if found is None:
        if request.method != "GET":
            return await error_page(request, 403, "Your session has ended: sign in again.")
        target = request.path_qs if request.path.startswith("/console") else "/console/"
        raise web.HTTPSeeOther(f"/console/login?next={quote(target, safe='')}")
    who, stale = found
    request[STAFF] = who
    if stale:
        async with writing(svc.sessions) as session:
            await sessions.touch(session, who, now)
    if not who.may(access):
        return await error_page(request, 403, f"This needs the {access} role; you are {who.role}.")
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        sent = request.headers.get("X-CSRF-Token")
        if sent is None:
            form = await request.post()
            value = form.get("_csrf")
            sent = value if isinstance(value, str) else None
        if not sent or not hmac.compare_digest(sent, who.csrf):
            return await error_page(request, 403, "The form's security token is missing or stale: reload the page.")
    return await handler(request)


def as_of(at: datetime, zone: ZoneInfo) -> str:
    """When a snapshot's figures were read, as the pages say it (service time zone)."""
    time = f"{at.replace(tzinfo=UTC).astimezone(zone):%H:%M}"
    return f"as of {time} · 截至 {time}"


NAV: list[tuple[str, str, Role]] = [
    ("/console/", "Dashboard 概览", "manager"),
    ("/console/inbox", "Inbox 会话", "manager"),
    ("/console/customers", "Customers 客户", "manager"),
    ("/console/campaigns", "Campaigns 活动", "manager"),
    ("/console/coupons", "Coupons 优惠券", "manager"),
    ("/console/codes", "Codes 渠道活码", "manager"),
    ("/console/segments", "Segments 分群", "manager"),
    ("/console/audit", "Audit 审计", "admin"),
]


async def _context(request: web.Request) -> dict[str, Any]:
    who: Staff | None = request.get(STAFF)
    return {"staff": who, "csrf": who.csrf if who else "", "path": request.path,
            "nav": [(href, label) for href, label, role in NAV if who is not None and who.may(role)
                    and any(r.path == href.removeprefix("/console") or (href == "/console/" and r.path == "/")
                            for r in _all_routes(request.app))]}


def _all_routes(app: web.Application) -> list[_Route]:
    routes: list[_Route] = app[_ROUTES]
    return routes


_ROUTES = web.AppKey("console_routes", list)


def console_app(svc: Service, page_modules: list[Pages]) -> web.Application:
    app = web.Application(middlewares=[guard])
    app[SERVICE] = svc
    app[SNAPSHOTS] = Snapshots(svc.clock)

    async def keep_snapshots(app: web.Application) -> None:
        app[SNAPSHOTS].keep_warm_every(KEEP_WARM_SECONDS)

    async def stop_snapshots(app: web.Application) -> None:  # before the service closes its store
        await app[SNAPSHOTS].close()

    app.on_startup.append(keep_snapshots)
    app.on_shutdown.append(stop_snapshots)
    env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                               context_processors=[_context], undefined=jinja2.StrictUndefined)
    env.globals["static"] = lambda name: f"/console/static/{name}"
    zone = ZoneInfo(svc.config.service.timezone)
    env.globals["as_of"] = lambda at: as_of(at, zone)
    access: dict[Any, Access] = {}
    routes: list[_Route] = []
    for pages in page_modules:
        for r in pages.routes:
            app.router.add_route(r.method, r.path, r.handler)
            access[r.handler] = r.access
            routes.append(r)
    app[_ACCESS] = access
    app[_ROUTES] = routes
    app.router.add_static("/static/", HERE / "static")
    return app
