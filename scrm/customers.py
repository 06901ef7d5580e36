"""Customers and their channel identities, and the touchpoints that record every interaction."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.messages import OutboundMessage, SendResult
from scrm.store.dialect import json_values
from scrm.store.models import Customer, Identity, Touchpoint
from scrm.webhooks import events

if TYPE_CHECKING:
    from scrm.keyring import Keyring

#: Store ids are 32-bit integers on PostgreSQL: a larger number names no customer.
MAX_ID = 2**31 - 1
#: The longest channel and external id the store keeps (``identities``).
MAX_CHANNEL, MAX_EXTERNAL_ID = 16, 128
REF_FORMS = "#id, channel:id or channel:account:id"
_SHOWN = 160  # characters of a reference quoted back in an error


async def find_customer(session: AsyncSession, channel: str, external_id: str, account: str | None = None) -> Customer | None:
    query = select(Customer).join(Identity).where(Identity.channel == channel, Identity.external_id == external_id)
    if account is not None:
        query = query.where(Identity.account == account)
    return (await session.scalars(query.order_by(Identity.id).limit(1))).first()


class CustomerRefError(LookupError):
    """Why a customer reference names no single customer. Its text is the one message every surface
    (CLI, staff chat, API, file imports) shows, so the same mistake reads the same wherever it was typed."""


class BadCustomerRef(CustomerRefError):
    """Text that is not a customer reference, or a form not accepted where it was given."""


class UnknownCustomer(CustomerRefError):
    """A well-formed reference that no customer answers to."""


class AmbiguousCustomer(CustomerRefError):
    """``channel:id`` without an account, where the id is different customers' on several accounts."""


@dataclass(frozen=True)
class CustomerRef:
    """Who an operator, a file or an API client means: a store id, a phone number or a channel
    identity. Made by :func:`parse_ref` (or :func:`identity_ref`, :func:`phone_ref`), looked up by
    :func:`resolve_refs`; hashable, so a batch of orders looks each distinct reference up once."""

    #: How errors quote it (a phone number only by its last 4 digits).
    text: str
    id: int | None = None
    channel: str | None = None
    #: None when left out (see :func:`resolve_refs`).
    account: str | None = None
    external_id: str | None = None
    phone: str | None = field(default=None, repr=False)
    #: The channel's configured accounts when the reference was read.
    accounts: tuple[str, ...] = ()


def parse_ref(text: str, channels: Mapping[str, Mapping[str, Any]]) -> CustomerRef:
    """Read a customer reference: the one reader behind every command, chat command, API path and import.

    Forms: ``#12`` or ``12`` (store id), ``channel:id``, ``channel:account:id``, and ``phone:<number>``
    (found by its keyed hash, where the caller has the keyring). ``channels`` is the config's
    ``[channels.<type>.<account>]`` tables. External ids contain ``:`` on some channels, so the middle
    part is an account only when it is a configured account of that channel: with
    ``[channels.console.local]``, ``console:local:x`` is id ``x`` on account ``local``, while
    ``console:a:b`` (no account ``a``) is id ``a:b`` with the account left out. Raises
    :class:`BadCustomerRef` for anything else.
    """
    text = text.strip()
    digits = text.removeprefix("#")
    if digits.isascii() and digits.isdigit():  # not "¹" or "②": digits to str.isdigit, not to int()
        return CustomerRef(text[:_SHOWN], id=int(digits) if len(digits) <= 10 else MAX_ID + 1)
    channel, sep, rest = text.partition(":")
    if not sep or not channel or not rest:
        raise BadCustomerRef(f"not a customer reference: {text[:_SHOWN]!r} (use {REF_FORMS})")
    channel = channel.lower()
    if channel == "phone":
        return phone_ref(rest)
    account, sep, external_id = rest.partition(":")
    if not sep or account not in (channels.get(channel) or {}):
        account, external_id = "", rest
    return identity_ref(channel, external_id, account or None, channels, text)


def identity_ref(channel: str, external_id: str, account: str | None, channels: Mapping[str, Mapping[str, Any]],
                 text: str | None = None) -> CustomerRef:
    """A channel identity as a reference (the API's ``{"channel", "external_id", "account"}`` too)."""
    text = (text or ":".join(p for p in (channel, account, external_id) if p is not None))[:_SHOWN]
    if not external_id or len(external_id) > MAX_EXTERNAL_ID or len(channel) > MAX_CHANNEL:
        raise BadCustomerRef(f"not a customer reference: {text!r} (a channel of at most {MAX_CHANNEL} characters "
                             f"and an id of 1 to {MAX_EXTERNAL_ID})")
    return CustomerRef(text, channel=channel, account=account, external_id=external_id,
                       accounts=tuple(channels.get(channel) or ()))


