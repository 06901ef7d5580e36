"""Channel codes (渠道活码): made on the platform, kept in the store, listed and withdrawn.

A code is a WeChat parametric QR code, a WeCom contact-me (or group join) way or a Telegram deep link;
the channel module makes it (:meth:`scrm.channels.Channel.create_code`) and this module keeps what it
does when someone comes through it (tags, welcome, campaign, coupon) and what it cost. The CLI, the API
and the console all call these functions: create, change, disable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.audit import audit
from scrm.campaigns import templates
from scrm.channels import CodeError, CodeRequest, IssuedCode
from scrm.store.models import AcquisitionCode

if TYPE_CHECKING:
    from scrm.config import Config
    from scrm.runtime import Runtime

#: Names double as the scene the platform hands back: WeCom's state takes 30 characters, Telegram's
#: /start payload letters, digits, _ and -.
NAME = re.compile(r"[A-Za-z0-9_-]{1,30}")
#: WeChat's temporary QR codes live at most 30 days; WeCom's contact-me ways have no expiry of their own.
MAX_TEMPORARY = timedelta(days=30)
DEFAULT_TEMPORARY = timedelta(days=30)
#: Variables a code's welcome text may use.
WELCOME_VARIABLES = {"customer", "coupon"}


@dataclass(frozen=True)
class CodeSpec:
    """A code as asked for (``scrm codes create``, the API, the console)."""

    name: str
    #: ``<type>:<account>``, e.g. ``wechat:brand``.
    channel: str
    permanent: bool = False
    expires: timedelta | None = None
    staff: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    welcome: str | None = None
    campaign: str | None = None
    coupon: str | None = None
    cost: float | None = None


@dataclass(frozen=True)
class CodeChange:
    """What to change on a code (``scrm codes update``, the API, the console): a field left None stays as
    it is; ``clear`` names the optional ones to empty (welcome, campaign, coupon, cost). The channel,
    kind and lifetime stay: a printed code keeps working as it was made."""

    staff: tuple[str, ...] | None = None
    groups: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None
    welcome: str | None = None
    campaign: str | None = None
    coupon: str | None = None
    cost: float | None = None
    clear: frozenset[str] = frozenset()


#: The fields :attr:`CodeChange.clear` may name.
CLEARABLE = frozenset({"welcome", "campaign", "coupon", "cost"})


@dataclass(frozen=True)
class CodeView:
    """A stored code, as every caller shows it."""

    name: str
    channel: str
    account: str
    kind: str
    scene: str
    url: str
    staff: list[str]
    tags: list[str]
    welcome: str | None
    campaign: str | None
    coupon: str | None
    cost: float | None
    expires_at: datetime | None
    disabled_at: datetime | None
    created_at: datetime
    created_by: str | None
    state: str = field(default="active")

    @classmethod
    def of(cls, row: AcquisitionCode, now: datetime) -> CodeView:
        state = ("disabled" if row.disabled_at is not None
                 else "expired" if row.expires_at is not None and row.expires_at <= now else "active")
        return cls(row.name, row.channel, row.account, row.kind, row.scene, row.url, list(row.staff), list(row.tags),
                   row.welcome, row.campaign, row.coupon_pool, row.cost, row.expires_at, row.disabled_at,
                   row.created_at, row.created_by, state)


class CodeProblem(Exception):
    """A code that cannot be made or found: ``field`` names what was wrong (for forms), ``status`` the
    HTTP answer (400 bad input, 404 unknown, 409 taken, 502 the platform refused)."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


