"""The operators' browser console at ``/console/``: one module per page, one for sign-in, the layout
in ``templates/`` and ``static/``. Pages call the same core functions as the API, the CLI and chat."""

from __future__ import annotations

from aiohttp import web

from scrm.console import auth, dashboard
from scrm.console.app import Pages, console_app
from scrm.service import Service

PAGE_MODULES: list[Pages] = [auth.pages, dashboard.pages]


def mount(app: web.Application, service: Service) -> None:
    """Serve the console under ``/console/`` of the service's own application."""

    async def to_console(_request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect("/console/")

    app.router.add_get("/console", to_console)
    app.add_subapp("/console/", console_app(service, PAGE_MODULES))
