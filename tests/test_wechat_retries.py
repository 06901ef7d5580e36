"""WeChat's retries and loose callback XML, through the real app against the fake WeChat API.

WeChat retries a callback whose answer it did not get (5 s a try, 3 tries): a retry of a message that
was answered with a passive reply gets that same reply again, from the store, without running anything
twice; in plaintext and safe mode, within a batch, across batches and across instances. Callbacks
with a repeated scalar field, an out-of-range MsgId or a non-integer CreateTime are refused (400) and
write nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import xmltodict
from sqlalchemy import func, select

from handlers.wechat import RETRY_WINDOW
from scrm import commands
from scrm.messages import InboundEvent
from scrm.store.models import Consent, Customer, ReportDigest, Touchpoint
from scrm.web import SERVICE, create_app
from tests.conftest import POSTGRES_URL, applied, eventually
from tests.fakes.wechat import Callback, FakeWeChat, event_xml, open_reply, plaintext, safe_mode, text_xml
from tests.test_wechat import fake  # noqa: F401 - the fake WeChat API fixture
from tests.test_wechat import AES_KEY, TOKEN, account, count, inbound, post, start


def build(mode: str, fake: FakeWeChat) -> Callable[[str], Callback]:
    """Signed callbacks in one mode; each call signs anew, as WeChat does for every try."""
    if mode == "plaintext":
        return lambda xml: plaintext(TOKEN, xml)
    return lambda xml: safe_mode(TOKEN, AES_KEY, fake.app_id, xml)


async def answer(resp: Any, mode: str, fake: FakeWeChat) -> dict[str, Any] | str:
    """A passive reply's fields (decrypted and checked in safe mode), or the plain body (``success``)."""
    assert resp.status == 200, await resp.text()
    body = await resp.text()
    if resp.content_type != "application/xml":
        return body
    if mode == "plaintext":
        return dict(xmltodict.parse(body)["xml"])
    return open_reply(TOKEN, AES_KEY, fake.app_id, body)


def content(reply: dict[str, Any] | str) -> str:
    assert isinstance(reply, dict), f"expected a passive reply, got {reply!r}"
    return str(reply["Content"])


# -- item: a retried message gets its recorded reply --------------------------------------------------


@pytest.mark.parametrize("mode", ["plaintext", "safe"])
async def test_retry_of_a_replied_message_gets_the_same_reply_and_runs_nothing_twice(
        aiohttp_client, make_config, clock, fake, mode):
    client, service = await start(aiohttp_client, make_config, clock, fake)
    signed = build(mode, fake)
    first = await answer(await post(client, signed(text_xml("o_una", "退订", 6200000000000000777))), mode, fake)
    assert content(first) == commands.OPT_OUT_REPLY and first["ToUserName"] == "o_una"
    # the answer was lost on the way: WeChat tries twice more within its window, same MsgId, new signatures
    for seconds in (5, 5):
        clock.advance(seconds)
        again = await answer(await post(client, signed(text_xml("o_una", "退订", 6200000000000000777))), mode, fake)
        assert content(again) == commands.OPT_OUT_REPLY
        assert (again["ToUserName"], again["FromUserName"], again["MsgType"]) == (
            "o_una", first["FromUserName"], "text")
    assert [(t.kind, t.platform_msg_id) for t in await inbound(service)] == [("text", "6200000000000000777")]
    assert await count(service, Touchpoint, Touchpoint.kind == "reply") == 1
    assert await count(service, Consent) == 1  # the opt-out was recorded once
    assert fake.custom_messages == []  # nothing went out as a customer-service message instead

    # the same MsgId after WeChat's window is not a retry WeChat makes: acknowledged, nothing shown
    clock.advance(RETRY_WINDOW)
    late = await answer(await post(client, signed(text_xml("o_una", "退订", 6200000000000000777))), mode, fake)
    assert late == "success"
    assert await count(service, Touchpoint, Touchpoint.kind == "reply") == 1


async def test_retry_of_a_message_without_reply_is_acknowledged(aiohttp_client, make_config, clock, fake):
    client, service = await start(aiohttp_client, make_config, clock, fake)
    for _ in range(3):
        resp = await post(client, plaintext(TOKEN, text_xml("o_vic", "你好,有奶粉吗", 900)))
        assert (resp.status, await resp.text()) == (200, "success")
    for _ in range(3):  # events carry no MsgId: sender + CreateTime identify them
        resp = await post(client, plaintext(TOKEN, event_xml("o_vic", "CLICK", "MENU_1", create_time=1700000200)))
        assert (resp.status, await resp.text()) == (200, "success")
    assert [(t.kind, t.platform_msg_id) for t in await inbound(service)] == [
        ("text", "900"), ("menu_click", "o_vic:1700000200")]
    assert await count(service, Touchpoint, Touchpoint.kind == "reply") == 0


