"""``Idempotency-Key`` on POSTs: a retried request (the caller timed out, the network dropped the answer)
gets the first request's answer again instead of placing a second order or sending a second reply.

The key is claimed in the store before the work (one row per API key and idempotency key, unique), so
two instances racing on the same retry do the work once: the second is told 409 while the first runs.
The answer is kept with the claim once the work is done; answers that were errors are not kept (an
error wrote nothing, so running the retry again is safe). A claim left without an answer (the service
stopped mid-request) may be taken over after :data:`ABANDONED`. Everything older than :data:`KEPT` is
deleted as new keys come in.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scrm.store.engine import writing
from scrm.store.models import ApiIdempotencyKey

Sessions = async_sessionmaker[AsyncSession]

HEADER = "Idempotency-Key"
KEPT = timedelta(hours=24)
ABANDONED = timedelta(minutes=5)
#: Printable ASCII, as a UUID or any token a client makes up.
KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


@dataclass(frozen=True)
class Replay:
    status: int
    body: str


class KeyConflict(Exception):
    """The key cannot be used for this request: ``code`` and the HTTP status say why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def fingerprint(method: str, path: str, body: bytes) -> str:
    return hashlib.sha256(b"\0".join((method.encode(), path.encode(), body))).hexdigest()


async def claim(sessions: Sessions, key_name: str, key: str, print_: str, now: datetime) -> Replay | None:
    """The first answer to replay, or None once this request holds the key (do the work, then :func:`keep`)."""
    async with writing(sessions) as session:
        await session.execute(delete(ApiIdempotencyKey).where(ApiIdempotencyKey.created_at < now - KEPT))
        row = await session.scalar(select(ApiIdempotencyKey).where(
            ApiIdempotencyKey.key_name == key_name, ApiIdempotencyKey.idempotency_key == key))
        if row is not None:
            if row.fingerprint != print_:
                raise KeyConflict(422, "idempotency_key_reused",
                                  f"{HEADER} {key[:64]!r} was used with another request in the last 24 hours")
            if row.status is not None and row.body is not None:
                return Replay(row.status, row.body)
            if row.created_at > now - ABANDONED:
                raise KeyConflict(409, "idempotency_in_progress",
                                  f"a request with {HEADER} {key[:64]!r} is still being answered; retry shortly")
            row.created_at = now  # abandoned by a stopped instance: this request takes it over
            return None
    try:
        async with writing(sessions) as session:
            session.add(ApiIdempotencyKey(key_name=key_name, idempotency_key=key, fingerprint=print_,
                                          created_at=now))
    except IntegrityError:
        raise KeyConflict(409, "idempotency_in_progress",
                          f"a request with {HEADER} {key[:64]!r} is still being answered; retry shortly") from None
    return None


async def keep(sessions: Sessions, key_name: str, key: str, status: int, body: str) -> None:
    async with writing(sessions) as session:
        await session.execute(update(ApiIdempotencyKey).where(
            ApiIdempotencyKey.key_name == key_name, ApiIdempotencyKey.idempotency_key == key)
            .values(status=status, body=body))


async def release(sessions: Sessions, key_name: str, key: str) -> None:
    """The request failed: free the key so that a retry runs again."""
    async with writing(sessions) as session:
        await session.execute(delete(ApiIdempotencyKey).where(
            ApiIdempotencyKey.key_name == key_name, ApiIdempotencyKey.idempotency_key == key,
            ApiIdempotencyKey.status.is_(None)))
