"""Signed outbound webhooks: events written with their change, verified by a Standard Webhooks receiver,
delivered in order per customer through failures, filtered, replayed, disabled after 12 hours of failures
(admins told), after a SIGKILL, and the API's scope checks. Both stores, an injected clock for back-off."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from sqlalchemy import func, insert, select
from standardwebhooks import Webhook

from scrm.config_file import load_config
from scrm.store.models import Customer, Touchpoint, WebhookAttempt, WebhookDelivery, WebhookSubscription
from scrm.tagging import tag_where
from scrm.web import SERVICE, create_app
from scrm.webhooks.subscriptions import new_secret
from tests.conftest import cli_env, deep_merge, eventually, example_config

SECRET = new_secret()


@dataclass
class Receiver:
    """A loopback endpoint that verifies every request with the standardwebhooks verifier and keeps the
    events; it answers ``status`` (a list is consumed one answer per request, then 200)."""

    secret: str = SECRET
    events: list[dict[str, Any]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    refused: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        data = await request.read()
        payload = Webhook(self.secret).verify(data, dict(request.headers))  # raises on a bad signature
        status = self.answers.pop(0) if self.answers else 200
        if status != 200:
            self.refused += 1
            return web.Response(status=status)
        self.events.append(payload)
        self.ids.append(request.headers["webhook-id"])
        return web.Response(status=204)

    def kinds(self) -> list[str]:
        return [e["type"] for e in self.events]


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Receiver:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/hook", r.handle)
    server = await aiohttp_server(app)
    r.url = str(server.make_url("/hook"))
    return r


def hooks(receiver: Receiver, events: list[str] | None = None, name: str = "shop") -> dict[str, Any]:
    return {"webhooks": {name: {"url": receiver.url, "secret": receiver.secret, "events": events or []}}}


async def rows(service: Any, *where: Any) -> list[WebhookDelivery]:
    async with service.sessions() as s:
        return list((await s.scalars(select(WebhookDelivery).where(*where).order_by(WebhookDelivery.id))).all())


async def say(client: Any, user: str, text: str, msg_id: str) -> None:
    resp = await client.post("/console/local/messages", json={"user": user, "text": text, "id": msg_id})
    assert resp.status == 200


async def test_events_are_signed_and_verified_by_the_receiver(aiohttp_client, make_config, clock, receiver):
    client = await aiohttp_client(create_app(make_config(hooks(receiver)), clock))
    await say(client, "alice", "我想买奶粉", "a1")
    await eventually(lambda: _has(receiver, {"customer.created", "message.received", "tag.added"}))
    created = next(e for e in receiver.events if e["type"] == "customer.created")
    assert created["data"]["external_id"] == "alice" and created["data"]["channel"] == "console"
    received = next(e for e in receiver.events if e["type"] == "message.received")
    assert received["data"]["text"] == "我想买奶粉" and received["data"]["customer_id"] == created["data"]["customer_id"]
    assert "奶粉" in {e["data"]["tag"] for e in receiver.events if e["type"] == "tag.added"}
    assert len(set(receiver.ids)) == len(receiver.ids), "one webhook-id per event"
    async with client.app[SERVICE].sessions() as s:
        logged = (await s.execute(select(WebhookAttempt.status, WebhookAttempt.http_status, WebhookAttempt.latency_ms))).all()
    assert logged and all(status == "delivered" and code == 204 and ms >= 0 for status, code, ms in logged)


async def _has(receiver: Receiver, kinds: set[str]) -> bool:
    return kinds <= set(receiver.kinds())


async def test_a_subscriptions_filter_and_no_events_without_subscribers(aiohttp_client, make_config, clock, receiver):
    client = await aiohttp_client(create_app(make_config(hooks(receiver, ["tag.added"])), clock))
    service = client.app[SERVICE]
    await say(client, "bo", "奶粉", "b1")
    await eventually(lambda: _has(receiver, {"tag.added"}))
    assert set(await _kinds_stored(service)) == {"tag.added"}, "only the kinds the subscription wants are written"

    # The same store without the subscription in the config: it is turned off, and nothing is written.
    before = len(await _kinds_stored(service))
    await client.close()
    bare = await aiohttp_client(create_app(make_config(), clock))
    await say(bare, "cy", "奶粉", "c1")
    assert len(await _kinds_stored(bare.app[SERVICE])) == before
    async with bare.app[SERVICE].sessions() as s:
        assert (await s.execute(select(WebhookSubscription.enabled, WebhookSubscription.disabled_reason))).all() == [
            (False, "config")]


async def _kinds_stored(service: Any) -> list[str]:
    return [r.kind for r in await rows(service)]


async def test_bulk_tagging_writes_its_events_set_based(aiohttp_client, make_config, clock, receiver):
    client = await aiohttp_client(create_app(make_config(hooks(receiver, ["tag.added", "tag.removed"])), clock))
    service = client.app[SERVICE]
    for n in range(5):
        await say(client, f"p{n}", "你好", f"p{n}")
    now = clock.now()
    async with service.sessions() as s, s.begin():
        added = await tag_where(service, s, Customer.id > 0, "vip", True, "console:op", now)
    async with service.sessions() as s, s.begin():
        removed = await tag_where(service, s, Customer.id > 0, "vip", False, "console:op", now)
    assert added == removed == 5
    await eventually(lambda: _count_kinds(receiver, "tag.added", 5, "tag.removed", 5))
    vip = [e for e in receiver.events if e["data"].get("tag") == "vip"]
    assert sorted(e["data"]["customer_id"] for e in vip if e["type"] == "tag.added") == sorted(
        e["data"]["customer_id"] for e in vip if e["type"] == "tag.removed")
    for customer in {e["data"]["customer_id"] for e in vip}:  # in order per customer: added, then removed
        assert [e["type"] for e in vip if e["data"]["customer_id"] == customer] == ["tag.added", "tag.removed"]


async def _count_kinds(receiver: Receiver, *pairs: Any) -> bool:
    kinds = [e["type"] for e in receiver.events if e["data"].get("tag") in (None, "vip")]
    return all(kinds.count(k) == n for k, n in zip(pairs[::2], pairs[1::2]))


async def _attempts(service: Any) -> int:
    async with service.sessions() as s:
        return int(await s.scalar(select(func.count()).select_from(WebhookAttempt)) or 0)


async def test_a_failing_receiver_gets_everything_in_order_once_it_recovers(aiohttp_client, make_config, clock,
                                                                             receiver):
    receiver.answers = [500, 503, 502]
    kinds = ["customer.created", "message.received", "consent.changed"]  # none written later by jobs
    client = await aiohttp_client(create_app(make_config(hooks(receiver, kinds)), clock))
    service = client.app[SERVICE]
    await say(client, "dee", "我想买奶粉", "d1")
    await say(client, "dee", "退订", "d2")
    stored = await rows(service)
    assert [r.kind for r in stored] == ["customer.created", "message.received", "message.received", "consent.changed"]
    assert {r.customer_id for r in stored} == {stored[0].customer_id}
    for n, wait in enumerate([5, 10, 20], start=1):
        await eventually(lambda n=n: _attempts_are(service, n))
        assert receiver.events == []
        later = await rows(service, WebhookDelivery.id > stored[0].id)
        assert all(r.status == "pending" and r.attempts == 0 for r in later), "later events wait for the first"
        first = (await rows(service, WebhookDelivery.id == stored[0].id))[0]
        assert first.attempts == n and first.due_at == clock.now() + timedelta(seconds=wait), "back-off doubles"
        clock.advance(wait)
        service.webhook_worker.wake()
    await eventually(lambda: _delivered(service, len(stored)))
    assert receiver.ids == [r.event_id for r in stored], "every event once, in the order written"
    assert receiver.refused == 3 and "consent.changed" in receiver.kinds()
    async with service.sessions() as s:
        sub = await s.scalar(select(WebhookSubscription))
        assert sub is not None and sub.enabled and sub.failures == 0 and sub.failing_since is None


async def _attempts_are(service: Any, n: int) -> bool:
    return await _attempts(service) == n


async def _delivered(service: Any, n: int) -> bool:
    return [r.status for r in await rows(service)] == ["delivered"] * n


async def test_a_subscription_failing_for_a_day_is_disabled_and_admins_told(aiohttp_client, make_config, clock,
                                                                             receiver):
    receiver.answers = [500] * 1000
    config = deep_merge(hooks(receiver, ["message.received"]), {"staff": {"console:ada": "admin"}})
    client = await aiohttp_client(create_app(make_config(config), clock))
    service = client.app[SERVICE]
    await say(client, "eve", "你好", "e1")
    start = clock.now()
    for tried in range(1, 100):
        # The event's own row tells both that the attempt is recorded and when the next one is due.
        [event] = await eventually(lambda: _tried(service, tried))
        if await _disabled(service):
            break
        assert event.due_at is not None and event.due_at > clock.now()
        clock.set(event.due_at)
        service.webhook_worker.wake()
    assert await _disabled(service) and clock.now() - start >= timedelta(hours=12)
    async with service.sessions() as s:
        alert = await s.scalar(select(Touchpoint.text).where(Touchpoint.kind == "staff_alert",
                                                            Touchpoint.actor == "staff:console:ada"))
        failures = await s.scalar(select(WebhookSubscription.failures))
    assert alert is not None and "shop" in alert and "scrm webhooks enable shop" in alert
    assert failures is not None and failures >= 10
    # Disabled: the event waits (it is neither dead nor tried again) until the subscription is enabled.
    made = await _attempts(service)
    clock.advance(3600)
    await service.webhook_worker.tick()
    assert await _attempts(service) == made


async def _tried(service: Any, attempts: int) -> list[WebhookDelivery]:
    """The one event once its ``attempts``-th try is recorded (pending again, or waiting while disabled)."""
    return [r for r in await rows(service) if r.attempts >= attempts and r.status == "pending"]


async def _disabled(service: Any) -> bool:
    async with service.sessions() as s:
        return await s.scalar(select(WebhookSubscription.enabled)) is False


async def test_replay_sends_a_subscriptions_events_since_a_moment_again(aiohttp_client, make_config, clock, receiver):
    from scrm.webhooks import log

    client = await aiohttp_client(create_app(make_config(hooks(receiver, ["message.received"])), clock))
    service = client.app[SERVICE]
    await say(client, "fin", "一", "f1")
    clock.advance(60)
    since = clock.now()
    await say(client, "fin", "二", "f2")
    await say(client, "fin", "三", "f3")
    await eventually(lambda: _delivered(service, 3))
    first_ids = list(receiver.ids)
    async with service.sessions() as s, s.begin():
        assert await log.replay(s, "shop", since, clock.now(), 24) == 2
    service.webhook_worker.wake()
    await eventually(lambda: _received(receiver, 5))
    assert receiver.ids == first_ids + first_ids[1:], "the replayed events, in order, with their webhook-ids"
    assert [e["data"]["text"] for e in receiver.events] == ["一", "二", "三", "二", "三"]


async def _received(receiver: Receiver, n: int) -> bool:
    return len(receiver.events) >= n


READ, WRITE, OTHER = "webhooks-read-key-0123456789", "webhooks-write-key-0123456789", "customers-key-0123456789"
API_KEYS = {"api": {"keys": {"reader": {"key": READ, "scopes": ["webhooks:read"]},
                             "writer": {"key": WRITE, "scopes": ["webhooks:read", "webhooks:write"]},
                             "other": {"key": OTHER, "scopes": ["customers:read"]}}}}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_api_subscriptions_scopes_log_test_and_replay(aiohttp_client, make_config, clock, receiver):
    client = await aiohttp_client(create_app(make_config(API_KEYS), clock))
    new = {"name": "crm", "url": receiver.url, "events": ["message.received"]}
    calls = [("GET", "/api/v1/webhooks", None), ("POST", "/api/v1/webhooks", new),
             ("GET", "/api/v1/webhooks/crm", None), ("PATCH", "/api/v1/webhooks/crm", {"enabled": True}),
             ("DELETE", "/api/v1/webhooks/crm", None), ("GET", "/api/v1/webhooks/crm/attempts", None),
             ("POST", "/api/v1/webhooks/crm/test", None), ("POST", "/api/v1/webhooks/crm/replay", {"since": "2026-01-01"})]
    for method, path, body in calls:
        assert (await client.request(method, path, json=body)).status == 401, path
        assert (await client.request(method, path, json=body, headers=auth("wrong-key-0123456789"))).status == 401
        assert (await client.request(method, path, json=body, headers=auth(OTHER))).status == 403, path
        if method != "GET":
            assert (await client.request(method, path, json=body, headers=auth(READ))).status == 403, path
    assert (await client.get("/api/v1/webhooks/crm", headers=auth(READ))).status == 404

    made = await client.post("/api/v1/webhooks", json=new, headers=auth(WRITE))
    assert made.status == 201
    created = await made.json()
    assert created["secret"].startswith("whsec_") and created["events"] == ["message.received"]
    assert (await client.post("/api/v1/webhooks", json=new, headers=auth(WRITE))).status == 409
    assert (await client.post("/api/v1/webhooks", json={**new, "name": "x", "events": ["nope"]},
                              headers=auth(WRITE))).status == 422
    listed = await (await client.get("/api/v1/webhooks", headers=auth(READ))).json()
    assert [w["name"] for w in listed["webhooks"]] == ["crm"] and "secret" not in listed["webhooks"][0]

    receiver.secret = created["secret"]
    await say(client, "gil", "你好", "g1")
    await eventually(lambda: _received(receiver, 1))
    assert receiver.kinds() == ["message.received"]
    test = await client.post("/api/v1/webhooks/crm/test", headers=auth(WRITE))
    assert test.status == 202
    await eventually(lambda: _received(receiver, 2))
    assert receiver.events[-1]["type"] == "webhook.test" and receiver.ids[-1] == (await test.json())["webhook_id"]
    attempts = (await (await client.get("/api/v1/webhooks/crm/attempts", headers=auth(READ))).json())["attempts"]
    assert [a["type"] for a in attempts] == ["webhook.test", "message.received"]
    assert all(a["status"] == "delivered" and a["http_status"] == 204 and a["latency_ms"] >= 0 for a in attempts)

    since = (clock.now() - timedelta(minutes=1)).isoformat()
    replayed = await client.post("/api/v1/webhooks/crm/replay", json={"since": since}, headers=auth(WRITE))
    assert replayed.status == 202 and (await replayed.json())["queued"] == 2
    await eventually(lambda: _received(receiver, 4))
    assert sorted(receiver.ids[2:]) == sorted(receiver.ids[:2])

    off = await client.patch("/api/v1/webhooks/crm", json={"enabled": False}, headers=auth(WRITE))
    assert off.status == 200 and (await off.json())["enabled"] is False
    await say(client, "gil", "还在吗", "g2")
    assert len(await rows(client.app[SERVICE], WebhookDelivery.kind == "message.received")) == 1, \
        "a disabled subscription is sent nothing new"
    assert (await client.delete("/api/v1/webhooks/crm", headers=auth(WRITE))).status == 200
    assert (await client.get("/api/v1/webhooks/crm", headers=auth(READ))).status == 404


async def test_sigkill_between_the_change_and_its_delivery_delivers_after_restart(tmp_path: Path, store: dict[str, Any],
                                                                                  aiohttp_server: Any) -> None:
    """A real ``scrm run`` commits a message's events, posts the first to a receiver that holds the request,
    and is SIGKILLed with it in flight; the next instance delivers every event, the held one included."""
    from tests.e2e import Instance, dump_toml, kill_all, store_engine, wait_for
    from scrm.store.engine import make_sessionmaker

    hold = asyncio.Event()
    held: list[str] = []
    receiver = Receiver()

    async def handle(request: web.Request) -> web.Response:
        if not hold.is_set():
            held.append(request.headers["webhook-id"])
            await hold.wait()  # the service dies while waiting for this answer
            return web.Response(status=500)
        return await receiver.handle(request)

    app = web.Application()
    app.router.add_post("/hook", handle)
    server = await aiohttp_server(app)
    receiver.url = str(server.make_url("/hook"))
    data = deep_merge(example_config(), {
        "store": store, "campaigns": {"path": str(tmp_path / "campaigns")},
        "scheduler": {"outbox_tick_seconds": 0.2}, "cluster": {"heartbeat_seconds": 0.5, "lease_seconds": 3},
        "privacy": {"key_file": str(tmp_path / "privacy.key")}, "logging": {"level": "WARNING"},
        **hooks(receiver, ["customer.created", "message.received", "tag.added"])})
    (tmp_path / "campaigns").mkdir()
    config = tmp_path / "config.toml"
    config.write_text(dump_toml(data) + "\n", "utf-8")
    first, second = Instance(config, "web-1"), Instance(config, "web-2")
    engine = store_engine(config)
    sessions = make_sessionmaker(engine)
    try:
        await first.start()
        await first.wait_ready()
        async with ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{first.port}/console/local/messages",
                                 json={"user": "kim", "text": "我想买奶粉", "id": "k1"}) as resp:
                assert resp.status == 200  # committed: the events are in the store
        await wait_for(lambda: held, 30, lambda: f"the first event posted\n{first.tail()}")
        await first.kill()
        async with sessions() as s:
            at_kill = (await s.execute(select(WebhookDelivery.event_id, WebhookDelivery.status)
                                       .order_by(WebhookDelivery.id))).all()
        assert at_kill[0] == (held[0], "claimed") and len(at_kill) >= 3
        assert all(status == "pending" for _, status in at_kill[1:]), "the customer's later events wait"
        hold.set()
        await second.start()
        await second.wait_ready()
        await wait_for(lambda: len(receiver.ids) >= len(at_kill), 60, lambda: f"all delivered\n{second.tail()}")

        async def recorded() -> list[Any]:  # the worker records each answer after the receiver gave it
            async with sessions() as s:
                rows = (await s.execute(select(WebhookDelivery.event_id, WebhookDelivery.status)
                                        .order_by(WebhookDelivery.id))).all()
            return list(rows) if all(status != "claimed" for _, status in rows) else []

        final = await wait_for(recorded, 60, lambda: f"every answer recorded\n{second.tail()}")
    finally:
        await kill_all([first, second])
        await engine.dispose()
    assert receiver.ids == [event_id for event_id, _ in at_kill], "each event once after the restart, in order"
    assert [status for _, status in final] == ["delivered"] * len(at_kill)


def scrm(cwd: Path, store: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scrm", *args], cwd=cwd, env=cli_env(store), capture_output=True,
                          text=True, timeout=120, check=False)


async def test_cli_lists_tests_logs_and_replays(tmp_path: Path, store: dict[str, Any], receiver: Receiver) -> None:
    assert (await asyncio.to_thread(scrm, tmp_path, store, "init")).returncode == 0
    config = tmp_path / "config.toml"
    config.write_text(config.read_text("utf-8") + f'\n[webhooks.shop]\nurl = "{receiver.url}"\nsecret = "{SECRET}"\n'
                      'events = ["customer.created", "tag.added"]\n', "utf-8")

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(scrm, tmp_path, store, *args)

    listed = await run("webhooks", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    shop = json.loads(listed.stdout)
    assert (shop["name"], shop["events"], shop["source"], shop["enabled"], shop["pending"]) == (
        "shop", ["customer.created", "tag.added"], "config", True, 0)
    queued = await run("webhooks", "test", "shop")
    assert queued.returncode == 0 and "queued webhook.test msg_" in queued.stdout, queued.stderr
    (tmp_path / "people.csv").write_text("name,identity,tags\nAnn,console:ann,vip\nBen,console:ben,vip\n", "utf-8")
    imported = await run("customers", "import", "people.csv")  # a command's changes emit their events too
    assert imported.returncode == 0, imported.stderr
    app = create_app(load_config(config, environ=cli_env(store)))  # the store (and schema) the commands used
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await eventually(lambda: _received(receiver, 5))
        assert sorted(receiver.kinds()) == ["customer.created"] * 2 + ["tag.added"] * 2 + ["webhook.test"]
        assert next(e for e in receiver.events if e["type"] == "webhook.test")["data"] == {"subscription": "shop"}
        for customer in {e["data"]["customer_id"] for e in receiver.events if e["type"] == "tag.added"}:
            assert [e["type"] for e in receiver.events if e["data"].get("customer_id") == customer] == [
                "customer.created", "tag.added"]
        logged = await run("webhooks", "log", "shop", "--json")
        assert logged.returncode == 0, logged.stderr
        entries = [json.loads(line) for line in logged.stdout.splitlines()]
        assert len(entries) == 5 and all(e["latency_ms"] >= 0 for e in entries)
        assert ("webhook.test", "delivered", 204) in [(e["kind"], e["status"], e["http_status"]) for e in entries]
        replayed = await run("webhooks", "replay", "shop", "--since", "2000-01-01")
        assert replayed.returncode == 0 and "5 event(s) of shop queued again" in replayed.stdout, replayed.stderr
        await eventually(lambda: _received(receiver, 10))
        assert sorted(receiver.ids[5:]) == sorted(receiver.ids[:5]), "replayed with their webhook-ids"
    finally:
        await runner.cleanup()
    unknown = await run("webhooks", "replay", "nosuch", "--since", "2000-01-01")
    assert unknown.returncode == 1 and "no webhook subscription nosuch" in unknown.stderr


async def test_two_instances_share_the_events_and_post_each_once(aiohttp_client, make_config, clock, receiver):
    slow = receiver.handle

    async def handle_slowly(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)  # deliveries take a while: both instances' workers are at it together
        return await slow(request)

    receiver.handle = handle_slowly
    config = make_config(deep_merge(hooks(receiver, ["tag.added"]), {
        "webhook_delivery": {"concurrency": 4}, "scheduler": {"outbox_tick_seconds": 0.1}}))
    one = await aiohttp_client(create_app(config, clock))
    two = await aiohttp_client(create_app(config, clock))
    first, second = one.app[SERVICE], two.app[SERVICE]
    now = clock.now()
    async with first.sessions() as s, s.begin():
        await s.execute(insert(Customer), [{"display_name": f"m{i}", "first_seen_at": now, "last_seen_at": now,
                                            "attributes": {}, "stage": "acquisition", "opted_out": False}
                                           for i in range(150)])
    for n, service in enumerate((first, second)):  # each instance writes one bulk change's events
        async with service.sessions() as s, s.begin():
            assert await tag_where(service, s, Customer.id > 0, f"wave-{n}", True, "test", now) == 150
    claimers: set[str] = set()

    async def all_delivered() -> bool:
        async with first.sessions() as s:
            claimers.update(c for c in (await s.scalars(select(WebhookDelivery.claimed_by).where(
                WebhookDelivery.claimed_by.is_not(None)))).all())
        return len(receiver.ids) >= 300

    await eventually(all_delivered, interval=0.01)
    await asyncio.sleep(0.3)  # a second post of anything would arrive by now
    assert len(receiver.ids) == len(set(receiver.ids)) == 300, "each event posted once"
    assert claimers == {first.instance_id, second.instance_id}, "both instances posted"
    by_customer: dict[int, list[str]] = {}
    for event in receiver.events:
        by_customer.setdefault(event["data"]["customer_id"], []).append(event["data"]["tag"])
    assert all(tags == ["wave-0", "wave-1"] for tags in by_customer.values()), "in order per customer"


async def test_erasure_is_an_event_and_leaves_no_text_in_the_outbox(aiohttp_client, make_config, clock, receiver):
    from scrm.personal import erase

    client = await aiohttp_client(create_app(make_config(hooks(receiver, ["message.received", "customer.erased"])),
                                             clock))
    service = client.app[SERVICE]
    await say(client, "hal", "我的地址是人民路 1 号", "h1")
    await eventually(lambda: _received(receiver, 1))
    async with service.sessions() as s, s.begin():
        customer = await s.get(Customer, receiver.events[0]["data"]["customer_id"])
        assert customer is not None
        await erase(s, customer, clock.now())
    await eventually(lambda: _received(receiver, 2))
    assert receiver.events[1]["type"] == "customer.erased"
    stored = await rows(service, WebhookDelivery.kind == "message.received")
    assert [r.payload for r in stored] == [{"redacted": True}]


async def test_staff_chat_is_no_customer_message(aiohttp_client, make_config, clock, receiver):
    client = await aiohttp_client(create_app(make_config(hooks(receiver, ["message.received", "message.sent"])), clock))
    await say(client, "bob", "/report", "s1")  # console:bob is a manager in the demo config
    await say(client, "ivy", "营业时间?", "i1")  # a customer, answered by the demo's opening-hours rule
    await eventually(lambda: _has(receiver, {"message.received", "message.sent"}))
    assert {e["data"]["customer_id"] for e in receiver.events} == {receiver.events[0]["data"]["customer_id"]}
    assert sorted(receiver.kinds()) == ["message.received", "message.sent"]


async def test_conversation_events(aiohttp_client, make_config, clock, receiver):
    kinds = ["conversation.opened", "conversation.assigned", "conversation.resolved"]
    client = await aiohttp_client(create_app(make_config(hooks(receiver, kinds)), clock))
    await say(client, "jo", "转人工", "j1")  # asking for a person opens a conversation
    await eventually(lambda: _has(receiver, {"conversation.opened"}))
    opened = next(e for e in receiver.events if e["type"] == "conversation.opened")
    assert opened["data"]["channel"] == "console" and opened["data"]["customer_id"] > 0


async def test_a_code_scan_is_an_event(aiohttp_client, aiohttp_server, make_config, clock, receiver):
    from scrm.acquisition import codes
    from scrm.acquisition.codes import CodeSpec
    from tests.fakes.telegram import FakeTelegram, Updates, user

    token, secret = "123456789:AAwebhooksTestTokenForTheFakeBotApi000", "webhooks-test-secret"
    fake = FakeTelegram(token)
    fake.base_url = str((await aiohttp_server(fake.app())).make_url("/bot"))
    config = make_config(deep_merge(hooks(receiver, ["code.scanned", "tag.added"]), {"channels": {"telegram": {
        "main": {"token": token, "webhook_secret": secret, "api_base_url": fake.base_url}}}}))
    client = await aiohttp_client(create_app(config, clock))
    await codes.create(client.app[SERVICE], CodeSpec("flyer_7", "telegram:main", tags=("flyer",)), None)
    resp = await client.post("/telegram/main", json=Updates(fake.bot_user).text(user(4242, "Dana"), "/start flyer_7"),
                             headers={"X-Telegram-Bot-Api-Secret-Token": secret})
    assert resp.status == 200
    await eventually(lambda: _has(receiver, {"code.scanned", "tag.added"}))
    scanned = next(e for e in receiver.events if e["type"] == "code.scanned")
    assert scanned["data"]["channel"] == "telegram" and "flyer_7" in json.dumps(scanned["data"])
    assert {"flyer"} <= {e["data"]["tag"] for e in receiver.events if e["type"] == "tag.added"}