async def test_retry_of_a_staff_command_gets_its_answer_without_running_it_again(
        aiohttp_client, make_config, clock, fake):
    client, service = await start(aiohttp_client, make_config, clock, fake,
                                  overrides={"staff": {"wechat:o_manager": "manager"}})
    answers = []
    for _ in range(2):
        digest = text_xml("o_manager", "/digest daily 09:00", 71)
        resp = await post(client, safe_mode(TOKEN, AES_KEY, fake.app_id, digest))
        answers.append(content(await answer(resp, "safe", fake)))
    assert answers[0] == answers[1] and "Digest daily 09:00" in answers[0]
    assert await count(service, ReportDigest) == 1
    assert await count(service, Touchpoint, Touchpoint.kind == "reply") == 1


async def test_duplicates_in_one_batch_get_the_first_ones_replies(aiohttp_client, make_config, clock, fake):
    """A retry committed in the same group commit as its original (submitted together, so the writer
    takes them as one batch) carries the original's replies; the original alone has effects."""
    _, service = await start(aiohttp_client, make_config, clock, fake)

    def opt_out(msg_id: str) -> InboundEvent:
        return InboundEvent("wechat", "brand", "o_wes", "text", text="TD", platform_msg_id=msg_id)

    first, retry, other = await asyncio.gather(*(service.receive(e) for e in
                                                 (opt_out("31"), opt_out("31"), opt_out("32"))))
    assert (first.duplicate, first.replies) == (False, (commands.OPT_OUT_REPLY,))
    assert retry.duplicate and retry.replies == () and retry.original is not None
    assert (retry.original.replies, retry.original.received_at) == ((commands.OPT_OUT_REPLY,), clock.now())
    assert not other.duplicate
    assert await count(service, Touchpoint, Touchpoint.direction == "in") == 2
    assert await count(service, Touchpoint, Touchpoint.kind == "reply") == 2
    assert await count(service, Consent) == 2

    # and in a later batch, from the store
    clock.advance(3)
    later = await service.receive(opt_out("31"))
    assert later.duplicate and later.original is not None
    assert later.original.replies == (commands.OPT_OUT_REPLY,)
    assert later.original.received_at == clock.now() - timedelta(seconds=3)


@pytest.mark.skipif(not POSTGRES_URL, reason="needs SCRM_TEST_POSTGRES_URL: on SQLite one writer at a time reads "
                                              "what the previous one committed, so instances cannot race")
@pytest.mark.parametrize("known", [False, True], ids=["new-customer", "known-customer"])
async def test_retry_racing_its_original_on_another_instance_gets_its_reply(
        aiohttp_client, make_config, clock, fake, store, monkeypatch, known):
    """The retry reaches a second instance while the first is still applying the original (its consumer
    holds the original's uncommitted effects): the retry is recognised at append by the journal's unique
    key, waits for the original's application and is answered with the reply the first recorded."""
    if "schema_name" not in store:
        pytest.skip("PostgreSQL variant only")
    from scrm import pipeline

    config = make_config({"channels": {"wechat": {"brand": account(fake)}}})
    first = await aiohttp_client(create_app(config, clock))
    second = await aiohttp_client(create_app(config, clock))
    if known:
        assert await (await post(first, plaintext(TOKEN, text_xml("o_xia", "你好", 40)))).text() == "success"
    held, release = asyncio.Event(), asyncio.Event()
    load_customer = pipeline._Batch.customer

    async def hold_first(batch: Any, customer_id: int) -> Customer:
        """The opt-out loads the customer after the batch's rows are written: the first batch waits there."""
        customer = await load_customer(batch, customer_id)
        if not held.is_set():
            held.set()
            await release.wait()
        return customer

    monkeypatch.setattr(pipeline._Batch, "customer", hold_first)
    original = asyncio.ensure_future(post(first, plaintext(TOKEN, text_xml("o_xia", "TD", 41))))
    try:
        await held.wait()
        retry = asyncio.ensure_future(post(second, plaintext(TOKEN, text_xml("o_xia", "TD", 41))))
        waiting = second.app[SERVICE].journal._waiting

        async def recognised() -> bool:  # durable as a retry of the original, waiting for its application
            return bool(waiting)

        await eventually(recognised)
    finally:
        release.set()
    answers = [content(await answer(await resp, "plaintext", fake)) for resp in (original, retry)]
    assert answers == [commands.OPT_OUT_REPLY, commands.OPT_OUT_REPLY]
    service = first.app[SERVICE]
    assert [t.platform_msg_id for t in await inbound(service)] == (["40"] if known else []) + ["41"]
    assert await count(service, Touchpoint, Touchpoint.kind == "reply") == 1
    assert await count(service, Customer) == 1 and await count(service, Consent) == 1


