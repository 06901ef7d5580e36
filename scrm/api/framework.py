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
from scrm.api import idempotency
from scrm.api.models import Error
from scrm.config import ApiScope
from scrm.group_commit import StoreUnavailable
from scrm.service import Service

log = logging.getLogger(__name__)

API_SERVICE = web.AppKey("api_service", Service)
PREFIX = "/api/v1"

_STATUS_TEXT = {400: "Bad request", 401: "Missing or wrong API key", 403: "The key lacks the scope",
                404: "Not found", 409: "Conflict", 413: "Body too large", 422: "Validation error",
                502: "The platform refused", 503: "Store unavailable, retry later"}


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
    #: The validated query string (the endpoint's ``query`` model), or None.
    query: Any = None

    @property
    def actor(self) -> str:
        return f"api:{self.key_name}"


@dataclass(frozen=True)
class Binary:
    """An answer that is not JSON (an image): its bytes and their media type, one of the endpoint's ``binary``."""

    body: bytes
    content_type: str


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Callable[[Call], Awaitable[BaseModel | tuple[int, BaseModel] | Binary]]
    scope: ApiScope
    summary: str
    #: The JSON answer's model; None for an endpoint that answers ``binary`` media types.
    response: type[BaseModel] | None
    body: type[BaseModel] | None = None
    status: int = 200
    params: dict[str, str] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    description: str = ""
    #: The query string's model (flat: each field one parameter).
    query: type[BaseModel] | None = None
    binary: tuple[str, ...] = ()

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
        if any("\x00" in value for value in request.match_info.values()):  # no name holds one; PostgreSQL refuses it
            raise ApiError(404, "not_found", "no such resource")
        query: Any = None
        if endpoint.query is not None:
            if nul := [name for name, value in request.query.items() if "\x00" in value]:
                raise ApiError(422, "validation_error", f"query.{nul[0]}: a NUL character",
                               [{"field": f"query.{name}", "problem": "a NUL character"} for name in nul])
            try:
                query = endpoint.query.model_validate(dict(request.query))
            except ValidationError as exc:
                fields = _field_errors(exc, "query")
                raise ApiError(422, "validation_error", "; ".join(f"{f['field']}: {f['problem']}" for f in fields),
                               fields) from None
        raw = b""
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
        call = Call(request, service, key_name, body, dict(request.match_info), query)
        key = request.headers.get(idempotency.HEADER) if endpoint.method == "POST" else None
        if key is None:
            return await _answer(endpoint, call)
        if not idempotency.KEY.match(key):
            raise ApiError(422, "validation_error", f"{idempotency.HEADER}: 1-255 printable ASCII characters",
                           [{"field": f"header.{idempotency.HEADER}", "problem": "1-255 printable ASCII characters"}])
        try:
            replay = await idempotency.claim(service.sessions, key_name, key,
                                             idempotency.fingerprint(request.method, request.path_qs, raw),
                                             service.clock.now())
        except idempotency.KeyConflict as exc:
            named = [{"field": f"header.{idempotency.HEADER}", "problem": exc.message}] if exc.status == 422 else None
            raise ApiError(exc.status, exc.code, exc.message, named) from None
        if replay is not None:
            return web.Response(text=replay.body, status=replay.status, content_type="application/json",
                                headers={"Idempotent-Replayed": "true"})
        try:
            response = await _answer(endpoint, call)
        except BaseException:
            await idempotency.release(service.sessions, key_name, key)
            raise
        assert isinstance(response, web.Response) and response.text is not None  # POSTs answer JSON
        await idempotency.keep(service.sessions, key_name, key, response.status, response.text)
        return response

    handle.__name__ = endpoint.operation_id
    return handle


async def _answer(endpoint: Endpoint, call: Call) -> web.Response:
    result = await endpoint.handler(call)
    if isinstance(result, Binary):
        assert result.content_type in endpoint.binary, result.content_type
        return web.Response(body=result.body, status=endpoint.status, content_type=result.content_type)
    assert endpoint.response is not None
    status, model = result if isinstance(result, tuple) else (endpoint.status, result)
    return web.json_response(endpoint.response.model_validate(model).model_dump(mode="json"), status=status,
                             dumps=lambda v: json.dumps(v, ensure_ascii=False))


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


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """A flat query model as OpenAPI query parameters (each field one parameter)."""
    schema = model.model_json_schema(mode="validation")
    assert "$defs" not in schema, f"{model.__name__}: a query model's fields are plain values"
    required = set(schema.get("required", []))
    out = []
    for name, prop in schema["properties"].items():
        param: dict[str, Any] = {"name": name, "in": "query", "required": name in required,
                                 "schema": {k: v for k, v in prop.items() if k not in ("title", "description")}}
        if "description" in prop:
            param["description"] = prop["description"]
        out.append(param)
    return out


def openapi(endpoints: list[Endpoint], title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document, schemas generated from the endpoints' pydantic models."""
    models: list[tuple[type[BaseModel], Any]] = [(Error, "serialization")]
    for e in endpoints:
        if e.response is not None:
            models.append((e.response, "serialization"))
        if e.body is not None:
            models.append((e.body, "validation"))
    refs, schema = models_json_schema(models, ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for e in endpoints:
        error_ref = {"content": {"application/json": {"schema": refs[(Error, "serialization")]}}}
        if e.response is not None:
            content = {"application/json": {"schema": refs[(e.response, "serialization")]}}
        else:
            content = {media: {"schema": {"type": "string", "contentMediaType": media}} for media in e.binary}
        op: dict[str, Any] = {
            "operationId": e.operation_id,
            "summary": e.summary,
            "security": [{"apiKey": [e.scope]}],
            "x-scope": e.scope,
            "parameters": [{"name": n, "in": "path", "required": True, "description": d,
                            "schema": {"type": "string", "minLength": 1}} for n, d in e.params.items()],
            "responses": {str(e.status): {"description": "OK", "content": content}},
        }
        if e.query is not None:
            op["parameters"] += _query_parameters(e.query)
        if e.method == "POST":
            op["parameters"].append({
                "name": idempotency.HEADER, "in": "header", "required": False,
                "description": "A retry with the same key (within 24 hours) gets the first answer again and does "
                               "nothing twice; the same key with another request is refused (422).",
                "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x21-\\x7e]+$"}})
        if e.description:
            op["description"] = e.description
        if e.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": refs[(e.body, "validation")]}}}
        statuses = {401, 403, *e.errors, *((413, 422) if e.body else ()), *((422,) if e.query else ()),
                    *((409, 422) if e.method == "POST" else ()), *((404,) if e.params else ())}
        for status in sorted(statuses):
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
