"""One person, one customer: merging the customers that two channels created for the same person.

By a verified phone (a customer sharing their own number, e.g. Telegram's contact button) or by an
operator (``scrm customers merge``). The data moves with :func:`scrm.personal.merge`; the merge
itself is a touchpoint on the customer that remains.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.customers import touchpoint
from scrm.personal import merge
from scrm.store.models import Customer


async def merge_customers(session: AsyncSession, keep: Customer, dup: Customer, by: str, now: datetime) -> None:
    await merge(session, keep, dup)
    touchpoint(session, customer_id=keep.id, actor=by, channel="system", account="-", direction="internal",
               kind="customers_merged", now=now, payload={"merged": dup.id, "by": by})


async def merge_by_verified_phone(session: AsyncSession, customer: Customer, by: str, now: datetime) -> Customer:
    """After ``customer`` verified their phone: fold them into the oldest customer with the same
    number (or fold younger ones into them); returns the customer that remains."""
    if customer.phone_hash is None:
        return customer
    same = (await session.scalars(select(Customer).where(
        Customer.phone_hash == customer.phone_hash, Customer.id != customer.id).order_by(Customer.id))).all()
    if not same:
        return customer
    keep = min([customer, *same], key=lambda c: c.id)
    for dup in [customer, *same]:
        if dup.id != keep.id:
            await merge_customers(session, keep, dup, by, now)
    return keep
