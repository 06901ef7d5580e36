"""The one place personal data is written and read: phone numbers and birthdays, encrypted at rest.

Why one place: a plaintext phone number written by any other path (an import, an API, a log line)
would undo the whole point. Values are sealed with AES-GCM under a key from the environment or a key
file (never the store); each value keeps the id of its key beside it, so keys can be rotated row by
row. Lookups and de-duplication use a keyed hash (HMAC-SHA256 under a separate, stable lookup key),
and what campaigns and staff need in plain form is derived and minimal: the birthday's "MM-DD" and
the phone's last four digits. The keys themselves: :mod:`scrm.keyring`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scrm.keyring import Keyring, KeyringError, KeyringMissing, write_key_file
from scrm.store.dialect import dialect_name, rowcount
from scrm.store.models import Customer, PersonalPlaintextPending, PrivacyKey

if TYPE_CHECKING:
    from scrm.config import Config
    from scrm.runtime import Runtime

log = logging.getLogger(__name__)


class PersonalDataError(ValueError):
    """A personal value that cannot be stored as given (e.g. not a phone number)."""


def normalize_phone(phone: str) -> str:
    """``+<country><number>`` from what people type or platforms send.

    Separators go; ``00`` becomes ``+``; an 11-digit number starting with 1 is a mainland mobile
    (+86); a 0-prefixed 10-12 digit number is a mainland landline with its trunk 0; other bare
    digits are taken as international (Telegram sends ``8613812345678`` without the plus).
    """
    if not isinstance(phone, str):
        raise PersonalDataError("a phone number must be text")
    cleaned = re.sub(r"[\s\-().\u00a0]", "", phone.strip())
    if cleaned.startswith("00"):
        cleaned = "+" + cleaned[2:]
    plus, digits = cleaned.startswith("+"), cleaned.lstrip("+")
    if not digits.isascii() or not digits.isdigit():
        raise PersonalDataError("not a phone number: use digits, optionally with a leading + and separators")
    if not plus:
        if len(digits) == 11 and digits.startswith("1"):
            digits = "86" + digits
        elif digits.startswith("0") and 10 <= len(digits) <= 12:
            digits = "86" + digits[1:]
    if not 8 <= len(digits) <= 15 or digits.startswith("0"):
        raise PersonalDataError(f"not a phone number: {len(digits)} digits with country code (8-15 expected)")
    return "+" + digits


def phone_hash(phone: str, keyring: Keyring) -> str:
    """The keyed hash stored for look-ups and de-duplication (same number, however typed, same hash)."""
    return keyring.lookup_hash(normalize_phone(phone))


async def set_phone(session: AsyncSession, customer: Customer, phone: str | None, keyring: Keyring) -> None:
    """Store (or, with None, erase) a customer's phone: ciphertext, key id, lookup hash, last 4 digits.

    Raises :class:`PersonalDataError` for something that is not a phone number. Async so that
    callers need not change if storing ever needs the store (it takes the session for that).
    """
    if phone is None:
        _clear_phone(customer)
        return
    normalized = normalize_phone(phone)
    customer.phone_enc, customer.phone_key = keyring.seal("phone", normalized)
    customer.phone_hash = keyring.lookup_hash(normalized)
    customer.phone_last4 = normalized[-4:]


def _clear_phone(customer: Customer) -> None:
    customer.phone_enc = customer.phone_key = customer.phone_hash = customer.phone_last4 = None


def _clear_birthday(customer: Customer) -> None:
    customer.birthday_enc = customer.birthday_key = customer.birthday_md = None


async def set_birthday(session: AsyncSession, customer: Customer, birthday: date | None, keyring: Keyring) -> None:
    """Store (or erase) the full birth date encrypted; ``birthday_md`` ("MM-DD") stays plain for
    birthday campaigns, which need nothing more."""
    if birthday is None:
        _clear_birthday(customer)
        return
    if isinstance(birthday, datetime) or not isinstance(birthday, date):
        raise PersonalDataError("a birthday must be a date")
    customer.birthday_enc, customer.birthday_key = keyring.seal("birthday", birthday.isoformat())
    customer.birthday_md = birthday.strftime("%m-%d")


async def find_by_phone(session: AsyncSession, phone: str, keyring: Keyring) -> Customer | None:
    """The (oldest) customer with this phone number; duplicates are merged into the oldest."""
    digest = phone_hash(phone, keyring)
    return (await session.scalars(
        select(Customer).where(Customer.phone_hash == digest).order_by(Customer.id).limit(1))).first()


async def phone_duplicates(session: AsyncSession) -> list[list[int]]:
    """Groups of customer ids sharing one phone (by hash), oldest first: candidates for merging."""
    dup = select(Customer.phone_hash).where(Customer.phone_hash.is_not(None)) \
        .group_by(Customer.phone_hash).having(func.count() > 1).subquery()
    rows = (await session.execute(
        select(Customer.phone_hash, Customer.id).where(Customer.phone_hash.in_(select(dup.c.phone_hash)))
        .order_by(Customer.phone_hash, Customer.id))).all()
    groups: dict[str | None, list[int]] = {}
    for digest, cid in rows:
        groups.setdefault(digest, []).append(cid)
    return list(groups.values())


class Sealed(Protocol):
    """What :func:`reveal` reads: a Customer, or a row of the customers table's columns."""

    @property
    def phone_enc(self) -> bytes | None: ...
    @property
    def phone_key(self) -> str | None: ...
    @property
    def birthday_enc(self) -> bytes | None: ...
    @property
    def birthday_key(self) -> str | None: ...


