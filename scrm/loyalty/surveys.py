"""Satisfaction surveys (满意度): CSAT (1-5) or NPS (0-10) after a conversion or a staff conversation.

A survey row is planned (due after ``delay_hours``), asked (sent by the sweep, at most once: the row
is claimed before sending) and answered in chat with a number, optionally followed by a reason.
One answer per survey (a conditional UPDATE on ``status = 'asked'``); a number after the window or
after answering gets a polite reply. A low score tags the customer ``detractor`` (which can start a
recovery campaign through a ``tag_added`` trigger) and makes a follow-up task, which the sweep
sends to the owner with the 360° card.
"""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, cast, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.campaigns.planner import plan_triggered
from scrm.customers import touchpoint
from scrm.loyalty.followups import create_task
from scrm.loyalty.points import credit, loyalty
from scrm.messages import OutboundMessage
from scrm.store.dialect import insert_ignore, rowcount
from scrm.store.models import Conversion, Customer, Identity, Survey, Touchpoint
from scrm.tagging import add_tag

if TYPE_CHECKING:
    from scrm.runtime import Runtime

DETRACTOR_TAG = "detractor"
RANGES = {"csat": (1, 5), "nps": (0, 10)}
QUESTIONS = {
    "csat": "您对我们这次的服务满意吗?请回复 1-5 的数字(5 = 非常满意),数字后可以附上原因。",
    "nps": "您有多大可能把我们推荐给朋友?请回复 0-10 的数字(10 = 非常愿意),数字后可以附上原因。",
}
_ANSWER = re.compile(r"^\s*(\d{1,2})\s*(?:分)?\s*[,,.。::;;、!!\-—]*\s*(.*)$", re.DOTALL)


def low_threshold(service: Runtime, kind: str) -> int:
    config = loyalty(service).surveys
    if config is not None and config.low_score is not None:
        return config.low_score
    return 2 if kind == "csat" else 6


async def plan(service: Runtime, session: AsyncSession, customer_id: int, trigger: str, ref: str, now: datetime,
               due_at: datetime, campaign: str | None = None) -> bool:
    """Plan one survey for the customer (once per trigger and ref), on their latest identity."""
    config = loyalty(service).surveys
    kind = config.kind if config else "csat"
    identity = await session.scalar(select(Identity).where(Identity.customer_id == customer_id)
                                    .order_by(Identity.id.desc()).limit(1))
    if identity is None:
        return False
    return bool(await insert_ignore(session, Survey.__table__, {
        "customer_id": customer_id, "kind": kind, "trigger": trigger, "ref": ref, "channel": identity.channel,
        "account": identity.account, "external_id": identity.external_id, "campaign": campaign,
        "status": "planned", "due_at": due_at, "created_at": now}))


async def plan_after_conversions(service: Runtime, session: AsyncSession, conversions: list[Conversion],
                                 now: datetime) -> int:
    config = loyalty(service).surveys
    if config is None or not config.after_conversion:
        return 0
    planned = 0
    for conversion in conversions:
        if conversion.kind != "order":
            continue
        planned += await plan(service, session, conversion.customer_id, "conversion", str(conversion.id), now,
                              conversion.created_at + timedelta(hours=config.delay_hours), conversion.campaign)
    return planned


async def send_due(service: Runtime, session: AsyncSession, now: datetime) -> int:
    """Ask the surveys that are due: claimed (planned -> asked) before the send, so never twice."""
    config = loyalty(service).surveys
    window = timedelta(hours=config.answer_hours if config else 72)
    ids = (await session.scalars(select(Survey.id).where(Survey.status == "planned", Survey.due_at <= now)
                                 .order_by(Survey.due_at, Survey.id).limit(200))).all()
    sent = 0
    for survey_id in ids:
        survey = await session.get(Survey, survey_id)
        customer = await session.get(Customer, survey.customer_id) if survey else None
        if survey is None or customer is None:
            continue
        # A newer survey supersedes an older one still open: one question at a time.
        await session.execute(update(Survey).where(Survey.customer_id == survey.customer_id,
                                                   Survey.status == "asked").values(status="expired"))
        status = "skipped" if customer.opted_out else "asked"
        claimed = await session.execute(update(Survey).where(Survey.id == survey_id, Survey.status == "planned")
                                        .values(status=status, asked_at=now, expires_at=now + window))
        if not rowcount(claimed) or status == "skipped":
            continue
        channel = service.channel(survey.channel, survey.account)
        if channel is None:
            continue
        text = QUESTIONS[survey.kind]
        scores = range(1, 6) if survey.kind == "csat" else range(11)
        result = await channel.send(OutboundMessage(survey.channel, survey.account, survey.external_id, text,
                                                    campaign=survey.campaign,
                                                    last_inbound_at=customer.last_inbound_at,
                                                    quick_replies=tuple(str(n) for n in scores)))
        touchpoint(session, customer_id=customer.id, channel=survey.channel, account=survey.account,
                   direction="out", kind="survey_question", now=now, text=text, campaign=survey.campaign,
                   payload={"survey": survey_id, "kind": survey.kind, "status": result.status})
        sent += result.status == "sent"
    return sent


