"""Conversation figures on a generated history, on SQLite and PostgreSQL: conversations opened by customer
messages (console and the fake WeChat), answered and resolved by two operators through the conversation
core as a manual clock advances; p50/p90 of first response and resolution per staff member and channel
against hand-computed values, the open and pending counts, and the same figures in `/report`,
`scrm report` and the console dashboard."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest

from scrm.clock import ManualClock, SystemClock
from scrm.console import accounts
from scrm.conversations import threads
from scrm.conversations.figures import (
    ConversationFigures,
    Times,
    conversation_figures,
    duration,
    percentile,
    times_query,
)
from scrm.customers import find_customer
from scrm.messages import InboundEvent
from scrm.service import Service
from scrm.store.engine import writing
from scrm.store.models import Customer
from scrm.web import SERVICE, create_app
from tests.console_support import PASSWORD
from tests.test_reports import scrm_cli
from tests.test_wechat import account, fake  # noqa: F401  (fake: a fixture)

STAFF = {"console:olive": "operator", "console:oscar": "operator", "console:bob": "manager"}
OLIVE, OSCAR = "staff:console:olive", "staff:console:oscar"

#: (channel, customer, [(staff who answers, seconds after the first message), ...] per episode,
#:  resolved by and seconds after the first message, or None: left pending).
#: Whoever answers first becomes the assignee, and the resolution counts for the assignee.
HISTORY: list[tuple[str, str, str, int, str | None, int | None]] = [
    ("console", "c1", OLIVE, 60, OLIVE, 600),
    ("console", "c2", OLIVE, 120, OLIVE, 1200),
    ("console", "c3", OLIVE, 300, OLIVE, 3600),
    ("console", "c4", OLIVE, 900, None, None),      # answered, waiting for the customer
    ("console", "c1", OLIVE, 90, OLIVE, 400),       # c1 again: a second episode
    ("console", "c5", OSCAR, 30, OSCAR, 300),
    ("console", "c6", OSCAR, 240, OLIVE, 1800),     # olive resolves oscar's conversation: oscar's time
    ("wechat", "w1", OLIVE, 600, OLIVE, 7200),
    ("wechat", "w2", OLIVE, 1800, OLIVE, 5400),
]
#: Hand-computed nearest-rank percentiles, in seconds: (count, p50, p90).
EXPECTED = {
    ("console:olive", "console"): {"first": (5, 120, 900), "resolution": (4, 600, 3600)},  # [60 90 120 300 900]
    ("console:oscar", "console"): {"first": (2, 30, 240), "resolution": (2, 300, 1800)},
    ("console:olive", "wechat"): {"first": (2, 600, 1800), "resolution": (2, 5400, 7200)},
}
TOTAL_FIRST = (9, 240, 1800)        # [30 60 90 120 240 300 600 900 1800]
TOTAL_RESOLUTION = (8, 1200, 7200)  # [300 400 600 1200 1800 3600 5400 7200]


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert [percentile([7.0], p) for p in (50, 90)] == [7.0, 7.0]
    assert Times.of([900, 60, 300, 90, 120]) == Times(5, 120, 900)
    assert Times.of(list(range(1, 11))) == Times(10, 5, 9)
    assert Times.of([1, 2]) == Times(2, 1, 2)
    assert [duration(s) for s in (None, 0, 42, 60, 200, 3600, 5400, 86400, 90000)] == \
        ["-", "0s", "42s", "1m", "3m20s", "1h", "1h30m", "1d", "1d1h"]


class History:
    def __init__(self, service: Service, clock: ManualClock) -> None:
        self.service, self.clock, self.n = service, clock, 0
        self.started = clock.now()
        self.waiting_since: datetime | None = None
        self.stopped = False

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.service.stop()

    async def write(self, channel: str, user: str, text: str) -> None:
        self.n += 1
        account = "local" if channel == "console" else "brand"
        await self.service.receive(InboundEvent(channel, account, user, "text", text=text,
                                                platform_msg_id=f"{user}-{self.n}"))

    async def customer(self, channel: str, user: str) -> Customer:
        async with self.service.sessions() as s:
            found = await find_customer(s, channel, user, "local" if channel == "console" else "brand")
            assert found is not None
            return found

    async def episode(self, channel: str, user: str, staff: str, answer: int, resolver: str | None,
                      resolve: int | None) -> None:
        opened = self.clock.now()
        await self.write(channel, user, "转人工")
        customer = await self.customer(channel, user)
        self.clock.advance(timedelta(seconds=answer))
        async with self.service.sessions() as s, s.begin():
            await threads.reply(self.service, s, customer, "您好,我来帮您", staff, self.clock.now())
        if resolver is not None and resolve is not None:
            self.clock.set(opened + timedelta(seconds=resolve))
            async with self.service.sessions() as s, s.begin():
                await threads.resolve(s, customer, resolver, self.clock.now())
        self.clock.advance(timedelta(minutes=7))

    async def build(self) -> None:
        for channel, user, staff, answer, resolver, resolve in HISTORY:
            await self.episode(channel, user, staff, answer, resolver, resolve)
        # two customers nobody has answered yet: the oldest waits from here
        self.waiting_since = self.clock.now()
        await self.write("console", "c7", "人工")
        self.clock.advance(timedelta(minutes=25))
        await self.write("wechat", "w3", "转人工")
        self.clock.advance(timedelta(minutes=20))


def config_overrides(fake: Any) -> dict[str, Any]:
    return {"staff": STAFF, "channels": {"wechat": {"brand": account(fake)}}}


@pytest.fixture
async def history(make_config, fake):  # noqa: F811
    # a few days back, so `scrm report --days 7` (the real clock) covers it too
    clock = ManualClock(SystemClock().now().replace(microsecond=0) - timedelta(days=3))
    service = Service(make_config(config_overrides(fake)), clock)
    await service.start(scheduler=False)
    built = History(service, clock)
    try:
        await built.build()
        yield built
    finally:
        await built.stop()


def check(figures: ConversationFigures) -> None:
    got = {(r.staff, r.channel): {"first": (r.first_response.count, r.first_response.p50, r.first_response.p90),
                                  "resolution": (r.resolution.count, r.resolution.p50, r.resolution.p90)}
           for r in figures.rows}
    assert got == EXPECTED
    assert (figures.first_response.count, figures.first_response.p50, figures.first_response.p90) == TOTAL_FIRST
    assert (figures.resolution.count, figures.resolution.p50, figures.resolution.p90) == TOTAL_RESOLUTION
    assert (figures.open, figures.pending) == (2, 1)


def report_lines(figures_text: str) -> dict[str, str]:
    """`<staff> [<channel>]` -> the rest of its line, from a report's conversations section."""
    rows = {}
    for line in figures_text.splitlines():
        if "] " in line and line.startswith("  console:"):
            head, rest = line.strip().split("] ", 1)
            rows[head + "]"] = rest
    return rows


