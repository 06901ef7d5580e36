"""What the API's handlers share: finding the customer a path or a body names, and timestamps as text."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from scrm.api import models as m
from scrm.api.framework import ApiError, Call
from scrm.customers import (
    BadCustomerRef,
    CustomerRefError,
    customer_of,
    find_by_ref,
    identity_ref,
    parse_ref,
    phone_ref,
)
from scrm.store.models import Customer

REF_PARAM = {"ref": "The store id (``42`` or ``#42``) or a channel identity (``wechat:oAbC123``, or "
                        "``wechat:brand:oAbC123`` naming the account), URL-encoded."}


async def resolve(call: Call, session: AsyncSession, ref: m.CustomerRef, field: str = "customer") -> Customer:
    """The customer a body's ``customer`` names, looked up like every other customer reference."""
    channels = call.service.config.channels
    try:
        if ref.id is not None:
            wanted = parse_ref(str(ref.id), channels)
        elif ref.phone is not None:
            wanted = phone_ref(ref.phone)
        else:
            assert ref.channel is not None and ref.external_id is not None
            wanted = identity_ref(ref.channel, ref.external_id, ref.account, channels)
    except BadCustomerRef as exc:
        where = f"body.{field}" + (".phone" if ref.phone is not None else "")
        raise ApiError(422, "validation_error", f"{where}: {exc}", [{"field": where, "problem": str(exc)}]) from None
    try:
        return await customer_of(session, wanted, call.service.keyring)
    except CustomerRefError as exc:
        raise ApiError(404, "customer_not_found", f"body.{field}: {exc}") from None


async def by_path(call: Call, session: AsyncSession) -> Customer:
    try:
        return await find_by_ref(session, call.params["ref"], call.service.config.channels)
    except CustomerRefError as exc:
        raise ApiError(404, "customer_not_found", str(exc)) from None


def iso(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