# -- item: loose callback XML is refused -------------------------------------------------------------


def repeated(xml: str, tag: str) -> str:
    """The callback with its first ``<tag>`` element given twice."""
    start, end = xml.index(f"<{tag}>"), xml.index(f"</{tag}>") + len(f"</{tag}>")
    assert start < end, tag
    return xml[:end] + xml[start:end] + xml[end:]


def with_value(xml: str, tag: str, value: str) -> str:
    start, end = xml.index(f"<{tag}>") + len(f"<{tag}>"), xml.index(f"</{tag}>")
    return xml[:start] + value + xml[end:]


TEXT = text_xml("o_yan", "我想买奶粉", 6200000000000000123, create_time=1700000300)
CLICK = event_xml("o_yan", "CLICK", "MENU_1", create_time=1700000301)
LOCATION = event_xml("o_yan", "LOCATION", create_time=1700000302,
                     extra={"Latitude": 23.137466, "Longitude": 113.352425, "Precision": 119.385040})
MALFORMED = {
    "two MsgIds": repeated(TEXT, "MsgId"),
    "MsgId of 32 digits": with_value(TEXT, "MsgId", "9" * 32),
    "MsgId 2**64": with_value(TEXT, "MsgId", str(2**64)),
    "MsgId 0": with_value(TEXT, "MsgId", "0"),
    "MsgId negative": with_value(TEXT, "MsgId", "-5"),
    "MsgId signed": with_value(TEXT, "MsgId", "+5"),
    "MsgId with underscore": with_value(TEXT, "MsgId", "1_000"),
    **{f"two {tag}s": repeated(TEXT, tag)
       for tag in ("FromUserName", "ToUserName", "CreateTime", "MsgType", "Content")},
    **{f"event with two {tag}s": repeated(CLICK, tag) for tag in ("Event", "EventKey", "CreateTime", "FromUserName")},
    "CreateTime 1.5": with_value(TEXT, "CreateTime", "1700000300.5"),
    "CreateTime text": with_value(TEXT, "CreateTime", "soon"),
    "CreateTime empty": with_value(CLICK, "CreateTime", ""),
    "CreateTime signed": with_value(CLICK, "CreateTime", "-1700000301"),
    "Content with children": with_value(TEXT, "Content", "<b>奶粉</b>"),
    "Latitude text": with_value(LOCATION, "Latitude", "north"),
    "Latitude not finite": with_value(LOCATION, "Latitude", "nan"),
}


@pytest.mark.parametrize("mode", ["plaintext", "safe"])
async def test_loose_xml_is_refused_and_writes_nothing(aiohttp_client, make_config, clock, fake, mode):
    client, service = await start(aiohttp_client, make_config, clock, fake)
    signed = build(mode, fake)
    answers = {}
    for case, xml in MALFORMED.items():
        resp = await post(client, signed(xml))
        answers[case] = (resp.status, await resp.text())
    assert {case: status for case, (status, _) in answers.items()} == {case: 400 for case in MALFORMED}, answers
    assert all(body.startswith("malformed WeChat XML") for _, body in answers.values()), answers
    assert await count(service, Touchpoint) == 0 and await count(service, Customer) == 0

    # well-formed neighbours are accepted: the largest 64-bit MsgId, an event without one, whitespace
    # around a number (XML text, as WeChat's own parsers read it)
    accepted = [with_value(TEXT, "MsgId", str(2**64 - 1)), CLICK, with_value(LOCATION, "CreateTime", " 1700000302 ")]
    for xml in accepted:
        resp = await post(client, signed(xml))
        assert (resp.status, await resp.text()) == (200, "success")
    await applied(service)  # the location report is acknowledged once durable: its touchpoint follows
    assert [(t.kind, t.platform_msg_id) for t in await inbound(service)] == [
        ("text", str(2**64 - 1)), ("menu_click", "o_yan:1700000301"), ("location_report", "o_yan:1700000302")]