async def answer(service: Runtime, session: AsyncSession, customer: Customer, text: str, channel: str,
                 account: str, now: datetime) -> str | None:
    """The reply to a survey answer, or None when the message is not one (ordinary chat goes on)."""
    match = _ANSWER.match(text)
    if match is None:
        return None
    survey = await session.scalar(select(Survey).where(Survey.customer_id == customer.id, Survey.status == "asked")
                                  .order_by(Survey.id.desc()).limit(1))
    if survey is not None and survey.expires_at is not None and survey.expires_at < now:
        await session.execute(update(Survey).where(Survey.id == survey.id, Survey.status == "asked")
                              .values(status="expired"))
        return "感谢您的回复!这次满意度调查已经结束,如有任何问题请直接留言告诉我们。"
    if survey is None:
        return await _late(service, session, customer.id, now)
    low, high = RANGES[survey.kind]
    score = int(match.group(1))
    if not low <= score <= high:
        return f"请回复 {low}-{high} 之间的数字,谢谢!"
    reason = match.group(2).strip()[:500] or None
    recorded = await session.execute(update(Survey).where(Survey.id == survey.id, Survey.status == "asked")
                                     .values(status="answered", score=score, reason=reason, answered_at=now))
    if not rowcount(recorded):
        return "您已经评价过了,感谢!"
    touchpoint(session, customer_id=customer.id, channel=channel, account=account, direction="internal",
               kind="survey_answered", now=now, campaign=survey.campaign,
               payload={"survey": survey.id, "kind": survey.kind, "score": score, "reason": reason})
    config = loyalty(service).surveys
    if config is not None and config.points:
        await credit(service, session, customer.id, config.points, "survey", str(survey.id), now, channel, account)
    if score <= low_threshold(service, survey.kind):
        await _detractor(service, session, customer, survey, score, reason, now)
        return "非常抱歉没能让您满意,我们的同事会尽快联系您。"
    return "感谢您的评价!"


async def _late(service: Runtime, session: AsyncSession, customer_id: int, now: datetime) -> str | None:
    """A number soon after a survey closed, with no campaign message since: a polite word, else None
    (the digits may answer a campaign's own question)."""
    config = loyalty(service).surveys
    window = timedelta(hours=config.answer_hours if config else 72)
    last = await session.scalar(select(Survey).where(Survey.customer_id == customer_id,
                                                     Survey.status.in_(("answered", "expired")),
                                                     Survey.asked_at >= now - 2 * window)
                                .order_by(Survey.id.desc()).limit(1))
    if last is None or last.asked_at is None:
        return None
    since = await session.scalar(select(func.count()).select_from(Touchpoint).where(
        Touchpoint.customer_id == customer_id, Touchpoint.kind == "campaign_message",
        Touchpoint.created_at > last.asked_at))
    if since:
        return None
    if last.status == "answered":
        return "您已经评价过了,感谢!如有其他问题请直接留言。"
    return "感谢您的回复!这次满意度调查已经结束,如有任何问题请直接留言告诉我们。"


async def _detractor(service: Runtime, session: AsyncSession, customer: Customer, survey: Survey, score: int,
                     reason: str | None, now: datetime) -> None:
    if await add_tag(session, customer.id, DETRACTOR_TAG, "survey", f"{survey.kind}:{score}", now):
        touchpoint(session, customer_id=customer.id, channel="system", account="-", direction="internal",
                   kind="tag_added", now=now, payload={"tag": DETRACTOR_TAG, "survey": survey.id, "score": score})
        if await plan_triggered(service, session, "tag_added", [customer.id], now, tag=DETRACTOR_TAG):
            service.wake_outbox()
    note = f"{survey.kind.upper()} {score} 分" + (f":{reason}" if reason else "")
    await create_task(service, session, customer.id, "detractor", note, now, now, rule_key=str(survey.id))


def _week(at: datetime) -> str:
    year, week, _ = at.replace(tzinfo=UTC).isocalendar()
    return f"{year}-W{week:02d}"


def _score(kind: str, scores: list[int]) -> dict[str, Any]:
    n = len(scores)
    if kind == "nps":
        promoters = sum(1 for s in scores if s >= 9)
        detractors = sum(1 for s in scores if s <= 6)
        return {"answers": n, "nps": round(100 * (promoters - detractors) / n, 1) if n else None,
                "promoters": promoters, "detractors": detractors}
    satisfied = sum(1 for s in scores if s >= 4)
    return {"answers": n, "csat": round(100 * satisfied / n, 1) if n else None,
            "average": round(sum(scores) / n, 2) if n else None}


async def survey_summary(session: AsyncSession, since: datetime, until: datetime) -> dict[str, Any]:
    """CSAT (% answering 4-5, average) and NPS (% promoters - % detractors) for answers in
    [since, until), overall and by ISO week, channel and campaign. For scrm.reports / ``/report``.

    Grouped in SQL by (kind, channel, campaign, day, score), so Python sees at most one row per
    combination, not one per answer."""
    day = func.substr(cast(Survey.answered_at, String), 1, 10)
    rows = (await session.execute(
        select(Survey.kind, Survey.channel, Survey.campaign, day, Survey.score, func.count())
        .where(Survey.status == "answered", Survey.answered_at >= since, Survey.answered_at < until)
        .group_by(Survey.kind, Survey.channel, Survey.campaign, day, Survey.score))).all()
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for kind, channel, campaign, when, score, n in rows:
        week = _week(datetime.fromisoformat(str(when)[:10]))
        for key in (("total", ""), ("week", week), ("channel", channel), ("campaign", campaign or "(none)")):
            groups[kind][f"{key[0]}:{key[1]}"] += [score] * n
    result: dict[str, Any] = {}
    for kind, buckets in groups.items():
        section: dict[str, Any] = {"total": _score(kind, buckets.get("total:", [])),
                                   "by_week": {}, "by_channel": {}, "by_campaign": {}}
        for label, scores in sorted(buckets.items()):
            dim, _, value = label.partition(":")
            if dim != "total":
                section[f"by_{dim}"][value] = _score(kind, scores)
        result[kind] = section
    return result


async def pending_count(session: AsyncSession, customer_id: int) -> int:
    return int(await session.scalar(select(func.count()).where(Survey.customer_id == customer_id,
                                                               Survey.status == "asked")) or 0)
