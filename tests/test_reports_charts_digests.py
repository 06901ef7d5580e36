"""Charts (valid PNGs whose CJK text renders as glyphs, not missing-glyph boxes) and report digests
fired by the real scheduler with an injected clock, through the console channel."""

from __future__ import annotations

import io
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import matplotlib
import pytest
from fontTools.ttLib import TTFont
from PIL import Image, ImageChops
from sqlalchemy import func, select

from scrm import charts, reports
from scrm.clock import ManualClock
from scrm.scheduler import DIGESTS_JOB, run_soon
from scrm.store.models import ReportDigest, Touchpoint
from scrm.web import SERVICE, create_app
from tests.conftest import eventually

NOW = datetime(2026, 11, 27, 12, 0, 0)  # Friday 20:00 in Asia/Shanghai
DEJAVU = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def image(png: bytes) -> Image.Image:
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG"
        return img.convert("L")


def test_shipped_font_covers_every_label():
    cmap = TTFont(charts.SHIPPED_FONT).getBestCmap()
    chars = {ch for zh, en in reports.LABELS.values() for ch in zh + en if ch != " "}
    assert not {ch for ch in chars if ord(ch) not in cmap}
    assert charts.has_glyphs(charts.SHIPPED_FONT) and not charts.has_glyphs(DEJAVU)
    assert (charts.SHIPPED_FONT.parent / "OFL.txt").read_text("utf-8").count("SIL OPEN FONT LICENSE") == 1


@pytest.mark.parametrize("system", [False, True])
def test_cjk_text_renders_as_glyphs(system):
    """Missing glyphs all draw the same box: two different characters rendering identically means
    the font lacks them (DejaVu Sans shows the check can fail); real glyphs differ."""
    font = charts.cjk_font(system=system)
    assert charts.has_glyphs(font, "新客户转化漏斗周留存")

    def differ(a: str, b: str, f: Path) -> bool:
        return ImageChops.difference(image(charts.text_png(a, f)), image(charts.text_png(b, f))).getbbox() is not None

    assert not differ("新", "客", DEJAVU)  # both tofu
    assert differ("新", "客", font) and differ("转化", "漏斗", font)
    blank = Image.new("L", image(charts.text_png("新", font)).size, 255)
    assert ImageChops.difference(image(charts.text_png("新", font)), blank).getbbox() is not None


def test_charts_are_pngs_of_the_stated_size():
    funnel = reports.Funnel("spring", reports.FunnelRow(10, 8, 6, 3, 2, 1, 1, 99.0),
                            {"A": reports.FunnelRow(5, 4, 3, 2, 1, 1), "B": reports.FunnelRow(5, 4, 3, 1, 1, 0)},
                            {"wechat": reports.FunnelRow(10, 8, 6, 3, 2, 1)}, {"opted_out": 2}, 0, 7)
    cohorts = reports.Cohorts([datetime(2026, 11, d).date() for d in (9, 16, 23)], [4, 0, 2],
                              [[1.0, 0.5, 0.25], [0.0, 0.0], [1.0]], [[4, 2, 1], [0, 0], [2]])
    trend = {"new_customers": {"11-26": 1, "11-27": 3}, "messages_in": {"11-26": 5, "11-27": 2}}
    for png in (charts.funnel_png(funnel), charts.cohort_png(cohorts), charts.trend_png(trend, "zh"),
                charts.funnel_png(funnel, "en")):
        img = image(png)
        assert img.size == (int(charts.SIZE[0] * charts.DPI), int(charts.SIZE[1] * charts.DPI))
        assert img.getextrema()[0] < 128  # something dark was drawn


async def say(client, user: str, text: str) -> dict:
    resp = await client.post("/console/local/messages", json={"user": user, "text": text, "id": uuid.uuid4().hex})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_digest_subscription_fires_through_the_scheduler(aiohttp_client, make_config):
    clock = ManualClock(NOW)
    client = await aiohttp_client(create_app(make_config({"staff": {"console:bob": "manager"}}), clock))
    service = client.app[SERVICE]
    await say(client, "alice", "你好")  # a customer, so the digest has something to count

    answer = await say(client, "bob", "/digest daily 09:00")
    assert answer["replies"][0].startswith("已订阅 Digest daily 09:00")
    async with service.sessions() as s:
        row = await s.scalar(select(ReportDigest))
        assert (row.channel, row.external_id, row.next_at) == ("console", "bob", datetime(2026, 11, 28, 1, 0))

    async def mailbox() -> list[str]:
        resp = await client.get("/console/local/updates", params={"user": "bob", "wait": "0.2"})
        return (await resp.json())["messages"]

    run_soon(service.scheduler, DIGESTS_JOB)  # not due yet: nothing is sent
    await eventually(lambda: _job_idle(service))
    assert await mailbox() == []

    clock.set(datetime(2026, 11, 28, 1, 0, 30))
    run_soon(service.scheduler, DIGESTS_JOB)
    messages = await eventually(mailbox)
    assert len(messages) == 1 and messages[0].startswith("报告 Report")
    assert "新客户 New customers" in messages[0]
    path = Path(messages[0].rsplit("[chart: ", 1)[1].rstrip("]"))
    with Image.open(path) as img:
        assert (img.format, img.size) == ("PNG", (800, 500))
    async def recorded() -> list[Touchpoint]:  # the send is recorded just after it returns
        async with service.sessions() as s:
            return list((await s.scalars(select(Touchpoint).where(Touchpoint.kind == "report_digest"))).all())

    sent = await eventually(recorded)
    assert [(t.actor, t.direction, t.payload["status"]) for t in sent] == [("staff:console:bob", "out", "sent")]
    async with service.sessions() as s:
        row = await s.scalar(select(ReportDigest))
        assert row.next_at == datetime(2026, 11, 29, 1, 0) and row.last_sent_at == clock.now()

    run_soon(service.scheduler, DIGESTS_JOB)  # same moment again: already sent
    await eventually(lambda: _job_idle(service))
    assert await mailbox() == []

    weekly = await say(client, "bob", "/digest weekly 9:30")
    assert "weekly 09:30" in weekly["replies"][0]
    async with service.sessions() as s:
        assert (await s.scalar(select(ReportDigest))).next_at == datetime(2026, 11, 30, 1, 30)  # Monday 09:30 local
    assert (await say(client, "bob", "/digest hourly 09:00"))["replies"][0].startswith("用法 Usage")
    assert (await say(client, "bob", "/digest off"))["replies"] == ["已退订报表 Digest off"]
    async with service.sessions() as s:
        assert await s.scalar(select(func.count()).select_from(ReportDigest)) == 0


async def _job_idle(service) -> bool:
    """The digest job ran (its next run is back in the future) and is not running."""
    job = service.scheduler.get_job(DIGESTS_JOB)
    from datetime import UTC

    return job.next_run_time > datetime.now(UTC) + timedelta(seconds=30) and not service._running_jobs


async def test_console_chat_returns_the_chart_path(aiohttp_client, make_config):
    client = await aiohttp_client(create_app(make_config({"staff": {"console:bob": "manager"}}), ManualClock(NOW)))
    answer = await say(client, "bob", "/report 7d")
    assert len(answer["images"]) == 1
    with Image.open(answer["images"][0]) as img:
        assert img.format == "PNG"
    assert (await say(client, "bob", "/top tags"))["images"] == []