def reveal(customer: Sealed, keyring: Keyring) -> dict[str, Any]:
    """Decrypted personal values (``phone``, ``birthday`` as a date), for export and authorized views.
    Callers that show them to staff write an audit entry (see scrm.audit)."""
    phone = birthday = None
    if customer.phone_enc is not None and customer.phone_key:
        phone = keyring.open("phone", customer.phone_enc, customer.phone_key)
    if customer.birthday_enc is not None and customer.birthday_key:
        birthday = date.fromisoformat(keyring.open("birthday", customer.birthday_enc, customer.birthday_key))
    return {"phone": phone, "birthday": birthday}


def masked_phone(customer: Customer) -> str | None:
    """What staff screens show: ``*******5678``."""
    return f"*******{customer.phone_last4}" if customer.phone_last4 else None


async def rotate_batch(session: AsyncSession, keyring: Keyring, batch: int) -> int:
    """Re-encrypt up to ``batch`` customers whose values are under an older key; returns how many.

    Each batch is its own transaction at the caller, and rows carry their key id, so an interrupted
    rotation resumes where it stopped by simply running again.
    """
    current = keyring.current
    stale = or_(
        (Customer.phone_enc.is_not(None)) & (Customer.phone_key != current),
        (Customer.birthday_enc.is_not(None)) & (Customer.birthday_key != current),
    )
    rows = (await session.scalars(
        select(Customer).where(stale).order_by(Customer.id).limit(batch).with_for_update())).all()
    for customer in rows:
        values = reveal(customer, keyring)
        if customer.phone_key != current and values["phone"] is not None:
            customer.phone_enc, customer.phone_key = keyring.seal("phone", values["phone"])
        if customer.birthday_key != current and values["birthday"] is not None:
            customer.birthday_enc, customer.birthday_key = keyring.seal("birthday", values["birthday"].isoformat())
    await session.flush()
    return len(rows)


async def stale_count(session: AsyncSession, keyring: Keyring) -> int:
    """Customers with a value not yet under the current key."""
    current = keyring.current
    return int(await session.scalar(select(func.count()).select_from(Customer).where(or_(
        (Customer.phone_enc.is_not(None)) & (Customer.phone_key != current),
        (Customer.birthday_enc.is_not(None)) & (Customer.birthday_key != current),
    ))) or 0)


def scrub_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """An event payload fit for the touchpoints table: a shared phone keeps only its last 4 digits."""
    if "phone" not in payload:
        return payload
    clean = {k: v for k, v in payload.items() if k != "phone"}
    phone = payload["phone"]
    if isinstance(phone, str):
        digits = re.sub(r"\D", "", phone)
        clean["phone_last4"] = digits[-4:] if len(digits) >= 4 else None
    return clean


