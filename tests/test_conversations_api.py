"""Staff replies and the conversations inbox through the integration API, on SQLite and PostgreSQL:
a customer asks for a person, the API's reply is queued (202), sent by the outbox and recorded with the
key's actor; resolve; every bad request gets its status and the API's error shape and writes nothing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from scrm.importer import Importer
from scrm.messages import InboundEvent
from scrm.service import Service
from scrm.store.models import STAFF_REPLY, Conversation, Customer, Delivery, Touchpoint
from scrm.web import SERVICE, create_app
from tests.fakes.wechat import plaintext, text_xml
from tests.test_api import KEYS, READER, SHOP, auth
from tests.test_wechat import TOKEN, customer_of, fake, post, start  # noqa: F401  (fake: a fixture)

AGENT = "agent-key-0123456789abcdef"
API_KEYS = {"api": {"keys": {**KEYS["api"]["keys"],
                             "helpdesk": {"key": AGENT, "scopes": ["messages:write", "conversations:read"]}}}}


@pytest.fixture
async def client(aiohttp_client, make_config, clock):
    return await aiohttp_client(create_app(make_config(API_KEYS), clock))


async def write(service: Service, user: str, text: str, n: list[int] = [0]) -> None:  # noqa: B006
    n[0] += 1
    await service.receive(InboundEvent("console", "local", user, "text", text=text, platform_msg_id=f"{user}-{n[0]}"))


async def settle(service: Service) -> None:
    while await service.outbox.tick():
        pass


async def customer_id(service: Service, user: str) -> int:
    async with service.sessions() as s:
        from scrm.customers import find_customer

        found = await find_customer(s, "console", user, "local")
        assert found is not None
        return found.id


async def written(service: Service) -> tuple[int, ...]:
    """What a refused request must not change: reply deliveries, staff touchpoints, conversation states."""
    async with service.sessions() as s:
        replies = await s.scalar(select(func.count()).select_from(Delivery).where(Delivery.campaign == STAFF_REPLY))
        staff = await s.scalar(select(func.count()).select_from(Touchpoint).where(Touchpoint.actor.like("api:%")))
        states = tuple((await s.scalars(select(Conversation.state).order_by(Conversation.id))).all())
    return (replies, staff, *states)


async def message(client, ref: str, key: str = AGENT, **body: Any):
    return await client.post(f"/api/v1/customers/{ref}/messages", json=body, headers=auth(key))


async def error_of(resp) -> tuple[int, str]:
    body = await resp.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return resp.status, body["error"]["code"]


async def test_api_reply_is_sent_and_recorded_with_the_keys_actor(client, clock):
    service = client.app[SERVICE]
    await write(service, "amy", "转人工")
    clock.advance(timedelta(minutes=2))
    await write(service, "ben", "我的快递到哪了")
    amy = await customer_id(service, "amy")

    inbox = await client.get("/api/v1/conversations", headers=auth(AGENT))
    assert inbox.status == 200
    listed = await inbox.json()
    assert (listed["open"], listed["pending"]) == (2, 0)
    assert [c["customer_id"] for c in listed["conversations"]][0] == amy  # waiting longest
    assert listed["conversations"][1]["last_text"] == "我的快递到哪了"
    assert (await client.get("/api/v1/conversations", headers=auth(READER))).status == 403

    clock.advance(timedelta(minutes=3))
    resp = await message(client, "console:amy", text="您好,我是客服,请讲。")
    assert resp.status == 202, await resp.text()
    out = await resp.json()
    async with service.sessions() as s:
        conv = await s.scalar(select(Conversation).where(Conversation.customer_id == amy))
        assert conv is not None
    assert out == {"conversation": conv.id, "delivery": out["delivery"], "channel": "console", "as_notice": False}
    assert (conv.state, conv.assignee) == ("pending", "api:helpdesk")

    await settle(service)
    async with service.sessions() as s:
        delivery = await s.get(Delivery, out["delivery"])
        assert delivery is not None and (delivery.status, delivery.actor) == ("sent", "api:helpdesk")
        sent = (await s.execute(select(Touchpoint.actor, Touchpoint.text, Touchpoint.customer_id)
                                .where(Touchpoint.kind == "staff_reply"))).all()
        first = await s.scalar(select(Touchpoint.payload).where(Touchpoint.kind == "conversation_first_response"))
    assert sent == [("api:helpdesk", "您好,我是客服,请讲。", amy)]
    assert first == {"conversation": conv.id, "seconds": 300.0}
    assert "您好,我是客服,请讲。" in service.channels[("console", "local")]._mailboxes["amy"]  # type: ignore[attr-defined]

    # resolve: once; then replies are refused until the customer writes again
    resp = await client.post(f"/api/v1/customers/{amy}/conversation/resolve", headers=auth(AGENT))
    assert resp.status == 200 and await resp.json() == {"conversation": conv.id, "customer_id": amy,
                                                          "channel": "console", "state": "resolved"}
    before = await written(service)
    assert await error_of(await client.post(f"/api/v1/customers/{amy}/conversation/resolve", headers=auth(AGENT))) \
        == (409, "conversation_resolved")
    assert await error_of(await message(client, f"%23{amy}", text="还在吗")) == (409, "conversation_resolved")
    assert await written(service) == before
    listed = await (await client.get("/api/v1/conversations", headers=auth(AGENT))).json()
    assert (listed["open"], listed["pending"], len(listed["conversations"])) == (1, 0, 1)

    await write(service, "amy", "又有一个问题")
    resp = await message(client, "console:amy", text="请讲")
    assert resp.status == 202 and (await resp.json())["conversation"] == conv.id


async def test_bad_replies_get_their_status_and_write_nothing(client, tmp_path):
    service = client.app[SERVICE]
    await write(service, "amy", "转人工")
    (tmp_path / "dora.csv").write_text("identity\nconsole:local:dora\n", "utf-8")
    assert (await Importer(service.sessions, service.config, service.keyring, service.clock.now()).run(
        tmp_path / "dora.csv")).created == 1
    before = await written(service)
    cases = [
        (message(client, "console:nobody", text="hello"), (404, "customer_not_found")),
        (message(client, "99999", text="hello"), (404, "customer_not_found")),
        (message(client, "console:amy", text=""), (400, "empty_reply")),
        (message(client, "console:amy", text=" \n\t "), (400, "empty_reply")),
        (message(client, "console:amy", text="长" * 2001), (413, "reply_too_long")),
        (message(client, "console:dora", text="hello"), (409, "no_conversation")),
        (message(client, "console:amy", text="hello", channel="wechat"), (409, "no_conversation")),
        (message(client, "console:amy", text="hello", as_notice=True), (400, "no_notice")),
        (message(client, "console:amy", text="hello", channel="we chat"), (422, "validation_error")),
        (message(client, "console:amy", text="hello", to="someone"), (422, "validation_error")),
        (message(client, "console:amy"), (422, "validation_error")),
        (message(client, "console:amy", key=SHOP, text="hello"), (403, "forbidden")),
        (client.post("/api/v1/customers/console:dora/conversation/resolve", headers=auth(AGENT)),
         (409, "no_conversation")),
        (client.post("/api/v1/customers/console:nobody/conversation/resolve", headers=auth(AGENT)),
         (404, "customer_not_found")),
    ]
    for request, expected in cases:
        assert await error_of(await request) == expected, expected
    assert await written(service) == before
    # and the same reply, well formed, goes through
    assert (await message(client, "console:amy", text="您好")).status == 202
    assert (await written(service))[0] == before[0] + 1


async def test_outside_the_wechat_window_is_refused(aiohttp_client, make_config, clock, fake):
    client, service = await start(aiohttp_client, make_config, clock, fake, overrides=API_KEYS)
    answer = await post(client, plaintext(TOKEN, text_xml("o_amy", "转人工", 41)))
    assert "人工" in await answer.text()
    amy: Customer = await customer_of(service, "o_amy")
    clock.advance(timedelta(hours=48, minutes=1))
    before = await written(service)
    resp = await message(client, "wechat:o_amy", text="还需要帮助吗")
    status, code = await error_of(resp)
    assert (status, code) == (409, "outside_window")
    assert "48 hours" in (await resp.json())["error"]["message"]
    assert await written(service) == before
    clock.advance(timedelta(minutes=1))
    await post(client, plaintext(TOKEN, text_xml("o_amy", "还在吗", 42)))
    resp = await message(client, str(amy.id), text="在的,请讲")
    assert resp.status == 202 and (await resp.json())["channel"] == "wechat"


async def test_openapi_documents_the_conversation_endpoints(client):
    doc = await (await client.get("/api/v1/openapi.json")).json()
    send = doc["paths"]["/api/v1/customers/{ref}/messages"]["post"]
    assert send["x-scope"] == "messages:write"
    assert {"202", "400", "401", "403", "404", "409", "413", "422"} <= set(send["responses"])
    name = send["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert doc["components"]["schemas"][name]["required"] == ["text"]
    assert doc["paths"]["/api/v1/conversations"]["get"]["x-scope"] == "conversations:read"
    resolve = doc["paths"]["/api/v1/customers/{ref}/conversation/resolve"]["post"]
    assert {"200", "404", "409"} <= set(resolve["responses"]) and "requestBody" not in resolve