def check(config: Config, spec: CodeSpec, campaigns: set[str]) -> None:
    """Everything that can be told before asking the platform, each problem naming its field."""
    if not NAME.fullmatch(spec.name):
        raise CodeProblem("name", "1-30 letters, digits, _ or - (it is also the code's scene)")
    kind, _, account = spec.channel.partition(":")
    if account not in config.channels.get(kind, {}):
        known = ", ".join(f"{k}:{a}" for k, accounts in config.channels.items() for a in accounts) or "none"
        raise CodeProblem("channel", f"no account {spec.channel!r} in the configuration (configured: {known})")
    if spec.permanent and spec.expires is not None:
        raise CodeProblem("expires", "a permanent code has no expiry")
    if spec.expires is not None and not timedelta(minutes=1) <= spec.expires <= MAX_TEMPORARY:
        raise CodeProblem("expires", "between 1 minute and 30 days")
    if spec.groups and kind != "wecom":
        raise CodeProblem("groups", "group join codes are WeCom's")
    if spec.staff and kind != "wecom":
        raise CodeProblem("staff", "staff members are WeCom's (the people a contact-me code adds)")
    if kind == "wecom" and not spec.staff and not spec.groups:
        raise CodeProblem("staff", "a WeCom code needs staff members (user ids) or group chats")
    if spec.campaign is not None and spec.campaign not in campaigns:
        raise CodeProblem("campaign", f"no campaign {spec.campaign!r} (known: {', '.join(sorted(campaigns)) or 'none'})")
    if spec.coupon is not None and spec.coupon not in config.coupons:
        raise CodeProblem("coupon", f"no coupon pool {spec.coupon!r} (known: {', '.join(sorted(config.coupons)) or 'none'})")
    if spec.welcome is not None:
        if not spec.welcome.strip():
            raise CodeProblem("welcome", "empty")
        if spec.welcome and (problem := templates.check(spec.welcome, WELCOME_VARIABLES)):
            raise CodeProblem("welcome", problem)
    if spec.cost is not None and not 0 <= spec.cost < 10**9:
        raise CodeProblem("cost", "a positive amount")
    if any(not t.strip() or len(t) > 64 for t in spec.tags):
        raise CodeProblem("tags", "tag names are 1-64 characters")


async def create(runtime: Runtime, spec: CodeSpec, actor: str | None) -> CodeView:
    """Make the code on the platform and keep it; the name must be new (a code's figures are its own).
    The platform is asked outside any transaction (it may take seconds); a name taken meanwhile by
    another instance withdraws the code just made."""
    check(runtime.config, spec, set(runtime.campaigns))
    kind, _, account = spec.channel.partition(":")
    channel = runtime.channel(kind, account)
    assert channel is not None  # check() found the account
    async with runtime.sessions() as session:
        if await session.scalar(select(AcquisitionCode.id).where(AcquisitionCode.name == spec.name)) is not None:
            raise CodeProblem("name", f"a code named {spec.name!r} exists", 409)
    lifetime = None if spec.permanent else (spec.expires or DEFAULT_TEMPORARY)
    request = CodeRequest(spec.name, int(lifetime.total_seconds()) if lifetime else None, spec.staff, spec.groups,
                          remark=spec.name)
    try:
        issued = await channel.create_code(request)
    except CodeError as exc:
        raise CodeProblem("channel", exc.reason, 502) from exc
    now = runtime.clock.now()
    row = AcquisitionCode(
        name=spec.name, channel=kind, account=account, kind=issued.kind, scene=spec.name,
        url=issued.url, platform_ref=issued.ref, staff=list(spec.staff or spec.groups), tags=list(spec.tags),
        welcome=spec.welcome, campaign=spec.campaign, coupon_pool=spec.coupon, cost=spec.cost,
        expires_at=now + lifetime if lifetime else None, created_at=now, created_by=actor)
    try:
        async with runtime.sessions() as session, session.begin():
            session.add(row)
            await _record(session, actor, f"code create {spec.name} on {spec.channel}", now)
    except IntegrityError as exc:
        await channel.delete_code(issued)
        raise CodeProblem("name", f"a code named {spec.name!r} exists", 409) from exc
    return CodeView.of(row, now)


async def change(runtime: Runtime, name: str, wanted: CodeChange, actor: str | None) -> CodeView:
    """Change what a code does. New staff members or group chats are changed on the platform first
    (WeCom's update_contact_way / update_join_way, outside any transaction); the rest is the store's,
    with the change in the audit log (what each field was and became)."""
    if unknown := sorted(wanted.clear - CLEARABLE):
        raise CodeProblem(unknown[0], "cannot be cleared")
    async with runtime.sessions() as session:
        row = await find(session, name)
    if row.disabled_at is not None:
        raise CodeProblem("name", f"code {name!r} is disabled", 409)
    on_platform = _members(row, wanted)

    def value(field: str, new: object, old: object) -> object:
        return None if field in wanted.clear else old if new is None else new

    spec = CodeSpec(
        row.name, f"{row.channel}:{row.account}", permanent=True,
        staff=() if row.kind == "join_way" else tuple(on_platform or row.staff),
        groups=tuple(on_platform or row.staff) if row.kind == "join_way" else (),
        tags=wanted.tags if wanted.tags is not None else tuple(row.tags),
        welcome=value("welcome", wanted.welcome, row.welcome),  # type: ignore[arg-type]
        campaign=value("campaign", wanted.campaign, row.campaign),  # type: ignore[arg-type]
        coupon=value("coupon", wanted.coupon, row.coupon_pool),  # type: ignore[arg-type]
        cost=value("cost", wanted.cost, row.cost))  # type: ignore[arg-type]
    check(runtime.config, spec, set(runtime.campaigns))
    if on_platform is not None and on_platform != tuple(row.staff):
        channel = runtime.channel(row.channel, row.account)
        if channel is None:
            raise CodeProblem("channel", f"no account {row.channel}:{row.account} in the configuration")
        request = CodeRequest(row.scene, None, spec.staff, spec.groups, remark=row.name)
        try:
            await channel.update_code(IssuedCode(row.kind, row.url, row.platform_ref), request)
        except CodeError as exc:
            raise CodeProblem("groups" if row.kind == "join_way" else "staff", exc.reason, 502) from exc
    values = {"staff": list(spec.staff or spec.groups), "tags": list(spec.tags), "welcome": spec.welcome,
              "campaign": spec.campaign, "coupon_pool": spec.coupon, "cost": spec.cost}
    before = {key: getattr(row, key) for key in values}
    changed = "; ".join(f"{key}: {before[key]!r} -> {new!r}" for key, new in values.items() if before[key] != new)
    now = runtime.clock.now()
    async with runtime.sessions() as session, session.begin():
        await session.execute(update(AcquisitionCode).where(AcquisitionCode.id == row.id).values(**values))
        await _record(session, actor, f"code change {row.name}: {changed or 'nothing'}", now)
    for key, new in values.items():
        setattr(row, key, new)
    return CodeView.of(row, now)