async def capture_phone(session: AsyncSession, customer: Customer, phone: str, keyring: Keyring, channel: str,
                        now: datetime) -> bool:
    """A phone the person shared themselves: stored encrypted with a record of their consent to keep it.
    Something that is not a phone number is dropped (logged without the value); returns whether stored."""
    from scrm import consent

    try:
        await set_phone(session, customer, phone, keyring)
    except PersonalDataError as exc:
        log.warning("customer #%s shared a contact that is not a phone number (%s); not stored", customer.id, exc)
        return False
    consent.record(session, customer.id, channel, True, "contact_shared", now, purpose=consent.PHONE)
    return True


async def open_keyring(config: Config, sessions: async_sessionmaker[AsyncSession], now: datetime) -> Keyring:
    """Load the keyring and check it against the store; a new, empty store gets a key file written.

    Also seals any plaintext values the pre-encryption schema left behind (migration 0005).
    """
    try:
        keyring = Keyring.from_config(config)
    except KeyringMissing:
        async with sessions() as session:
            used = await session.scalar(select(PrivacyKey.key_id).limit(1)) is not None
        if used:  # values were encrypted before: a fresh key could never read them
            raise
        assert config.privacy.key_file is not None
        path = config.resolve(config.privacy.key_file)
        try:
            write_key_file(path)
            log.warning("wrote a new privacy key file %s: back it up, the store's phone numbers and birthdays "
                        "cannot be read without it", path)
        except FileExistsError:
            pass  # another process of this service wrote it first
        except OSError as exc:
            raise KeyringError(f"privacy.key_file: cannot write {path} ({exc.strerror})") from None
        keyring = Keyring.from_config(config)
    async with sessions() as session, session.begin():
        await keyring.verify(session, now)
        await _seal_pending(session, keyring)
    return keyring


async def _seal_pending(session: AsyncSession, keyring: Keyring) -> int:
    rows = (await session.scalars(select(PersonalPlaintextPending))).all()
    for row in rows:
        customer = await session.get(Customer, row.customer_id)
        if customer is not None:
            if row.phone:
                try:
                    await set_phone(session, customer, row.phone, keyring)
                except PersonalDataError:
                    log.warning("customer #%s: an old phone value is not a phone number; dropped", row.customer_id)
            if row.birthday:
                await set_birthday(session, customer, row.birthday, keyring)
        await session.delete(row)
    if rows:
        log.info("sealed %d customers' plaintext personal values left by the old schema", len(rows))
    await session.flush()
    return len(rows)


async def check_store(config: Config) -> Keyring:
    """What ``scrm run`` does before serving: migrate and open the keyring, so a missing or wrong key
    is a clear error at the prompt instead of a traceback from inside the web server."""
    from scrm.clock import SystemClock
    from scrm.store.engine import make_engine, make_sessionmaker
    from scrm.store.migrate import upgrade

    engine = make_engine(config.store_url, config.store.schema_name)
    try:
        await upgrade(engine)
        return await open_keyring(config, make_sessionmaker(engine), SystemClock().now())
    finally:
        await engine.dispose()


async def redact_messages(session: AsyncSession, before: datetime, customer_id: int | None = None) -> int:
    """Blank message texts older than ``before`` (or all of one customer's): ``text`` -> NULL and
    ``payload.redacted`` = true; the rest of each touchpoint (customer, kind, direction, time,
    campaign) stays. Message counts, active customers, new customers, funnels, attribution, stages,
    cohorts and tags do not change.

    Opt-outs in reports do: an opt-out by chat word ("退订") is counted by the text of the bot's reply
    (``rollups.OPT_OUT_REPLY_ROW``), so once that reply is blanked it no longer counts on its day in
    /report, digests and ``scrm report`` (the rolled-up days holding such replies are invalidated
    first, so built and live figures agree). The customer stays opted out, and platform opt-outs
    (unsubscribe, blocked, contact removed) still count. The texts are also gone from the 360° view
    and from touchpoint exports. One set-based UPDATE; returns rows redacted."""
    from sqlalchemy import literal_column, update

    from scrm import rollups
    from scrm.store.models import Touchpoint

    payload: ColumnElement[Any]
    if dialect_name(session) == "postgresql":
        payload = literal_column("""(CAST(touchpoints.payload AS jsonb) || '{"redacted": true}'::jsonb)::json""")
    else:
        payload = func.json_set(Touchpoint.payload, "$.redacted", func.json("true"))
    which = Touchpoint.customer_id == customer_id if customer_id is not None else Touchpoint.created_at < before
    await rollups.before_redaction(session, which)
    query = update(Touchpoint).where(Touchpoint.text.is_not(None), which).values(text=None, payload=payload)
    result = await session.execute(query.execution_options(synchronize_session=False))
    return rowcount(result) or 0


