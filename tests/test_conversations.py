"""Conversations on SQLite and PostgreSQL: a customer asking for a person, staff answering from chat
inside and outside WeChat's 48-hour window (the fake WeChat API), replies in order, handoff pausing
marketing until resolve, assignment and alerts, and bad input that writes nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from scrm.conversations import routing, threads
from scrm.messages import InboundEvent
from scrm.service import Service
from scrm.store.models import STAFF_REPLY, Conversation, Customer, Delivery, Touchpoint
from tests.conftest import ROOT, eventually
from tests.fakes.wechat import plaintext, text_xml
from tests.test_wechat import TOKEN, customer_of, fake, post, start  # noqa: F401  (fake: a fixture)

STAFF = {"console:olive": "operator", "console:oscar": "operator", "console:bob": "manager"}
#: The demo's reply rules and fallback (working hours Mon-Fri 9:00-18:00).
DEMO_REPLIES = {"path": str(ROOT / "replies")}


async def say(service: Service, user: str, text: str, n: list[int] = [0]) -> tuple[str, ...]:  # noqa: B006
    n[0] += 1
    reaction = await service.receive(InboundEvent("console", "local", user, "text", text=text,
                                                  platform_msg_id=f"{user}-{n[0]}"))
    return reaction.replies


async def settle(service: Service) -> None:
    while await service.outbox.tick():
        pass


async def read(service: Service, query: Any) -> list[Any]:
    async with service.sessions() as s:
        return list((await s.execute(query)).all())


async def deliveries(service: Service) -> int:
    async with service.sessions() as s:
        return await s.scalar(select(func.count()).select_from(Delivery).where(Delivery.campaign == STAFF_REPLY))


async def started(make_config, clock, **overrides: Any) -> Service:
    service = Service(make_config({"staff": STAFF, **overrides}), clock)
    await service.start(scheduler=False)
    return service


def mailbox(service: Service, user: str) -> list[str]:
    return list(service.channels[("console", "local")]._mailboxes[user])  # type: ignore[attr-defined]


async def test_person_request_hands_off_and_staff_replies_in_order(make_config, clock):
    service = await started(make_config, clock)
    try:
        assert await say(service, "amy", "转人工") == (service.config.conversations.person_reply,)
        [(conv,)] = await read(service, select(Conversation))
        assert (conv.state, conv.handled, conv.waiting_since) == ("open", True, clock.now())
        amy = conv.customer_id

        # Two staff answer at the same moment: both go out, in the order written, each recorded once.
        clock.advance(timedelta(minutes=3))
        answers = await asyncio.gather(say(service, "olive", f"/reply #{amy} 您好,我是 Olive"),
                                       say(service, "oscar", f"/reply #{amy} 我是 Oscar,也在"))
        assert all("Queued" in a[0] for a in answers), answers
        await settle(service)
        written = [text for (text,) in await read(service, select(Delivery.text).where(
            Delivery.campaign == STAFF_REPLY).order_by(Delivery.id))]
        assert [m for m in mailbox(service, "amy") if m in written] == written and len(written) == 2
        sent = await read(service, select(Touchpoint.actor, Touchpoint.text).where(Touchpoint.kind == "staff_reply")
                          .order_by(Touchpoint.id))
        assert sorted(sent) == sorted([("staff:console:olive", "您好,我是 Olive"), ("staff:console:oscar", "我是 Oscar,也在")])
        assert [t for _, t in sent] == written
        [(conv,)] = await read(service, select(Conversation))
        assert (conv.state, conv.waiting_since, conv.first_response_at) == ("pending", None, clock.now())
        [(first,)] = await read(service, select(Touchpoint.payload).where(
            Touchpoint.kind == "conversation_first_response"))
        assert first == {"conversation": conv.id, "seconds": 180.0}

        # The customer writes again: open again, waiting since now; resolving ends it, writing reopens it.
        clock.advance(timedelta(minutes=1))
        await say(service, "amy", "好的谢谢")
        [(conv,)] = await read(service, select(Conversation))
        assert (conv.state, conv.waiting_since) == ("open", clock.now())
        assert "resolved" in (await say(service, "olive", f"/resolve #{amy}"))[0]
        [(conv,)] = await read(service, select(Conversation))
        assert (conv.state, conv.handled, conv.resolved_by) == ("resolved", False, "staff:console:olive")
        before = await deliveries(service)
        assert "resolved" in (await say(service, "olive", f"/reply #{amy} 还在吗"))[0]
        assert await deliveries(service) == before  # refused, nothing written
        clock.advance(timedelta(hours=1))
        await say(service, "amy", "又有问题")
        [(conv,)] = await read(service, select(Conversation))
        assert (conv.state, conv.opened_at, conv.first_response_at) == ("open", clock.now(), None)
    finally:
        await service.stop()


async def test_bad_replies_get_clear_answers_and_write_nothing(make_config, clock):
    service = await started(make_config, clock)
    try:
        await say(service, "amy", "在吗")
        await say(service, "carl", "你好")
        [(carl,)] = await read(service, select(Customer.id).where(Customer.display_name.is_(None)).order_by(
            Customer.id.desc()).limit(1))
        before = await deliveries(service)
        assert "没有找到客户" in (await say(service, "olive", "/reply #99999 hello"))[0]
        assert "Usage" in (await say(service, "olive", f"/reply #{carl}"))[0]
        assert "Usage" in (await say(service, "olive", f"/reply #{carl}    "))[0]
        # a customer cannot use staff commands, a manager cannot answer
        assert (await say(service, "carl", f"/reply #{carl} 我自己回")) == ("抱歉,这个命令仅限员工使用。Sorry, this command is for "
                                                                         "staff only.",)
        assert "仅限员工" in (await say(service, "bob", f"/reply #{carl} hi"))[0]
        async with service.sessions() as s:
            customer = await s.get(Customer, carl)
            assert customer is not None
            for text, code in (("", "empty_reply"), ("x" * 2001, "reply_too_long")):
                try:
                    await threads.reply(service, s, customer, text, "console:olive", clock.now())
                except threads.ConversationError as exc:
                    assert exc.code == code
                else:
                    raise AssertionError(f"{code} not refused")
        assert await deliveries(service) == before
    finally:
        await service.stop()


async def test_handoff_pauses_marketing_until_resolved(make_config, clock):
    service = await started(make_config, clock)
    try:
        await say(service, "amy", "奶粉怎么选")  # tag 奶粉: the nurture journey's first step in an hour
        [(amy,)] = await read(service, select(Customer.id))
        await say(service, "amy", "人工")
        clock.advance(timedelta(hours=1, minutes=1))
        await say(service, "olive", f"/reply #{amy} 我来帮您")  # the person is still on it
        await settle(service)
        found = await read(service, select(Delivery.step, Delivery.status, Delivery.reason).where(
            Delivery.campaign == "nurture-formula"))
        assert found == [(0, "planned", "deferred:handoff")], found
        await say(service, "olive", f"/resolve #{amy}")
        await settle(service)
        [(status,)] = await read(service, select(Delivery.status).where(Delivery.campaign == "nurture-formula",
                                                                        Delivery.step == 0))
        assert status == "sent"
        # handoff also ends on its own after handoff_idle_minutes of quiet
        async with service.sessions() as s:
            assert await threads.handled_customers(service.config, s, [amy], clock.now()) == set()
    finally:
        await service.stop()


async def test_handoff_ends_after_idle_time(make_config, clock):
    service = await started(make_config, clock, conversations={"handoff_idle_minutes": 10})
    try:
        await say(service, "amy", "转人工")
        [(amy,)] = await read(service, select(Customer.id))
        async with service.sessions() as s:
            assert await threads.handled_customers(service.config, s, [amy], clock.now()) == {amy}
            clock.advance(timedelta(minutes=9))
            assert await threads.handoff_until(service.config, s, amy, clock.now()) == clock.now() + timedelta(minutes=1)
            clock.advance(timedelta(minutes=2))
            assert await threads.handled_customers(service.config, s, [amy], clock.now()) == set()
    finally:
        await service.stop()


async def test_new_conversations_are_assigned_in_turn_and_alerted(make_config, clock):
    service = await started(make_config, clock)
    try:
        for user in ("amy", "ben", "cat"):
            await say(service, user, "我的订单什么时候到")
            clock.advance(timedelta(seconds=1))
        assert await routing.alert_new(service) == 3
        rows = await read(service, select(Conversation.assignee).order_by(Conversation.id))
        assert [a for (a,) in rows] == ["console:olive", "console:oscar", "console:olive"]
        assert any("/reply #" in m and "我的订单" in m for m in mailbox(service, "olive"))
        assert await routing.alert_new(service) == 0  # at most once
        [(n,)] = await read(service, select(func.count()).select_from(Touchpoint).where(
            Touchpoint.kind == routing.ALERT_KIND))
        assert n == 3
    finally:
        await service.stop()


async def test_wechat_reply_window_and_notice(aiohttp_client, make_config, clock, fake):
    client, service = await start(aiohttp_client, make_config, clock, fake, overrides={
        "staff": STAFF, "conversations": {"notice": {"template_id": "TPL_NOTICE",
                                                     "fields": {"first": "{{ customer.name or '您好' }}", "keyword1": "{{ text }}"}}}})
    answer = await post(client, plaintext(TOKEN, text_xml("o_amy", "转人工", 31)))
    assert "人工" in await answer.text()
    amy = (await customer_of(service, "o_amy")).id
    clock.advance(timedelta(hours=1))
    assert "Queued" in (await say(service, "olive", f"/reply #{amy} 您好,请问订单号?"))[0]
    await settle(service)
    # the demo's welcome (a lifecycle message: it goes even during handoff), then the reply
    assert [m["text"]["content"] for m in fake.custom_messages if m["touser"] == "o_amy"][-1] == "您好,请问订单号?"

    clock.advance(timedelta(hours=48))
    before = await deliveries(service)
    refused = (await say(service, "olive", f"/reply #{amy} 还需要帮助吗"))[0]
    assert "48 hours" in refused and "template" in refused, refused
    assert await deliveries(service) == before
    async with service.sessions() as s, s.begin():
        customer = await s.get(Customer, amy)
        assert customer is not None
        await threads.reply(service, s, customer, "还需要帮助吗", "console:olive", clock.now(), as_notice=True)
    await settle(service)
    [notice] = fake.template_messages
    assert notice["template_id"] == "TPL_NOTICE" and notice["data"]["keyword1"] == {"value": "还需要帮助吗"}


async def test_waiting_alert_attaches_to_the_conversation(make_config, clock):
    from scrm.loyalty import followups
    from scrm.store.models import FollowupTask

    service = await started(make_config, clock, loyalty={"followups": {"staffed_channels": ["console"],
                                                                       "waiting_minutes": 10}})
    try:
        await say(service, "amy", "我的快递丢了")
        [(amy,)] = await read(service, select(Customer.id))
        assert await routing.alert_new(service) == 1
        clock.advance(timedelta(minutes=11))
        async with service.sessions() as s, s.begin():
            assert await followups.waiting_tasks(service, s, clock.now()) == 1
        [(owner, note)] = await read(service, select(FollowupTask.owner, FollowupTask.note))
        assert owner == "console:olive" and f"/reply #{amy}" in note
    finally:
        await service.stop()


async def test_new_conversations_go_to_agents_on_duty(make_config):
    from datetime import datetime

    from scrm.clock import ManualClock

    # Monday 03:00 UTC: 11:00 in Shanghai (olive at work), Sunday 19:00 in Los Angeles (oscar off).
    monday = ManualClock(datetime(2026, 12, 7, 3, 0))
    zones = {"console:olive": "Asia/Shanghai", "console:oscar": "America/Los_Angeles"}
    service = await started(make_config, monday, replies=DEMO_REPLIES, loyalty={"followups": {"timezones": zones}})
    try:
        assert service.replies.fallback is not None  # the demo's working hours, Mon-Fri 9:00-18:00
        for user in ("amy", "ben", "cat"):
            await say(service, user, "我的订单什么时候到")
            monday.advance(timedelta(seconds=1))
        assert await routing.alert_new(service) == 3
        rows = await read(service, select(Conversation.assignee).order_by(Conversation.id))
        assert [a for (a,) in rows] == ["console:olive"] * 3
        # 17:00 UTC: 09:00 in Los Angeles, 01:00 in Shanghai: the next one goes to oscar
        monday.advance(timedelta(hours=14))
        await say(service, "dan", "有人吗")
        assert await routing.alert_new(service) == 1
        [(last,)] = await read(service, select(Conversation.assignee).order_by(Conversation.id.desc()).limit(1))
        assert last == "console:oscar"
    finally:
        await service.stop()


async def test_the_fallback_is_no_answer_to_a_waiting_customer(make_config):
    from datetime import datetime

    from scrm.clock import ManualClock
    from scrm.loyalty import followups

    monday = ManualClock(datetime(2026, 12, 7, 3, 0))  # 11:00 in Shanghai: in hours
    service = await started(make_config, monday, replies=DEMO_REPLIES,
                            loyalty={"followups": {"staffed_channels": ["console"], "waiting_minutes": 10}})
    try:
        assert "客服会尽快" in (await say(service, "amy", "在吗"))[0]  # the fallback: "a person will answer soon"
        monday.advance(timedelta(minutes=11))
        async with service.sessions() as s, s.begin():
            assert await followups.waiting_tasks(service, s, monday.now()) == 1
    finally:
        await service.stop()


async def test_telegram_staff_answer_by_replying_to_the_alert(aiohttp_server, aiohttp_client, make_config, clock):
    from scrm.web import SERVICE, create_app
    from tests.fakes.telegram import FakeTelegram, Updates, private_chat, user
    from tests.test_telegram import TOKEN, deliver, telegram_config

    fake = FakeTelegram(TOKEN)
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("/bot"))
    updates = Updates(fake.bot_user)
    alice, olive = user(1001, "Alice"), user(2002, "Olive")
    config = telegram_config(make_config, fake.base_url, {"staff": {"telegram:2002": "operator"},
                                                          "conversations": {"agents": ["telegram:2002"]}})
    client = await aiohttp_client(create_app(config, clock))
    service = client.app[SERVICE]

    await deliver(client, updates.text(alice, "人工"))
    await settle(service)  # the demo's welcome
    await routing.alert_new(service)  # or the service's own job, which runs every 5 s: either, once
    await eventually(lambda: _any_async(any(s.chat_id == 2002 for s in fake.sent)))
    [alert] = [s for s in fake.sent if s.chat_id == 2002]
    assert "/reply #" in (alert.text or "") and "reply to this message" in (alert.text or "")

    answer = updates._message(olive, text="您好 Alice,请发订单号", reply_to_message={
        "message_id": alert.message_id, "from": fake.bot_user, "chat": private_chat(olive), "date": 0,
        "text": alert.text})
    await deliver(client, answer)
    # replies go out after the webhook's 200, at the chat's pace (the alert was its last message)
    await eventually(lambda: _any_async(any("Queued" in t for t in fake.texts_to(2002))))
    await settle(service)
    await eventually(lambda: _any_async(fake.texts_to(1001)[-1:] == ["您好 Alice,请发订单号"]))
    [(actor,)] = await read(service, select(Touchpoint.actor).where(Touchpoint.kind == "staff_reply"))
    assert actor == "staff:telegram:2002"
    # a reply to any other message of the bot is no answer to a customer
    other = updates._message(olive, text="谢谢", reply_to_message={
        "message_id": 999_999, "from": fake.bot_user, "chat": private_chat(olive), "date": 0, "text": "?"})
    await deliver(client, other)
    assert await deliveries(service) == 1


async def _any_async(value: bool) -> bool:
    return value
