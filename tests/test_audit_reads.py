"""Every read of a customer's personal data by staff in chat or by an API key is in the audit log."""

from __future__ import annotations

from scrm.audit import entries
from scrm.web import SERVICE, create_app
from tests.conftest import deep_merge
from tests.test_api import KEYS, READER, auth


async def test_staff_chat_and_api_reads_are_audited(aiohttp_client, make_config, clock):
    config = make_config(deep_merge(KEYS, {"staff": {"console:bob": "manager"}}))
    client = await aiohttp_client(create_app(config, clock))
    service = client.app[SERVICE]
    said = await client.post("/console/local/messages", json={"user": "alice", "text": "你好", "id": "a1"})
    assert said.status == 200
    card = await client.post("/console/local/messages", json={"user": "bob", "text": "/customer console:alice", "id": "b1"})
    assert "alice" in (await card.json())["replies"][0]
    refused = await client.post("/console/local/messages", json={"user": "alice", "text": "/customer console:alice",
                                                                 "id": "a2"})
    assert "仅限员工" in (await refused.json())["replies"][0]  # a customer asking reads nothing, is not audited
    api = await client.get("/api/v1/customers/console:alice", headers=auth(READER))
    assert api.status == 200
    async with service.sessions() as s:
        log = [(e.actor, e.role, e.action) for e in await entries(s)]
    assert log == [("staff:console:bob", "manager", "view"), ("api:reader", None, "view")]
