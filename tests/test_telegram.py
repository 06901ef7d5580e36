"""The Telegram channel through the real app, store and scheduler, against a fake Bot API server
that enforces Telegram's flood limits — on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from scrm import commands
from scrm.campaigns.outbox import PREPARE_GROUP
from scrm.campaigns.ratelimit import Pace
from scrm.config import Config, ConfigError
from scrm.messages import Chart, OutboundMessage
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
from tests.conftest import ROOT, applied, eventually
from tests.fakes.telegram import FakeTelegram, Updates, group_chat, png, user

TOKEN = "7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0"
SECRET = "wh_s3cret-Token_123"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
ALICE = user(1001, "Alice", "Wang", "alice_w")
# PTB's own RetryAfter constructor reads its deprecated int-valued attribute.
pytestmark = pytest.mark.filterwarnings("ignore:.*`retry_after`.*:DeprecationWarning")


@pytest.fixture
async def fake(aiohttp_server) -> FakeTelegram:
    fake = FakeTelegram(TOKEN)
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("/bot"))
    return fake


@pytest.fixture
def updates(fake: FakeTelegram) -> Updates:
    return Updates(fake.bot_user)


def telegram_config(make_config: Callable[..., Config], base_url: str, extra: dict[str, Any] | None = None,
                    **settings: Any) -> Config:
    account = {"token": TOKEN, "webhook_secret": SECRET, "api_base_url": base_url, **settings}
    return make_config({"channels": {"telegram": {"main": account}}, **(extra or {})})


@pytest.fixture
async def client(aiohttp_client, make_config, clock, fake):
    return await aiohttp_client(create_app(telegram_config(make_config, fake.base_url), clock))


async def post(client, update: Any, secret: str | None = SECRET, path: str = "/telegram/main"):
    """Post an update; once Telegram is answered 200 (the events are durable), wait until they are applied."""
    headers = {SECRET_HEADER: secret} if secret is not None else {}
    data = update if isinstance(update, bytes) else json.dumps(update).encode()
    resp = await client.post(path, data=data, headers={**headers, "Content-Type": "application/json"})
    if resp.status == 200:
        await applied(client.app[SERVICE])
    return resp


async def deliver(client, update: dict[str, Any]) -> None:
    resp = await post(client, update)
    assert resp.status == 200, await resp.text()


async def count(client, model: Any, *where: Any) -> int:
    async with client.app[SERVICE].sessions() as s:
        return await s.scalar(select(func.count()).select_from(model).where(*where))


async def customer_of(client, user_id: int) -> Customer | None:
    async with client.app[SERVICE].sessions() as s:
        return await s.scalar(select(Customer).join(Identity).where(
            Identity.channel == "telegram", Identity.account == "main", Identity.external_id == str(user_id)))


async def delivery_of(client, user_id: int) -> Delivery | None:
    async with client.app[SERVICE].sessions() as s:
        return await s.scalar(select(Delivery).where(Delivery.external_id == str(user_id),
                                                     Delivery.campaign == "welcome"))


async def test_secret_token_is_required(client, updates):
    update = updates.text(ALICE, "你好")
    assert (await post(client, update, secret=None)).status == 403
    assert (await post(client, update, secret="wrong-secret")).status == 403
    assert await count(client, Touchpoint) == 0 and await count(client, Customer) == 0
    assert (await post(client, update)).status == 200
    assert await count(client, Touchpoint, Touchpoint.direction == "in") == 1


async def test_text_makes_customer_tags_and_welcome_through_outbox(client, fake, updates):
    update = updates.text(ALICE, "你好,我想买奶粉,有优惠券吗")
    await deliver(client, update)
    await deliver(client, update)  # Telegram's retry of the same update_id

    customer = await customer_of(client, 1001)
    assert customer is not None
    assert (customer.display_name, customer.acquisition_source) == ("Alice Wang", "telegram:main")
    async with client.app[SERVICE].sessions() as s:
        tags = set((await s.scalars(select(Tag.name).join(CustomerTag).where(CustomerTag.customer_id == customer.id))).all())
        inbound = (await s.scalars(select(Touchpoint).where(Touchpoint.direction == "in"))).all()
    assert tags == {"奶粉", "coupon-seeker"}
    assert [(t.kind, t.text, t.platform_msg_id) for t in inbound] == [
        ("text", "你好,我想买奶粉,有优惠券吗", str(update["update_id"]))]

    async def welcomed() -> Delivery | None:  # arrived at Telegram, and the outcome recorded
        d = await delivery_of(client, 1001)
        return d if d is not None and d.status == "sent" and fake.texts_to(1001) else None

    delivery = await eventually(welcomed)
    messages = fake.texts_to(1001)
    assert len(messages) == 1 and messages[0].startswith("Alice Wang,欢迎")
    assert delivery.campaign == "welcome"
    assert delivery.text == messages[0]
    await client.app[SERVICE].outbox.tick()
    assert fake.texts_to(1001) == messages  # sent once


async def test_start_deep_link_sets_acquisition_source(client, updates):
    long_payload = "spring_2024-" + "x" * 52  # 64 characters, the most a deep link carries
    await deliver(client, updates.text(ALICE, "/start ref_spring-2024"))
    await deliver(client, updates.text(user(1002, "Bo"), f"/start {long_payload}"))
    await deliver(client, updates.text(user(1003, "Cai"), "/start bad!payload"))
    await deliver(client, updates.text(user(1004, "Dan"), "/help"))
    await deliver(client, updates.text(user(1005, "Eve"), "/start@scrm_shop_bot  qr_store-7"))

    alice = await customer_of(client, 1001)
    assert alice is not None and alice.acquisition_source == "telegram:start:ref_spring-2024"
    bo = await customer_of(client, 1002)
    assert bo is not None and bo.acquisition_source == f"telegram:start:{long_payload}"[:64]
    cai = await customer_of(client, 1003)
    assert cai is not None and cai.acquisition_source == "telegram:main"  # invalid payload ignored
    async with client.app[SERVICE].sessions() as s:
        kinds = dict((await s.execute(select(Touchpoint.text, Touchpoint.kind).where(Touchpoint.direction == "in"))).all())
        start = await s.scalar(select(Touchpoint.payload).where(Touchpoint.text == f"/start {long_payload}"))
    eve = await customer_of(client, 1005)
    assert eve is not None and eve.acquisition_source == "telegram:start:qr_store-7"
    assert kinds == {"/start@scrm_shop_bot  qr_store-7": "subscribe", "/start ref_spring-2024": "subscribe", f"/start {long_payload}": "subscribe",
                     "/start bad!payload": "subscribe", "/help": "command"}
    assert start == {"start": long_payload}


def phone_last4(customer: Customer) -> str | None:
    """The stored phone's last digits: plaintext ``phone`` before scrm.personal, ``phone_last4`` beside
    the ciphertext after it (the core is moving personal data while this channel is built)."""
    if hasattr(customer, "phone_last4"):
        return customer.phone_last4
    return customer.phone[-4:] if customer.phone else None


async def test_contact_only_saved_when_it_is_the_senders_own(client, updates):
    bo = user(1002, "Bo")
    await deliver(client, updates.contact(ALICE, "+8613800001111"))
    await deliver(client, updates.contact(bo, "+8613900002222", owner=user(4242, "Someone", "Else")))

    alice, bo_customer = await customer_of(client, 1001), await customer_of(client, 1002)
    assert alice is not None and bo_customer is not None
    assert (phone_last4(alice), phone_last4(bo_customer)) == ("1111", None)
    async with client.app[SERVICE].sessions() as s:
        payloads = (await s.scalars(select(Touchpoint.payload))).all()
    assert "+8613900002222" not in json.dumps(payloads)  # a third party's number is not kept anywhere
    assert await count(client, Touchpoint, Touchpoint.kind == "contact_shared") == 1


async def test_group_join_and_leave(client, updates):
    group = group_chat(-1001234567890)
    bo, cai = user(1002, "Bo"), user(1003, "Cai")
    joined = updates.members_joined(group, [bo, cai], added_by=ALICE)
    await deliver(client, joined)
    await deliver(client, joined)  # retry
    await deliver(client, updates.member_left(group, bo))

    async with client.app[SERVICE].sessions() as s:
        rows = (await s.execute(
            select(Identity.external_id, Touchpoint.kind, Touchpoint.payload)
            .join(Identity, Identity.customer_id == Touchpoint.customer_id)
            .where(Touchpoint.direction == "in").order_by(Touchpoint.id))).all()
    where = {"group_id": -1001234567890, "group_title": "VIP 妈妈群"}
    assert [tuple(r) for r in rows] == [("1002", "group_joined", where), ("1003", "group_joined", where),
                                        ("1002", "group_left", where)]
    assert await customer_of(client, 1001) is None  # the one who added them did not join


async def test_blocking_the_bot_opts_out(client, updates):
    await deliver(client, updates.text(ALICE, "hi"))
    await deliver(client, updates.bot_blocked(ALICE))
    alice = await customer_of(client, 1001)
    assert alice is not None and alice.opted_out is True
    assert await count(client, Touchpoint, Touchpoint.kind == "blocked") == 1


async def test_core_replies_go_back_to_the_chat(aiohttp_client, make_config, clock, fake, updates):
    config = telegram_config(make_config, fake.base_url)
    config.staff["telegram:2001"] = "manager"
    client = await aiohttp_client(create_app(config, clock))
    await deliver(client, updates.text(ALICE, "退订"))
    await deliver(client, updates.text(user(2001, "Manager"), "/report"))

    async def replied() -> bool:
        return bool(fake.texts_to(1001)) and bool(fake.texts_to(2001))

    await eventually(replied)
    assert fake.texts_to(1001) == [commands.OPT_OUT_REPLY]
    assert "新客户" in fake.texts_to(2001)[0]
    alice = await customer_of(client, 1001)
    assert alice is not None and alice.opted_out

    async def welcome_skipped() -> bool:
        d = await delivery_of(client, 1001)
        return d is not None and (d.status, d.reason) == ("skipped", "opted_out")

    await eventually(welcome_skipped)
    assert fake.texts_to(1001) == [commands.OPT_OUT_REPLY]


async def test_a_reading_staff_command_is_answered_in_the_chat_and_sends_go_on(aiohttp_client, make_config, clock,
                                                                                 fake, updates, tmp_path):
    # /inbox is answered beside the writer (before its ingest transaction); its answer goes back like any
    # reply, after the webhook's 200 and paced per chat, so the test waits for it at the fake.
    (tmp_path / "no-campaigns").mkdir()  # no welcome: the outbox's only send is the staff reply below
    olive, bob = user(2002, "Olive"), user(1002, "Bob")
    config = telegram_config(make_config, fake.base_url, {"staff": {"telegram:2002": "operator"},
                                                          "campaigns": {"path": str(tmp_path / "no-campaigns")}})
    client = await aiohttp_client(create_app(config, clock))
    await deliver(client, updates.text(ALICE, "转人工"))  # a conversation waiting for a person
    await deliver(client, updates.text(olive, "/inbox"))
    await deliver(client, updates.text(olive, "/inbox"))  # its answer waits for the chat's next turn

    async def answers(n: int) -> list[str]:
        texts = fake.texts_to(2002)
        return texts if len(texts) == n else []

    inbox = await eventually(partial(answers, 2))
    assert all(a.startswith("会话 Conversations (1):\n#") and "Alice Wang [telegram]" in a for a in inbox)
    customer_id = inbox[0].split("#", 1)[1].split()[0]

    # the same bot's sends go on: a write command's answer, the outbox, a passive reply, a direct send
    await deliver(client, updates.text(olive, f"/reply #{customer_id} 您好,请发订单号"))
    assert "Queued" in (await eventually(partial(answers, 3)))[-1]

    async def staff_reply() -> bool:
        return fake.texts_to(1001)[-1:] == ["您好,请发订单号"]

    await eventually(staff_reply)
    await deliver(client, updates.text(bob, "退订"))

    async def opted_out() -> list[str]:
        return fake.texts_to(1002)

    assert await eventually(opted_out) == [commands.OPT_OUT_REPLY]
    channel = client.app[SERVICE].channel("telegram", "main")
    assert (await channel.send(OutboundMessage("telegram", "main", "1003", "好的 OK"))).status == "sent"
    assert fake.texts_to(1003) == ["好的 OK"]


async def test_flood_wait_replans_then_sends_once(client, fake, updates, clock):
    fake.inject_flood(retry_after=2)
    await deliver(client, updates.text(ALICE, "你好"))

    async def replanned() -> Delivery | None:
        d = await delivery_of(client, 1001)
        return d if d is not None and d.attempts == 1 and d.status == "planned" and d.reason == "rate_limited" else None

    delivery = await eventually(replanned)
    assert [t.limit for t in fake.throttled] == ["injected"] and fake.sent == []
    assert (delivery.due_at - clock.now()).total_seconds() == pytest.approx(2, abs=0.01)
    clock.advance(2)

    async def sent() -> bool:
        d = await delivery_of(client, 1001)
        return d is not None and d.status == "sent"

    await eventually(sent)
    assert len(fake.texts_to(1001)) == 1
    assert await count(client, Touchpoint, Touchpoint.kind == "campaign_message") == 1


async def test_blocked_on_send_is_skipped_and_opts_out(client, fake, updates):
    fake.blocked.add(1001)
    await deliver(client, updates.text(ALICE, "你好"))

    async def skipped() -> Delivery | None:
        d = await delivery_of(client, 1001)
        return d if d is not None and d.status == "skipped" else None

    delivery = await eventually(skipped)
    assert delivery.reason == "blocked" and fake.sent == []
    alice = await customer_of(client, 1001)
    assert alice is not None and alice.opted_out is True
    assert await count(client, Touchpoint, Touchpoint.kind == "blocked") == 1
    # The welcome's coupon never reached her: it went back to the pool.
    assert await count(client, CouponCode, CouponCode.customer_id == alice.id) == 0
    assert await count(client, Touchpoint, Touchpoint.kind == "coupon_revoked", Touchpoint.customer_id == alice.id) == 1


async def test_unreachable_api_means_retry_not_failure(aiohttp_client, make_config, clock, updates):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = await aiohttp_client(create_app(telegram_config(make_config, f"http://127.0.0.1:{port}/bot"), clock))
    await deliver(client, updates.text(ALICE, "你好"))  # inbound does not need the Bot API

    async def replanned() -> Delivery | None:
        d = await delivery_of(client, 1001)
        return d if d is not None and d.attempts == 1 and d.status == "planned" else None

    delivery = await eventually(replanned)
    assert delivery.reason.startswith("network")


async def test_bad_input_is_rejected_and_writes_nothing(aiohttp_client, make_config, clock, fake, updates):
    config = telegram_config(make_config, fake.base_url, extra={"service": {"max_body_bytes": 4096}})
    client = await aiohttp_client(create_app(config, clock))
    assert (await post(client, b"{not json")).status == 400
    assert (await post(client, b"\xff\xfe")).status == 400
    assert (await post(client, [1, 2])).status == 400
    assert (await post(client, {"update_id": "7"})).status == 400
    assert (await post(client, {"update_id": 7, "message": {"text": "no chat, no date"}})).status == 400
    assert (await post(client, {"update_id": 8, "message": "text"})).status == 400
    big = updates.text(ALICE, "奶粉" * 3000)
    assert (await post(client, big)).status == 413
    assert (await post(client, updates.text(ALICE, "hi"), path="/telegram/other")).status == 404
    assert await count(client, Touchpoint) == 0 and await count(client, Customer) == 0
    # An update the service does not track is acknowledged (no retries) and writes nothing either.
    assert (await post(client, {"update_id": 9, "edited_message": updates.text(ALICE, "x")["message"]})).status == 200
    assert await count(client, Touchpoint) == 0


async def test_fan_out_stays_under_flood_limits(client, fake, updates, monkeypatch):
    # When the service takes each send's slot of the overall pace, right before its HTTP call.
    slots: list[float] = []
    take = Pace.acquire

    async def acquire(self: Pace) -> None:
        await take(self)
        slots.append(asyncio.get_running_loop().time())

    monkeypatch.setattr(Pace, "acquire", acquire)
    people = [user(5000 + i, f"Fan{i}") for i in range(60)]
    for resp in await asyncio.gather(*(post(client, updates.text(p, "hello")) for p in people)):
        assert resp.status == 200

    async def all_sent() -> bool:
        return len(fake.sent) >= 60 and await count(client, Delivery, Delivery.campaign == "welcome",
                                                    Delivery.status == "sent") == 60

    await eventually(all_sent)
    assert fake.throttled == []  # the fake enforces 30/s overall and 1/s per chat: none was needed
    assert sorted(s.chat_id for s in fake.sent) == [p["id"] for p in people]  # one each, no duplicates
    # The pace itself: never 31 sends within a second. Arrival times at the fake also carry the delay
    # between a send's slot and its arrival, which a loaded machine varies by tens of milliseconds
    # (more than the pace's margin); the fake judges arrivals with its slack for that (nothing throttled).
    assert len(slots) >= 60
    assert max(sum(1 for t in slots if start <= t < start + 1) for start in slots) <= 30


async def test_two_messages_to_one_chat_are_a_second_apart(client, fake, updates):
    # An unknown coupon code as the first message: the core's reply and the welcome both go to Alice.
    await deliver(client, updates.text(ALICE, "我要用券 NOSUCH123"))

    async def both() -> bool:
        return len(fake.texts_to(1001)) == 2

    await eventually(both)
    first, second = (s for s in fake.sent if s.chat_id == 1001)
    assert fake.throttled == [] and second.at - first.at >= 0.95
    assert any(s.text and s.text.startswith("Alice Wang,欢迎") for s in (first, second))


async def test_pace_keeps_every_second_under_the_rate_however_late_the_loop_runs():
    # Telegram's overall limit: a sender that wakes a little late keeps its slot (the rate holds), yet no
    # rate + 1 sends ever fall within one second, while other work holds the event loop now and then.
    rate, senders, each = 50, 4, 30
    pace, loop, rng = Pace(rate), asyncio.get_running_loop(), random.Random(7)
    times: list[float] = []

    async def sender() -> None:
        for _ in range(each):
            await pace.acquire()
            times.append(loop.time())

    async def busy() -> None:
        while len(times) < senders * each:
            time.sleep(rng.uniform(0, 0.015))  # noqa: ASYNC251 (holding the event loop is the point)
            await asyncio.sleep(rng.uniform(0, 0.02))

    await asyncio.gather(*(sender() for _ in range(senders)), busy())
    assert all(later - first > 1.0 for first, later in zip(times, times[rate:]))


async def test_outbox_sends_the_next_batches_while_earlier_sends_are_in_flight(aiohttp_client, make_config, clock,
                                                                               fake, updates):
    # Batches of two, five sends in flight at most: with Telegram's answers held back, the outbox goes on
    # claiming and sending until five are out, and no further; once answered, everyone has one message.
    config = telegram_config(make_config, fake.base_url, {
        "scheduler": {"outbox_batch": 2, "outbox_tick_seconds": 0.1}, "delivery": {"concurrency": 5}})
    client = await aiohttp_client(create_app(config, clock))
    people = [user(7000 + i, f"Pipe{i}") for i in range(12)]
    fake.hold_answers()
    for person in people:
        await deliver(client, updates.text(person, "hello"))

    async def five_out() -> bool:
        return len(fake.sent) >= 5

    await eventually(five_out)
    await asyncio.sleep(0.5)  # time for a sixth to go out, were the bound not kept
    out, sending = len(fake.sent), await count(client, Delivery, Delivery.status == "sending")
    fake.release_answers()
    assert (out, sending) == (5, 5)

    async def all_sent() -> bool:
        return await count(client, Delivery, Delivery.campaign == "welcome", Delivery.status == "sent") == len(people)

    await eventually(all_sent)
    assert sorted(s.chat_id for s in fake.sent) == [p["id"] for p in people] and fake.throttled == []


async def test_a_wake_while_the_outbox_runs_is_taken_by_the_running_tick(aiohttp_client, make_config, clock, fake,
                                                                          updates, caplog):
    # The scheduler's interval is a minute: Bob's welcome, planned while Alice's send awaits Telegram, can
    # only go out through the tick that is running, and the wake finds the job busy without a warning.
    config = telegram_config(make_config, fake.base_url, {"scheduler": {"outbox_tick_seconds": 60}})
    client = await aiohttp_client(create_app(config, clock))
    bob = user(7300, "Bob")
    fake.hold_answers()
    await deliver(client, updates.text(ALICE, "hello"))

    async def alice_out() -> bool:
        return len(fake.sent) == 1

    await eventually(alice_out)
    await deliver(client, updates.text(bob, "hello"))
    await asyncio.sleep(0.3)  # the wake's scheduler run
    fake.release_answers()

    async def both_welcomed() -> bool:
        return await count(client, Delivery, Delivery.campaign == "welcome", Delivery.status == "sent") == 2

    await eventually(both_welcomed)
    assert [s.chat_id for s in fake.sent] == [ALICE["id"], bob["id"]]
    assert not [r for r in caplog.records if "maximum number of running instances" in r.getMessage()]


async def test_frequency_cap_counts_marketing_messages_still_in_flight(aiohttp_client, make_config, clock, fake,
                                                                        updates):
    # Three marketing messages due for Alice, each in a later prepare transaction than the one before and
    # prepared while Telegram has not answered the earlier ones: the cap (2 a week) counts those in flight.
    config = telegram_config(make_config, fake.base_url, {"delivery": {"concurrency": 2 * PREPARE_GROUP + 4}})
    client = await aiohttp_client(create_app(config, clock))
    service = client.app[SERVICE]
    others = [user(7100 + i, f"Other{i}") for i in range(2 * (PREPARE_GROUP - 1))]
    for person in (ALICE, *others):
        await deliver(client, updates.text(person, "hello"))

    async def welcomed() -> bool:
        return await count(client, Delivery, Delivery.campaign == "welcome", Delivery.status == "sent") \
            == 1 + len(others)

    await eventually(welcomed)
    fake.hold_answers()
    now = clock.now()
    async with service.sessions() as s, s.begin():
        # By id: Alice, 7 others | Alice, 7 others | Alice — one prepare transaction each.
        for n, person in enumerate((ALICE, *others[:PREPARE_GROUP - 1], ALICE, *others[PREPARE_GROUP - 1:], ALICE)):
            customer = await customer_of(client, person["id"])
            assert customer is not None
            s.add(Delivery(campaign="nurture-formula", step=0, target=f"c{customer.id}", occurrence=f"cap{n}",
                           customer_id=customer.id, channel="telegram", account="main", external_id=str(person["id"]),
                           status="planned", attempts=0, due_at=now, created_at=now))
            await s.flush()
    service.wake_outbox()

    async def prepared() -> list[tuple[str, str | None]] | None:
        async with service.sessions() as s:
            rows = (await s.execute(select(Delivery.status, Delivery.reason).where(
                Delivery.campaign == "nurture-formula", Delivery.step == 0, Delivery.external_id == str(ALICE["id"]))
                .order_by(Delivery.id))).all()
        return None if {r.status for r in rows} & {"planned", "claimed"} else [tuple(r) for r in rows]

    outcomes = await eventually(prepared)
    fake.release_answers()
    assert outcomes == [("sending", None), ("sending", None), ("skipped", "frequency_cap")]

    async def all_sent() -> bool:
        return await count(client, Delivery, Delivery.campaign == "nurture-formula", Delivery.status == "sent") \
            == 2 + len(others)

    await eventually(all_sent)
    assert len(fake.texts_to(ALICE["id"])) == 3  # the welcome and two of the three


async def test_send_photo_uploads_multipart(client, fake):
    channel = client.app[SERVICE].channel("telegram", "main")
    image = png(4, 3)
    result = await channel.send_photo(1001, image, "本周报表 Weekly report")
    assert result.status == "sent" and result.platform_msg_id
    (photo,) = fake.sent
    assert (photo.method, photo.chat_id, photo.photo, photo.caption) == ("sendPhoto", 1001, image, "本周报表 Weekly report")
    fake.blocked.add(1002)
    assert (await channel.send_photo(1002, image, "x")).reason == "blocked"
    assert (await channel.send_photo(1003, b"not an image", "x")).status == "failed"

    # Outbound messages with an image (report charts): the text is the caption, or follows the photo.
    assert (await channel.send(OutboundMessage("telegram", "main", "1004", "图表 chart", image=Chart(lambda: image)))).status == "sent"
    long_text = "报表 " * 400
    assert (await channel.send(OutboundMessage("telegram", "main", "1005", long_text, image=Chart(lambda: image)))).status == "sent"
    assert [(s.method, s.chat_id, s.caption, s.text) for s in fake.sent[1:]] == [
        ("sendPhoto", 1004, "图表 chart", None), ("sendPhoto", 1005, None, None), ("sendMessage", 1005, None, long_text)]
    assert fake.throttled == []


async def test_long_polling_feeds_the_same_conversion(aiohttp_client, make_config, clock, fake, updates):
    fake.webhook = {"url": "https://old.example.com/telegram/main", "secret_token": SECRET}
    config = make_config({"channels": {"telegram": {"main": {"token": TOKEN, "polling": True,
                                                             "api_base_url": fake.base_url}}}})
    client = await aiohttp_client(create_app(config, clock))
    assert (await post(client, updates.text(ALICE, "x"))).status == 404  # no webhook route when polling
    update = updates.text(ALICE, "想买奶粉")
    fake.push_update(update)

    async def tagged() -> bool:
        customer = await customer_of(client, 1001)
        return customer is not None and await count(client, CustomerTag, CustomerTag.customer_id == customer.id) == 1

    await eventually(tagged)
    assert fake.webhook is None and fake.method_calls("deleteWebhook")

    async def confirmed() -> bool:  # the next getUpdates carries offset = update_id + 1
        return not fake.pending_updates

    await eventually(confirmed)
    assert any(int(c.get("offset") or 0) == update["update_id"] + 1 for c in fake.method_calls("getUpdates"))
    assert await count(client, Touchpoint, Touchpoint.direction == "in") == 1

    async def welcomed() -> bool:  # campaigns work the same with polling
        return bool(fake.texts_to(1001))

    await eventually(welcomed)


def write_config(tmp_path: Path, fake: FakeTelegram) -> Path:
    """A small config file: this bot and the welcome campaign only."""
    campaigns = tmp_path / "campaigns"
    campaigns.mkdir()
    shutil.copy(ROOT / "campaigns" / "welcome.toml", campaigns)
    config = tmp_path / "config.toml"
    config.write_text(f"""
