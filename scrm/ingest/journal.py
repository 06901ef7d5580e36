"""The inbound journal: an event is made durable (one row of ``inbound_events``) before it is acknowledged.

Appends are group-committed (scrm.group_commit): the events that arrive while a commit is in flight
share the next one, which costs an insert and (for retries only) one look-up per batch. A platform's
retry of an event already in the journal meets the row's unique key (channel, account, platform id) and
is recognised at append (INSERT ... ON CONFLICT DO NOTHING on both stores): it is never applied again,
and it is answered with its original's reaction once that is applied.

What the caller gets (:class:`Accepted`): ``durable``, resolved at the append's commit (what a platform
may be acknowledged on), and ``applied``, resolved with the :class:`~scrm.messages.Reaction` once the
consumer (scrm.ingest.consumer) has committed the event's effects. The consumer in this process
resolves the futures of what it applies at its commit; events applied by another instance's consumer
(a ``--role web`` instance has none) are found by polling the journal rows every ``ingest.poll_seconds``.

Personal data: a phone number a person shares is sealed with the privacy keys (scrm.keyring), as the
customer row keeps it; the consumer opens it to apply the event and drops it from the row once applied.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm import metrics
from scrm.group_commit import GroupCommit, StoreUnavailable
from scrm.messages import Article, InboundEvent, Original, Reaction
from scrm.store.dialect import dialect_of
from scrm.store.models import InboundJournal

if TYPE_CHECKING:
    from scrm.keyring import Keyring
    from scrm.runtime import Runtime
    from scrm.staff import StaffReply

log = logging.getLogger(__name__)

_T = InboundJournal.__table__
#: The sealed phone's place in the stored event, and the field name bound into its ciphertext.
_SEALED = "sealed_phone"
_PHONE_FIELD = "journal_phone"
#: Keys of events the platform gives no id: unique, so never taken for a retry (as before the journal).
_OWN_KEY = "~"
#: Waiting events looked up per statement (an id range) by an instance whose events another one applies.
WATCH_CHUNK = 500
WATCH_SPAN = 4 * WATCH_CHUNK

_EXISTING = select(_T.c.id, _T.c.dedup_key, _T.c.received_at, _T.c.reaction).where(
    _T.c.channel == bindparam("channel"), _T.c.account == bindparam("account"),
    _T.c.dedup_key.in_(bindparam("keys", expanding=True)))
#: By id range, not an IN list: SQLAlchemy renders an expanding IN's hundreds of parameters into the
#: statement on every poll, which cost a web instance a tenth of its time. The rows of the range that
#: another instance waits for are passed over.
_APPLIED = select(_T.c.id, _T.c.received_at, _T.c.reaction).where(
    _T.c.id.between(bindparam("low"), bindparam("high")), _T.c.applied_at.is_not(None))


@dataclass(frozen=True)
class Accepted:
    """An event handed to the journal: ``durable`` resolves once it is committed (it may be acknowledged
    then), ``applied`` with its reaction once its effects are committed. Futures, not coroutines: a
    caller that stops waiting cancels neither the append nor the application."""

    durable: asyncio.Future[None]
    applied: asyncio.Future[Reaction]
    #: Whether applying it may give an answer for the acknowledgement to carry (scrm.ingest.replying):
    #: a channel with passive replies waits for ``applied`` then, else only for ``durable``.
    answers: bool = True


@dataclass
class _Waiter:
    future: asyncio.Future[Reaction]
    #: A retry of the event: answered as one, with the original's replies.
    duplicate: bool


@dataclass(frozen=True)
class _Item:
    event: InboundEvent
    #: A staff report's answer, read before the append (scrm.staff); the consumer records it.
    answer: StaffReply | None
    applied: asyncio.Future[Reaction]


class Journal:
    def __init__(self, service: Runtime) -> None:
        self.service = service
        self._commits: GroupCommit[_Item, None] = GroupCommit(
            "ingest", service.sessions, self._append, linger=service.config.store.commit_linger_ms / 1000)
        self._waiting: dict[int, list[_Waiter]] = defaultdict(list)
        #: Staff reports' answers by journal id, for the consumer in this process.
        self._answers: dict[int, StaffReply] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        #: Called after each append commit (the consumer in this process, woken).
        self.on_append: Callable[[], None] | None = None

    async def start(self) -> None:
        await self._commits.start()
        self._watcher = asyncio.create_task(self._watch(), name="scrm-ingest-watch")

    async def stop(self) -> None:
        """Commit every append already queued (its callers were not answered yet), then stop."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._commits.stop()

    async def close(self) -> None:
        """Stop looking for events applied elsewhere (after the consumer's last batch)."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None

    def accept(self, event: InboundEvent, answer: StaffReply | None = None) -> Accepted:
        """Append the event (already cleaned, scrm.messages.cleaned). Raises StoreUnavailable when the
        journal is not running."""
        applied: asyncio.Future[Reaction] = asyncio.get_running_loop().create_future()
        committed = self._commits.submit(_Item(event, answer, applied))
        committed.add_done_callback(lambda done: _fail_with(done, applied))
        return Accepted(committed, applied)

    def accept_after(self, event: InboundEvent, answer: Awaitable[StaffReply]) -> Accepted:
        """Append the event once ``answer`` (a staff report's, read beside the writer) is read."""
        loop = asyncio.get_running_loop()
        durable: asyncio.Future[None] = loop.create_future()
        applied: asyncio.Future[Reaction] = loop.create_future()

        async def append() -> None:
            try:
                accepted = self.accept(event, await answer)
            except StoreUnavailable as exc:
                durable.set_exception(exc)
                applied.set_exception(exc)
                return
            _forward(accepted.durable, durable)
            _forward(accepted.applied, applied)

        self._spawn(append())
        return Accepted(durable, applied)

    def answer_for(self, journal_id: int) -> StaffReply | None:
        return self._answers.get(journal_id)

    def applied(self, rows: list[tuple[int, datetime, Reaction]]) -> None:
        """The consumer committed these events' effects: answer whoever waits for them."""
        for journal_id, received_at, reaction in rows:
            self._answers.pop(journal_id, None)
            for waiter in self._waiting.pop(journal_id, ()):
                if not waiter.future.done():
                    waiter.future.set_result(_as_retry(received_at, reaction) if waiter.duplicate else reaction)

    def set_aside(self, journal_id: int, error: Exception) -> None:
        """The consumer gave up on the event (scrm.ingest.consumer): its waiters get the error."""
        self._answers.pop(journal_id, None)
        for waiter in self._waiting.pop(journal_id, ()):
            if not waiter.future.done():
                waiter.future.set_exception(error)

    # -- the append ---------------------------------------------------------------------------------

    async def _append(self, session: AsyncSession, items: list[_Item]) -> tuple[list[None], Callable[[], None]]:
        now = self.service.clock.now()
        keyring = self.service.keyring
        firsts: dict[tuple[str, str, str], int] = {}  # key -> index of its first event in the batch
        keys: list[tuple[str, str, str]] = []
        for index, item in enumerate(items):
            e = item.event
            key = (e.channel, e.account, e.platform_msg_id or f"{_OWN_KEY}{uuid.uuid4().hex}")
            keys.append(key)
            firsts.setdefault(key, index)
        rows = [{"channel": key[0], "account": key[1], "external_id": items[index].event.external_id,
                 "dedup_key": key[2], "event": encode(items[index].event, keyring), "received_at": now,
                 "applied_at": None, "attempts": 0, "reaction": None} for key, index in firsts.items()]
        statement = dialect_of(session).insert(_T).on_conflict_do_nothing(
            index_elements=["channel", "account", "dedup_key"]).returning(_T.c.id, _T.c.channel, _T.c.account,
                                                                          _T.c.dedup_key)
        inserted = {(c, a, k): i for i, c, a, k in await session.execute(statement, rows)}
        # Keys already in the journal: retries of events appended before (or by another instance).
        earlier: dict[tuple[str, str, str], tuple[int, datetime, dict[str, Any] | None]] = {}
        missing: dict[tuple[str, str], list[str]] = defaultdict(list)
        for key in firsts:
            if key not in inserted:
                missing[key[:2]].append(key[2])
        for (channel, account), dedup_keys in missing.items():
            for i, k, at, reaction in await session.execute(_EXISTING, {"channel": channel, "account": account,
                                                                        "keys": dedup_keys}):
                earlier[(channel, account, k)] = (i, at, reaction)

        def committed() -> None:
            for index, (item, key) in enumerate(zip(items, keys, strict=True)):
                if key in inserted and firsts[key] == index:
                    journal_id = inserted[key]
                    if item.answer is not None:
                        self._answers[journal_id] = item.answer
                    self._waiting[journal_id].append(_Waiter(item.applied, duplicate=False))
                elif key in inserted:  # a retry of an event earlier in this batch
                    metrics.received(item.event, Reaction(duplicate=True))
                    self._waiting[inserted[key]].append(_Waiter(item.applied, duplicate=True))
                else:
                    metrics.received(item.event, Reaction(duplicate=True))
                    journal_id, received_at, recorded = earlier[key]
                    if recorded is None:
                        self._waiting[journal_id].append(_Waiter(item.applied, duplicate=True))
                    elif not item.applied.done():
                        item.applied.set_result(_as_retry(received_at, decode_reaction(recorded)))
            if self.on_append is not None and inserted:
                self.on_append()

        return [None] * len(items), committed

    # -- events applied elsewhere ------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Resolve the waiters of events another instance's consumer applied (every waiter, in an instance
        without a consumer), and let go of those whose callers stopped waiting."""
        while True:
            await asyncio.sleep(self.service.config.ingest.poll_seconds)
            for journal_id in [i for i, ws in self._waiting.items() if all(w.future.done() for w in ws)]:
                del self._waiting[journal_id]
            if not self._waiting:
                continue
            try:
                found: list[Any] = []
                async with self.service.sessions() as session:
                    for low, high in _ranges(sorted(self._waiting)):
                        found += [row for row in await session.execute(_APPLIED, {"low": low, "high": high})
                                  if row[0] in self._waiting]
            except Exception:  # noqa: BLE001 - the next poll tries again; the events are durable
                log.exception("could not read the applied events of the journal")
                continue
            self.applied([(i, at, decode_reaction(reaction or {})) for i, at, reaction in found])

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _ranges(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted ids as ranges of at most :data:`WATCH_CHUNK` ids spanning at most :data:`WATCH_SPAN`: a
    backlog of thousands is read in bounded statements, and one old id does not drag in every row since."""
    ranges: list[tuple[int, int]] = []
    low = high = ids[0]
    count = 0
    for i in ids:
        if count == WATCH_CHUNK or i - low > WATCH_SPAN:
            ranges.append((low, high))
            low, count = i, 0
        high, count = i, count + 1
    ranges.append((low, high))
    return ranges