def retention_job(service: Runtime) -> Callable[[], Awaitable[int]]:
    """The nightly job: redact message texts older than ``privacy.message_retention_days``."""

    async def redact_old_messages() -> int:
        days = service.config.privacy.message_retention_days
        if days is None:
            return 0
        async with service.sessions() as session, session.begin():
            count = await redact_messages(session, service.clock.now() - timedelta(days=days))
        if count:
            log.info("retention: redacted %d message texts older than %d days", count, days)
        return count

    return redact_old_messages


PERSONAL_PAYLOAD_KEYS = frozenset({"phone", "phone_last4", "name", "display_name", "contact", "text", "address"})


async def erase(session: AsyncSession, customer: Customer, now: datetime) -> dict[str, int]:
    """Erase a person: personal values (ciphertext and derived), name, attributes, message texts and
    channel ids go; aggregates (orders, coupons, tags, touchpoint metadata, consent history,
    the audit log) stay, so reports keep their figures except the person's chat opt-outs, which
    are counted by reply text (see :func:`redact_messages`). Planned sends to them are cancelled."""
    from sqlalchemy import String, cast, delete, literal, update

    from scrm import rollups
    from scrm.store.models import Delivery, Identity, InboundJournal, Touchpoint
    from scrm.webhooks import events

    await rollups.before_redaction(session, Touchpoint.customer_id == customer.id)
    _clear_phone(customer)
    _clear_birthday(customer)
    customer.display_name = None
    customer.attributes = {"erased_at": now.isoformat(timespec="seconds")}
    customer.opted_out = True
    texts = 0
    for tp in (await session.scalars(select(Touchpoint).where(Touchpoint.customer_id == customer.id))).all():
        if tp.text is not None or PERSONAL_PAYLOAD_KEYS & set(tp.payload):
            texts += tp.text is not None
            tp.text = None
            tp.payload = {**{k: v for k, v in tp.payload.items() if k not in PERSONAL_PAYLOAD_KEYS}, "redacted": True}
    cancelled = rowcount(await session.execute(
        update(Delivery).where(Delivery.customer_id == customer.id, Delivery.status == "planned")
        .values(status="skipped", reason="erased", finished_at=now).execution_options(synchronize_session=False)
    )) or 0
    await session.execute(update(Delivery).where(Delivery.customer_id == customer.id)
                          .values(text=None, external_id="erased").execution_options(synchronize_session=False))
    # The inbound journal keeps the person's applied messages for a few days (scrm.ingest): they go now.
    for channel, account, external_id in (await session.execute(
            select(Identity.channel, Identity.account, Identity.external_id)
            .where(Identity.customer_id == customer.id))).all():
        await session.execute(delete(InboundJournal).where(
            InboundJournal.channel == channel, InboundJournal.account == account,
            InboundJournal.external_id == external_id, InboundJournal.applied_at.is_not(None)))
    # The identity row stays (reports count customers by channel) but no longer names the person; their
    # next message, if any, starts a new customer.
    identities = rowcount(await session.execute(
        update(Identity).where(Identity.customer_id == customer.id)
        .values(external_id=literal("erased:") + cast(Identity.id, String))
        .execution_options(synchronize_session=False))) or 0
    await events.redact(session, customer.id)
    events.emit(session, "customer.erased", customer.id, {"identities": identities}, now)
    await session.flush()
    return {"texts": texts, "identities": identities, "cancelled": cancelled}


