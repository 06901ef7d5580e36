"""The one place personal data is written and read: phone numbers and birthdays, encrypted at rest.

Why one place: a plaintext phone number written by any other path (an import, an API, a log line)
would undo the whole point. Values are sealed with AES-GCM under a key from the environment or a key
file (never the store); each value keeps the id of its key beside it, so keys can be rotated row by
row. Lookups and de-duplication use a keyed hash (HMAC-SHA256 under a separate, stable lookup key),
and what campaigns and staff need in plain form is derived and minimal: the birthday's "MM-DD" and
the phone's last four digits.

Key material, in a key file or ``SCRM_PRIVACY__KEY``: whitespace- or comma-separated entries
``<id>:<base64 of 32 bytes>``; the entry with id ``lookup`` is the HMAC key, the others encrypt and
the last one (or ``privacy.current_key``) encrypts new values.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.store.models import Customer, PrivacyKey

if TYPE_CHECKING:
    from scrm.config import Config

LOOKUP_ID = "lookup"
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
_CHECK_PLAINTEXT = b"scrm key check v1"
_NONCE = 12


class KeyringError(Exception):
    """The privacy key is missing, malformed or does not open the store's data: the service must not
    start (it would write values nobody can read back, or fail to read what is there)."""


class PersonalDataError(ValueError):
    """A personal value that cannot be stored as given (e.g. not a phone number)."""


def _decode_key(key_id: str, text: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise KeyringError(f"key {key_id!r}: not base64") from None
    if len(raw) != 32:
        raise KeyringError(f"key {key_id!r}: must be 32 bytes (base64 of 32 random bytes), got {len(raw)}")
    return raw


def new_key_entry(key_id: str) -> str:
    """One ``id:base64`` key entry of fresh random bytes."""
    if not _KEY_ID.fullmatch(key_id):
        raise KeyringError(f"key id {key_id!r}: use 1-16 of A-Z a-z 0-9 _ -")
    return f"{key_id}:{base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()}"


def write_key_file(path: Path) -> None:
    """A new key file (lookup key + first encryption key), readable by its owner only."""
    text = ("# scrm privacy keys: keep this file secret and backed up; losing it loses the phone numbers\n"
            "# and birthdays in the store. `scrm keys new` adds a key, `scrm keys rotate` re-encrypts.\n"
            f"{new_key_entry(LOOKUP_ID)}\n{new_key_entry('k1')}\n")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


class Keyring:
    """Encryption keys by id, the current key id, and the lookup (HMAC) key."""

    def __init__(self, keys: dict[str, bytes], lookup: bytes, current: str) -> None:
        if current not in keys:
            raise KeyringError(f"current key {current!r} is not in the keyring (have: {', '.join(keys) or 'none'})")
        self.keys = dict(keys)
        self.lookup = lookup
        self.current = current
        self._aead = {key_id: AESGCM(key) for key_id, key in keys.items()}

    @classmethod
    def parse(cls, text: str, current: str | None = None, where: str = "key") -> Keyring:
        keys: dict[str, bytes] = {}
        lookup: bytes | None = None
        for line in text.splitlines():
            line = line.split("#", 1)[0]
            for entry in re.split(r"[\s,]+", line.strip()):
                if not entry:
                    continue
                key_id, sep, b64 = entry.partition(":")
                if not sep or not _KEY_ID.fullmatch(key_id):
                    raise KeyringError(f"{where}: entries are <id>:<base64 key>, got {entry[:6]!r}…")
                if key_id in keys or (key_id == LOOKUP_ID and lookup is not None):
                    raise KeyringError(f"{where}: key {key_id!r} appears twice")
                if key_id == LOOKUP_ID:
                    lookup = _decode_key(key_id, b64)
                else:
                    keys[key_id] = _decode_key(key_id, b64)
        if lookup is None:
            raise KeyringError(f"{where}: no {LOOKUP_ID!r} entry (the key for phone look-ups)")
        if not keys:
            raise KeyringError(f"{where}: no encryption key entry")
        return cls(keys, lookup, current or list(keys)[-1])

    @classmethod
    def from_config(cls, config: Config) -> Keyring:
        """From ``SCRM_PRIVACY__KEY`` / ``privacy.key`` if set, else from ``privacy.key_file``."""
        privacy = config.privacy
        if privacy.key:
            return cls.parse(privacy.key, privacy.current_key, "privacy.key")
        if not privacy.key_file:
            raise KeyringError("privacy: no key configured; set privacy.key_file (`scrm keys init` writes one) "
                               "or the environment variable SCRM_PRIVACY__KEY")
        path = config.resolve(privacy.key_file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KeyringError(f"privacy.key_file: {path} does not exist (`scrm keys init` writes one; "
                               "if the store already holds data, restore the file from backup)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyringError(f"privacy.key_file: cannot read {path} ({exc})") from None
        return cls.parse(text, privacy.current_key, f"privacy.key_file {path}")

    def seal(self, field: str, plaintext: str) -> tuple[bytes, str]:
        """Encrypt under the current key; the field name is bound in as associated data so a phone
        ciphertext cannot be passed off as a birthday."""
        nonce = secrets.token_bytes(_NONCE)
        sealed = nonce + self._aead[self.current].encrypt(nonce, plaintext.encode(), field.encode())
        return sealed, self.current

    def open(self, field: str, sealed: bytes, key_id: str) -> str:
        aead = self._aead.get(key_id)
        if aead is None:
            raise KeyringError(f"a {field} value is encrypted with key {key_id!r}, which is not in the keyring")
        try:
            return aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], field.encode()).decode()
        except InvalidTag:
            raise KeyringError(f"a {field} value does not decrypt with key {key_id!r} (wrong key?)") from None

    def lookup_hash(self, normalized: str) -> str:
        return hmac.new(self.lookup, normalized.encode(), hashlib.sha256).hexdigest()

    async def verify(self, session: AsyncSession, now: datetime) -> None:
        """Check the keyring against the store's check values (and record new keys' check values).

        A wrong key is caught here, at start, by a check value that fails to decrypt, instead of
        later by values that cannot be read or lookups that silently find nobody.
        """
        rows = {r.key_id: r for r in (await session.scalars(select(PrivacyKey))).all()}
        lookup_check = self.lookup_hash(_CHECK_PLAINTEXT.decode())
        if LOOKUP_ID in rows:
            if not hmac.compare_digest(rows[LOOKUP_ID].check, lookup_check.encode()):
                raise KeyringError("the privacy lookup key is not the one this store was written with (wrong key file?)")
        else:
            session.add(PrivacyKey(key_id=LOOKUP_ID, check=lookup_check.encode(), created_at=now))
        for key_id, row in rows.items():
            if key_id == LOOKUP_ID:
                continue
            if key_id in self.keys:
                self.open("check", row.check, key_id)
            elif await _key_in_use(session, key_id):
                raise KeyringError(f"the store holds values encrypted with key {key_id!r}, which is not in the keyring")
        for key_id in self.keys:
            if key_id not in rows:
                nonce = secrets.token_bytes(_NONCE)
                sealed = nonce + self._aead[key_id].encrypt(nonce, _CHECK_PLAINTEXT, b"check")
                session.add(PrivacyKey(key_id=key_id, check=sealed, created_at=now))
        await session.flush()


async def _key_in_use(session: AsyncSession, key_id: str) -> bool:
    found = await session.scalar(
        select(Customer.id).where(or_(Customer.phone_key == key_id, Customer.birthday_key == key_id)).limit(1))
    return found is not None


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
        customer.phone_enc = customer.phone_key = customer.phone_hash = customer.phone_last4 = None
        return
    normalized = normalize_phone(phone)
    customer.phone_enc, customer.phone_key = keyring.seal("phone", normalized)
    customer.phone_hash = keyring.lookup_hash(normalized)
    customer.phone_last4 = normalized[-4:]


async def set_birthday(session: AsyncSession, customer: Customer, birthday: date | None, keyring: Keyring) -> None:
    """Store (or erase) the full birth date encrypted; ``birthday_md`` ("MM-DD") stays plain for
    birthday campaigns, which need nothing more."""
    if birthday is None:
        customer.birthday_enc = customer.birthday_key = customer.birthday_md = None
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
    groups: dict[str, list[int]] = {}
    for digest, cid in rows:
        groups.setdefault(digest, []).append(cid)
    return list(groups.values())


def reveal(customer: Customer, keyring: Keyring) -> dict[str, Any]:
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
