"""The operators' browser console at ``/console/``: one module per page, one for sign-in, the layout
in ``templates/`` and ``static/``. Pages call the same core functions as the API, the CLI and chat.

Nothing is imported here at module level: :mod:`scrm.console.accounts` is core that chat commands
use (``/console``), and the pages import the service, which imports those commands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

    from scrm.console.app import Pages
    from scrm.service import Service


def page_modules() -> list[Pages]:
    """Every page module's routes (add a new page module here)."""
    from scrm.console import audit, auth, campaigns, codes, coupons, customer, customers, dashboard, inbox, segments

    return [auth.pages, dashboard.pages, inbox.pages, customers.pages, customer.pages, campaigns.pages, coupons.pages,
            codes.pages, segments.pages, audit.pages]


def mount(app: web.Application, service: Service) -> None:
    """Serve the console under ``/console/`` of the service's own application."""
    from aiohttp import web

    from scrm.console.app import console_app

    async def to_console(_request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect("/console/")

    app.router.add_get("/console", to_console)
    app.add_subapp("/console/", console_app(service, page_modules()))