[store]
url = "sqlite+aiosqlite:///{tmp_path / 'scrm.db'}"

[campaigns]
path = "campaigns"

[coupons.welcome]
prefix = "WEL"
value = 10

[channels.telegram.main]
token = "{TOKEN}"
webhook_secret = "{SECRET}"
api_base_url = "{fake.base_url}"
""", "utf-8")
    return config


async def test_set_webhook_cli(tmp_path, fake):
    from scrm.cli import main

    config = write_config(tmp_path, fake)
    runner = CliRunner()

    def cli(*args: str):
        # The CLI runs its own event loop; the fake keeps serving on this one meanwhile.
        return asyncio.to_thread(runner.invoke, main, ["-c", str(config), "telegram", *args])

    ok = await cli("set-webhook", "main", "https://shop.example.com/")
    assert ok.exit_code == 0, ok.output
    assert fake.webhook == {"url": "https://shop.example.com/telegram/main", "secret_token": SECRET,
                            "allowed_updates": ["message", "my_chat_member"]}
    assert "https://shop.example.com/telegram/main" in ok.output

    plain = await cli("set-webhook", "main", "http://shop.example.com")
    assert plain.exit_code == 1 and "https url must be provided" in plain.output.lower()
    unknown = await cli("set-webhook", "nosuchbot", "https://shop.example.com")
    assert unknown.exit_code == 2 and "nosuchbot" in unknown.output
    assert fake.webhook["url"] == "https://shop.example.com/telegram/main"


async def test_settings_are_validated(make_config):
    with pytest.raises(ConfigError) as missing:
        make_config({"channels": {"telegram": {"main": {"token": TOKEN}}}})
    assert any(p.startswith("channels.telegram.main.webhook_secret: required unless polling") for p in missing.value.problems)
    with pytest.raises(ConfigError) as bad:
        make_config({"channels": {"telegram": {"main": {"token": "nope", "webhook_secret": "a b", "surprise": 1}}}})
    problems = "\n".join(bad.value.problems)
    assert "channels.telegram.main.token: not a bot token" in problems
    assert "channels.telegram.main.webhook_secret: 1-256 characters" in problems
    assert "channels.telegram.main.surprise: unknown key" in problems


async def test_poll_cli_serves_the_bot_until_interrupted(tmp_path, fake, updates):
    fake.webhook = {"url": "https://old.example.com/telegram/main", "secret_token": SECRET}
    config = write_config(tmp_path, fake)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRM_")}
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:  # files, not pipes: logs never block the service
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "scrm", "-c", str(config), "telegram",
                                                    "poll", "main", cwd=tmp_path, env=env, stdout=stdout, stderr=stderr)
    try:
        fake.push_update(updates.text(ALICE, "你好"))

        async def welcomed() -> bool:
            return bool(fake.texts_to(1001)) and not fake.pending_updates

        try:
            await eventually(welcomed)
        except AssertionError:
            raise AssertionError(err.read_text("utf-8")[-3000:]) from None
        assert fake.webhook is None and fake.texts_to(1001)[0].startswith("Alice Wang,欢迎")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0, err.read_text("utf-8")[-3000:]
    assert "polling telegram bot main" in out.read_text("utf-8")