def phone_ref(phone: str) -> CustomerRef:
    """A phone number as a reference; errors show only its last 4 digits."""
    from scrm.personal import PersonalDataError, normalize_phone

    try:
        normal = normalize_phone(phone)
    except PersonalDataError as exc:
        raise BadCustomerRef(f"phone: {exc}") from None
    return CustomerRef(f"phone:…{normal[-4:]}", phone=normal)


async def resolve_refs(session: AsyncSession, refs: Collection[CustomerRef],
                       keyring: Keyring | None = None) -> dict[CustomerRef, int | CustomerRefError]:
    """Each reference's customer id, or why it names none, in a few set-based queries for any number.

    A channel identity whose account was left out is looked up on the channel's only configured
    account; when the channel has several (or none), or the id is not on that one (the config changed
    since), on any account of the channel, and different customers there make it ambiguous. A phone
    number is the oldest customer with it (:mod:`scrm.identity` merges the others into them); it needs
    the ``keyring``, and without one it is refused (numbers stay out of URLs, chat and files).
    """
    out: dict[CustomerRef, int | CustomerRefError] = {}
    by_id = [r for r in refs if r.id is not None]
    wanted_ids = sorted({r.id for r in by_id if r.id is not None and r.id <= MAX_ID})
    existing: set[int] = set()
    if wanted_ids:
        existing.update((await session.scalars(select(Customer.id).where(
            Customer.id.in_(json_values(session, "ids", integers=True))), {"ids": json.dumps(wanted_ids)})).all())
    for r in by_id:
        out[r] = r.id if r.id in existing else UnknownCustomer(f"no customer {r.text}")
    await _resolve_phones(session, [r for r in refs if r.phone is not None], keyring, out)
    exact: dict[tuple[str, str], dict[str, list[CustomerRef]]] = defaultdict(lambda: defaultdict(list))
    loose: list[CustomerRef] = []
    for r in refs:
        if r.channel is None or r.external_id is None:
            continue
        account = r.account or (r.accounts[0] if len(r.accounts) == 1 else None)
        if account is None:
            loose.append(r)
        else:
            exact[(r.channel, account)][r.external_id].append(r)
    for (channel, account), named in exact.items():
        for external_id, customer_id in (await session.execute(
                select(Identity.external_id, Identity.customer_id).where(
                    Identity.channel == channel, Identity.account == account,
                    Identity.external_id.in_(json_values(session, "ids"))), {"ids": json.dumps(list(named))})).all():
            for r in named[external_id]:
                out[r] = customer_id
        for group in named.values():
            for r in group:
                if r not in out:
                    if r.account is None:
                        loose.append(r)
                    else:
                        out[r] = UnknownCustomer(f"no customer {r.text}")
    await _resolve_any_account(session, loose, out)
    return out


async def _resolve_phones(session: AsyncSession, refs: list[CustomerRef], keyring: Keyring | None,
                          out: dict[CustomerRef, int | CustomerRefError]) -> None:
    if not refs:
        return
    if keyring is None:
        for r in refs:
            out[r] = BadCustomerRef(f"{r.text}: a phone number is not accepted here "
                                    "(scrm customers show phone:<number> or POST /api/v1/customers/lookup)")
        return
    from scrm.personal import phone_hash

    hashed = {r: phone_hash(r.phone, keyring) for r in refs if r.phone is not None}
    first: dict[str, int] = {}
    # Sorted here, not by ORDER BY id: SQLite would then walk every customer in id order instead of
    # looking the hashes up in their index (a million customers: ~200 ms instead of ~1 ms).
    rows = (await session.execute(
        select(Customer.phone_hash, Customer.id).where(Customer.phone_hash.in_(json_values(session, "hashes"))),
        {"hashes": json.dumps(sorted(set(hashed.values())))})).all()
    for digest, customer_id in sorted(rows, key=lambda row: row[1]):
        if digest is not None:
            first.setdefault(digest, customer_id)
    for r, digest in hashed.items():
        out[r] = first[digest] if digest in first else UnknownCustomer(f"no customer {r.text}")