async def merge(session: AsyncSession, keep: Customer, dup: Customer) -> None:
    """Fold ``dup`` (the same person, e.g. found by phone hash on another channel) into ``keep``:
    identities, history, tags, coupons, orders and consents move; ``dup`` is left empty, marked
    ``merged_into``. Set-based per table."""
    from sqlalchemy import delete, update

    from scrm import rollups
    from scrm.store.models import Consent as ConsentRow
    from scrm.store.models import (
        Conversion,
        CouponCode,
        CustomerTag,
        Delivery,
        GroupMember,
        Identity,
        Redemption,
        TagScore,
        Touchpoint,
        TrackedLink,
    )

    if keep.id == dup.id:
        raise ValueError("cannot merge a customer into itself")
    await rollups.before_merge(session, keep, dup)
    for tag_model in (CustomerTag, TagScore):  # unique per (customer, tag): keep's row wins
        await session.execute(delete(tag_model).where(
            tag_model.customer_id == dup.id,
            tag_model.tag_id.in_(select(tag_model.tag_id).where(tag_model.customer_id == keep.id).scalar_subquery())))
    await session.execute(delete(GroupMember).where(
        GroupMember.customer_id == dup.id,
        GroupMember.group_id.in_(select(GroupMember.group_id).where(GroupMember.customer_id == keep.id)
                                 .scalar_subquery())))
    for model in (Identity, Touchpoint, CustomerTag, TagScore, GroupMember, Delivery, CouponCode, Redemption,
                  Conversion, ConsentRow, TrackedLink):
        await session.execute(update(model).where(model.customer_id == dup.id).values(customer_id=keep.id)
                              .execution_options(synchronize_session=False))
    if keep.phone_enc is None and dup.phone_enc is not None:
        keep.phone_enc, keep.phone_key, keep.phone_hash, keep.phone_last4 = \
            dup.phone_enc, dup.phone_key, dup.phone_hash, dup.phone_last4
    if keep.birthday_enc is None and dup.birthday_enc is not None:
        keep.birthday_enc, keep.birthday_key, keep.birthday_md = dup.birthday_enc, dup.birthday_key, dup.birthday_md
    keep.display_name = keep.display_name or dup.display_name
    keep.first_seen_at = min(keep.first_seen_at, dup.first_seen_at)
    keep.last_seen_at = max(keep.last_seen_at, dup.last_seen_at)
    if dup.last_inbound_at and (keep.last_inbound_at is None or dup.last_inbound_at > keep.last_inbound_at):
        keep.last_inbound_at = dup.last_inbound_at
    keep.opted_out = keep.opted_out or dup.opted_out
    keep.attributes = {**dup.attributes, **keep.attributes}
    _clear_phone(dup)
    _clear_birthday(dup)
    dup.display_name = None
    dup.attributes = {"merged_into": keep.id}
    dup.opted_out = True
    await session.flush()


async def dedupe_by_phone(session: AsyncSession) -> list[tuple[int, int]]:
    """Merge every group of customers sharing a phone into its oldest; returns (kept, merged) pairs."""
    merged: list[tuple[int, int]] = []
    for group in await phone_duplicates(session):
        keep = await session.get(Customer, group[0])
        assert keep is not None
        for cid in group[1:]:
            dup = await session.get(Customer, cid)
            assert dup is not None
            await merge(session, keep, dup)
            merged.append((keep.id, cid))
    return merged


async def rotate(sessions: async_sessionmaker[AsyncSession], keyring: Keyring, batch: int = 500,
                 on_batch: Callable[[int], None] | None = None, max_batches: int | None = None) -> int:
    """Re-encrypt everything under the current key, one committed transaction per batch.

    Stopping at any point (Ctrl-C, a crash, ``max_batches``) loses nothing: finished batches are
    committed and the rest still carry their old key id, so running again resumes. Returns rows done.
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    done = batches = 0
    while max_batches is None or batches < max_batches:
        async with sessions() as session, session.begin():
            count = await rotate_batch(session, keyring, batch)
        if count == 0:
            break
        done, batches = done + count, batches + 1
        if on_batch is not None:
            on_batch(count)
    return done


async def export_data(session: AsyncSession, customer: Customer, keyring: Keyring) -> dict[str, Any]:
    """Everything the store holds about one person, readable: their right to see their data."""
    from scrm import consent
    from scrm.profile import customer_view

    view = await customer_view(session, customer, touchpoints=1_000_000)
    values = reveal(customer, keyring)
    return {
        "customer": view,
        "personal": {
            "phone": values["phone"],
            "birthday": values["birthday"].isoformat() if values["birthday"] else None,
            "display_name": customer.display_name,
            "timezone": customer.timezone,
            "locale": customer.locale,
            "attributes": customer.attributes,
        },
        "consents": [
            {"channel": c.channel, "purpose": c.purpose, "granted": c.granted, "source": c.source, "detail": c.detail,
             "at": c.created_at.isoformat(timespec="seconds")}
            for c in await consent.history(session, customer.id)
        ],
    }
