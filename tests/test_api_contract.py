"""The API's contract: the OpenAPI document is a valid OpenAPI 3.1 document covering every served route
(with its scope, parameters, request body and answers), and every endpoint checks the key and its scope:
no key 401, a key with every scope but the endpoint's 403 (nothing done), the endpoint's scope alone gets
past the check. Walks every endpoint, so a new one is checked the day it is added."""

from __future__ import annotations

from typing import Any, get_args

import pytest
from openapi_spec_validator import validate

from scrm.api import ENDPOINTS, openapi_document
from scrm.config import ApiScope
from scrm.web import create_app

ALL_SCOPES = list(get_args(ApiScope))
KEYS = {"api": {"keys": {
    **{f"only{i}": {"key": f"only-{scope}-0123456789", "scopes": [scope]} for i, scope in enumerate(ALL_SCOPES)},
    **{f"but{i}": {"key": f"but-{scope}-0123456789",
                   "scopes": [s for s in ALL_SCOPES if s != scope]} for i, scope in enumerate(ALL_SCOPES)},
}}}


def test_the_document_is_valid_openapi_and_covers_every_endpoint():
    doc = openapi_document()
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema
    for e in ENDPOINTS:
        op = doc["paths"]["/api/v1" + e.path][e.method.lower()]
        assert op["x-scope"] == e.scope and op["security"] == [{"apiKey": [e.scope]}]
        assert str(e.status) in op["responses"] and {"401", "403"} <= set(op["responses"])
        documented = {p["name"] for p in op["parameters"] if p["in"] == "path"}
        assert documented == set(e.params) == {part[1:-1] for part in e.path.split("/") if part.startswith("{")}
        if e.query is not None:
            assert {p["name"] for p in op["parameters"] if p["in"] == "query"} == set(e.query.model_fields)
        assert ("requestBody" in op) == (e.body is not None)
        assert e.response is not None or e.binary, e.path  # every answer is described
    assert len({(e.method, e.path) for e in ENDPOINTS}) == len(ENDPOINTS)
    assert len({e.operation_id for e in ENDPOINTS}) == len(ENDPOINTS)


def _path(e: Any) -> str:
    return "/api/v1" + e.path.replace("{ref}", "console:nobody").replace("{name}", "welcome").replace(
        "{pool}", "welcome").replace("{subscription}", "nope")


@pytest.fixture
async def client(aiohttp_client, make_config, clock):
    return await aiohttp_client(create_app(make_config(KEYS), clock))


async def test_every_endpoint_checks_the_key_and_its_scope(client):
    index = {scope: i for i, scope in enumerate(ALL_SCOPES)}
    for e in ENDPOINTS:
        path, body = _path(e), b"{}" if e.body is not None else None
        call = getattr(client, e.method.lower())
        resp = await call(path, data=body)
        assert resp.status == 401, (e.method, e.path)
        assert (await resp.json())["error"]["code"] == "unauthorized"
        resp = await call(path, data=body, headers={"Authorization": f"Bearer but-{e.scope}-0123456789"})
        assert resp.status == 403, (e.method, e.path, resp.status)
        assert (await resp.json())["error"] == {"code": "forbidden", "message": f"this key lacks the scope {e.scope!r}"}
        resp = await call(path, data=body, headers={"Authorization": f"Bearer only-{e.scope}-0123456789"})
        assert resp.status not in (401, 403), (e.method, e.path, resp.status, index[e.scope])


async def test_a_nul_character_is_refused_not_an_error(client):
    """PostgreSQL refuses NUL in text: a path or query value holding one is answered before any store read."""
    for e in ENDPOINTS:
        if e.params:
            path = _path(e).replace("console:nobody", "%00").replace("welcome", "we%00").replace("nope", "%00")
            resp = await getattr(client, e.method.lower())(
                path, data=b"{}" if e.body is not None else None,
                headers={"Authorization": f"Bearer only-{e.scope}-0123456789"})
            assert resp.status == 404, (e.method, e.path, resp.status)
        if e.query is not None:
            name = next(iter(e.query.model_fields))
            resp = await getattr(client, e.method.lower())(
                _path(e) + f"?{name}=a%00b", headers={"Authorization": f"Bearer only-{e.scope}-0123456789"})
            body = await resp.json()
            assert resp.status == 422 and body["error"]["fields"][0]["field"] == f"query.{name}", (e.path, body)