def encode(event: InboundEvent, keyring: Keyring) -> dict[str, Any]:
    """The event as the journal keeps it: a shared phone number sealed, never in clear."""
    payload = dict(event.payload)
    stored: dict[str, Any] = {"kind": event.kind, "text": event.text, "platform_msg_id": event.platform_msg_id,
                              "display_name": event.display_name, "source": event.source, "scene": event.scene}
    phone = payload.pop("phone", None)
    if isinstance(phone, str):
        sealed, key_id = keyring.seal(_PHONE_FIELD, phone)
        stored[_SEALED] = [base64.b64encode(sealed).decode("ascii"), key_id]
    elif phone is not None:
        payload["phone"] = phone
    stored["payload"] = payload
    return stored


def decode(channel: str, account: str, external_id: str, stored: dict[str, Any], keyring: Keyring) -> InboundEvent:
    payload = dict(stored.get("payload") or {})
    if (sealed := stored.get(_SEALED)) is not None:
        payload["phone"] = keyring.open(_PHONE_FIELD, base64.b64decode(sealed[0]), sealed[1])
    return InboundEvent(channel, account, external_id, stored["kind"], text=stored.get("text") or "",
                        platform_msg_id=stored.get("platform_msg_id"), display_name=stored.get("display_name"),
                        source=stored.get("source"), payload=payload, scene=stored.get("scene"))


