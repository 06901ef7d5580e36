"""Property-based: requests generated from the *served* OpenAPI document (valid-looking bodies and query
strings, broken ones, odd path parameters, retried idempotency keys) never get a 5xx, and every answer
is one the document declares for the operation, with the declared media type, its body valid against
the declared schema: the document cannot drift from what is served.

The app runs in a thread with its own event loop so that hypothesis drives it from a plain test."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import urllib.parse
from typing import Any, get_args

import jsonschema
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scrm.config import ApiScope
from scrm.messages import InboundEvent
from scrm.web import SERVICE, create_app
from tests.test_api import KEYS

ALL = "all-scopes-key-0123456789"
FUZZ_KEYS = {"api": {"keys": {**KEYS["api"]["keys"], "all": {"key": ALL, "scopes": list(get_args(ApiScope))}}}}
WORDS = ["console", "alice", "local", "welcome", "13800138000", "+8613800138000", "WELABCDEFGH", "vip", "", " ",
         "console:alice", "1", "#1", "0", "-1", "%", "../", "🙂", "a" * 70]


class Served:
    """The real app on a real port, in a background thread."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = self.runner.addresses[0][1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(30)

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        status, _, raw = self.exchange(method, path, body, headers)
        return status, raw

    def exchange(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        """Status, media type (without parameters) and body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, (resp.getheader("Content-Type") or "").split(";")[0].strip(), resp.read()
        finally:
            conn.close()

    def stop(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture
def served(make_config, clock):
    server = Served(create_app(make_config(FUZZ_KEYS), clock))
    service = server.runner.app[SERVICE]

    async def seed() -> None:  # one known customer, so generated requests also reach the deeper paths
        await service.receive(InboundEvent("console", "local", "alice", "text", "你好", platform_msg_id="seed-1",
                                           display_name="alice"))

    server.call(seed())
    yield server
    server.stop()


def value_for(schema: dict[str, Any], defs: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values shaped by a JSON schema, often valid and sometimes not, to explore validation and handlers."""
    junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                     max_size=3), max_leaves=6)
    if depth > 4:
        return junk
    if "$ref" in schema:
        return value_for(defs[schema["$ref"].rsplit("/", 1)[1]], defs, depth + 1)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([value_for(s, defs, depth + 1) for s in schema[key]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"]) | junk
    kind = schema.get("type")
    strategies: dict[str, st.SearchStrategy[Any]] = {
        "string": st.sampled_from(WORDS) | st.text(max_size=schema.get("maxLength", 40) + 2),
        "integer": st.integers(-2, 10) | st.integers(),
        "number": st.floats(allow_nan=False, allow_infinity=False, min_value=-10, max_value=1e12) | st.integers(),
        "boolean": st.booleans(),
        "null": st.none(),
    }
    if kind in strategies:
        return strategies[kind] | (junk if depth else st.nothing())
    if kind == "array":
        return st.lists(value_for(schema.get("items", {}), defs, depth + 1), max_size=3)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = [k for k in schema.get("required", []) if k in props]
        optional = {k: value_for(v, defs, depth + 1) for k, v in props.items() if k not in required}
        base = st.fixed_dictionaries({k: value_for(props[k], defs, depth + 1) for k in required}, optional=optional)
        return base | st.builds(lambda d, k: {**d, k: 1}, base, st.text(min_size=1, max_size=4)) | junk
    return junk


def conforms(doc: dict[str, Any], op: dict[str, Any], status: int, content_type: str, raw: bytes) -> None:
    """The answer is one the operation declares: its status, its media type, a body valid against its schema."""
    declared = op["responses"].get(str(status))
    assert declared is not None, f"{op['operationId']}: {status} is not documented ({sorted(op['responses'])})"
    media = declared["content"].get(content_type)
    assert media is not None, f"{op['operationId']}: {status} answered {content_type}, not {sorted(declared['content'])}"
    if content_type == "application/json":
        schema = {**media["schema"], "components": doc["components"]}  # its $refs resolve in the document
        jsonschema.Draft202012Validator(schema).validate(json.loads(raw))


def test_answers_conform_to_the_document(served):
    status, raw = served.request("GET", "/api/v1/openapi.json")
    assert status == 200
    doc = json.loads(raw)
    defs = doc["components"]["schemas"]
    operations = [(path, method, op) for path, ops in doc["paths"].items() for method, op in ops.items()]

    @st.composite
    def requests(draw: st.DrawFn) -> tuple[str, str, bytes | None, dict[str, str], dict[str, Any]]:
        path, method, op = draw(st.sampled_from(operations))
        query: dict[str, str] = {}
        for param in op.get("parameters", []):
            if param["in"] == "path":
                value = draw(st.sampled_from(WORDS) | st.text(min_size=1, max_size=12))
                path = path.replace("{" + param["name"] + "}", urllib.parse.quote(value, safe=""))
            elif param["in"] == "query" and draw(st.booleans()):
                value = draw(value_for(param["schema"], defs).map(lambda v: v if isinstance(v, str) else json.dumps(v))
                             | st.sampled_from(WORDS))
                query[param["name"]] = value
        if query:
            path += "?" + urllib.parse.urlencode(query)
        headers = draw(st.sampled_from([{"Authorization": f"Bearer {ALL}"}] * 4 + [{}, {"X-API-Key": "nope"}]))
        if method == "post" and draw(st.booleans()):  # a few keys, so that retries and reuses happen
            headers = {**headers, "Idempotency-Key": draw(st.sampled_from(["k1", "k2", "k 3"]))}
        body = None
        if "requestBody" in op:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            raw_body = draw(st.one_of(
                value_for(schema, defs).map(lambda v: json.dumps(v).encode()),
                st.binary(max_size=30),
            ))
            body, headers = raw_body, {**headers, "Content-Type": "application/json"}
        return method.upper(), path, body, headers, op

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(requests())
    def check(request: tuple[str, str, bytes | None, dict[str, str], dict[str, Any]]) -> None:
        method, path, body, headers, op = request
        status, content_type, raw = served.exchange(method, path, body, headers)
        assert status < 500, (method, path, body, status, raw[:300])
        conforms(doc, op, status, content_type, raw)
        if status >= 400:
            data = json.loads(raw)
            assert set(data) == {"error"} and {"code", "message"} <= set(data["error"]), data
            if status == 422:
                assert data["error"].get("fields"), data

    check()
