"""The aiohttp application factory: health check, every configured channel's webhook routes, tracked links."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

from aiohttp import web
from aiohttp.typedefs import Handler

from scrm import api, console
from scrm.acquisition import links
from scrm.clock import Clock
from scrm.config import Config
from scrm.group_commit import StoreUnavailable
from scrm.service import Service

SERVICE = web.AppKey("service", Service)
Role = Literal["web", "worker", "all"]


@web.middleware
async def store_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An event the store could not commit was not acknowledged: 503 makes the platform retry."""
    try:
        return await handler(request)
    except StoreUnavailable:
        return web.json_response({"error": "store_unavailable", "message": "try again later"}, status=503)


def create_app(config: Config, clock: Clock | None = None, role: Role = "all") -> web.Application:
    """``role``: ``web`` serves webhooks (ingest), ``worker`` sends and plans, ``all`` does both."""
    app = web.Application(client_max_size=config.service.max_body_bytes, middlewares=[store_errors])
    service = Service(config, clock, role)
    app[SERVICE] = service
    app.cleanup_ctx.append(_service_ctx)
    app.router.add_get("/healthz", healthz)
    if role in ("web", "all"):
        for channel in service.channels.values():
            app.router.add_routes(channel.routes())
        app.router.add_get("/l/{token}", tracked_link)
    api.mount(app, service)  # /api/v1, /metrics, request ids
    if config.console.enabled and role in ("web", "all"):
        console.mount(app, service)  # /console/
    return app


async def _service_ctx(app: web.Application) -> AsyncIterator[None]:
    service = app[SERVICE]
    await service.start()
    yield
    await service.stop()


async def healthz(request: web.Request) -> web.Response:
    status = await request.app[SERVICE].health()
    healthy = status["store"] == "ok" and status["scheduler"] == "running"
    return web.json_response({"status": "ok" if healthy else "degraded", **status}, status=200 if healthy else 503)


async def tracked_link(request: web.Request) -> web.StreamResponse:
    """A tracked link (``/l/<token>``): 302 to the target the store holds for the token, never one the
    request names; 404 for a token that is unknown, forged or expired. HEAD is a preview's fetch."""
    target = await links.follow(request.app[SERVICE], request.match_info["token"],
                                request.headers.get("User-Agent", ""), preview=request.method == "HEAD")
    if target is None:
        return web.Response(status=404, text="This link is unknown or has expired. 链接无效或已过期。")
    # No caching (every visit is counted), and the token is not handed on to the target as a Referer.
    return web.Response(status=302, headers={"Location": target, "Cache-Control": "no-store",
                                             "Referrer-Policy": "no-referrer"})