def scrubbed(stored: dict[str, Any]) -> dict[str, Any] | None:
    """The stored event without its sealed phone (kept no longer than its application needs it), or None
    when it has none."""
    if _SEALED not in stored:
        return None
    return {k: v for k, v in stored.items() if k != _SEALED}


def encode_reaction(reaction: Reaction) -> dict[str, Any]:
    """What is kept of a reaction for a retry's answer and for a web instance's caller (charts are drawn
    from the store when sent and are not kept: only the consumer's own process hands them on)."""
    original = reaction.original
    return {"duplicate": reaction.duplicate, "replies": list(reaction.replies), "customer_id": reaction.customer_id,
            "buttons": [list(b) for b in reaction.buttons],
            "article": None if reaction.article is None else {
                "title": reaction.article.title, "description": reaction.article.description,
                "url": reaction.article.url, "picurl": reaction.article.picurl},
            "original": None if original is None else {"received_at": original.received_at.isoformat(),
                                                       "replies": list(original.replies)}}


def decode_reaction(stored: dict[str, Any]) -> Reaction:
    original = stored.get("original")
    article = stored.get("article")
    return Reaction(duplicate=bool(stored.get("duplicate")), replies=tuple(stored.get("replies") or ()),
                    customer_id=stored.get("customer_id"),
                    buttons=tuple((label, url) for label, url in stored.get("buttons") or ()),
                    article=None if article is None else Article(**article),
                    original=None if original is None else Original(datetime.fromisoformat(original["received_at"]),
                                                                    tuple(original["replies"])))


def _as_retry(received_at: datetime, reaction: Reaction) -> Reaction:
    """A retry's answer: the original's replies (a platform that retried for a lost answer gets it again)."""
    if reaction.duplicate:  # the original was itself a retry of an event older than the journal keeps
        return Reaction(duplicate=True, original=reaction.original)
    return Reaction(duplicate=True, original=Original(received_at, reaction.replies))


def _fail_with(durable: asyncio.Future[None], applied: asyncio.Future[Reaction]) -> None:
    """An append that failed fails its application too (the channel asks the platform to retry)."""
    if not durable.cancelled() and (exc := durable.exception()) is not None and not applied.done():
        applied.set_exception(exc)


def _forward(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    def copy(done: asyncio.Future[Any]) -> None:
        if target.done():
            return
        if done.cancelled():
            target.cancel()
        elif (exc := done.exception()) is not None:
            target.set_exception(exc)
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)
