"""The integration API (``/api/v1``), ``/metrics`` and request ids, mounted on the service's aiohttp app.

Other systems (the shop, the till, a BI tool) talk to the service here with API keys from
``[api.keys.<name>]``; Prometheus scrapes ``/metrics``. See :mod:`scrm.api.routes` for the endpoints.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from scrm import logs, metrics
from scrm.api.framework import API_SERVICE, PREFIX, Endpoint, api_errors, openapi, serve
from scrm.api.routes import ENDPOINTS
from scrm.campaigns import timed
from scrm.service import Service

__all__ = ["ENDPOINTS", "PREFIX", "create_api", "mount", "openapi_document"]

VERSION = "1.0.0"


def openapi_document(endpoints: list[Endpoint] = ENDPOINTS) -> dict[str, object]:
    return openapi(endpoints, "SCRM integration API", VERSION)


def create_api(service: Service) -> web.Application:
    api = web.Application(middlewares=[api_errors])
    api[API_SERVICE] = service
    document = openapi_document()

    async def spec(_request: web.Request) -> web.Response:
        return web.json_response(document)

    api.router.add_get("/openapi.json", spec)
    for endpoint in ENDPOINTS:
        api.router.add_route(endpoint.method, endpoint.path, serve(endpoint))
    return api


def mount(app: web.Application, service: Service) -> None:
    """Add the API sub-app, ``GET /metrics``, request ids on every request, scheduler metrics."""
    app.middlewares.append(request_ids)
    app.add_subapp(PREFIX, create_api(service))
    app[_METRICS_SERVICE] = service
    app.router.add_get("/metrics", scrape)
    metrics.watch_scheduler(service.scheduler)


_METRICS_SERVICE = web.AppKey("metrics_service", Service)


@web.middleware
async def request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every log line while handling a request carries its id; the caller gets it back."""
    with logs.request_context(request.headers.get("X-Request-ID")) as rid:
        response = await handler(request)
        if not response.prepared:
            response.headers["X-Request-ID"] = rid
        return response


async def scrape(request: web.Request) -> web.Response:
    """Prometheus exposition; outbox gauges are read from the store now (a failed read is counted)."""
    service = request.app[_METRICS_SERVICE]
    try:
        async with service.sessions() as session:
            await metrics.refresh_outbox(session, service.clock.now())
            await metrics.refresh_ingest(session, service.clock.now())
            runs = await timed.last_runs(session)
            metrics.campaigns_failing(service.campaigns, {n for n, r in runs.items() if r.status == "failed"})
    except Exception:  # noqa: BLE001  (the scrape must still answer: the error counter is what tells the operator)
        metrics.store_error("metrics")
    body, content_type = metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})
