"""Browser sessions: a random token in an HttpOnly, SameSite=Lax cookie; the store keeps its hash,
the session's CSRF token and when it was made and last used (idle and absolute expiry)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from aiohttp import web
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.config import ConsoleConfig, Role
from scrm.console.accounts import at_least, token_id
from scrm.store.models import ConsoleSession, StaffAccount

COOKIE = "scrm_console"
#: A session's last-seen time is written at most this often (not on every page view).
TOUCH_EVERY = timedelta(seconds=30)


@dataclass(frozen=True)
class Staff:
    """The signed-in staff member, as every console handler sees them."""

    account_id: int
    name: str
    role: Role
    csrf: str
    session_id: str

    @property
    def actor(self) -> str:
        """How the audit log names them."""
        return f"console:{self.name}"

    def may(self, role: Role) -> bool:
        return at_least(self.role, role)


async def open_session(session: AsyncSession, account: StaffAccount, address: str, now: datetime) -> str:
    """A new session for ``account``; returns the cookie's token."""
    token = secrets.token_urlsafe(32)
    session.add(ConsoleSession(id=token_id(token), account_id=account.id, csrf=secrets.token_urlsafe(32),
                               address=address[:64], created_at=now, last_seen_at=now))
    await session.flush()
    return token


async def current(session: AsyncSession, token: str, now: datetime, config: ConsoleConfig) -> tuple[Staff, bool] | None:
    """The staff member the cookie signs in, and whether the session's last-seen time is due a write;
    None for an unknown, ended, idle or too old session, or a disabled account."""
    row = (await session.execute(
        select(ConsoleSession, StaffAccount).join(StaffAccount, StaffAccount.id == ConsoleSession.account_id)
        .where(ConsoleSession.id == token_id(token)))).first()
    if row is None:
        return None
    s, account = row
    if (s.ended_at is not None or account.disabled or now - s.last_seen_at > timedelta(minutes=config.idle_minutes)
            or now - s.created_at > timedelta(hours=config.absolute_hours)):
        return None
    staff = Staff(account.id, account.name, account.role, s.csrf, s.id)  # type: ignore[arg-type]
    return staff, now - s.last_seen_at >= TOUCH_EVERY


async def touch(session: AsyncSession, staff: Staff, now: datetime) -> None:
    await session.execute(update(ConsoleSession).where(ConsoleSession.id == staff.session_id).values(last_seen_at=now))


async def end(session: AsyncSession, staff: Staff, now: datetime) -> None:
    await session.execute(update(ConsoleSession).where(ConsoleSession.id == staff.session_id).values(ended_at=now))


def secure(request: web.Request, config: ConsoleConfig) -> bool:
    if config.secure_cookies != "auto":
        return config.secure_cookies == "always"
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def set_cookie(response: web.StreamResponse, request: web.Request, token: str, config: ConsoleConfig) -> None:
    response.set_cookie(COOKIE, token, path="/console", httponly=True, samesite="Lax",
                        secure=secure(request, config), max_age=int(config.absolute_hours * 3600))


def clear_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/console")