async def _resolve_any_account(session: AsyncSession, refs: list[CustomerRef],
                               out: dict[CustomerRef, int | CustomerRefError]) -> None:
    by_channel: dict[str, set[str]] = defaultdict(set)
    for r in refs:
        assert r.channel is not None and r.external_id is not None
        by_channel[r.channel].add(r.external_id)
    owners: dict[tuple[str, str], dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for channel, external_ids in by_channel.items():
        for external_id, account, customer_id in (await session.execute(
                select(Identity.external_id, Identity.account, Identity.customer_id)
                .where(Identity.channel == channel, Identity.external_id.in_(json_values(session, "ids"))),
                {"ids": json.dumps(sorted(external_ids))})).all():
            owners[(channel, external_id)][customer_id].append(account)
    for r in refs:
        assert r.channel is not None and r.external_id is not None
        found = owners.get((r.channel, r.external_id), {})
        if len(found) == 1:
            out[r] = next(iter(found))
        elif not found:
            out[r] = UnknownCustomer(f"no customer {r.text}")
        else:
            accounts = ", ".join(sorted(a for names in found.values() for a in names))
            out[r] = AmbiguousCustomer(f"{r.text} names different customers on {r.channel} accounts {accounts}: "
                                       f"use {r.channel}:<account>:{r.external_id}"[:2 * _SHOWN])


async def customer_of(session: AsyncSession, ref: CustomerRef, keyring: Keyring | None = None) -> Customer:
    """The one customer ``ref`` names; raises :class:`CustomerRefError` with the message to show."""
    found = (await resolve_refs(session, [ref], keyring))[ref]
    if isinstance(found, CustomerRefError):
        raise found
    customer = await session.get(Customer, found)
    assert customer is not None
    return customer


async def find_by_ref(session: AsyncSession, text: str, channels: Mapping[str, Mapping[str, Any]],
                      keyring: Keyring | None = None) -> Customer:
    """:func:`parse_ref` then :func:`customer_of`: the customer an operator named, or CustomerRefError."""
    return await customer_of(session, parse_ref(text, channels), keyring)


def touchpoint(
    session: AsyncSession,
    *,
    customer_id: int | None,
    channel: str,
    account: str,
    direction: str,
    kind: str,
    now: datetime,
    text: str | None = None,
    payload: dict[str, Any] | None = None,
    platform_msg_id: str | None = None,
    campaign: str | None = None,
    delivery_id: int | None = None,
    actor: str | None = None,
) -> Touchpoint:
    """Append one touchpoint to the session; the caller's transaction commits it."""
    row = Touchpoint(
        customer_id=customer_id,
        actor=actor,
        channel=channel,
        account=account,
        direction=direction,
        kind=kind,
        text=text,
        payload=payload or {},
        platform_msg_id=platform_msg_id,
        campaign=campaign,
        delivery_id=delivery_id,
        created_at=now,
    )
    session.add(row)
    if events.active(session):
        events.emit_touchpoint(session, {"customer_id": customer_id, "channel": channel, "account": account,
                                         "direction": direction, "kind": kind, "text": text, "payload": payload,
                                         "campaign": campaign, "delivery_id": delivery_id, "actor": actor,
                                         "created_at": now})
    return row


def staff_message_touchpoint(session: AsyncSession, message: OutboundMessage, result: SendResult, kind: str,
                             now: datetime, **payload: Any) -> Touchpoint:
    """Record a message the service sent to a staff member (digest, alert) and how the send went."""
    return touchpoint(session, customer_id=None, actor=staff_actor(message.channel, message.external_id),
                      channel=message.channel, account=message.account, direction="out", kind=kind, now=now,
                      text=message.text, payload={"status": result.status, "reason": result.reason,
                                                  "platform_msg_id": result.platform_msg_id, **payload})


def staff_actor(channel: str, external_id: str) -> str:
    """How staff touchpoints name who acted: ``staff:<channel>:<id on that channel>``."""
    return f"staff:{channel}:{external_id}"


async def staff_last_inbound(session: AsyncSession, channel: str, account: str, external_id: str) -> datetime | None:
    """When this staff member last wrote to the account: WeChat lets the service message them for 48
    hours after, as it does customers (whose time is ``Customer.last_inbound_at``)."""
    return await session.scalar(select(func.max(Touchpoint.created_at)).where(
        Touchpoint.actor == staff_actor(channel, external_id), Touchpoint.account == account,
        Touchpoint.direction == "in"))
