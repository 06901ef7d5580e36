"""The WeCom channel through the real app against a fake WeCom API, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import func, select

from handlers.wecom import WeComChannel
from scrm.config import ConfigError
from scrm.messages import OutboundMessage
from scrm.store.models import (
    CouponCode,
    Customer,
    CustomerTag,
    Delivery,
    Identity,
    Tag,
    Touchpoint,
)
from scrm.web import SERVICE, create_app
from tests.conftest import applied, eventually
from tests.fakes.wecom import CallbackSigner, FakeWeCom, chat_event, contact_event

CORP_ID = "ww5f3c0d2e9a8b7c6d"
SECRET = "customer-contact-secret"
TOKEN = "callbacktoken"
AES_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
SIGNER = CallbackSigner(CORP_ID, TOKEN, AES_KEY)

WELCOME = {
    "store_a": {"text": "{{ customer.name }},欢迎光临A店!新人券 {{ coupon.code }},面值 {{ coupon.value }} 元。",
                "coupon_pool": "welcome", "tags": ["store_a", "新客"]},
    "ghost": {"text": "{{ customer.name }} {{ coupon.code }}", "coupon_pool": "no_such_pool", "tags": ["ghost"]},
    "default": {"text": "{{ customer.name }},欢迎!", "tags": ["wecom"]},
}


def account(base_url: str, **extra: Any) -> dict[str, Any]:
    return {"corp_id": CORP_ID, "secret": SECRET, "token": TOKEN, "encoding_aes_key": AES_KEY,
            "api_base_url": base_url, "sender": "zhangsan", "welcome": WELCOME, "result_poll_seconds": 0.2,
            "retry_after_seconds": 0.5, **extra}


@pytest.fixture
async def fake(aiohttp_server) -> FakeWeCom:
    wecom = FakeWeCom(CORP_ID, SECRET)
    server = await aiohttp_server(wecom.app)
    wecom.url = str(server.make_url("/"))  # type: ignore[attr-defined]
    return wecom


@pytest.fixture
async def client(aiohttp_client, make_config, clock, fake):
    config = make_config({"service": {"max_body_bytes": 16384},
                          "channels": {"wecom": {"acme": account(fake.url)}}})
    return await aiohttp_client(create_app(config, clock))


async def post(client, xml: str, **kwargs: Any):
    params, body = SIGNER.post(xml, **kwargs)
    return await client.post("/wecom/acme", params=params, data=body)


async def ok(client, xml: str) -> None:
    """Post a callback; WeCom is answered once its event is durable: wait until it is applied too."""
    resp = await post(client, xml)
    assert resp.status == 200, await resp.text()
    assert await resp.text() == "success"
    await applied(client.app[SERVICE])


def channel(client) -> WeComChannel:
    found = client.app[SERVICE].channel("wecom", "acme")
    assert isinstance(found, WeComChannel)
    return found


async def scalar(client, query: Any) -> Any:
    async with client.app[SERVICE].sessions() as s:
        return await s.scalar(query)


async def rows(client, query: Any) -> list[Any]:
    async with client.app[SERVICE].sessions() as s:
        return list((await s.scalars(query)).all())


async def customer(client, external_id: str) -> Customer | None:
    return await scalar(client, select(Customer).join(Identity).where(
        Identity.channel == "wecom", Identity.external_id == external_id))


async def touchpoints(client, kind: str) -> list[Touchpoint]:
    return await rows(client, select(Touchpoint).where(Touchpoint.kind == kind).order_by(Touchpoint.id))


async def finished_delivery(client, customer_id: int) -> Delivery | None:
    d = await scalar(client, select(Delivery).where(Delivery.customer_id == customer_id))
    return d if d is not None and d.status not in ("planned", "claimed", "sending") else None


async def test_url_verification(client):
    resp = await client.get("/wecom/acme", params=SIGNER.verify("echo-1234567890"))
    assert resp.status == 200 and await resp.text() == "echo-1234567890"
    resp = await client.get("/wecom/acme", params=SIGNER.verify("echo", token="not-the-token"))
    assert resp.status == 403
    params = SIGNER.verify("echo")
    del params["echostr"]
    assert (await client.get("/wecom/acme", params=params)).status == 400


async def test_new_contact_gets_one_personal_welcome_with_a_coupon(client, fake):
    fake.add_contact("wmStoreA01", "小王")
    code = fake.issue_welcome_code()
    xml = contact_event(CORP_ID, "add_external_contact", "wmStoreA01", state="store_a", welcome_code=code)
    params, body = SIGNER.post(xml)
    for _ in range(2):  # WeCom retries the same callback when the answer is late
        resp = await client.post("/wecom/acme", params=params, data=body)
        assert resp.status == 200 and await resp.text() == "success"

    c = await eventually(lambda: customer(client, "wmStoreA01"))
    assert c.acquisition_source == "wecom:state:store_a"
    sent = await eventually(lambda: touchpoints(client, "welcome_message"))
    assert len(fake.welcomes) == 1
    used, age, welcome = fake.welcomes[0]
    assert used == code and age < 20
    codes = await rows(client, select(CouponCode).where(CouponCode.customer_id == c.id))
    assert len(codes) == 1
    assert welcome["text"]["content"] == f"小王,欢迎光临A店!新人券 {codes[0].code},面值 10 元。"
    assert [(t.customer_id, t.payload["coupon"], t.payload["state"]) for t in sent] == [(c.id, codes[0].code, "store_a")]
    tags = await rows(client, select(Tag.name).join(CustomerTag).where(CustomerTag.customer_id == c.id))
    assert set(tags) == {"store_a", "新客"}
    assert (await customer(client, "wmStoreA01")).display_name == "小王"
    assert len(await touchpoints(client, "subscribe")) == 1

    # The demo welcome campaign (first_message) also planned a welcome: it must not greet them twice.
    delivery = await eventually(lambda: finished_delivery(client, c.id))
    assert delivery.status == "skipped" and delivery.reason in ("wecom:welcomed_on_add", "coupon_limit_reached")
    assert fake.calls_to("externalcontact/add_msg_template") == []
    assert len(fake.welcomes) == 1
    # One coupon given: if the campaign granted one in a race with the welcome, the skipped campaign
    # message's code went back to the pool.
    assert await scalar(client, select(func.count()).select_from(CouponCode)
                        .where(CouponCode.customer_id.is_not(None))) == 1


async def test_expired_welcome_code_is_recorded_not_fatal(client, fake):
    fake.add_contact("wmLate", "老李")
    code = fake.issue_welcome_code(age=25)
    await ok(client, contact_event(CORP_ID, "add_external_contact", "wmLate", state="store_a", welcome_code=code))
    failed = await eventually(lambda: touchpoints(client, "welcome_failed"))
    assert failed[0].payload["errcode"] == 41051 and failed[0].payload["state"] == "store_a"
    assert fake.welcomes == [] and await touchpoints(client, "welcome_message") == []
    c = await customer(client, "wmLate")
    tags = await rows(client, select(Tag.name).join(CustomerTag).where(CustomerTag.customer_id == c.id))
    assert set(tags) == {"store_a", "新客"}
    # Not welcomed, so the welcome campaign reaches them as a mass-send task, never a second coupon.
    delivery = await eventually(lambda: finished_delivery(client, c.id))
    assert await scalar(client, select(func.count()).select_from(CouponCode)) <= 1
    if delivery.status == "sent":
        [task] = fake.calls_to("externalcontact/add_msg_template")
        held = await scalar(client, select(CouponCode.code).where(CouponCode.customer_id == c.id))
        assert task["external_userid"] == ["wmLate"] and held in task["text"]["content"]
    else:
        assert (delivery.status, delivery.reason) == ("skipped", "coupon_limit_reached")
    # the service still works
    await ok(client, contact_event(CORP_ID, "edit_external_contact", "wmLate"))
    assert len(await touchpoints(client, "contact_updated")) == 1


async def test_unknown_coupon_pool_is_a_clear_failure(client, fake):
    code = fake.issue_welcome_code()
    await ok(client, contact_event(CORP_ID, "add_external_contact", "wmGhost", state="ghost", welcome_code=code))
    failed = await eventually(lambda: touchpoints(client, "welcome_failed"))
    assert failed[0].payload["errcode"] == "config"
    assert failed[0].payload["errmsg"] == "unknown_coupon_pool:no_such_pool"
    assert fake.welcomes == []


async def test_contact_removed_marks_lost_and_opted_out(client, fake):
    await ok(client, contact_event(CORP_ID, "add_external_contact", "wmGone"))
    await ok(client, contact_event(CORP_ID, "del_follow_user", "wmGone"))
    c = await customer(client, "wmGone")
    assert (c.stage, c.opted_out, c.acquisition_source) == ("lost", True, "wecom:staff:zhangsan")
    await ok(client, contact_event(CORP_ID, "add_external_contact", "wmCut"))
    await ok(client, contact_event(CORP_ID, "del_external_contact", "wmCut"))
    await ok(client, contact_event(CORP_ID, "transfer_fail", "wmCut", fail_reason="customer_refused"))
    removed = await touchpoints(client, "contact_removed")
    assert [t.payload["by"] for t in removed] == ["customer", "staff"]
    assert (await customer(client, "wmCut")).stage == "lost"
    [failed] = await touchpoints(client, "transfer_failed")
    assert failed.payload["fail_reason"] == "customer_refused"


async def test_customer_groups(client, fake):
    fake.add_group("wrChat01", "zhangsan", {"zhangsan": 1, "wmMemberA": 2})
    await ok(client, chat_event(CORP_ID, "create", "wrChat01", create_time=1700000000))
    fake.groups["wrChat01"]["members"].update({"wmMemberB": 2, "lisi": 1})
    add = chat_event(CORP_ID, "update", "wrChat01", detail="add_member", create_time=1700000100)
    await ok(client, add)
    await ok(client, add)  # retried
    await ok(client, chat_event(CORP_ID, "update", "wrChat01", detail="del_member", members=["wmMemberA"],
                                create_time=1700000200))
    del fake.groups["wrChat01"]["members"]["wmMemberB"]
    await ok(client, chat_event(CORP_ID, "update", "wrChat01", detail="del_member", create_time=1700000300))
    await ok(client, chat_event(CORP_ID, "dismiss", "wrChat01", create_time=1700000400))

    joined = [(t.payload["group_id"], t.customer_id) for t in await touchpoints(client, "group_joined")]
    left = [(t.payload["group_id"], t.customer_id) for t in await touchpoints(client, "group_left")]
    a, b = await customer(client, "wmMemberA"), await customer(client, "wmMemberB")
    assert joined == [("wrChat01", a.id), ("wrChat01", b.id)]
    assert left == [("wrChat01", a.id), ("wrChat01", b.id)]
    group = [(t.kind, t.actor, t.customer_id) for t in await rows(client, select(Touchpoint).where(
        Touchpoint.actor.is_not(None)).order_by(Touchpoint.id))]
    assert group == [("group_created", "wecom-group:wrChat01", None)] + [
        ("group_updated", "wecom-group:wrChat01", None)] * 3 + [("group_dismissed", "wecom-group:wrChat01", None)]
    # groups and staff are not customers
    assert await customer(client, "wrChat01") is None and await customer(client, "lisi") is None
    assert await scalar(client, select(func.count()).select_from(Customer)) == 2

    fake.add_group("wrChat02", "wangwu", {"wangwu": 1})
    result = await channel(client).send_group("wrChat02", "本周群活动")
    assert result.status == "sent"
    [task] = [b for b in fake.calls_to("externalcontact/add_msg_template") if b["chat_type"] == "group"]
    assert (task["chat_type"], task["sender"], task["chat_id_list"]) == ("group", "wangwu", ["wrChat02"])


async def test_campaign_goes_out_as_mass_send_and_results_are_polled(client, fake):
    fake.add_contact("wmMass", "阿强")
    # The send finds the token the contact lookup fetched expired (42001): it must refresh it and carry on.
    fake.expire_on.add("externalcontact/add_msg_template")
    await ok(client, contact_event(CORP_ID, "add_external_contact", "wmMass"))  # no WelcomeCode: console welcome
    c = await eventually(lambda: customer(client, "wmMass"))
    delivery = await eventually(lambda: finished_delivery(client, c.id))
    assert (delivery.campaign, delivery.status) == ("welcome", "sent")
    [task] = [t.body for t in fake.tasks.values()]
    assert len(fake.calls_to("gettoken")) == 2  # refreshed after 42001
    code = await scalar(client, select(CouponCode.code).where(CouponCode.customer_id == c.id))
    assert task["chat_type"] == "single" and task["external_userid"] == ["wmMass"] and task["sender"] == "zhangsan"
    assert code in task["text"]["content"]
    tags = await rows(client, select(Tag.name).join(CustomerTag).where(CustomerTag.customer_id == c.id))
    assert tags == ["wecom"]  # the default rule's tags, without a welcome message

    # Not delivered until the staff member confirms: the poll records nothing yet.
    await asyncio.sleep(0.5)
    assert await touchpoints(client, "mass_send_result") == []
    [msgid] = fake.tasks
    fake.confirm(msgid, {"wmMass": 3})
    [result] = await eventually(lambda: touchpoints(client, "mass_send_result"))
    assert result.customer_id == c.id and result.campaign == "welcome" and result.delivery_id == delivery.id
    assert (result.payload["status"], result.payload["reason"]) == (3, "over_receive_limit")
    assert await channel(client).poll_results() == 0  # final results are not recorded twice
    assert len(await touchpoints(client, "mass_send_result")) == 1


async def test_send_maps_wecom_errors(client, fake):
    fake.add_contact("wmErr", "E")
    wecom = channel(client)
    message = OutboundMessage("wecom", "acme", "wmErr", "hello 你好", delivery_id=None, campaign=None)
    for errcode, status in ((-1, "retry"), (45009, "retry"), (45033, "retry"), (40096, "failed"),
                            (41009, "failed")):
        fake.fail_next["externalcontact/add_msg_template"] = [(errcode, "forced")]
        result = await wecom.send(message)
        assert (result.status, result.reason) == (status, f"wecom:{errcode}")
        assert result.retry_after == (0.5 if status == "retry" else 0.0)
    result = await wecom.send(OutboundMessage("wecom", "acme", "wmStranger", "hi"))
    assert (result.status, result.reason) == ("failed", "wecom:not_sendable")
    result = await wecom.send(message)
    assert result.status == "sent" and result.platform_msg_id in fake.tasks
    assert "\\u" not in str(fake.calls_to("externalcontact/add_msg_template")[-1])
    assert len(fake.calls_to("gettoken")) == 1  # cached


async def test_unreachable_api_is_retried(aiohttp_client, make_config, clock, unused_tcp_port):
    config = make_config({"channels": {"wecom": {"acme": account(f"http://127.0.0.1:{unused_tcp_port}/")}}})
    client = await aiohttp_client(create_app(config, clock))
    result = await channel(client).send(OutboundMessage("wecom", "acme", "wmX", "hi"))
    assert (result.status, result.reason) == ("retry", "wecom:unreachable")


async def test_bad_input_is_refused_and_writes_nothing(client, fake):
    xml = contact_event(CORP_ID, "add_external_contact", "wmBad")
    assert (await post(client, xml, token="wrong")).status == 403
    params, body = SIGNER.post(xml)
    assert (await client.post("/wecom/acme", params={**params, "msg_signature": ""}, data=body)).status == 403
    doctype = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e "boom">]><xml><Encrypt>&e;</Encrypt></xml>'
    assert (await client.post("/wecom/acme", params=params, data=doctype)).status == 400
    inner = '<!DOCTYPE xml [<!ENTITY e SYSTEM "file:///etc/passwd">]>' + xml
    assert (await post(client, inner)).status == 400
    assert (await client.post("/wecom/acme", params=params, data=b"<xml><Encrypt>")).status == 400
    assert (await client.post("/wecom/acme", params=params, data=b"not xml at all")).status == 400
    assert (await post(client, "<xml><MsgType>event</MsgType><Event>change_external_contact</Event>"
                               "<ChangeType>add_external_contact</ChangeType></xml>")).status == 400
    assert (await post(client, "plain text, not xml")).status == 400
    big_params, big = SIGNER.post(xml.replace("zhangsan", "z" * 20000))
    assert (await client.post("/wecom/acme", params=big_params, data=big)).status == 413
    assert (await client.post("/wecom/unknown", params=params, data=body)).status == 404
    assert await scalar(client, select(func.count()).select_from(Touchpoint)) == 0
    assert await scalar(client, select(func.count()).select_from(Customer)) == 0
    assert fake.calls == []


def test_settings_are_checked_at_load(make_config):
    with pytest.raises(ConfigError) as err:
        make_config({"channels": {"wecom": {"acme": account("http://127.0.0.1:1/", welcome={
            "store_a": {"text": "{{ customer.nmae }} {{ coupon.code }}"},
            "x" * 31: {"text": "hi"}})}}})
    problems = "\n".join(err.value.problems)
    assert "channels.wecom.acme.welcome.store_a" in problems and "coupon" in problems
    assert f"channels.wecom.acme.welcome.{'x' * 31}.[key]: String should have at most 30 characters" in problems
