"""The privacy keys: which key seals new values, which opened the old ones, and the lookup key.

Key material, in a key file or ``SCRM_PRIVACY__KEY``: whitespace- or comma-separated entries
``<id>:<base64 of 32 bytes>``; the entry with id ``lookup`` is the HMAC key, the others encrypt and
the last one (or ``privacy.current_key``) encrypts new values. What is sealed with them, and where,
is :mod:`scrm.personal`'s business.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import or_, select
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


class KeyringMissing(KeyringError):
    """The configured key file does not exist (a new store may get one written; a used store may not)."""


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
            raise KeyringMissing(f"privacy.key_file: {path} does not exist (`scrm keys init` writes one; "
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
        """Check the keyring against the store's check values (recording check values for new keys).

        A wrong key is caught here, at start, by a check value that fails to decrypt, instead of
        later by values that cannot be read or lookups that silently find nobody.
        """
        from scrm.store.dialect import insert_ignore

        new = [{"key_id": LOOKUP_ID, "check_value": self.lookup_hash(_CHECK_PLAINTEXT.decode()).encode(),
                "created_at": now}]
        for key_id, aead in self._aead.items():
            nonce = secrets.token_bytes(_NONCE)
            new.append({"key_id": key_id, "check_value": nonce + aead.encrypt(nonce, _CHECK_PLAINTEXT, b"check"),
                        "created_at": now})
        await insert_ignore(session, PrivacyKey.__table__, new)
        for row in (await session.execute(select(PrivacyKey.key_id, PrivacyKey.check_value))).all():
            if row.key_id == LOOKUP_ID:
                if not hmac.compare_digest(row.check_value, new[0]["check_value"]):
                    raise KeyringError("the privacy lookup key is not the one this store was written with "
                                       "(wrong key file or SCRM_PRIVACY__KEY?)")
            elif row.key_id in self.keys:
                if self._check_fails(row.key_id, row.check_value):
                    raise KeyringError(f"privacy key {row.key_id!r} is not the one this store was written with "
                                       "(wrong key file or SCRM_PRIVACY__KEY?)")
            elif await _key_in_use(session, row.key_id):
                raise KeyringError(f"the store holds values encrypted with privacy key {row.key_id!r}, "
                                   "which is not in the keyring")

    def _check_fails(self, key_id: str, sealed: bytes) -> bool:
        try:
            return self._aead[key_id].decrypt(sealed[:_NONCE], sealed[_NONCE:], b"check") != _CHECK_PLAINTEXT
        except InvalidTag:
            return True


async def _key_in_use(session: AsyncSession, key_id: str) -> bool:
    found = await session.scalar(
        select(Customer.id).where(or_(Customer.phone_key == key_id, Customer.birthday_key == key_id)).limit(1))
    return found is not None