EXPECTED_LINES = {
    "console:olive [console]": "首次响应 2m/15m (5) · 解决 10m/1h (4)",
    "console:olive [wechat]": "首次响应 10m/30m (2) · 解决 1h30m/2h (2)",
    "console:oscar [console]": "首次响应 30s/4m (2) · 解决 5m/30m (2)",
}


async def test_figures_per_staff_and_channel_match_the_hand_computed_ones(history: History) -> None:
    service, now = history.service, history.clock.now()
    async with service.sessions() as s:
        figures = await conversation_figures(s, now - timedelta(days=7), now)
        check(figures)
        assert figures.oldest_waiting_since == history.waiting_since
        assert figures.oldest_wait_seconds == 45 * 60
        # a period before any of it: no times, the open conversations are still there now
        before = await conversation_figures(s, history.started - timedelta(days=1), history.started, now)
        assert (before.rows, before.first_response.count, before.open, before.any) == ([], 0, 2, True)
        # (since, until] like every report: the first answer at started + 60 s is in, the resolve at 600 s out
        first = await conversation_figures(s, history.started, history.started + timedelta(seconds=599))
        assert [(r.staff, r.first_response, r.resolution.count) for r in first.rows] == \
            [("console:olive", Times(1, 60, 60), 0)]
        assert first.as_dict()["by_staff"][0]["first_response"] == {"count": 1, "p50_seconds": 60.0,
                                                                     "p90_seconds": 60.0}
        if s.bind.dialect.name == "sqlite":  # the period's rows come from the (created_at, kind) index
            compiled = times_query(now - timedelta(days=7), now).compile(
                dialect=s.bind.dialect, compile_kwargs={"render_postcompile": True})
            params = tuple(str(compiled.params[key]) for key in compiled.positiontup or ())
            connection = await s.connection()
            plan = (await connection.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), params)).all()
            assert "ix_touchpoints_created_kind" in " ".join(str(row[-1]) for row in plan), plan


