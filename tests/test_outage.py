"""A platform outage delays campaign messages instead of losing them.

A send that never reached the platform (connection refused, DNS failure, connect timeout) delivered
nothing, so the outbox tries it again, backing off, until ``[delivery] unreachable_retry_hours`` after its
first such try; its coupon stays reserved meanwhile, and the channel account is reported degraded in
/healthz and /metrics until a send gets through. An answer lost after the request went out may hide a
delivered message and is never resent. The drill takes the fake Telegram server down (its port refuses
connections) for ten minutes of the service's clock in the middle of a 1,000-customer welcome campaign,
driving the real outbox tick by tick: no sleeps, nothing that depends on the machine's speed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from telegram.error import NetworkError, TimedOut

from handlers.telegram import result_for
from handlers.wechat import WeChatChannel
from handlers.wecom import WeComChannel
from scrm.campaigns.outbox import UNREACHABLE_MAX_WAIT
from scrm.clock import ManualClock
from scrm.config import Config
from scrm.messages import OutboundMessage
from scrm.store.models import CouponCode, Customer, Delivery, Identity, Touchpoint
from scrm.web import SERVICE, create_app
from tests.conftest import applied, free_port
from tests.fakes.loopback import LoopbackServer
from tests.fakes.telegram import FakeTelegram, Updates, user
from tests.fakes.wechat import FakeWeChat

TOKEN = "7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0"
SECRET = "wh_s3cret-Token_123"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
#: Messages a second the fake Telegram allows and the bot paces itself to: high, so that the drill's
#: 1,000 welcomes (and the tries that find Telegram down) are not a minute of waiting for slots.
RATE = 1000
CUSTOMERS = 1000
DEGRADED = "channel:telegram:main"
pytestmark = pytest.mark.filterwarnings("ignore:.*`retry_after`.*:DeprecationWarning")


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    fake = FakeTelegram(TOKEN, overall_per_second=RATE)
    await fake.serve()
    yield fake
    await fake.close()


def telegram_config(make_config: Callable[..., Config], fake: FakeTelegram, per_chat_per_second: float = 1,
                    **extra: Any) -> Config:
    account = {"token": TOKEN, "webhook_secret": SECRET, "api_base_url": fake.base_url, "overall_per_second": RATE,
               "per_chat_per_second": per_chat_per_second}
    return make_config({"channels": {"telegram": {"main": account}}, **extra})


async def start(aiohttp_client: Any, config: Config, clock: ManualClock) -> Any:
    """The real app; its scheduler paused, so that the test drives the outbox tick by tick."""
    client = await aiohttp_client(create_app(config, clock))
    client.app[SERVICE].scheduler.pause()
    return client


async def arrive(client: Any, updates: Updates, people: list[dict[str, Any]]) -> None:
    """First messages through the webhook: each plans the welcome (with a coupon) for its sender."""
    async def one(person: dict[str, Any]) -> None:
        resp = await client.post("/telegram/main", data=json.dumps(updates.text(person, "你好")).encode(),
                                 headers={SECRET_HEADER: SECRET, "Content-Type": "application/json"})
        assert resp.status == 200, await resp.text()

    for start_at in range(0, len(people), 100):
        await asyncio.gather(*(one(p) for p in people[start_at:start_at + 100]))
    await applied(client.app[SERVICE])  # answered once durable: the welcomes are planned as they are applied


async def welcomes(client: Any) -> dict[str, int]:
    async with client.app[SERVICE].sessions() as s:
        rows = (await s.execute(select(Delivery.status, func.count()).where(Delivery.campaign == "welcome")
                                .group_by(Delivery.status))).all()
    return {status: n for status, n in rows}


async def health(client: Any) -> dict[str, Any]:
    resp = await client.get("/healthz")
    assert resp.status == 200  # a platform down does not take the instance out of service
    return dict(await resp.json())


async def degraded_gauge(client: Any) -> float | None:
    resp = await client.get("/metrics")
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            if sample.name == "scrm_channel_degraded" and sample.labels == {"channel": "telegram",
                                                                           "account": "main"}:
                return sample.value
    return None


async def codes_held(client: Any) -> dict[str, list[str]]:
    """Telegram user id -> the welcome codes their customer holds."""
    async with client.app[SERVICE].sessions() as s:
        rows = (await s.execute(select(Identity.external_id, CouponCode.code)
                                .join(CouponCode, CouponCode.customer_id == Identity.customer_id)
                                .where(Identity.channel == "telegram"))).all()
    held: dict[str, list[str]] = {}
    for external_id, code in rows:
        held.setdefault(external_id, []).append(code)
    return held


async def count(client: Any, model: Any, *where: Any) -> int:
    async with client.app[SERVICE].sessions() as s:
        return int(await s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def test_ten_minutes_of_telegram_down_during_a_1000_customer_campaign(aiohttp_client, make_config, clock, fake):
    began, cpu = time.perf_counter(), time.process_time()
    client = await start(aiohttp_client, telegram_config(make_config, fake, scheduler={"outbox_batch": 200}), clock)
    service = client.app[SERVICE]
    updates = Updates(fake.bot_user)
    people = [user(100_000 + i, f"Fan{i}") for i in range(CUSTOMERS)]
    waves = [people[i:i + CUSTOMERS // 4] for i in range(0, CUSTOMERS, CUSTOMERS // 4)]

    # Clock second 0: the first quarter arrives and is welcomed while Telegram is up.
    await arrive(client, updates, waves[0])
    await service.outbox.tick()
    assert await welcomes(client) == {"sent": len(waves[0])}
    assert DEGRADED not in await health(client) and await degraded_gauge(client) == 0

    # Seconds 60 to 660: Telegram refuses every connection; the other three quarters arrive meanwhile.
    # The outbox runs every two minutes of clock time (from second 60), until every welcome is sent.
    down_at, up_at, step = 60, 660, 120
    arrivals = {60: waves[1], 300: waves[2], 540: waves[3]}
    elapsed, tries_while_down, arrived = 0, 0, len(waves[0])
    while await welcomes(client) != {"sent": CUSTOMERS}:
        advance = down_at if elapsed == 0 else step
        clock.advance(advance)
        elapsed += advance
        assert elapsed <= up_at + UNREACHABLE_MAX_WAIT + step, await welcomes(client)
        if elapsed == down_at:
            await fake.go_down()
        if elapsed == up_at:
            await fake.come_back()
        if elapsed in arrivals:
            await arrive(client, updates, arrivals[elapsed])
            arrived += len(arrivals[elapsed])
        claimed_before = await _attempts(client)
        await service.outbox.tick()
        if down_at <= elapsed < up_at:
            tries_while_down += await _attempts(client) - claimed_before
            # Nothing is lost: every welcome not sent is planned again, its coupon still its customer's.
            statuses = await welcomes(client)
            assert set(statuses) <= {"sent", "planned"} and statuses["sent"] == len(waves[0]), statuses
            held = await codes_held(client)
            assert len(held) == arrived and {len(codes) for codes in held.values()} == {1}
            assert (await health(client))[DEGRADED].startswith("degraded: platform unreachable since")
            assert await degraded_gauge(client) == 1
    assert tries_while_down > 0 and len(fake.sent) == CUSTOMERS

    # Every customer has the welcome exactly once, with the code the store says is theirs.
    per_chat = Counter(s.chat_id for s in fake.sent)
    assert set(per_chat) == {p["id"] for p in people}
    duplicates = sum(n - 1 for n in per_chat.values())
    assert duplicates == 0
    held = await codes_held(client)
    for message in fake.sent:
        [code] = held[str(message.chat_id)]
        assert message.text is not None and code in message.text
    assert len({code for codes in held.values() for code in codes}) == CUSTOMERS
    assert await count(client, Touchpoint, Touchpoint.kind == "coupon_revoked") == 0
    assert await count(client, Touchpoint, Touchpoint.kind == "campaign_message") == CUSTOMERS
    assert await count(client, Delivery, Delivery.unreachable_since.is_not(None)) == CUSTOMERS - len(waves[0])
    # The next successful send cleared the mark.
    assert DEGRADED not in await health(client) and await degraded_gauge(client) == 0
    await service.outbox.tick()
    assert len(fake.sent) == CUSTOMERS
    print(f"\noutage drill: {CUSTOMERS} customers, {len(fake.sent)} deliveries, {duplicates} duplicates, "
          f"{tries_while_down} tries refused while down, {elapsed} s of clock time, "
          f"{time.perf_counter() - began:.1f} s wall time ({time.process_time() - cpu:.1f} s CPU)")


async def _attempts(client: Any) -> int:
    async with client.app[SERVICE].sessions() as s:
        return int(await s.scalar(select(func.coalesce(func.sum(Delivery.attempts), 0))) or 0)


async def test_after_the_horizon_the_delivery_fails_and_its_coupon_goes_back(aiohttp_client, make_config, clock,
                                                                            fake):
    # The default horizon (6 h); the bot's pace for one chat (a second) would only slow the tries down.
    client = await start(aiohttp_client, telegram_config(make_config, fake, per_chat_per_second=RATE), clock)
    service = client.app[SERVICE]
    alice = user(1001, "Alice")
    await fake.go_down()
    await arrive(client, Updates(fake.bot_user), [alice])
    first_try = clock.now()
    waits: list[float] = []
    while True:
        await service.outbox.tick()
        async with service.sessions() as s:
            d = await s.scalar(select(Delivery).where(Delivery.campaign == "welcome"))
        assert d is not None
        if d.status != "planned":
            break
        assert d.unreachable_since == first_try and d.reason is not None and d.reason.startswith("network")
        assert len((await codes_held(client))["1001"]) == 1  # still reserved for her
        waits.append((d.due_at - clock.now()).total_seconds())
        clock.set(d.due_at)

    horizon = timedelta(hours=6).total_seconds()
    # Doubling from the channel's 5 s, capped, and the last wait ends at the horizon exactly.
    assert waits[:8] == [5, 5, 10, 20, 40, 80, 160, UNREACHABLE_MAX_WAIT]
    assert set(waits[8:-1]) == {UNREACHABLE_MAX_WAIT} and 0 < waits[-1] <= UNREACHABLE_MAX_WAIT
    assert sum(waits) == horizon and clock.now() == first_try + timedelta(seconds=horizon)
    assert d.status == "failed" and d.reason is not None and d.reason.startswith("unreachable: network")
    assert (await codes_held(client)).get("1001") is None  # back in the pool
    assert await count(client, Touchpoint, Touchpoint.kind == "coupon_revoked") == 1
    assert await count(client, Touchpoint, Touchpoint.kind == "delivery_failed") == 1
    assert (await health(client))[DEGRADED].startswith("degraded")

    await fake.come_back()  # failed is final: never sent later
    clock.advance(3600)
    await service.outbox.tick()
    assert fake.sent == []


async def test_a_retry_rechecks_quiet_hours(aiohttp_client, make_config, clock, fake):
    """A marketing message that found Telegram down at 20:59 (Asia/Shanghai) is not tried again in quiet
    hours: it waits for 09:00, and the night does not count against its horizon."""
    client = await start(aiohttp_client, telegram_config(make_config, fake), clock)
    service = client.app[SERVICE]
    await arrive(client, Updates(fake.bot_user), [user(1001, "Alice")])
    await service.outbox.tick()
    assert len(fake.sent) == 1  # her welcome
    async with service.sessions() as s:
        customer = await s.scalar(select(Customer).join(Identity).where(Identity.external_id == "1001"))
    assert customer is not None
    clock.set(clock.now().replace(hour=12, minute=59))  # 20:59 in Shanghai
    async with service.sessions() as s, s.begin():
        s.add(Delivery(campaign="nurture-formula", step=0, target=f"c{customer.id}", occurrence="", status="planned",
                       customer_id=customer.id, channel="telegram", account="main", external_id="1001", attempts=0,
                       due_at=clock.now(), created_at=clock.now()))
    await fake.go_down()
    await service.outbox.tick()

    async def nurture() -> Delivery:
        async with service.sessions() as s:
            found = await s.scalar(select(Delivery).where(Delivery.campaign == "nurture-formula"))
        assert found is not None
        return found

    d = await nurture()
    assert (d.status, d.attempts, d.unreachable_since) == ("planned", 1, clock.now())
    clock.set(d.due_at + timedelta(seconds=60))  # 21:00:05: quiet hours began
    await service.outbox.tick()
    d = await nurture()
    assert (d.status, d.reason, d.attempts, d.unreachable_since) == ("planned", "deferred:quiet_hours", 2, None)
    assert d.due_at == clock.now().replace(hour=1, minute=0, second=0) + timedelta(days=1)  # 09:00 local
    await fake.come_back()
    clock.set(d.due_at)
    await service.outbox.tick()
    assert (await nurture()).status == "sent" and len(fake.sent) == 2


# -- each channel tells "never reached" apart from "answer lost" ---------------------------------------


def test_telegram_classifies_network_errors():
    refused, dns, connect = (NetworkError("httpx.ConnectError: refused"), NetworkError("httpx.ConnectError: dns"),
                             TimedOut("connect"))
    refused.__cause__ = httpx.ConnectError("[Errno 111] Connection refused")
    dns.__cause__ = httpx.ConnectError("[Errno -2] Name or service not known")
    connect.__cause__ = httpx.ConnectTimeout("timed out")
    for error in (refused, dns, connect):
        result = result_for(error)
        assert (result.status, result.unreachable) == ("retry", True)
    pool = TimedOut("pool")
    pool.__cause__ = httpx.PoolTimeout("no connection")
    assert (result_for(pool).status, result_for(pool).unreachable) == ("retry", False)  # not sent, but reachable
    lost = TimedOut("read")
    lost.__cause__ = httpx.ReadTimeout("timed out")
    assert (result_for(lost).status, result_for(lost).unreachable) == ("failed", False)


#: Set when a test ends: the requests the hanging routes hold are answered, and the servers stop at once.
_RELEASED = "released"


def _hanging(routes: dict[str, Any]) -> Callable[[], web.Application]:
    """An API whose ``hang`` routes take the request and answer only when the test ends (the client
    has long given up: an answer lost); other routes answer the given JSON."""
    def make() -> web.Application:
        app = web.Application()
        release = asyncio.Event()
        app[RELEASE] = release

        def handler(answer: Any) -> Any:
            async def handle(request: web.Request) -> web.Response:
                await request.read()
                if answer == "hang":
                    await release.wait()
                    return web.json_response({"errcode": -1, "errmsg": _RELEASED})
                return web.json_response(answer)
            return handle

        for path, answer in routes.items():
            app.router.add_route("*", path, handler(answer))
        return app

    return make


RELEASE = web.AppKey("release", asyncio.Event)


class _Served(LoopbackServer):
    """A loopback server that keeps its app, so that a test can answer what the app holds."""

    def __init__(self, make_app: Callable[[], web.Application]) -> None:
        self.apps: list[web.Application] = []

        def keep() -> web.Application:
            app = make_app()
            self.apps.append(app)
            return app

        super().__init__(keep)

    async def stop(self) -> None:
        for app in self.apps:
            if RELEASE in app:
                app[RELEASE].set()
        await super().stop()


async def _serve(make_app: Callable[[], web.Application]) -> _Served:
    server = _Served(make_app)
    await server.start()
    return server


async def test_wechat_classifies_network_errors(make_config, clock):
    from scrm.service import Service

    fake = FakeWeChat()
    up = await _serve(fake.app)
    token = {"access_token": "T" * 20, "expires_in": 7200}
    hangs = await _serve(_hanging({"/cgi-bin/token": token, "/cgi-bin/message/custom/send": "hang"}))
    token_hangs = await _serve(_hanging({"/cgi-bin/token": "hang"}))
    account = {"app_id": fake.app_id, "app_secret": fake.app_secret, "token": "scrmtoken",
               "request_timeout_seconds": 0.5}
    bases = {"up": up.url(), "closed": f"http://127.0.0.1:{free_port()}/", "hangs": hangs.url(),
             "token_hangs": token_hangs.url()}
    config = make_config({"channels": {"wechat": {name: {**account, "api_base_url": base}
                                                  for name, base in bases.items()}}})
    service = Service(config, clock)
    await service.start(scheduler=False)
    try:
        def send(account: str) -> Any:
            channel = service.channel("wechat", account)
            assert isinstance(channel, WeChatChannel)
            return channel.send(OutboundMessage("wechat", account, "o_ann", "你好", last_inbound_at=clock.now()))

        closed = await send("closed")  # the token fetch is refused
        assert (closed.status, closed.reason, closed.unreachable) == ("retry", "network:ConnectionError", True)
        assert (await send("up")).status == "sent"
        await up.stop()  # the token is cached: now the message itself is refused
        # The first may meet the kept-alive connection the server closed: it cannot be written, and is retried.
        stale = await send("up")
        assert stale.status == "retry" and stale.reason in {"network:ClientOSError", "network:ConnectionError"}
        refused = await send("up")
        assert (refused.status, refused.reason, refused.unreachable) == ("retry", "network:ConnectionError", True)
        token_lost = await send("token_hangs")  # no message went out: retried, but WeChat was reached
        assert (token_lost.status, token_lost.reason, token_lost.unreachable) == ("retry", "network:ReadTimeout", False)
        lost = await send("hangs")
        assert (lost.status, lost.reason, lost.unreachable) == ("failed", "unknown_outcome:ReadTimeout", False)
    finally:
        await service.stop()
        for server in (up, hangs, token_hangs):
            await server.stop()


async def test_wecom_classifies_network_errors(make_config, clock):
    from scrm.service import Service

    token = {"errcode": 0, "errmsg": "ok", "access_token": "T" * 20, "expires_in": 7200}
    sends = await _serve(_hanging({"/cgi-bin/gettoken": token, "/cgi-bin/externalcontact/add_msg_template": {
        "errcode": 0, "errmsg": "ok", "msgid": "msgA", "fail_list": []}}))
    hangs = await _serve(_hanging({"/cgi-bin/gettoken": token, "/cgi-bin/externalcontact/add_msg_template": "hang"}))
    token_hangs = await _serve(_hanging({"/cgi-bin/gettoken": "hang"}))
    account = {"corp_id": "ww5f3c0d2e9a8b7c6d", "secret": "s", "token": "t", "sender": "zhangsan",
               "encoding_aes_key": "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C", "timeout_seconds": 1.0}
    bases = {"up": sends.url(), "closed": f"http://127.0.0.1:{free_port()}/", "hangs": hangs.url(),
             "token_hangs": token_hangs.url()}
    config = make_config({"channels": {"wecom": {name: {**account, "api_base_url": base}
                                                 for name, base in bases.items()}}})
    service = Service(config, clock)
    await service.start(scheduler=False)
    try:
        def send(account: str) -> Any:
            channel = service.channel("wecom", account)
            assert isinstance(channel, WeComChannel)
            return channel.send(OutboundMessage("wecom", account, "wmAnn", "你好"))

        closed = await send("closed")
        assert (closed.status, closed.reason, closed.unreachable) == ("retry", "wecom:unreachable", True)
        assert (await send("up")).status == "sent"
        await sends.stop()  # the token is cached: now the task itself is refused
        stale = await send("up")  # perhaps on the kept-alive connection the server closed: not written, retried
        assert stale.status == "retry"
        refused = await send("up")
        assert (refused.status, refused.unreachable) == ("retry", True)
        token_lost = await send("token_hangs")  # no task was created: retried, but WeCom was reached
        assert (token_lost.status, token_lost.unreachable) == ("retry", False)
        lost = await send("hangs")  # the task may exist: creating it again could reach the customer twice
        assert (lost.status, lost.reason, lost.unreachable) == ("failed", "unknown_outcome:TimeoutError", False)
    finally:
        await service.stop()
        for server in (sends, hangs, token_hangs):
            await server.stop()
