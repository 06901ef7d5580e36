"""Console accounts: who may sign in, with which role; passwords, throttling and single-use links.

One module for the CLI (``scrm staff``), the sign-in page and the ``/console`` chat command. Passwords
are hashed with argon2id (argon2-cffi's defaults) in a worker thread: a hash takes tens of milliseconds
of CPU, which must not stall the event loop that answers webhooks. Throttling counts failures in the
store, so every instance of a cluster refuses the same guesses.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.config import ConsoleConfig, Role

__all__ = ["Role"]
from scrm.store.dialect import rowcount
from scrm.store.models import ConsoleSession, SignInFailure, SignInLink, StaffAccount

ROLES: tuple[Role, ...] = ("manager", "operator", "admin")
#: Failures older than this no longer count against an account or an address.
THROTTLE_WINDOW = timedelta(minutes=15)
#: How long a ``/console`` sign-in link stays valid.
LINK_TTL = timedelta(minutes=10)
MIN_PASSWORD = 10

_hasher = PasswordHasher()  # argon2id, RFC 9106's second recommended parameters
#: Verified when the account does not exist, so an unknown name costs as long as a wrong password.
_DUMMY = _hasher.hash(secrets.token_urlsafe(16))


#: A change to accounts, run in one writing transaction (the CLI's shape for add, passwd, disable).
AccountChange = Callable[[AsyncSession], Awaitable[object]]


class AccountError(ValueError):
    """A refused account change; the message says what to do."""


def at_least(role: str, needed: Role) -> bool:
    """manager < operator < admin: an admin may do what an operator may, and so on."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


def token_id(token: str) -> str:
    """What the store keeps of a cookie or link token: a leaked table signs nobody in."""
    return hashlib.sha256(token.encode()).hexdigest()


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password needs at least {MIN_PASSWORD} characters")


async def hash_password(password: str) -> str:
    _check_password(password)
    return await asyncio.to_thread(_hasher.hash, password)


async def add_account(session: AsyncSession, name: str, role: Role, password: str, now: datetime,
                      identity: str | None = None) -> StaffAccount:
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise AccountError("a name is 1-64 letters, digits, '-', '_' or '.'")
    if role not in ROLES:
        raise AccountError(f"the role is one of {', '.join(ROLES)}")
    if await session.scalar(select(StaffAccount.id).where(StaffAccount.name == name)) is not None:
        raise AccountError(f"there is already an account {name!r}")
    if identity is not None:
        if ":" not in identity or identity.startswith(":") or identity.endswith(":"):
            raise AccountError("the identity is <channel>:<id>, as in [staff] (e.g. telegram:12345)")
        if await session.scalar(select(StaffAccount.id).where(StaffAccount.identity == identity)) is not None:
            raise AccountError(f"{identity} is already linked to another account")
    account = StaffAccount(name=name, role=role, password_hash=await hash_password(password), identity=identity,
                           disabled=False, created_at=now, updated_at=now)
    session.add(account)
    await session.flush()
    return account


async def get_account(session: AsyncSession, name: str) -> StaffAccount:
    account = await session.scalar(select(StaffAccount).where(StaffAccount.name == name))
    if account is None:
        raise AccountError(f"no account {name!r} (scrm staff list)")
    return account


async def set_password(session: AsyncSession, name: str, password: str, now: datetime) -> None:
    account = await get_account(session, name)
    account.password_hash, account.updated_at = await hash_password(password), now
    await end_sessions(session, account.id, now)  # a new password signs every browser out


async def disable(session: AsyncSession, name: str, now: datetime) -> None:
    account = await get_account(session, name)
    account.disabled, account.updated_at = True, now
    await end_sessions(session, account.id, now)


async def end_sessions(session: AsyncSession, account_id: int, now: datetime) -> None:
    await session.execute(update(ConsoleSession).where(ConsoleSession.account_id == account_id,
                                                       ConsoleSession.ended_at.is_(None)).values(ended_at=now))


async def accounts(session: AsyncSession) -> list[StaffAccount]:
    return list((await session.scalars(select(StaffAccount).order_by(StaffAccount.name))).all())


@dataclass(frozen=True)
class SignIn:
    outcome: Literal["ok", "invalid", "throttled"]
    account: StaffAccount | None = None
    #: For ``throttled``: when trying again makes sense.
    retry_at: datetime | None = None


async def sign_in(session: AsyncSession, name: str, password: str, address: str, now: datetime,
                  config: ConsoleConfig) -> SignIn:
    """Check a name and password, unless that name or address has failed too often lately.

    Unknown names, disabled accounts and wrong passwords are one answer (``invalid``), and each is a
    recorded failure; the caller commits the session either way.
    """
    since = now - THROTTLE_WINDOW
    name, address = name[:64], address[:64]
    by_name = select(func.count(), func.min(SignInFailure.at)).where(SignInFailure.name == name,
                                                                      SignInFailure.at > since)
    by_address = select(func.count(), func.min(SignInFailure.at)).where(SignInFailure.address == address,
                                                                         SignInFailure.at > since)
    for query, limit in ((by_name, config.max_failures_per_account), (by_address, config.max_failures_per_address)):
        count, oldest = (await session.execute(query)).one()
        if count >= limit:
            return SignIn("throttled", retry_at=(oldest or now) + THROTTLE_WINDOW)
    account = await session.scalar(select(StaffAccount).where(StaffAccount.name == name))
    usable = account is not None and not account.disabled and account.password_hash is not None
    stored = account.password_hash if usable and account is not None and account.password_hash else _DUMMY
    if await asyncio.to_thread(_verify, stored, password) and usable:
        assert account is not None
        if _hasher.check_needs_rehash(stored):
            account.password_hash = await hash_password(password)
        await session.execute(delete(SignInFailure).where(SignInFailure.name == name))
        return SignIn("ok", account)
    session.add(SignInFailure(name=name, address=address, at=now))
    return SignIn("invalid")


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


async def make_link(session: AsyncSession, account: StaffAccount, now: datetime) -> str:
    """A single-use sign-in token for ``account``, valid :data:`LINK_TTL`; the store keeps its hash."""
    token = secrets.token_urlsafe(32)
    session.add(SignInLink(id=token_id(token), account_id=account.id, created_at=now, expires_at=now + LINK_TTL))
    await session.flush()
    return token


async def use_link(session: AsyncSession, token: str, now: datetime) -> StaffAccount | None:
    """The link's account, once: the update that marks it used is the claim, so two clicks (or two
    instances) cannot both sign in with it."""
    link_id = token_id(token)
    claimed = await session.execute(update(SignInLink).where(SignInLink.id == link_id, SignInLink.used_at.is_(None),
                                                             SignInLink.expires_at > now).values(used_at=now))
    if not rowcount(claimed):
        return None
    account_id = await session.scalar(select(SignInLink.account_id).where(SignInLink.id == link_id))
    account = await session.get(StaffAccount, account_id)
    return account if account is not None and not account.disabled else None


async def account_for_identity(session: AsyncSession, identity: str) -> StaffAccount | None:
    return await session.scalar(select(StaffAccount).where(StaffAccount.identity == identity,
                                                           StaffAccount.disabled.is_(False)))