async def test_report_in_chat_and_cli_show_them(history: History, tmp_path, store) -> None:
    reaction = await history.service.receive(InboundEvent("console", "local", "bob", "command", text="/report 7d",
                                                          platform_msg_id="report-1"))
    report = reaction.replies[0]
    assert "会话 Conversations:" in report
    assert report_lines(report) == EXPECTED_LINES
    lines = report.splitlines()
    assert any(line.split() == ["待回复", "Waiting", "for", "staff", "2", "最久", "oldest", "45m"] for line in lines)
    assert any(line.split()[:3] == ["首次响应", "First", "response"] and line.split()[3:] ==
               ["p50", "4m", "p90", "30m", "(9)"] for line in lines), report
    assert any(line.split()[:2] == ["解决", "Resolution"] and line.split()[2:] == ["p50", "20m", "p90", "2h", "(8)"]
               for line in lines), report
    english = await history.service.receive(InboundEvent("console", "local", "bob", "command", text="/report 7d",
                                                         platform_msg_id="report-2", payload={"language_code": "en"}))
    assert "Conversations:" in english.replies[0] and "First response 2m/15m (5)" in english.replies[0]

    assert scrm_cli(tmp_path, store, "init").returncode == 0
    result = scrm_cli(tmp_path, store, "report", "--days", "7")
    assert result.returncode == 0, result.stderr
    assert report_lines(result.stdout) == EXPECTED_LINES
    data = json.loads(scrm_cli(tmp_path, store, "report", "--days", "7", "--json").stdout)["conversations"]
    assert (data["open"], data["pending"]) == (2, 1)
    assert data["first_response"] == {"count": 9, "p50_seconds": 240.0, "p90_seconds": 1800.0}
    assert {(r["staff"], r["channel"]): (r["resolution"]["p50_seconds"], r["resolution"]["p90_seconds"])
            for r in data["by_staff"]} == {k: v["resolution"][1:] for k, v in EXPECTED.items()}


async def test_no_conversations_no_section(make_config, clock) -> None:
    service = Service(make_config({"staff": STAFF}), clock)
    await service.start(scheduler=False)
    try:
        report = (await service.receive(InboundEvent("console", "local", "bob", "command", text="/report 7d",
                                                     platform_msg_id="r-1"))).replies[0]
        assert "Conversations" not in report and "新客户" in report
    finally:
        await service.stop()


async def test_dashboard_shows_them(history: History, aiohttp_client, make_config, fake) -> None:  # noqa: F811
    await history.stop()  # the console's service takes over the store
    client = await aiohttp_client(create_app(make_config(config_overrides(fake)), history.clock))
    service = client.app[SERVICE]
    async with writing(service.sessions) as session:
        await accounts.add_account(session, "bob", "manager", PASSWORD, history.clock.now())
    form = await client.get("/console/login")
    pre = (await form.text()).split('name="pre" value="')[1].split('"')[0]
    signed = await client.post("/console/login", data={"name": "bob", "password": PASSWORD, "pre": pre},
                               allow_redirects=False)
    assert signed.status == 303
    page = await (await client.get("/console/?period=7d")).text()
    section = page.split('id="conversations"')[1].split("</section>")[0]
    assert 'data-waiting="2" data-pending="1"' in section
    rows = {}
    for row in section.split("<tr ")[1:]:
        cells = [c.split("</td>")[0].strip() for c in row.split("<td>")[1:]]
        rows[row.split(">")[0].strip()] = cells
    assert rows['data-staff="console:olive" data-channel="console"'] == ["console:olive", "console", "2m / 15m", "5",
                                                                         "10m / 1h", "4"]
    assert rows['data-staff="console:oscar" data-channel="console"'][2:] == ["30s / 4m", "2", "5m / 30m", "2"]
    assert rows["data-total"][2:] == ["4m / 30m", "9", "20m / 2h", "8"]
