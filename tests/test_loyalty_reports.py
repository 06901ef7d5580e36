"""Survey and follow-up figures for reports: CSAT/NPS by week, channel and campaign; completion rates."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from scrm.clock import ManualClock
from scrm.loyalty import followups, surveys
from scrm.service import Service
from scrm.store.models import Customer, FollowupTask, Survey
from tests.test_loyalty import LOYALTY

NOW = datetime(2026, 11, 27, 3, 0)


@pytest.fixture
async def svc(make_config):
    service = Service(make_config(LOYALTY), ManualClock(NOW))
    await service.start(scheduler=False)
    yield service
    await service.stop()


async def test_survey_summary_and_completion_rates(svc):
    assert svc.scheduler.get_job("loyalty:sweep") is not None and svc.scheduler.get_job("loyalty:nightly")
    async with svc.sessions() as s, s.begin():
        s.add(Customer(id=1, first_seen_at=NOW, last_seen_at=NOW, attributes={}))
        answers = [("csat", 5, "wecom", "welcome", 0), ("csat", 4, "wecom", "welcome", 0),
                   ("csat", 1, "telegram", None, 7), ("nps", 10, "wecom", None, 0), ("nps", 9, "wecom", None, 1),
                   ("nps", 3, "telegram", None, 8)]
        for i, (kind, score, channel, campaign, ago) in enumerate(answers):
            s.add(Survey(customer_id=1, kind=kind, trigger="conversion", ref=str(i), channel=channel, account="a",
                         external_id="x", campaign=campaign, status="answered", due_at=NOW, score=score,
                         answered_at=NOW - timedelta(days=ago), created_at=NOW))
        s.add(Survey(customer_id=1, kind="csat", trigger="conversion", ref="late", channel="wecom", account="a",
                     external_id="x", status="answered", due_at=NOW, score=1,
                     answered_at=NOW - timedelta(days=40), created_at=NOW))
        for i, (done, late) in enumerate([(True, False), (True, True), (False, False)]):
            s.add(FollowupTask(customer_id=1, owner="wecom:zhang", kind="intent", due_at=NOW - timedelta(days=3),
                               created_at=NOW, rule_key=str(i),
                               done_at=(NOW + timedelta(days=2) if late else NOW - timedelta(days=3)) if done else None))
    async with svc.sessions() as s:
        summary = await surveys.survey_summary(s, NOW - timedelta(days=30), NOW + timedelta(seconds=1))
        rates = await followups.completion_rates(s, NOW - timedelta(days=30), NOW)
    csat, nps = summary["csat"], summary["nps"]
    assert csat["total"] == {"answers": 3, "csat": pytest.approx(66.7), "average": pytest.approx(3.33)}
    assert csat["by_channel"]["telegram"]["answers"] == 1 and csat["by_campaign"]["welcome"]["csat"] == 100.0
    assert len(csat["by_week"]) == 2
    assert nps["total"]["nps"] == pytest.approx(33.3) and nps["total"]["promoters"] == 2
    assert rates == [{"owner": "wecom:zhang", "kind": "intent", "tasks": 3, "done": 2, "on_time": 1,
                      "rate": 0.667}]
