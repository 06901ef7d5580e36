"""The small machinery behind the API: endpoints declared once, then served, guarded and documented.

Each :class:`Endpoint` names its method, path, scope and models; the same declaration builds the
aiohttp route (auth, body limit, validation, error shape) and the OpenAPI document, so the document
always matches what is served.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from scrm import metrics
from scrm.api.models import Error
from scrm.config import ApiScope
from scrm.group_commit import StoreUnavailable
from scrm.service import Service

log = logging.getLogger(__name__)

API_SERVICE = web.AppKey("api_service", Service)
PREFIX = "/api/v1"

_STATUS_TEXT = {400: "Bad request", 401: "Missing or wrong API key", 403: "The key lacks the scope",
                404: "Not found", 409: "Conflict", 413: "Body too large", 422: "Validation error",
                503: "Store unavailable, retry later"}


class ApiError(Exception):
    """An answer other than success: rendered as ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str, fields: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, fields


def error_response(status: int, code: str, message: str, fields: list[dict[str, str]] | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if fields is not None:
        body["fields"] = fields
    return web.json_response({"error": body}, status=status, headers=headers)


@dataclass
class Call:
    """What a handler gets: the service, who called, the validated body and the path parameters."""

    request: web.Request
    service: Service
    key_name: str
    body: Any
    params: dict[str, str]

    @property
    def actor(self) -> str:
        return f"api:{self.key_name}"


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Callable[[Call], Awaitable[BaseModel | tuple[int, BaseModel]]]
    scope: ApiScope
    summary: str
    response: type[BaseModel]
    body: type[BaseModel] | None = None
    status: int = 200
    params: dict[str, str] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    description: str = ""

    @property
    def operation_id(self) -> str:
        return self.handler.__name__.strip("_")


def _key_name(service: Service, header: str | None) -> str | None:
    """The configured key matching the request's, compared in constant time against every key."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    presented = (token if scheme.lower() == "bearer" else header).strip().encode()
    found = None
    for name, key in service.config.api.keys.items():
        if hmac.compare_digest(presented, key.key.get_secret_value().encode()):
            found = name
    return found


def _field_errors(exc: ValidationError, root: str) -> list[dict[str, str]]:
    out = []
    for e in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        out.append({"field": f"{root}.{loc}" if loc else root, "problem": e["msg"].removeprefix("Value error, ")})
    return out


def serve(endpoint: Endpoint) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        service = request.app[API_SERVICE]
        key_name = _key_name(service, request.headers.get("Authorization") or request.headers.get("X-API-Key"))
        if key_name is None:
            raise ApiError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer <key>)")
        if endpoint.scope not in service.config.api.keys[key_name].scopes:
            raise ApiError(403, "forbidden", f"this key lacks the scope {endpoint.scope!r}")
        body: Any = None
        if endpoint.body is not None:
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise ApiError(413, "body_too_large", f"request body over {request.client_max_size} bytes") from None
            if not raw.strip():
                raise ApiError(422, "validation_error", "a JSON body is required",
                               [{"field": "body", "problem": "missing"}])
            try:
                body = endpoint.body.model_validate_json(raw)
            except ValidationError as exc:
                fields = _field_errors(exc, "body")
                if any(e["type"] == "json_invalid" for e in exc.errors()):
                    raise ApiError(422, "invalid_json", "the body is not valid JSON",
                                   [{"field": "body", "problem": "not valid JSON"}]) from None
                raise ApiError(422, "validation_error", "; ".join(f"{f['field']}: {f['problem']}" for f in fields),
                               fields) from None
        result = await endpoint.handler(Call(request, service, key_name, body, dict(request.match_info)))
        status, model = result if isinstance(result, tuple) else (endpoint.status, result)
        return web.json_response(endpoint.response.model_validate(model).model_dump(mode="json"), status=status,
                                 dumps=lambda v: json.dumps(v, ensure_ascii=False))

    handle.__name__ = endpoint.operation_id
    return handle


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer under /api/v1 is JSON, errors included, with a stable code."""
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ApiError as exc:
        status = exc.status
        headers = {"WWW-Authenticate": 'Bearer realm="scrm"'} if exc.status == 401 else None
        return error_response(exc.status, exc.code, exc.message, exc.fields, headers)
    except web.HTTPException as exc:
        status = exc.status
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason, headers={"Allow": exc.headers["Allow"]}
                              if "Allow" in exc.headers else None)
    except (StoreUnavailable, OperationalError, PoolTimeout):
        status = 503
        metrics.store_error("api")
        log.warning("store unavailable answering %s %s", request.method, route)
        return error_response(503, "store_unavailable", "the store is unavailable; retry later")
    except Exception:
        log.exception("API error on %s %s", request.method, route)
        return error_response(500, "internal", "internal error; the service log has details")
    finally:
        metrics.API_REQUESTS.labels(route, str(status)).inc()


def openapi(endpoints: list[Endpoint], title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document, schemas generated from the endpoints' pydantic models."""
    models: list[tuple[type[BaseModel], Any]] = [(Error, "serialization")]
    for e in endpoints:
        models.append((e.response, "serialization"))
        if e.body is not None:
            models.append((e.body, "validation"))
    refs, schema = models_json_schema(models, ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for e in endpoints:
        error_ref = {"content": {"application/json": {"schema": refs[(Error, "serialization")]}}}
        op: dict[str, Any] = {
            "operationId": e.operation_id,
            "summary": e.summary,
            "security": [{"apiKey": [e.scope]}],
            "x-scope": e.scope,
            "parameters": [{"name": n, "in": "path", "required": True, "description": d,
                            "schema": {"type": "string", "minLength": 1}} for n, d in e.params.items()],
            "responses": {str(e.status): {"description": "OK", "content": {"application/json": {
                "schema": refs[(e.response, "serialization")]}}}},
        }
        if e.description:
            op["description"] = e.description
        if e.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": refs[(e.body, "validation")]}}}
        for status in sorted({401, 403, *e.errors, *((413, 422) if e.body else ())}):
            op["responses"][str(status)] = {"description": _STATUS_TEXT.get(status, "Error"), **error_ref}
        paths.setdefault(PREFIX + e.path, {})[e.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": schema.get("$defs", {}),
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                           "description": "A key from [api.keys.<name>] in the config"}},
        },
    }