async def _record(session: AsyncSession, actor: str | None, detail: str, now: datetime) -> None:
    """A code's making, change or withdrawal in the audit log, by who did it (a command of the
    service's own, with no one behind it, records nothing)."""
    if actor:
        await audit(session, actor, None, None, "code_edit", detail, at=now)


def _members(row: AcquisitionCode, wanted: CodeChange) -> tuple[str, ...] | None:
    """The staff members (or group chats, for a join way) the change asks for; None: unchanged."""
    if row.kind == "join_way":
        if wanted.staff is not None:
            raise CodeProblem("staff", "a group join code has group chats, not staff members")
        return wanted.groups
    if wanted.groups is not None:
        raise CodeProblem("groups", "only a group join code has group chats")
    if wanted.staff is not None and row.kind == "contact_way" and len(row.staff) == 1 and len(wanted.staff) != 1:
        raise CodeProblem("staff", "this code was made for one staff member, and WeCom cannot make it several: "
                                   "make another code")
    return wanted.staff


async def find(session: AsyncSession, name: str) -> AcquisitionCode:
    row = await session.scalar(select(AcquisitionCode).where(AcquisitionCode.name == name))
    if row is None:
        raise CodeProblem("name", f"no code named {name!r}", 404)
    return row


async def listing(session: AsyncSession, now: datetime, include_disabled: bool = True) -> list[CodeView]:
    query = select(AcquisitionCode).order_by(AcquisitionCode.created_at.desc(), AcquisitionCode.id.desc())
    if not include_disabled:
        query = query.where(AcquisitionCode.disabled_at.is_(None))
    return [CodeView.of(row, now) for row in await session.scalars(query)]


async def disable(runtime: Runtime, name: str, actor: str | None) -> CodeView:
    """Withdraw the code on the platform (WeCom deletes its contact way; WeChat's QR codes cannot be
    withdrawn and Telegram's links are only text) and stop honouring it; its figures stay."""
    async with runtime.sessions() as session:
        row = await find(session, name)
    now = runtime.clock.now()
    if row.disabled_at is not None:
        return CodeView.of(row, now)
    channel = runtime.channel(row.channel, row.account)
    if channel is not None:  # an account since removed from the config has nothing left to withdraw
        try:
            await channel.delete_code(IssuedCode(row.kind, row.url, row.platform_ref))
        except CodeError as exc:
            raise CodeProblem("channel", exc.reason, 502) from exc
    async with runtime.sessions() as session, session.begin():
        await session.execute(update(AcquisitionCode).where(AcquisitionCode.id == row.id)
                              .values(disabled_at=now))
        await _record(session, actor, f"code disable {row.name}", now)
    row.disabled_at = now
    return CodeView.of(row, now)


def parse_lifetime(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``: a code's lifetime as the CLI and forms take it."""
    match = re.fullmatch(r"\s*(\d{1,4})\s*([dhm])\s*", text)
    if not match:
        raise CodeProblem("expires", "a number of days, hours or minutes, e.g. 30d, 12h, 90m")
    return timedelta(**{{"d": "days", "h": "hours", "m": "minutes"}[match[2]]: int(match[1])})
