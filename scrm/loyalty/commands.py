"""Customer chat commands for everyone (签到, 积分, 积分兑换, /invite, survey answers): a registry.

Like scrm.staff but for customers: each command is a regular expression and a handler that
returns a reply, or None to let the message go on to keyword tagging. The pipeline calls
:func:`dispatch` once, after the coupon commands (``/redeem CODE`` / ``我要用券 CODE`` stay theirs:
rewards use ``积分兑换 <n>`` / ``/rewards <n>``). Nothing here runs without a ``[loyalty]`` config.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, TypedDict

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.config import LoyaltyConfig
from scrm.customers import touchpoint
from scrm.store.dialect import insert_ignore
from scrm.loyalty import points, referrals, surveys, tiers
from scrm.messages import InboundEvent
from scrm.store.models import Customer, LoyaltyAccount

if TYPE_CHECKING:
    from scrm.runtime import Runtime


@dataclass(frozen=True)
class CustomerContext:
    service: Runtime
    session: AsyncSession
    customer: Customer
    event: InboundEvent
    now: datetime


Handler = Callable[[CustomerContext, re.Match[str]], Awaitable[str | None]]


@dataclass(frozen=True)
class CustomerCommand:
    name: str
    pattern: re.Pattern[str]
    handler: Handler


_COMMANDS: list[CustomerCommand] = []


def command(name: str, pattern: str) -> Callable[[Handler], Handler]:
    """Register a customer command; commands are tried in registration order."""

    def register(handler: Handler) -> Handler:
        _COMMANDS.append(CustomerCommand(name, re.compile(pattern, re.IGNORECASE | re.DOTALL), handler))
        return handler

    return register


def is_command(text: str) -> bool:
    """Whether ``text`` is a customer command (签到, 积分, a survey answer...): one that has an answer."""
    return any(spec.pattern.match(text) for spec in _COMMANDS)


def shows_intent(config: LoyaltyConfig, text: str) -> bool:
    """Whether ``text`` has a buying-intent word (a price question): see :func:`note_intents`."""
    return any(word in text for word in config.followups.intent_keywords)


async def dispatch(service: Runtime, session: AsyncSession, customer: Customer, event: InboundEvent, text: str,
                   now: datetime) -> list[str] | None:
    """The replies to a customer command (:func:`is_command`), or None when no command answered."""
    if service.config.loyalty is None:
        return None
    ctx = CustomerContext(service, session, customer, event, now)
    for spec in _COMMANDS:
        if (match := spec.pattern.match(text)) is not None and (reply := await spec.handler(ctx, match)) is not None:
            return [reply]
    return None


async def note_intents(service: Runtime, session: AsyncSession, customer_ids: Collection[int], now: datetime) -> None:
    """Price questions (:func:`shows_intent`) start the "no order within N days" follow-up clock
    (scrm.loyalty.followups) of their customers: two statements for a whole ingest batch."""
    if not customer_ids:
        return
    tier = points.base_tier(points.loyalty(service))
    await insert_ignore(session, LoyaltyAccount.__table__, [
        {"customer_id": c, "balance": 0, "tier": tier, "updated_at": now} for c in sorted(customer_ids)])
    await session.execute(update(LoyaltyAccount).where(LoyaltyAccount.customer_id.in_(sorted(customer_ids)),
                                                       LoyaltyAccount.intent_at.is_(None)).values(intent_at=now))


class _Where(TypedDict):
    channel: str
    account: str


def _where(ctx: CustomerContext) -> _Where:
    return {"channel": ctx.event.channel, "account": ctx.event.account}


@command("checkin", r"^\s*(?:签到|打卡|/checkin)\s*$")
async def checkin(ctx: CustomerContext, _match: re.Match[str]) -> str:
    config = points.loyalty(ctx.service)
    day = points.local_date(ctx.service, ctx.now, ctx.customer.timezone)
    if config.checkin_points <= 0:
        return "签到成功!"
    new = await points.credit(ctx.service, ctx.session, ctx.customer.id, config.checkin_points, "checkin", day,
                              ctx.now, **_where(ctx))
    if new is None:
        return f"今天已经签到过了,明天再来吧!当前积分 {await points.balance(ctx.session, ctx.customer.id)}。"
    await tiers.evaluate(ctx.service, ctx.session, ctx.now, [ctx.customer.id])
    return f"签到成功,+{config.checkin_points} 积分!当前积分 {new}。"


_REASONS = {"order": "购物", "checkin": "签到", "survey": "评价", "referral": "推荐好友", "redeem": "兑换",
            "expire": "过期", "adjust": "调整"}


@command("points", r"^\s*(?:积分|我的积分|/points)\s*$")
async def show_points(ctx: CustomerContext, _match: re.Match[str]) -> str:
    session, cid = ctx.session, ctx.customer.id
    balance = await points.balance(session, cid)
    account = await session.get(LoyaltyAccount, cid)
    lines = [f"您的积分:{balance}" + (f"({account.tier})" if account and account.tier else "")]
    soon = await points.expiring(session, cid, ctx.now + timedelta(days=30))
    if soon:
        lines.append(f"30 天内将过期:{soon}")
    recent = await points.recent(session, cid)
    if recent:
        lines.append("最近变动:")
        lines += [f"  {r.delta:+d} {_REASONS.get(r.reason, r.reason)} {r.created_at:%m-%d}" for r in recent]
    if points.loyalty(ctx.service).rewards:
        lines.append("回复「积分兑换」查看可兑换的礼券。")
    return "\n".join(lines)


def _reward_list(ctx: CustomerContext) -> str:
    rewards = points.loyalty(ctx.service).rewards
    if not rewards:
        return "暂时没有可兑换的礼券。"
    lines = ["积分兑换(回复「积分兑换 编号」兑换):"]
    lines += [f"{i}. {r.title} — {r.points} 积分" for i, r in enumerate(rewards.values(), 1)]
    return "\n".join(lines)


@command("rewards", r"^\s*(?:积分兑换|兑换|/rewards|/redeem)\s*[::]?\s*(\S{0,32})\s*$")
async def rewards(ctx: CustomerContext, match: re.Match[str]) -> str:
    choice = match.group(1)
    if not choice:
        return _reward_list(ctx)
    names = list(points.loyalty(ctx.service).rewards)
    name = names[int(choice) - 1] if choice.isdecimal() and 0 < int(choice) <= len(names) else choice.lower()
    outcome = await points.redeem_reward(ctx.service, ctx.session, ctx.customer.id, name, ctx.now, **_where(ctx))
    if outcome.status == "redeemed":
        await tiers.evaluate(ctx.service, ctx.session, ctx.now, [ctx.customer.id])
        return (f"兑换成功!券码 {outcome.code},使用时回复「我要用券 {outcome.code}」。"
                f"剩余积分 {outcome.balance}。")
    if outcome.status == "insufficient":
        return f"积分不足:需要 {outcome.price},当前 {outcome.balance}。"
    if outcome.status == "unavailable":
        return "抱歉,这个礼券暂时兑换完了,积分未扣除。"
    return "没有这个兑换项。\n" + _reward_list(ctx)


@command("invite", r"^\s*(?:/invite|邀请|邀请好友|推荐有礼)\s*$")
async def invite(ctx: CustomerContext, _match: re.Match[str]) -> str:
    tier = points.base_tier(points.loyalty(ctx.service))
    code = await referrals.invite_code(ctx.session, ctx.customer.id, ctx.now, tier)
    touchpoint(ctx.session, customer_id=ctx.customer.id, direction="internal", kind="referral_invite", now=ctx.now,
               payload={"code": code}, **_where(ctx))
    return referrals.invite_text(ctx.service, code)


_CAPTURE_REPLIES = {
    "captured": "已记录您的邀请人,欢迎!",
    "unknown_code": "没有找到这个邀请码,请核对后再试。",
    "self": "不能使用自己的邀请码哦。",
    "known_customer": "邀请码仅限新朋友首次联系时使用。",
    "already_referred": "您已经填写过邀请码了。",
}


@command("referral_code", r"^\s*(?:邀请码|/ref)\s*[::]?\s*(?:ref_)?([A-Za-z0-9]{4,16})\s*$")
async def referral_code(ctx: CustomerContext, match: re.Match[str]) -> str:
    window = points.loyalty(ctx.service).referral.code_window_hours
    result = await referrals.capture(ctx.session, ctx.customer, match.group(1), "code", ctx.now, window)
    return _CAPTURE_REPLIES[result]


@command("survey_answer", r"^\s*\d{1,2}(?!\d)")
async def survey_answer(ctx: CustomerContext, _match: re.Match[str]) -> str | None:
    return await surveys.answer(ctx.service, ctx.session, ctx.customer, ctx.event.text, ctx.event.channel,
                                ctx.event.account, ctx.now)
