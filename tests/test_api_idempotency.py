"""``Idempotency-Key`` on the API's POSTs, on SQLite and PostgreSQL: a retry gets the first answer and
does nothing again; the key with another request is refused; an error is not kept (the retry runs); a
key still being answered is 409; keys are the caller's own and last 24 hours."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select

from scrm.store.models import ApiIdempotencyKey, Touchpoint
from scrm.web import SERVICE
from tests.test_api import READER, SHOP, auth, client  # noqa: F401  (client: a fixture)
from tests.test_foundation_flow import say

TAGS = "/api/v1/customers/console:alice/tags"


def keyed(key: str, idempotency_key: str) -> dict[str, str]:
    return {**auth(key), "Idempotency-Key": idempotency_key}


async def tag_changes(client) -> int:
    async with client.app[SERVICE].sessions() as s:
        return int(await s.scalar(select(func.count()).select_from(Touchpoint).where(
            Touchpoint.kind.in_(["tag_added", "tag_removed"]), Touchpoint.actor == "api:shop")))


async def test_a_retry_gets_the_first_answer(client, clock):
    # an error is not kept: the retry, once it can succeed, runs
    assert (await client.post(TAGS, json={"add": ["gold"]}, headers=keyed(SHOP, "k-0"))).status == 404
    await say(client, "alice", "你好")
    resp = await client.post(TAGS, json={"add": ["gold"]}, headers=keyed(SHOP, "k-0"))
    assert resp.status == 200 and (await resp.json())["changed"] == ["+gold"]
    assert await tag_changes(client) == 1
    first = await client.post(TAGS, json={"add": ["vip"]}, headers=keyed(SHOP, "k-1"))
    assert first.status == 200 and (await first.json())["changed"] == ["+vip"]
    assert "Idempotent-Replayed" not in first.headers
    # someone removes the tag; the shop's retry of its first request changes nothing and says what it said
    assert (await client.post(TAGS, json={"remove": ["vip"]}, headers=auth(SHOP))).status == 200
    assert await tag_changes(client) == 3
    again = await client.post(TAGS, json={"add": ["vip"]}, headers=keyed(SHOP, "k-1"))
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == await first.json()
    assert await tag_changes(client) == 3

    # the same key with another request: refused, nothing done
    other = await client.post(TAGS, json={"add": ["silver"]}, headers=keyed(SHOP, "k-1"))
    assert other.status == 422 and (await other.json())["error"]["code"] == "idempotency_key_reused"
    assert await tag_changes(client) == 3
    # a malformed key
    bad = await client.post(TAGS, json={"add": ["gold"]}, headers=keyed(SHOP, "a key with spaces"))
    assert bad.status == 422 and (await bad.json())["error"]["fields"][0]["field"] == "header.Idempotency-Key"

    # keys are per API key: another caller's "k-1" is its own
    async with client.app[SERVICE].sessions() as s:
        assert (await s.scalars(select(ApiIdempotencyKey.key_name).where(
            ApiIdempotencyKey.idempotency_key == "k-1"))).all() == ["shop"]

    # kept 24 hours: after that the key is new again (and the expired answers are deleted)
    clock.advance(timedelta(hours=24, minutes=1))
    resp = await client.post(TAGS, json={"add": ["vip"]}, headers=keyed(SHOP, "k-1"))
    assert "Idempotent-Replayed" not in resp.headers and (await resp.json())["changed"] == ["+vip"]
    async with client.app[SERVICE].sessions() as s:
        assert (await s.scalars(select(ApiIdempotencyKey.idempotency_key))).all() == ["k-1"]
        # (k-0's answer was older than 24 hours: deleted as k-1 came in again)


async def test_a_key_being_answered_is_409_until_abandoned(client, clock):
    await say(client, "alice", "你好")
    async with client.app[SERVICE].sessions() as s, s.begin():  # another instance is answering it now
        s.add(ApiIdempotencyKey(key_name="shop", idempotency_key="k-9", fingerprint="-", created_at=clock.now()))
    resp = await client.post(TAGS, json={"add": ["vip"]}, headers=keyed(SHOP, "k-9"))
    assert resp.status == 422  # another request's fingerprint
    async with client.app[SERVICE].sessions() as s, s.begin():
        row = await s.scalar(select(ApiIdempotencyKey))
        assert row is not None
        from scrm.api.idempotency import fingerprint

        row.fingerprint = fingerprint("POST", TAGS, b'{"add": ["vip"]}')
    resp = await client.post(TAGS, data=b'{"add": ["vip"]}', headers=keyed(SHOP, "k-9"))
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "idempotency_in_progress"
    assert await tag_changes(client) == 0
    clock.advance(timedelta(minutes=6))  # that instance stopped mid-request: the retry takes the key over
    resp = await client.post(TAGS, data=b'{"add": ["vip"]}', headers=keyed(SHOP, "k-9"))
    assert resp.status == 200 and await tag_changes(client) == 1
    # GETs ignore the header; a key without the scope is refused before the key is looked at
    assert (await client.get("/api/v1/customers/console:alice", headers=keyed(READER, "k-9"))).status == 200
    assert (await client.post(TAGS, data=b'{"add": ["vip"]}', headers=keyed(READER, "k-9"))).status == 403
